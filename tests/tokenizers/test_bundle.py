import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from musiclm.checkpoint import CheckpointError, artifact_id
from musiclm.tokenizers.bundle import COMPONENT_COMMANDS, TokenizerBundle, save_random_tokenizers

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
