"""backends.json: choosing a backend per role, our k-means / RVQ on pretrained features, token rates
and the token_info every shard records."""

from __future__ import annotations

import json

import pytest
import torch

from musiclm.checkpoint import CheckpointError, artifact_id
from musiclm.tokenizers import backends, pretrained
from musiclm.tokenizers.backends import BACKENDS_FILE, TokenRates
from musiclm.tokenizers.kmeans import KMeans
from musiclm.tokenizers.mulan import save_mulan_rvq
from musiclm.tokenizers.rvq import ResidualVQ
from musiclm.tokenizers.semantic import save_kmeans


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared CPU spinning OpenMP threads slow them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        name: pretrained.save_random_backend(name, root / name, "tiny")
        for name in ("encodec", "hubert", "clap")
    }


def tones(batch: int, seconds: float) -> torch.Tensor:
    t = torch.arange(int(seconds * 24000)) / 24000
    freqs = torch.linspace(220, 880, batch)[:, None]
    return 0.3 * torch.sin(2 * torch.pi * freqs * t) + 0.01 * torch.randn(
        batch, t.numel(), generator=torch.Generator().manual_seed(0)
    )


def fit_kmeans(ckpt, features: torch.Tensor, k: int = 8) -> None:
    kmeans = KMeans(k, features.shape[-1])
    kmeans.fit(features.reshape(-1, features.shape[-1]), iters=5, seed=0)
    save_kmeans(kmeans, ckpt / "semantic_kmeans", preset="hubert")


def fit_rvq(ckpt, dim: int, levels: int = 3, size: int = 8) -> None:
    x = torch.nn.functional.normalize(
        torch.randn(64, dim, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    save_mulan_rvq(ResidualVQ(dim, levels, size).fit(x, iters=5), ckpt / "mulan_rvq", preset="clap")


@pytest.fixture()
def ckpt(models, tmp_path):
    """A tokenizer folder with every role pretrained and the k-means / RVQ fitted on their outputs."""
    folder = tmp_path / "ckpt"
    backends.set_backend(folder, "acoustic", "encodec", models["encodec"])
    backends.set_backend(folder, "semantic", "hubert", models["hubert"], {"layer": 3})
    backends.set_backend(folder, "conditioner", "clap", models["clap"])
    fit_kmeans(folder, backends.load_semantic_features(folder).features(tones(2, 2.0)))
    fit_rvq(folder, 32)
    return folder


def test_set_backend_validates_keeps_the_other_roles_and_resets_to_ours(models, tmp_path):
    folder = tmp_path / "ckpt"
    path = backends.set_backend(folder, "acoustic", "encodec", models["encodec"], {"bandwidth": 3.0})
    backends.set_backend(folder, "semantic", "hubert", models["hubert"])
    assert path == folder / BACKENDS_FILE
    specs = backends.read_backends(folder)
    assert (specs["acoustic"].backend, specs["acoustic"].options) == ("encodec", {"bandwidth": 3.0})
    assert specs["semantic"].path == str(models["hubert"].resolve()) and not specs["conditioner"].pretrained
    before = path.read_text()
    with pytest.raises(CheckpointError, match="names clap but .* holds a hubert model"):
        backends.set_backend(folder, "conditioner", "clap", models["hubert"])
    with pytest.raises(ValueError, match="unknown option"):
        backends.set_backend(folder, "semantic", "hubert", models["hubert"], {"bandwidth": 6.0})
    with pytest.raises(ValueError, match="valid ones are w2vbert, hubert, w2v-bert-2.0"):
        backends.set_backend(folder, "semantic", "encodec", models["encodec"])
    with pytest.raises(ValueError, match="needs the path"):
        backends.set_backend(folder, "semantic", "hubert")
    assert path.read_text() == before  # nothing written by a refused change
    backends.set_backend(folder, "acoustic", "soundstream")
    specs = backends.read_backends(folder)
    assert not specs["acoustic"].pretrained and specs["semantic"].backend == "hubert"
    assert set(json.loads(path.read_text())) == {"semantic"}


def test_our_kmeans_and_rvq_tokenize_the_pretrained_outputs(ckpt):
    wav = tones(2, 1.5)
    semantic = backends.load_semantic(ckpt)
    tokens = semantic.tokens(wav)
    assert tokens.shape == (2, 1500 * 24 // 960) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < 8 and semantic.codebook_size == 8
    torch.testing.assert_close(semantic.features(wav), backends.load_semantic_features(ckpt).features(wav))

    conditioner = backends.load_conditioner(ckpt)
    audio, text = conditioner.tokens_audio(wav), conditioner.tokens_text(["calm piano", "loud drums"])
    assert audio.shape == text.shape == (2, 3) and audio.dtype == text.dtype == torch.long
    assert 0 <= min(audio.min(), text.min()) and max(audio.max(), text.max()) < 8
    assert torch.equal(audio, conditioner.tokens_audio(wav))


def test_a_kmeans_or_rvq_of_another_dimension_is_refused_with_the_fix(ckpt):
    fit_kmeans(ckpt, torch.randn(1, 40, 16))
    with pytest.raises(
        CheckpointError,
        match=r"fitted on 16-d features but the semantic backend 'hubert' "
        r"\(.*layer=3\) gives 32-d ones: refit it \(musiclm fit semantic_kmeans",
    ):
        backends.load_semantic(ckpt)
    fit_rvq(ckpt, 128)
    with pytest.raises(
        CheckpointError,
        match=r"fitted on 128-d embeddings but the conditioner backend 'clap' .* "
        r"gives 32-d ones: refit it",
    ):
        backends.load_conditioner(ckpt)


def test_token_rates_come_from_the_backends_and_the_fitted_quantizers(ckpt, tmp_path):
    assert backends.token_rates(tmp_path / "empty") == TokenRates()  # ours, the paper's rates
    rates = backends.token_rates(ckpt)
    assert (rates.acoustic_frame_rate, rates.acoustic_codebooks, rates.acoustic_codebook_size) == (
        75,
        8,
        1024,
    )
    assert (rates.coarse_levels, rates.frames_per_semantic, rates.acoustic_hop) == (4, 3, 320)
    assert (rates.semantic_frame_rate, rates.semantic_codebook_size) == (25, 8)
    assert (rates.conditioning_codebooks, rates.conditioning_codebook_size) == (3, 8)


def test_token_info_names_every_tokenizer_and_differs_when_one_does(ckpt, models):
    info = backends.token_info(ckpt)
    assert set(info) == {"acoustic", "semantic", "conditioner", "rates"}
    assert json.loads(json.dumps(info)) == info
    acoustic = info["acoustic"]
    assert acoustic["backend"] == "encodec" and acoustic["version"] == __import__("transformers").__version__
    assert acoustic["id"].startswith("encodec:") and acoustic["ids"] == {} and "rates" not in acoustic
    assert info["semantic"]["options"] == {"layer": 3}
    assert info["semantic"]["ids"] == {"semantic_kmeans": artifact_id(ckpt / "semantic_kmeans")}
    assert info["conditioner"]["ids"] == {"mulan_rvq": artifact_id(ckpt / "mulan_rvq")}
    assert info["rates"] == backends.token_rates(ckpt).to_dict()
    assert backends.token_info(ckpt) == info

    backends.set_backend(ckpt, "acoustic", "encodec", models["encodec"], {"bandwidth": 3.0})
    other = backends.token_info(ckpt)
    assert other["acoustic"]["options"]["bandwidth"] == 3.0 and other["rates"]["acoustic_codebooks"] == 4
    assert other != info


def test_describe_backends_is_a_short_table_and_shows_refusals(ckpt, tmp_path):
    text = backends.describe_backends(ckpt)
    lines = text.splitlines()
    assert lines[0].split() == ["role", "backend", "model", "details"] and len(lines) == 5
    assert "encodec" in lines[1] and "bandwidth=6.0 coarse_levels=4" in lines[1]
    assert "hubert" in lines[2] and "layer=3" in lines[2] and "semantic_kmeans/ 8 × 32-d" in lines[2]
    assert "mulan_rvq/ 3 × 8 on 32-d" in lines[3]
    assert lines[4] == (
        "tokens: acoustic 75 Hz × 8 × 1024 (coarse 4), semantic 25 Hz × 8, conditioning 3 × 8"
    )

    spec = backends.read_backends(ckpt)
    spec["acoustic"].path = str(tmp_path / "gone")
    backends.write_backends(ckpt, spec)
    text = backends.describe_backends(ckpt)
    assert "REFUSED: the 'encodec' model folder" in text and "tokens: unknown" in text
    ours = backends.describe_backends(tmp_path / "nothing")
    assert "soundstream/ (missing)" in ours and "semantic_kmeans/ not fitted" in ours
