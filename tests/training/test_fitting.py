import json

import numpy as np
import pytest
import torch

from musiclm.checkpoint import read_artifact_config
from musiclm.data import shards as sh
from musiclm.pipelines.sample_features import FEATURES_PREFIX, write_feature_manifest
from musiclm.tokenizers.backends import BackendSpec, load_semantic, write_backends
from musiclm.tokenizers.bundle import save_random_tokenizers
from musiclm.tokenizers.kmeans import KMeans
from musiclm.tokenizers.mulan import load_mulan_rvq
from musiclm.tokenizers.semantic import load_kmeans
from musiclm.training.fitting import artifact_preset, fit_component, fit_semantic_kmeans_on_features

torch.set_num_threads(1)
SR = 24000


def write_feature_sample(folder, x: np.ndarray, chunk: int) -> None:
    """Feature chunks as the Beam job writes them (float16 .npy + manifest), without the job."""
    entries = []
    for i, start in enumerate(range(0, len(x), chunk)):
        part = x[start : start + chunk].astype(np.float16)
        name = f"{FEATURES_PREFIX}-{i:06d}.npy"
        np.save(folder / name, part)
        entries.append({"name": name, "frames": len(part), "windows": 1, "dim": x.shape[1], "dtype": "float16",
                        "sha256": "", "bytes": 0})
    write_feature_manifest(str(folder), entries, {"feature_model": {"backend": "test"}, "keep_fraction": 1.0})


def test_streaming_fit_from_disk_matches_in_memory_lloyd(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16)) * 5
    x = (centres[:, None] + 0.05 * rng.normal(size=(8, 300, 16))).reshape(-1, 16)[rng.permutation(2400)]
    write_feature_sample(tmp_path, x, chunk=500)  # 5 chunks
    kmeans, meta = fit_semantic_kmeans_on_features(str(tmp_path), tmp_path / "semantic_kmeans", preset="tiny", k=8,
                                                   batch_size=128)
    data = torch.from_numpy(x.astype(np.float16).astype(np.float32))
    lloyd = KMeans(8, 16).fit(data, seed=0)
    assert len(set(zip(lloyd.assign(data).tolist(), kmeans.assign(data).tolist()))) == 8  # the same partition
    exact = ((data - kmeans.centroids[kmeans.assign(data)]) ** 2).sum().item()
    assert exact == pytest.approx(((data - lloyd.centroids[lloyd.assign(data)]) ** 2).sum().item(), rel=1e-4)
    assert meta["frames"] == 2400 and meta["passes"] == meta["reads"] >= 4 and meta["backend"] == {"backend": "test"}
    assert meta["inertia"] == pytest.approx(exact, rel=1e-2)
    loaded = load_kmeans(tmp_path / "semantic_kmeans", preset="tiny")
    assert torch.equal(loaded.centroids, kmeans.centroids)
    assert read_artifact_config(tmp_path / "semantic_kmeans")["meta"]["frames"] == 2400


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Untrained tiny tokenizers and one audio shard of 8 two-second tone windows."""
    root = tmp_path_factory.mktemp("fitting")
    save_random_tokenizers(root / "ckpt", "tiny")
    t = np.arange(2 * SR) / SR
    samples = [{"__key__": f"w{i}", "json": {"source": f"c{i}", "start": 0.0, "end": 2.0},
                "wav": (0.3 * np.sin(2 * np.pi * (150 + 90 * i) * t)).astype(np.float32)} for i in range(8)]
    entry = sh.write_shard(root / "audio" / sh.shard_name("audio", 0), samples)
    sh.write_manifest(str(root / "audio"), [entry], kind="audio", extra={"window_seconds": 2.0})
    return root


def test_fit_component_semantic_kmeans(tokenizers):
    ckpt = tokenizers / "ckpt"
    out = fit_component("semantic_kmeans", str(tokenizers / "audio"), str(ckpt), k=32, max_frames=300)
    assert out == ckpt / "semantic_kmeans"
    document = read_artifact_config(out)
    assert document["preset"] == "tiny" and document["config"] == {"k": 32, "dim": 128}
    meta = document["meta"]
    # 8 windows x 50 frames, 300 wanted: every window keeps 37 or 38 frames (the sample spans the corpus)
    assert 296 <= meta["frames"] <= 304 and meta["keep_fraction"] == pytest.approx(0.75)
    assert meta["backend"]["backend"] == "w2vbert" and meta["features"]["windows"] == 8
    assert meta["inertia"] > 0 and meta["empty_clusters"] == 0
    assert json.loads((out / "features" / "stats.json").read_text())["frames"] == meta["frames"]
    tokens = load_semantic(ckpt, preset="tiny").tokens(torch.zeros(1, SR) + 0.1)
    assert tokens.shape == (1, 25) and int(tokens.max()) < 32


def test_fit_component_mulan_rvq(tokenizers):
    ckpt = tokenizers / "ckpt"
    out = fit_component("mulan_rvq", str(tokenizers / "audio"), str(ckpt), max_windows=6, iters=2)
    rvq = load_mulan_rvq(out, preset="tiny")
    assert (rvq.num_quantizers, rvq.codebook_size) == (12, 1024)
    assert read_artifact_config(out)["meta"]["embeddings"] == 6
    with pytest.raises(ValueError, match="semantic_kmeans, mulan_rvq or melody_rvq"):
        fit_component("soundstream", str(tokenizers / "audio"), str(ckpt))


def test_fit_component_melody_rvq(tokenizers, tmp_path):
    """The melody RVQ on the melody embeddings of audio shards, sized by the melody/ config (tiny: 8 x 64)."""
    import shutil

    from musiclm.checkpoint import CheckpointError, artifact_id
    from musiclm.tokenizers.melody import MelodyConfig, MelodyEmbedder, load_melody_tokenizer, save_melody

    ckpt = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match="no melody/ embedder.*musiclm train melody"):
        fit_component("melody_rvq", str(tokenizers / "audio"), str(ckpt))
    shutil.copytree(tokenizers / "ckpt" / "mulan", ckpt / "mulan")  # any other folders may be there
    torch.manual_seed(0)
    save_melody(MelodyEmbedder(MelodyConfig.preset("tiny")), ckpt / "melody", "tiny")
    out = fit_component("melody_rvq", str(tokenizers / "audio"), str(ckpt), max_windows=6, iters=2)
    assert out == ckpt / "melody_rvq"
    document = read_artifact_config(out)
    assert document["preset"] == "tiny"
    assert document["config"] == {"dim": 192, "num_quantizers": 8, "codebook_size": 64}
    assert document["meta"]["embeddings"] == 6 and document["meta"]["melody"] == artifact_id(ckpt / "melody")
    tokenizer = load_melody_tokenizer(ckpt, preset="tiny")
    wav = torch.from_numpy(np.stack([s["wav"] for s in sh.iter_samples(str(tokenizers / "audio"))]))  # [8, 2 s]
    tokens = tokenizer.tokens(wav)
    assert tokens.shape == (8, 1, 8)  # 2-s windows: one (zero-padded) melody frame each
    # the 8 shard windows are distinct tones: the first level alone already tells most of them apart
    assert len(set(tokens[:, 0, 0].tolist())) >= 4


def test_artifact_preset_follows_the_backend(tokenizers, tmp_path):
    # ours: the preset of the model the artifact was fitted on; a pretrained backend: "pretrained"
    # (backends.load_semantic / load_conditioner do not check the preset of fitted folders then)
    assert artifact_preset(tokenizers / "ckpt", "semantic", "w2vbert") == "tiny"
    write_backends(tmp_path, {"semantic": BackendSpec("semantic", "hubert", str(tmp_path / "hubert-base")),
                              "conditioner": BackendSpec("conditioner", "clap", str(tmp_path / "clap"))})
    assert artifact_preset(tmp_path, "semantic", "w2vbert") == "pretrained"
    assert artifact_preset(tmp_path, "conditioner", "mulan") == "pretrained"
