import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from musiclm.checkpoint import CheckpointError, read_artifact_config
from musiclm.constants import MELODY_CODEBOOK_SIZE, MELODY_CODEBOOKS, MELODY_DIM
from musiclm.tokenizers.melody import (
    MelodyConfig,
    MelodyEmbedder,
    fit_melody_rvq,
    has_melody,
    load_melody,
    load_melody_tokenizer,
    melody_frame_count,
    melody_token_info,
    melody_tokens_of,
    save_melody,
    save_random_melody,
)

torch.set_num_threads(1)
SR = 24000


def _tones(seconds: float, count: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return torch.from_numpy(
        np.stack(
            [
                0.3 * np.sin(2 * np.pi * rng.uniform(150, 900) * t) + 0.05 * rng.standard_normal(t.shape)
                for _ in range(count)
            ]
        ).astype(np.float32)
    )  # [count, T]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("melody_ckpt")
    save_random_melody(folder, "tiny", seed=0)
    return folder


@pytest.fixture(scope="module")
def embedder() -> MelodyEmbedder:
    torch.manual_seed(0)
    return MelodyEmbedder(MelodyConfig.preset("tiny")).eval()


def test_presets_match_the_paper():
    paper = MelodyConfig.preset("paper")
    assert (paper.layers, paper.heads, paper.dim, paper.ff_dim, paper.embed_dim) == (
        12,
        6,
        512,
        1024,
        MELODY_DIM,
    )
    assert (
        (paper.rvq_codebooks, paper.rvq_codebook_size)
        == (MELODY_CODEBOOKS, MELODY_CODEBOOK_SIZE)
        == (24, 512)
    )
    assert (paper.window_seconds, paper.hop_seconds) == (4.0, 3.0) and paper.heads * paper.head_dim == 384
    model = MelodyEmbedder(paper)
    assert len(model.blocks) == 12 and model.blocks[0].mlp[0].out_features == 1024
    assert model.blocks[0].attn.qkv.out_features == 3 * 6 * 64 and model.head.out_features == 192
    params = sum(p.numel() for p in model.parameters())
    tiny = MelodyConfig.preset("tiny")
    tiny_params = sum(p.numel() for p in MelodyEmbedder(tiny).parameters())
    assert 20e6 < params < 25e6 and tiny_params < 1e6  # 22.7M and 0.47M
    assert tiny.embed_dim == 192 and (tiny.rvq_codebooks, tiny.rvq_codebook_size) == (8, 64)
    assert paper.num_patches == tiny.num_patches == 50
    with pytest.raises(ValueError, match="valid presets: tiny, paper"):
        MelodyConfig.preset("large")
    with pytest.raises(ValueError, match="patches"):
        MelodyConfig(patch_frames=7)


def test_frame_count_follows_the_paper():
    assert [melody_frame_count(s) for s in (10, 30, 4, 2.5, 6.9, 7, 0.1)] == [3, 9, 1, 1, 1, 2, 1]
    with pytest.raises(ValueError, match="positive"):
        melody_frame_count(0)


def test_embed_windows_with_a_3s_hop(embedder):
    wav = _tones(10.0, 2, 0)
    with torch.no_grad():
        emb = embedder.embed(wav)
        assert emb.shape == (2, 3, 192)
        assert torch.allclose(emb.norm(dim=-1), torch.ones(2, 3), atol=1e-5)
        # the third embedding is that of the window starting at 6 s
        third = embedder.embed_windows(wav[:, 6 * SR : 10 * SR])
        assert torch.allclose(emb[:, 2], third, atol=1e-5)
        # audio shorter than 4 s is zero-padded to one window
        short = embedder.embed(wav[:, : int(2.5 * SR)])
        padded = torch.nn.functional.pad(wav[:, : int(2.5 * SR)], (0, int(1.5 * SR)))
        assert short.shape == (2, 1, 192) and torch.allclose(
            short[:, 0], embedder.embed_windows(padded), atol=1e-5
        )
        # other audio, other embeddings
        assert float((emb[0, 0] - emb[1, 0]).norm()) > 1e-3


def test_bad_input_is_refused(embedder):
    with pytest.raises(ValueError, match="\\[B, T\\]"):
        embedder.embed(torch.zeros(SR))
    with pytest.raises(ValueError, match="too short"):
        embedder.embed(torch.zeros(1, 10))
    with pytest.raises(ValueError, match="log-mel \\[B, 80, F\\]"):
        embedder(torch.zeros(1, 64, 200))
    with pytest.raises(ValueError, match="mel frames"):
        embedder(torch.zeros(1, 80, 400))


def test_tokenizer_artifacts_round_trip(ckpt, embedder):
    assert has_melody(ckpt) and not has_melody(ckpt / "nothing")
    tokenizer = load_melody_tokenizer(ckpt)
    assert (tokenizer.num_codebooks, tokenizer.codebook_size, tokenizer.frame_hop_seconds) == (8, 64, 3.0)
    wav = _tones(10.0, 2, 1)
    tokens = tokenizer.tokens(wav)
    assert tokens.shape == (2, 3, 8) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 64
    assert torch.equal(tokens, tokenizer.tokens(wav))  # deterministic
    one = melody_tokens_of(ckpt, wav[1].numpy())  # what generate --melody takes: numpy [Fm, Q]
    assert isinstance(one, np.ndarray) and one.dtype == np.int64 and np.array_equal(one, tokens[1].numpy())
    # the RVQ reconstructs the embeddings better than its first level alone
    emb = tokenizer.embed(wav)
    full = (tokenizer.rvq.decode(tokens) - emb).norm(dim=-1).mean()
    first = (tokenizer.rvq.decode(tokens[..., :1]) - emb).norm(dim=-1).mean()
    assert full < first
    info = melody_token_info(ckpt)
    assert info["num_codebooks"] == 8 and info["codebook_size"] == 64 and info["frame_hop_seconds"] == 3.0
    assert set(info["ids"]) == {"melody", "melody_rvq"} and info["ids"]["melody"].startswith("melody:tiny:")
    with pytest.raises(CheckpointError, match="preset 'paper'"):
        load_melody_tokenizer(ckpt, preset="paper")


def test_missing_parts_name_the_commands(ckpt, tmp_path):
    shutil.copytree(ckpt / "melody", tmp_path / "melody")
    assert not has_melody(tmp_path)
    with pytest.raises(CheckpointError, match="melody_rvq/ .*musiclm fit melody_rvq"):
        load_melody_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="melody/ .*musiclm train melody"):
        load_melody_tokenizer(tmp_path / "empty")


def test_has_melody_on_an_fsspec_url(ckpt):
    remote = f"memory://melody-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{remote}/melody/config.json", (ckpt / "melody" / "config.json").read_bytes())
    assert not has_melody(remote)
    fs.pipe_file(f"{remote}/melody_rvq/config.json", (ckpt / "melody_rvq" / "config.json").read_bytes())
    assert has_melody(remote)


def test_fit_melody_rvq_records_its_embedder(embedder, tmp_path):
    embedder.preset = "tiny"
    save_melody(embedder, tmp_path / "melody", "tiny")
    rvq = fit_melody_rvq(
        embedder, [_tones(7.0, 4, 2), _tones(7.0, 4, 3)], tmp_path / "melody_rvq", max_embeddings=12, iters=2
    )
    assert (rvq.num_quantizers, rvq.codebook_size, rvq.dim) == (8, 64, 192)
    document = read_artifact_config(tmp_path / "melody_rvq")
    assert document["kind"] == "melody_rvq" and document["preset"] == "tiny"
    assert document["meta"]["embeddings"] == 12  # 8 clips x 2 windows, capped at 12
    loaded = load_melody(tmp_path / "melody")
    wav = _tones(4.0, 1, 4)
    with torch.no_grad():
        assert torch.allclose(loaded.embed(wav), embedder.embed(wav), atol=1e-6)
    with pytest.raises(ValueError, match="no audio"):
        fit_melody_rvq(embedder, [])
