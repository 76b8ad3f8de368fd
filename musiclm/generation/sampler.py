"""Autoregressive sampling from a StageTransformer, with the KV cache (and without, as a reference).

Each generated position may be restricted to an id range: the semantic stage samples among the
1024 semantic ids, an acoustic stage at generated position i among the 1024 ids of RVQ level
``i % levels``. Restricting is a slice of the head: a decoding step multiplies only the head rows
of the next position's range (``decode_one_token(..., outputs=(lo, hi))``), which gives the same
logits as slicing all of them; for the fine stage that is 1024 of 8192 rows, the step's largest matmul.

On the restricted logits, in this order: classifier-free guidance (``u + s * (c - u)``, the
unconditional logits ``u`` from a second copy of the batch whose prefix has NULL conditioning, run
in the same forward pass), temperature, top-k, then top-p (nucleus). With one ``torch.Generator``
per row, row i draws only from its own generator, so a request's tokens do not depend on which
other requests share its batch.

At batch 1 on a CPU a step is bound by reading the weights and by per-op overhead, so the cached
loop does no per-step host work: no ``.item()``, no numpy, one preallocated output written in place,
and the draw is ``torch.multinomial``'s own Gumbel-max arithmetic without its checks
(:func:`_multinomial`). ``sample`` draws exactly the tokens of the plain loop (pinned by the tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


Generators = torch.Generator | Sequence[torch.Generator] | None
LogitBias = Callable[[int, torch.Tensor], torch.Tensor]  # (i, tokens drawn so far [i, B]) -> [B, hi - lo]


def _check_options(
    batch: int, top_k: int | None, top_p: float | None, generator: Generators, guidance_scale: float,
    prefix: torch.Tensor, uncond_prefix: torch.Tensor | None,
) -> bool:
    """Validate the sampling options; True when guidance runs (a scale other than 1)."""
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if isinstance(generator, Sequence) and len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for a batch of {batch} rows (give one per row, or one)")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if guidance_scale == 1.0:
        return False  # u + 1 * (c - u) is c: no second branch to run
    if uncond_prefix is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs uncond_prefix (the prefix with NULL conditioning)")
    if tuple(uncond_prefix.shape) != tuple(prefix.shape):
        raise ValueError(f"uncond_prefix has shape {tuple(uncond_prefix.shape)}, the prefix {tuple(prefix.shape)}")
    return True


def _guide(logits: torch.Tensor, batch: int, guidance_scale: float | None) -> torch.Tensor:
    """[2B, n] (conditioned rows, then unconditional rows) -> u + s * (c - u) [B, n]; [B, n] passes through."""
    if guidance_scale is None:
        return logits
    c, u = logits[:batch].float(), logits[batch:].float()
    return u + guidance_scale * (c - u)


def _multinomial(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One draw per row of ``probs`` [B, n] -> ids [B]: ``torch.multinomial(probs, 1, generator)`` bit for bit.

    For one sample ATen uses the Gumbel-max trick, argmax(p / q) with q ~ Exp(1) drawn from the
    generator; this runs exactly those three ops without multinomial's input checks (three reductions
    and two host syncs: as much again per step on a CPU). A list of generators draws row i's q from
    ``generator[i]``, as ``multinomial(probs[i:i+1], 1, generator[i])`` does. The equality (tokens and
    generator states) is pinned by ``tests/generation/test_sampler.py`` against the reference below.
    """
    q = torch.empty_like(probs)
    if generator is None or isinstance(generator, torch.Generator):
        q.exponential_(1.0, generator=generator)
    elif len(generator) == 1:  # one row: its q is the whole of q, as in multinomial(probs[0:1])
        q.exponential_(1.0, generator=generator[0])
    else:  # row i draws from generators[i] only
        for row, g in zip(q, generator):
            row.exponential_(1.0, generator=g)
    return torch.div(probs, q, out=q).argmax(dim=-1)


def _multinomial_reference(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """The same draw with ``torch.multinomial`` (per row for a list of generators): the reference."""
    if isinstance(generator, Sequence):
        return torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g)[:, 0] for i, g in enumerate(generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _pick(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: Generators,
    top_p: float | None = None,
    draw: Callable[[torch.Tensor, Generators], torch.Tensor] = _multinomial,
) -> torch.Tensor:
    """Sample one id per row from logits [B, n] (already restricted); temperature 0 is greedy. -> [B]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # nucleus: the most probable ids whose mass reaches top_p (the first id always stays)
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, n]
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more probable ids
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return draw(probs, generator)


def _check(model: StageTransformer, prefix: torch.Tensor, num_new: int) -> None:
    if prefix.ndim != 2 or prefix.shape[1] == 0:
        raise ValueError(f"prefix must be [B, L0] with L0 >= 1, got {tuple(prefix.shape)}")
    if num_new < 0:
        raise ValueError("num_new must be >= 0")
    total = prefix.shape[1] + num_new
    if total > model.config.max_seq_len:
        raise ValueError(f"{total} tokens exceed the model's max_seq_len {model.config.max_seq_len}")


def _frame_rows(model: StageTransformer, frames: torch.Tensor | None, prefix: torch.Tensor, num_new: int,
                guided: bool) -> torch.Tensor | None:
    """The frame classes of every row and position, [B or 2B, L0 + num_new] (the unconditional copy of a
    guided batch gets NULL, like its prefix's condition), or None without frames."""
    if frames is None:
        return None
    classes = model.config.frame_classes
    if not classes:
        raise ValueError("frames given, but this model has no frame conditioning (frame_classes=0)")
    B, L0 = prefix.shape
    if tuple(frames.shape) != (B, L0 + num_new):
        raise ValueError(f"frames has shape {tuple(frames.shape)}, expected [B, L0 + num_new] = [{B}, {L0 + num_new}]")
    if frames.numel() and (int(frames.min()) < 0 or int(frames.max()) > classes):
        raise ValueError(f"frames has classes outside [0, {classes}] ({classes}: NULL)")
    frames = frames.to(device=prefix.device, dtype=torch.long)
    return torch.cat([frames, torch.full_like(frames, classes)]) if guided else frames


@torch.inference_mode()
def sample(
    model: StageTransformer,
    prefix: torch.Tensor,
    num_new: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    allowed_range: Ranges = None,
    generator: Generators = None,
    guidance_scale: float = 1.0,
    uncond_prefix: torch.Tensor | None = None,
    frames: torch.Tensor | None = None,
    logit_bias: LogitBias | None = None,
) -> torch.Tensor:
    """Continue ``prefix`` [B, L0] by ``num_new`` tokens with the KV cache -> tokens [B, num_new].

    ``allowed_range``: one (lo, hi) for every position, or one per position ([num_new, 2]).
    ``top_p``: nucleus sampling after temperature and top-k. ``generator``: None, one generator, or a
    list of B (row i's draws use only ``generator[i]``). ``guidance_scale`` != 1: classifier-free
    guidance against ``uncond_prefix`` ([B, L0], e.g. ``VocabLayout.unconditional(prefix)``): the 2B
    rows run as one batch and both copies of a row are fed the token drawn from the mixed logits.
    ``frames`` [B, L0 + num_new]: every position's frame class, for a model with frame conditioning (the
    melody contour; position i's class is that of the frame position i + 1 belongs to).
    ``logit_bias(i, drawn [i, B]) -> [B, hi - lo]``: added to new token i's (guided) logits over its allowed
    range, before temperature and truncation (e.g. a classifier's log-probabilities, FUDGE-style).
    """
    _check(model, prefix, num_new)
    B, L0 = prefix.shape
    guided = _check_options(B, top_k, top_p, generator, guidance_scale, prefix, uncond_prefix)
    ranges = _ranges(allowed_range, num_new, model.config.num_outputs)
    frame_rows = _frame_rows(model, frames, prefix, num_new, guided)  # [B or 2B, L0 + num_new] or None
    out = torch.empty(num_new, B, dtype=torch.long, device=prefix.device)  # position-major: out[i] is contiguous
    if num_new == 0:
        return out.t()
    rows = torch.cat([prefix, uncond_prefix.to(prefix.device)]) if guided else prefix  # [B or 2B, L0]
    scale = guidance_scale if guided else None
    was_training = model.training
    model.eval()
    try:
        model.setup_cache(rows.shape[0], L0 + num_new)
        lo, hi = ranges[0]
        logits = model.prefill(rows, None if frame_rows is None else frame_rows[:, :L0])[:, lo:hi]  # [B or 2B, hi - lo]
        for i in range(num_new):
            token = out[i]  # [B]
            mixed = _guide(logits, B, scale)  # [B, hi - lo]
            if logit_bias is not None:
                mixed = mixed + logit_bias(i, out[:i])
            torch.add(_pick(mixed, temperature, top_k, generator, top_p), lo, out=token)
            if i + 1 < num_new:
                lo, hi = ranges[i + 1]
                step = token.view(B, 1)  # [B] -> [B, 1]
                # only the head rows of the next position's range: the same logits as slicing all of them
                here = None if frame_rows is None else frame_rows[:, L0 + i : L0 + i + 1]  # [B or 2B, 1]
                logits = model.decode_one_token(step.repeat(2, 1) if guided else step, L0 + i, (lo, hi), here)
    finally:
        model.clear_cache()
        model.train(was_training)
    return out.t().contiguous()  # [num_new, B] -> [B, num_new]


@torch.inference_mode()
def sample_without_cache(
    model: StageTransformer,
    prefix: torch.Tensor,
    num_new: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    allowed_range: Ranges = None,
    generator: Generators = None,
    guidance_scale: float = 1.0,
    uncond_prefix: torch.Tensor | None = None,
    frames: torch.Tensor | None = None,
    logit_bias: LogitBias | None = None,
) -> torch.Tensor:
    """The same draws as ``sample``, recomputing the whole sequence each step and drawing with
    ``torch.multinomial`` (the reference the tests hold ``sample`` to, and a benchmark baseline)."""
    _check(model, prefix, num_new)
    B, L0 = prefix.shape
    guided = _check_options(B, top_k, top_p, generator, guidance_scale, prefix, uncond_prefix)
    ranges = _ranges(allowed_range, num_new, model.config.num_outputs)
    frame_rows = _frame_rows(model, frames, prefix, num_new, guided)
    rows = torch.cat([prefix, uncond_prefix.to(prefix.device)]) if guided else prefix  # [B or 2B, L0]
    seq = torch.empty(rows.shape[0], L0 + num_new, dtype=torch.long, device=prefix.device)
    seq[:, :L0] = rows
    scale = guidance_scale if guided else None
    was_training = model.training
    model.eval()
    try:
        for i, (lo, hi) in enumerate(ranges):
            here = None if frame_rows is None else frame_rows[:, : L0 + i]
            logits = model(seq[:, : L0 + i], frames=here)[:, -1]  # [B or 2B, V_out]
            mixed = _guide(logits[:, lo:hi], B, scale)  # [B, hi - lo]
            if logit_bias is not None:
                mixed = mixed + logit_bias(i, seq[:B, L0 : L0 + i].t())
            picked = _pick(mixed, temperature, top_k, generator, top_p, _multinomial_reference)
            token = picked + lo  # [B]
            seq[:, L0 + i] = torch.cat([token, token]) if guided else token
    finally:
        model.train(was_training)
    return seq[:B, L0:]
