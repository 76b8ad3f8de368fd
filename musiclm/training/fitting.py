"""Fitting the non-gradient tokenizer parts: the semantic k-means, the conditioner's RVQ and the melody RVQ.

* ``semantic_kmeans``: 1024 centroids over semantic features of the whole corpus. A Beam job
  (:mod:`musiclm.pipelines.sample_features`) samples frames evenly across every window into float16
  chunks on disk; :meth:`KMeans.fit_streaming` fits them one chunk at a time (k-means++ on a bounded
  reservoir, mini-batch passes, exact Lloyd passes), so a million frames are never in memory at once.
  The centroids are their own artifact (the memorization analysis reuses their distances).
* ``mulan_rvq``: MuLan's 12 x 1024 RVQ, k-means on successive residuals of the audio embeddings of
  up to ``max_windows`` windows (one 128-d embedding per window: small, fitted in memory).
* ``melody_rvq``: the melody tokenizer's RVQ (24 x 512 in the paper, the size the ``melody/`` artifact's
  config records), k-means on successive residuals of up to ``max_windows`` melody embeddings (one
  192-d embedding per 4-s window, 3-s hop, of the audio shards' windows), fitted in memory the same way.

Both use the feature model / towers that ``musiclm.tokenizers.backends`` loads for the tokenizer
folder, so they fit on our w2v-BERT / MuLan or on a pretrained HuBERT / w2v-BERT 2.0 / CLAP alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musiclm.constants import MULAN_CODEBOOK_SIZE, MULAN_CODEBOOKS, SEMANTIC_CODEBOOK_SIZE, SEMANTIC_HOP

PRETRAINED_PRESET = "pretrained"  # the preset recorded in artifacts fitted on a pretrained backend's outputs


def wav_batches(data: str, *, batch_size: int = 8, max_windows: int = 2000) -> Iterator[torch.Tensor]:
    """Audio windows from audio shards as ``[B, T]`` batches of equal length (cut to a semantic frame multiple)."""
    from musiclm.data.shards import iter_samples

    batch: list[np.ndarray] = []
    seen = 0
    for sample in iter_samples(data, split_by_node=False, split_by_worker=False):
        wav = sample.get("wav")
        if wav is None:
            continue
        batch.append(wav)
        seen += 1
        if len(batch) == batch_size or seen >= max_windows:
            yield _stack(batch)
            batch = []
        if seen >= max_windows:
            return
    if batch:
        yield _stack(batch)


def _stack(wavs: list[np.ndarray]) -> torch.Tensor:
    length = min(len(w) for w in wavs) // SEMANTIC_HOP * SEMANTIC_HOP
    return torch.from_numpy(np.stack([w[:length] for w in wavs]).astype(np.float32))  # [B, T]


def artifact_preset(tokenizers: str | Path, role: str, folder: str) -> str:
    """The preset a fitted artifact records: that of our model it was fitted on (``w2vbert/``,
    ``mulan/``), or ``"pretrained"`` for a pretrained backend (whose loaders ignore the preset)."""
    from musiclm.checkpoint import read_artifact_config
    from musiclm.tokenizers.backends import read_backends

    if read_backends(tokenizers)[role].pretrained:
        return PRETRAINED_PRESET
    return read_artifact_config(Path(tokenizers) / folder)["preset"]


def fit_semantic_kmeans_on_features(
    features_dir: str,
    out_dir: str | Path | None,
    *,
    preset: str,
    k: int = SEMANTIC_CODEBOOK_SIZE,
    minibatch_passes: int = 2,
    lloyd_passes: int = 3,
    batch_size: int = 4096,
    init_size: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[Any, dict[str, Any]]:
    """Streaming k-means over a feature sample on disk; saves the ``semantic_kmeans`` artifact when
    ``out_dir`` is given. Returns (the eval()ed KMeans, the artifact's meta)."""
    from musiclm.pipelines.sample_features import iter_feature_batches, read_feature_manifest
    from musiclm.tokenizers.kmeans import KMeans
    from musiclm.tokenizers.semantic import save_kmeans

    manifest = read_feature_manifest(features_dir)
    if not manifest["num_frames"]:
        raise ValueError(f"the feature sample in {features_dir} holds no frames (see its dead_letter.jsonl)")
    kmeans = KMeans(k, int(manifest["dim"])).to(device)
    stats = kmeans.fit_streaming(
        lambda epoch: iter_feature_batches(features_dir, batch_size=batch_size, epoch=epoch, seed=seed),
        minibatch_passes=minibatch_passes,
        lloyd_passes=lloyd_passes,
        init_size=init_size,
        seed=seed,
    )
    meta = {
        **stats.to_dict(),
        "passes": stats.reads,
        "backend": manifest.get("feature_model"),
        "keep_fraction": manifest.get("keep_fraction"),
        "batch_size": batch_size,
        "seed": seed,
        "features": {"dir": str(features_dir), "chunks": manifest["num_shards"], "windows": manifest["num_samples"],
                     "dtype": manifest["dtype"]},
    }
    kmeans = kmeans.cpu().eval()
    if out_dir is not None:
        save_kmeans(kmeans, out_dir, preset, meta=meta)
    return kmeans, meta


def fit_component(
    what: str,
    data: str | Sequence[str],
    tokenizers: str,
    *,
    max_windows: int = 2000,
    max_frames: int | None = 1_000_000,
    frames_per_window: int | None = None,
    features_dir: str | None = None,
    k: int = SEMANTIC_CODEBOOK_SIZE,
    minibatch_passes: int = 2,
    lloyd_passes: int = 3,
    batch_size: int = 4096,
    iters: int = 20,
    seed: int = 0,
    beam_args: Sequence[str] | None = None,
    device: str = "cpu",
) -> Path:
    """Fit ``semantic_kmeans``, ``mulan_rvq`` or ``melody_rvq`` into ``tokenizers/<what>``; return that folder.

    ``data``: audio shard folder(s) (or, for ``semantic_kmeans``, audio files / folders / globs too).

    ``semantic_kmeans``: the Beam job samples features into ``features_dir`` (default
    ``tokenizers/semantic_kmeans/features``; a rerun resumes it) keeping ``frames_per_window`` frames of
    every window (None: all) and about ``max_frames`` in all (None: no cap), with ``beam_args`` for the
    runner; then ``k`` centroids are fitted streaming (``minibatch_passes`` + ``lloyd_passes``, batches of
    ``batch_size`` frames). ``mulan_rvq``: 12 x 1024 RVQ on the audio embeddings of up to ``max_windows``
    windows, ``iters`` k-means iterations per level. ``melody_rvq``: the melody RVQ on up to ``max_windows``
    melody embeddings of the embedder in ``tokenizers/melody``, ``iters`` per level. ``seed`` makes all
    three deterministic.
    """
    ckpt = Path(tokenizers)
    out = ckpt / what
    if what == "semantic_kmeans":
        from musiclm.pipelines.sample_features import run_sample_features

        inputs = [data] if isinstance(data, (str, Path)) else list(data)
        features = str(features_dir or out / "features")
        run_sample_features([str(i) for i in inputs], features, str(ckpt), frames_per_window=frames_per_window,
                            max_frames=max_frames, seed=seed, beam_args=beam_args, device=device)
        fit_semantic_kmeans_on_features(
            features, out, preset=artifact_preset(ckpt, "semantic", "w2vbert"), k=k, minibatch_passes=minibatch_passes,
            lloyd_passes=lloyd_passes, batch_size=batch_size, seed=seed, device=device,
        )
    elif what == "mulan_rvq":
        fit_mulan_rvq_component(data, ckpt, out, max_windows=max_windows, iters=iters, seed=seed, device=device)
    elif what == "melody_rvq":
        fit_melody_rvq_component(data, ckpt, out, max_windows=max_windows, iters=iters, seed=seed,
                                 device=device)
    else:
        raise ValueError(f"cannot fit '{what}': choose semantic_kmeans, mulan_rvq or melody_rvq")
    return out


@torch.no_grad()
def fit_mulan_rvq_component(
    data: str | Sequence[str],
    tokenizers: str | Path,
    out_dir: str | Path,
    *,
    max_windows: int = 2000,
    iters: int = 20,
    seed: int = 0,
    device: str = "cpu",
) -> Any:
    """The conditioner's RVQ (12 x 1024) on the towers' audio embeddings (ours or CLAP) of up to
    ``max_windows`` windows of audio shards; saved as the ``mulan_rvq`` artifact. Returns the RVQ."""
    from musiclm.tokenizers.backends import load_conditioner_towers, read_backends
    from musiclm.tokenizers.mulan import save_mulan_rvq
    from musiclm.tokenizers.rvq import ResidualVQ

    towers = load_conditioner_towers(tokenizers, device=device)
    sources = [data] if isinstance(data, (str, Path)) else list(data)
    embeddings = []
    for source in sources:
        remaining = max_windows - sum(len(e) for e in embeddings)
        if remaining <= 0:
            break
        for wav in wav_batches(str(source), max_windows=remaining):
            embeddings.append(towers.embed_audio(wav.to(device)).float().cpu())  # [B, D]
    if not embeddings:
        raise ValueError(f"no audio windows in {data} to fit the conditioner's RVQ on")
    x = torch.cat(embeddings)  # [N, D]
    rvq = ResidualVQ(x.shape[1], MULAN_CODEBOOKS, MULAN_CODEBOOK_SIZE).fit(x, iters=iters, seed=seed).eval()
    spec = read_backends(tokenizers)["conditioner"]
    meta = {"embeddings": int(x.shape[0]), "iters": iters, "seed": seed,
            "backend": {"backend": spec.backend, "path": spec.path, "options": spec.options}}
    save_mulan_rvq(rvq, out_dir, artifact_preset(tokenizers, "conditioner", "mulan"), meta=meta)
    return rvq


@torch.no_grad()
def fit_melody_rvq_component(
    data: str | Sequence[str],
    tokenizers: str | Path,
    out_dir: str | Path,
    *,
    max_windows: int = 2000,
    iters: int = 20,
    seed: int = 0,
    device: str = "cpu",
) -> Any:
    """The melody RVQ (the size the ``melody/`` config records: 24 x 512 in the paper) on the melody
    embeddings of audio shards (every 4-s window with a 3-s hop of each shard window), up to
    ``max_windows`` embeddings; saved as the ``melody_rvq`` artifact with the embedder's preset. Returns
    the RVQ."""
    from musiclm.checkpoint import CheckpointError, artifact_id
    from musiclm.tokenizers.melody import fit_melody_rvq, load_melody

    folder = Path(tokenizers) / "melody"
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{tokenizers} has no melody/ embedder to fit melody_rvq on: train it first with "
            f"`musiclm train melody --data MELODY_AUDIO_SHARDS --out {folder}`"
        )
    embedder = load_melody(folder, device=device)
    sources = [data] if isinstance(data, (str, Path)) else list(data)

    def batches() -> Iterator[torch.Tensor]:
        for source in sources:
            yield from wav_batches(str(source), max_windows=max_windows)

    try:
        return fit_melody_rvq(embedder, batches(), out_dir, max_embeddings=max_windows, iters=iters,
                              seed=seed, meta={"melody": artifact_id(folder)})
    except ValueError as exc:
        if "no audio" in str(exc):
            raise ValueError(f"no audio windows in {data} to fit the melody RVQ on") from exc
        raise
