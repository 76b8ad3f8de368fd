"""Fitting the two non-gradient tokenizer parts on audio shards: the semantic k-means (on
w2v-BERT features) and MuLan's RVQ (on MuLan audio embeddings)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from musiclm.constants import SEMANTIC_HOP


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


def fit_component(what: str, data: str, tokenizers: str, *, max_windows: int = 2000) -> Path:
    """Fit ``semantic_kmeans`` or ``mulan_rvq`` into ``tokenizers/<what>`` and return that folder."""
    ckpt = Path(tokenizers)
    out = ckpt / what
    with torch.inference_mode():
        if what == "semantic_kmeans":
            from musiclm.tokenizers.semantic import fit_semantic_kmeans, load_w2vbert

            w2vbert = load_w2vbert(ckpt / "w2vbert")
            fit_semantic_kmeans(w2vbert, wav_batches(data, max_windows=max_windows), out_dir=out)
        elif what == "mulan_rvq":
            from musiclm.tokenizers.mulan import fit_mulan_rvq, load_mulan

            mulan = load_mulan(ckpt / "mulan")
            fit_mulan_rvq(mulan, wav_batches(data, max_windows=max_windows), out_dir=out)
        else:
            raise ValueError(f"cannot fit '{what}': choose semantic_kmeans or mulan_rvq")
    return out
