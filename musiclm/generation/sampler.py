"""Autoregressive sampling from a StageTransformer, with the KV cache (and without, as a reference).

Each generated position may be restricted to an id range: the semantic stage samples among the
1024 semantic ids, an acoustic stage at generated position i among the 1024 ids of RVQ level
``i % levels``. Restricting is a slice of the logits, so it costs nothing per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from musiclm.models.transformer import StageTransformer

Ranges = tuple[int, int] | Sequence[tuple[int, int]] | np.ndarray | None


def _ranges(allowed_range: Ranges, num_new: int, num_outputs: int) -> list[tuple[int, int]]:
    """One (lo, hi) per generated position, checked against the head's size."""
    if allowed_range is None:
        ranges = [(0, num_outputs)] * num_new
    elif isinstance(allowed_range, tuple) and len(allowed_range) == 2 and np.isscalar(allowed_range[0]):
        ranges = [(int(allowed_range[0]), int(allowed_range[1]))] * num_new
    else:
        ranges = [(int(lo), int(hi)) for lo, hi in np.asarray(allowed_range).reshape(-1, 2)]
        if len(ranges) != num_new:
            raise ValueError(f"{len(ranges)} allowed ranges for {num_new} new tokens")
    for lo, hi in ranges:
        if not 0 <= lo < hi <= num_outputs:
            raise ValueError(f"allowed range ({lo}, {hi}) is not inside the model's {num_outputs} outputs")
    return ranges


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """Sample one id per row from logits [B, n] (already restricted); temperature 0 is greedy. -> [B]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _check(model: StageTransformer, prefix: torch.Tensor, num_new: int) -> None:
    if prefix.ndim != 2 or prefix.shape[1] == 0:
        raise ValueError(f"prefix must be [B, L0] with L0 >= 1, got {tuple(prefix.shape)}")
    if num_new < 0:
        raise ValueError("num_new must be >= 0")
    total = prefix.shape[1] + num_new
    if total > model.config.max_seq_len:
        raise ValueError(f"{total} tokens exceed the model's max_seq_len {model.config.max_seq_len}")


@torch.inference_mode()
def sample(
    model: StageTransformer,
    prefix: torch.Tensor,
    num_new: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    allowed_range: Ranges = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue ``prefix`` [B, L0] by ``num_new`` tokens with the KV cache -> tokens [B, num_new].

    ``allowed_range``: one (lo, hi) for every position, or one per position ([num_new, 2]).
    """
    _check(model, prefix, num_new)
    B, L0 = prefix.shape
    ranges = _ranges(allowed_range, num_new, model.config.num_outputs)
    out = torch.empty(B, num_new, dtype=torch.long, device=prefix.device)
    if num_new == 0:
        return out
    was_training = model.training
    model.eval()
    try:
        model.setup_cache(B, L0 + num_new)
        logits = model.prefill(prefix)  # [B, V_out]
        for i, (lo, hi) in enumerate(ranges):
            out[:, i] = _pick(logits[:, lo:hi], temperature, top_k, generator) + lo
            if i + 1 < num_new:
                logits = model.decode_one_token(out[:, i : i + 1], L0 + i)
    finally:
        model.clear_cache()
        model.train(was_training)
    return out


@torch.inference_mode()
def sample_without_cache(
    model: StageTransformer,
    prefix: torch.Tensor,
    num_new: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    allowed_range: Ranges = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The same distribution as ``sample``, recomputing the whole sequence each step (reference, benchmark)."""
    _check(model, prefix, num_new)
    B, L0 = prefix.shape
    ranges = _ranges(allowed_range, num_new, model.config.num_outputs)
    seq = torch.empty(B, L0 + num_new, dtype=torch.long, device=prefix.device)
    seq[:, :L0] = prefix
    was_training = model.training
    model.eval()
    try:
        for i, (lo, hi) in enumerate(ranges):
            logits = model(seq[:, : L0 + i])[:, -1]  # [B, V_out]
            seq[:, L0 + i] = _pick(logits[:, lo:hi], temperature, top_k, generator) + lo
    finally:
        model.train(was_training)
    return seq[:, L0:]
