import dataclasses
import json
import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from musiclm.checkpoint import CheckpointError, artifact_id
from musiclm.tokenizers.backends import BackendSpec, TokenRates, write_backends
from musiclm.tokenizers.bundle import (
    COMPONENT_COMMANDS,
    TokenizerBundle,
    check_int16_rates,
    ids_from_token_info,
    required_folders,
    save_random_tokenizers,
)

SR = 24000


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tokenizers")
    save_random_tokenizers(folder, "tiny", seed=0)
    return str(folder)


@pytest.fixture(scope="module")
def bundle(ckpt) -> TokenizerBundle:
    torch.set_num_threads(1)
    return TokenizerBundle.load(ckpt)


def _clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def test_missing_folders_are_named_with_the_command_that_makes_them(ckpt, tmp_path):
    partial = tmp_path / "ckpt"
    for name in ("soundstream", "w2vbert", "mulan"):
        shutil.copytree(f"{ckpt}/{name}", partial / name)
    with pytest.raises(CheckpointError) as err:
        TokenizerBundle.load(partial)
    message = str(err.value)
    assert "semantic_kmeans/" in message and "musiclm fit semantic_kmeans" in message
    assert "mulan_rvq/" in message and "musiclm fit mulan_rvq" in message
    assert "soundstream/" not in message
    with pytest.raises(CheckpointError, match="soundstream/.*musiclm train soundstream"):
        TokenizerBundle.load(tmp_path / "nothing")


def test_load_records_preset_and_artifact_ids(bundle, ckpt):
    assert bundle.preset == "tiny"
    assert set(bundle.ids) == set(COMPONENT_COMMANDS)
    assert bundle.ids == {name: artifact_id(f"{ckpt}/{name}") for name in COMPONENT_COMMANDS}
    assert bundle.ids["soundstream"].startswith("soundstream:tiny:")
    with pytest.raises(CheckpointError, match="preset 'paper'"):
        TokenizerBundle.load(ckpt, preset="paper")


def test_tokenize_window_shapes_dtypes_and_ranges(bundle):
    tokens = bundle.tokenize_window(_clip(1.0, 0))
    assert tokens["acoustic"].dtype == np.int16 and tokens["acoustic"].shape == (50, 12)
    assert tokens["semantic"].dtype == np.int16 and tokens["semantic"].shape == (25,)
    assert tokens["mulan"].dtype == np.int16 and tokens["mulan"].shape == (12,)
    for name, size in (("acoustic", 1024), ("semantic", 1024), ("mulan", 1024)):
        assert 0 <= tokens[name].min() and tokens[name].max() < size
    # the same audio gives the same tokens; other audio gives other acoustic tokens
    again = bundle.tokenize_window(_clip(1.0, 0))
    for name in tokens:
        np.testing.assert_array_equal(tokens[name], again[name])
    assert not np.array_equal(tokens["acoustic"], bundle.tokenize_window(_clip(1.0, 1))["acoustic"])


def test_batched_tokenization_matches_one_by_one_and_mixed_lengths(bundle):
    wavs = [_clip(1.0, 2), _clip(2.0, 3), _clip(1.0, 4)]
    batched = bundle.tokenize_windows(wavs)
    assert [t["acoustic"].shape for t in batched] == [(50, 12), (100, 12), (50, 12)]
    assert [t["semantic"].shape for t in batched] == [(25,), (50,), (25,)]
    singles = [bundle.tokenize_window(wav) for wav in wavs]
    for name in ("acoustic", "semantic", "mulan"):
        # batching must not change the tokens; untrained networks put many frames near a tie between two
        # codes, where BLAS blocking (which depends on the batch) may flip one: tolerate a few percent
        same = np.concatenate([(s[name] == t[name]).ravel() for s, t in zip(singles, batched)])
        assert same.mean() >= 0.95, name


def test_bad_windows_are_refused(bundle):
    with pytest.raises(ValueError, match="multiple of 960"):
        bundle.tokenize_window(np.zeros(1000, np.float32))
    with pytest.raises(ValueError, match="float32 \\[T\\]"):
        bundle.tokenize_window(np.zeros((2, 960), np.float32))


def test_checkpoints_on_an_fsspec_url_load_through_a_local_copy(ckpt, bundle):
    remote = f"memory://ckpt-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for path in Path(ckpt).glob("*/*"):
        fs.pipe_file(f"{remote}/{path.parent.name}/{path.name}", path.read_bytes())
    assert TokenizerBundle.read_ids(remote) == bundle.ids
    loaded = TokenizerBundle.load(remote)
    assert loaded.ids == bundle.ids and loaded.ckpt_dir == remote
    wav = _clip(1.0, 5)
    np.testing.assert_array_equal(loaded.tokenize_window(wav)["semantic"], bundle.tokenize_window(wav)["semantic"])


# ----------------------------------------------------------------------------- backends (issue 3)


def test_ours_record_backends_and_paper_rates(bundle):
    assert bundle.backends == {"acoustic": "soundstream", "semantic": "w2vbert", "conditioner": "mulan"}
    assert bundle.rates == TokenRates() and bundle.token_info["rates"] == TokenRates().to_dict()
    assert bundle.token_info["acoustic"]["ids"] == {"soundstream": bundle.ids["soundstream"]}
    assert ids_from_token_info(bundle.token_info) == bundle.ids


@pytest.fixture(scope="module")
def encodec_ckpt(ckpt, tmp_path_factory) -> Path:
    """Our semantic tokenizer and conditioner, EnCodec (random weights, the real 24-kHz architecture's rates) as
    the acoustic tokenizer: no ``soundstream/``."""
    from musiclm.tokenizers.pretrained import save_random_backend

    root = tmp_path_factory.mktemp("encodec_ckpt")
    for name in ("w2vbert", "semantic_kmeans", "mulan", "mulan_rvq"):
        shutil.copytree(f"{ckpt}/{name}", root / "ckpt" / name)
    model = save_random_backend("encodec", root / "encodec_24khz", "tiny")
    write_backends(root / "ckpt", {"acoustic": BackendSpec("acoustic", "encodec", str(model))})
    return root / "ckpt"


def test_folders_needed_follow_the_backends(encodec_ckpt, tmp_path):
    assert required_folders(encodec_ckpt) == ["w2vbert", "semantic_kmeans", "mulan", "mulan_rvq"]
    TokenizerBundle.check_folders(encodec_ckpt)  # no soundstream/ needed
    partial = tmp_path / "partial"
    shutil.copytree(encodec_ckpt, partial)
    shutil.rmtree(partial / "mulan_rvq")
    with pytest.raises(CheckpointError) as err:
        TokenizerBundle.check_folders(partial)
    assert "mulan_rvq/" in str(err.value) and "musiclm fit mulan_rvq" in str(err.value)
    assert "soundstream" not in str(err.value)
    (partial / "backends.json").write_text(json.dumps({"acoustic": {"backend": "encodec", "path": str(tmp_path / "gone")}}))
    with pytest.raises(CheckpointError, match="encodec model folder .*gone named in backends.json"):
        TokenizerBundle.check_folders(partial)


def test_encodec_bundle_tokenizes_at_75_hz_into_int16(encodec_ckpt, bundle):
    loaded = TokenizerBundle.load(encodec_ckpt)
    assert loaded.backends["acoustic"] == "encodec" and loaded.preset == "tiny"
    assert loaded.rates == TokenRates(acoustic_frame_rate=75, acoustic_codebooks=8)
    assert loaded.ids["encodec"] == loaded.token_info["acoustic"]["id"] and "soundstream" not in loaded.ids
    assert loaded.ids["w2vbert"] == bundle.ids["w2vbert"]
    tokens = loaded.tokenize_windows([_clip(1.0, 6), _clip(0.4, 7)])
    assert tokens[0]["acoustic"].shape == (75, 8) and tokens[1]["acoustic"].shape == (30, 8)
    assert tokens[0]["semantic"].shape == (25,) and tokens[0]["mulan"].shape == (12,)
    assert all(t[name].dtype == np.int16 for t in tokens for name in t)
    assert len(np.unique(tokens[0]["acoustic"])) > 8  # the codes vary with the audio
    # the same networks checked against rates they do not make: a clear error, not a bad shard
    wrong = dataclasses.replace(loaded, rates=TokenRates())
    with pytest.raises(ValueError, match="acoustic codes \\(1, 8, 75\\) != \\[B, 12, 50\\]"):
        wrong.tokenize_window(_clip(1.0, 6))


def test_codebooks_too_large_for_int16_are_refused():
    check_int16_rates(TokenRates(acoustic_codebook_size=32768))  # ids 0..32767 fit
    with pytest.raises(ValueError, match="acoustic codebook has 65536 codes.*int16"):
        check_int16_rates(TokenRates(acoustic_codebook_size=65536))


# ----------------------------------------------------------------------------- melody tokens (issue 4)


@pytest.fixture(scope="module")
def melody_ckpt(ckpt, tmp_path_factory) -> Path:
    """The same five tokenizers plus an (untrained) tiny melody tokenizer: melody/ + melody_rvq/."""
    from musiclm.tokenizers.melody import save_random_melody

    root = tmp_path_factory.mktemp("melody_bundle") / "ckpt"
    shutil.copytree(ckpt, root)
    save_random_melody(root, "tiny", seed=0)
    return root


def test_a_melody_tokenizer_adds_melody_tokens_and_records_them(melody_ckpt, bundle):
    loaded = TokenizerBundle.load(melody_ckpt)
    assert bundle.melody is None and "melody" not in bundle.token_info  # without one nothing changes
    assert loaded.melody is not None
    info = loaded.token_info["melody"]
    assert (info["num_codebooks"], info["codebook_size"], info["frame_hop_seconds"]) == (8, 64, 3.0)
    assert {k: v for k, v in loaded.token_info.items() if k != "melody"} == bundle.token_info
    assert loaded.ids == {**bundle.ids, "melody": artifact_id(melody_ckpt / "melody"),
                          "melody_rvq": artifact_id(melody_ckpt / "melody_rvq")}
    assert TokenizerBundle.read_ids(melody_ckpt) == loaded.ids
    wavs = [_clip(1.0, 0), _clip(7.0, 1)]
    tokens = loaded.tokenize_windows(wavs)
    # 1 s: one zero-padded window; 7 s: the windows at 0 and 3 s
    assert tokens[0]["melody"].shape == (1, 8) and tokens[1]["melody"].shape == (2, 8)
    for t in tokens:
        assert t["melody"].dtype == np.int16 and 0 <= t["melody"].min() and t["melody"].max() < 64
    direct = loaded.melody.tokens(torch.from_numpy(wavs[1])[None])[0].numpy()
    np.testing.assert_array_equal(tokens[1]["melody"], direct)
    np.testing.assert_array_equal(tokens[0]["semantic"], bundle.tokenize_window(wavs[0])["semantic"])


def test_half_a_melody_tokenizer_is_refused(melody_ckpt, tmp_path):
    partial = tmp_path / "ckpt"
    shutil.copytree(melody_ckpt, partial)
    shutil.rmtree(partial / "melody_rvq")
    with pytest.raises(CheckpointError, match="melody_rvq/ \\(make it with `musiclm fit melody_rvq"):
        TokenizerBundle.load(partial)


def test_a_remote_melody_tokenizer_is_copied_too(melody_ckpt):
    remote = f"memory://ckpt-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for path in Path(melody_ckpt).glob("*/*"):
        fs.pipe_file(f"{remote}/{path.parent.name}/{path.name}", path.read_bytes())
    loaded = TokenizerBundle.load(remote)
    assert loaded.melody is not None and loaded.ids == TokenizerBundle.read_ids(melody_ckpt)
