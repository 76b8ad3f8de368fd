"""One window of one stage: what a Serve stage deployment runs, batched over rows of many requests.

Every function takes and returns *codes* (numpy-convertible, 0..codebook size - 1 per codebook), never
stage ids: the stage's vocabulary layout stays inside. A window is one training crop at most, so its
sequence (and the KV cache) is bounded by the crop whatever the length of the piece:

    semantic  [cond][S prefix][S new]                    (prefix = the previous window's last half)
    coarse    [cond][S of the window][SEP][A[:Kc] prefix][A[:Kc] new]
    fine      [cond][A[:Kc] of the window][SEP][A[Kc:] prefix][A[Kc:] new]

``cond`` is M (12 MuLan tokens) and, for a stage trained with it, the melody frames of the window
(``VocabLayout.condition_ids``); a stage trained with the melody contour also takes the window's
``contour`` [B, n] (one class per semantic frame), added position by position (``contour_positions``). The acoustic windows *continue* the previous window: its second
half is prefilled as given tokens and only the new frames are drawn, exactly the sequence the stage
was trained on (a random crop), so joins are as continuous as any other position.

Each row draws from its own generator, ``row_generator(seed, row, stage, window)``: a row's tokens do
not depend on which other rows (of the same request or of others) share the batch.

:class:`ChunkDecoder` turns the acoustic codes of consecutive windows into audio chunks that
concatenate to one continuous signal: with the codec's streaming state (``decode_stream``, causal
SoundStream: exactly ``decode`` of the whole), or, for a codec without one, by decoding each chunk
after a few frames of left context and cross-fading a held-back tail (see its docstring).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from musiclm.generation.sampler import sample
from musiclm.generation.spec import STAGE_NAMES, Sampling
from musiclm.models.stages import StageConfig, contour_positions
from musiclm.models.transformer import StageTransformer

SeedRow = tuple[int, int, int]  # (request seed, row, window index): the generator of one row in one window


def row_generator(seed: int, row: int, stage: str, window: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one row of one request in one window of one stage.

    Hashing (seed, row, stage, window) with numpy's SeedSequence gives streams that are independent
    across rows and windows and the same whichever batch, replica or process draws them (on one kind
    of device: CPU and CUDA generators differ).
    """
    if stage not in STAGE_NAMES:
        raise ValueError(f"unknown stage '{stage}': valid stages are {', '.join(STAGE_NAMES)}")
    if min(seed, row, window) < 0:
        raise ValueError(f"seed, row and window must be >= 0, got {seed}, {row}, {window}")
    words = np.random.SeedSequence([int(seed), int(row), STAGE_NAMES.index(stage), int(window)]).generate_state(2)
    value = (int(words[0]) << 31) ^ int(words[1])  # < 2**63: any torch generator accepts it
    return torch.Generator(device=device).manual_seed(value)


def model_device(model: StageTransformer) -> torch.device:
    return model.embed.weight.device


def check_codes(x: Any, name: str, shape: tuple[int | None, ...], size: int, device: Any = None) -> torch.Tensor:
    """``x`` as a long tensor of ``shape`` (None = any) with codes in [0, size); a ValueError naming it otherwise."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape} (None = any)")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer codes, got {x.dtype}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= size):
        raise ValueError(f"{name} has codes outside [0, {size})")
    return x.long().to(device) if device is not None else x.long()


def _generators(seeds: Sequence[SeedRow] | None, stage: str, rows: int, device: torch.device) -> list | None:
    if seeds is None:
        return None
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows} rows (one (seed, row, window) per row)")
    return [row_generator(s, r, stage, w, device) for s, r, w in seeds]


def _conditions(
    cfg: StageConfig, mulan: Any, melody: Any, sampling: Sampling, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(condition ids [B, Lc], unconditional ids [B, Lc] when guidance is on, else None)."""
    layout, r = cfg.layout, cfg.rates
    mulan = check_codes(mulan, "mulan", (None, r.conditioning_codebooks), r.conditioning_codebook_size, device)
    B = mulan.shape[0]
    if melody is not None:
        if not cfg.melody_codebooks:
            raise ValueError(f"the {cfg.stage} stage was trained without melody conditioning: it takes no melody")
        melody = check_codes(
            melody, "melody", (B, cfg.melody_frames, cfg.melody_codebooks), cfg.melody_codebook_size, device
        )
    cond = layout.condition_ids(mulan, melody)  # [B, Lc]; a stage with melody gets NULL melody ids for None
    if sampling.guidance_scale == 1.0:
        return cond, None
    null = torch.as_tensor(layout.condition_ids(None, None), device=device)  # [Lc] NULL ids
    return cond, null.reshape(1, -1).expand(B, -1)  # one unconditional condition for every row


def _frames(cfg: StageConfig, contour: Any, B: int, n: int, region_start: int, length: int,
            device: torch.device) -> torch.Tensor | None:
    """Every position's frame class [B, length] from the window's contour [B, n], or None (no contour)."""
    if contour is None:
        return None
    if not cfg.contour:
        raise ValueError(f"the {cfg.stage} stage was trained without the melody contour: it takes no contour")
    contour = check_codes(contour, "contour", (B, n), cfg.transformer.frame_classes)
    return torch.from_numpy(contour_positions(cfg, contour.numpy(), region_start, length)).to(device)


def _draw(
    model: StageTransformer,
    prefix: torch.Tensor,
    uncond: torch.Tensor | None,
    num_new: int,
    sampling: Sampling,
    allowed: Any,
    generators: list | None,
    frames: torch.Tensor | None = None,
    logit_bias: Any = None,
) -> torch.Tensor:
    """``sample`` with the window's settings: ids [B, num_new]."""
    guidance = {} if uncond is None else {"guidance_scale": sampling.guidance_scale, "uncond_prefix": uncond}
    return sample(model, prefix, num_new, temperature=sampling.temperature, top_k=sampling.top_k,
                  top_p=sampling.top_p, allowed_range=allowed, generator=generators, frames=frames,
                  logit_bias=logit_bias, **guidance)


def pitch_bias(probe: Any, cfg: StageConfig, contour: torch.Tensor, done: int, weight: float) -> Any:
    """The coarse window's ``logit_bias`` (sampler): new token i (level ``q = i % Kc`` of acoustic frame
    ``done + i // Kc``) gets ``weight * log p(target | the frame's levels < q + candidate)`` from the pitch
    ``probe`` (:mod:`musiclm.models.pitch_probe`), the target being the contour's class of the frame's 40-ms
    frame (``contour`` [B, n]); unpitched frames get no bias."""
    from musiclm.tokenizers.contour import PITCH_CLASSES

    layout, r = cfg.layout, cfg.rates
    Kc, per = r.coarse_levels, r.frames_per_semantic
    if probe.config.levels != Kc or probe.config.codebook_size != r.acoustic_codebook_size:
        raise ValueError(f"the pitch probe reads {probe.config.levels} levels of {probe.config.codebook_size} codes; "
                         f"the coarse stage draws {Kc} of {r.acoustic_codebook_size}")
    offsets = [layout.acoustic_offsets[q] for q in range(Kc)]
    vectors = probe.code_vectors.to(contour.device)  # [Kc, V, D]
    projections = [probe.code_projections(q) for q in range(Kc)]  # Kc x [V, H], once per window, not per token

    def bias(i: int, drawn: torch.Tensor) -> torch.Tensor:  # drawn [i, B] ids
        q, frame = i % Kc, done + i // Kc
        target = contour[:, frame // per]  # [B]
        latent = vectors.new_zeros(target.shape[0], vectors.shape[2])  # [B, D]: the frame's levels < q
        for level in range(q):
            latent = latent + vectors[level][drawn[i - q + level] - offsets[level]]
        log_probs = probe.candidate_log_probs(latent, q, target.clamp(max=PITCH_CLASSES - 1), projections[q])  # [B, V]
        return weight * log_probs * (target < PITCH_CLASSES).to(log_probs.dtype)[:, None]

    return bias


def _check_stage(cfg: StageConfig, stage: str) -> None:
    if cfg.stage != stage:
        raise ValueError(f"a {stage} window needs the {stage} stage's config, got the {cfg.stage} stage's")


def semantic_window(
    model: StageTransformer,
    cfg: StageConfig,
    mulan: Any,
    prefix: Any,
    num_new: int,
    sampling: Sampling,
    seeds: Sequence[SeedRow] | None = None,
    melody: Any = None,
    contour: Any = None,
) -> np.ndarray:
    """Semantic codes [B, num_new] continuing ``prefix`` [B, P] (may be empty) under M ``mulan`` [B, Qm]
    (and ``melody`` [B, melody_frames, Qmel], ``contour`` [B, P + num_new] for a stage trained with them);
    P + num_new <= the crop."""
    _check_stage(cfg, "semantic")
    device, layout, r = model_device(model), cfg.layout, cfg.rates
    cond, uncond = _conditions(cfg, mulan, melody, sampling, device)
    B = cond.shape[0]
    prefix = check_codes(prefix, "prefix", (B, None), r.semantic_codebook_size, device)
    if num_new < 1 or prefix.shape[1] + num_new > cfg.crop_frames:
        raise ValueError(
            f"a semantic window holds 1..{cfg.crop_frames} new frames after its prefix: "
            f"got prefix {prefix.shape[1]} + {num_new} new"
        )
    context = layout.semantic_ids(prefix)  # [B, P]
    ids = torch.cat([cond, context], dim=1)  # [B, Lc + P]
    uncond_ids = None if uncond is None else torch.cat([uncond, context], dim=1)
    gens = _generators(seeds, "semantic", B, device)
    n = prefix.shape[1] + num_new
    frames = _frames(cfg, contour, B, n, cond.shape[1], ids.shape[1] + num_new, device)
    new = _draw(model, ids, uncond_ids, num_new, sampling, (0, layout.num_outputs), gens, frames)
    return layout.generated_codes(new).cpu().numpy()


def coarse_window(
    model: StageTransformer,
    cfg: StageConfig,
    mulan: Any,
    semantic: Any,
    prefix: Any,
    sampling: Sampling,
    seeds: Sequence[SeedRow] | None = None,
    melody: Any = None,
    contour: Any = None,
    pitch_probe: Any = None,
) -> np.ndarray:
    """Coarse codes [B, Kc, p n - Pa] of the frames after ``prefix`` [B, Kc, Pa] for the window's
    semantic codes ``semantic`` [B, n] (n <= the crop; p acoustic frames per semantic frame), and its
    ``contour`` [B, n] for a stage trained with the melody contour. ``sampling.pitch_guidance`` > 0
    steers the draws toward the contour with ``pitch_probe`` (``pitch_bias``)."""
    _check_stage(cfg, "coarse")
    device, layout, r = model_device(model), cfg.layout, cfg.rates
    cond, uncond = _conditions(cfg, mulan, melody, sampling, device)
    B, Kc, per = cond.shape[0], r.coarse_levels, r.frames_per_semantic
    semantic = check_codes(semantic, "semantic", (B, None), r.semantic_codebook_size, device)
    prefix = check_codes(prefix, "prefix", (B, Kc, None), r.acoustic_codebook_size, device)
    n, done = semantic.shape[1], prefix.shape[2]
    if not 1 <= n <= cfg.crop_frames:
        raise ValueError(f"a coarse window holds 1..{cfg.crop_frames} semantic frames, got {n}")
    if done >= n * per:
        raise ValueError(f"coarse prefix of {done} frames leaves nothing to generate for {n} semantic frames")
    sep = torch.full((B, 1), layout.sep, dtype=torch.long, device=device)
    given = layout.acoustic_ids(prefix.transpose(1, 2), tuple(range(Kc)))  # [B, Kc, Pa] -> [B, Pa * Kc]
    context = torch.cat([layout.semantic_ids(semantic), sep, given], dim=1)  # [B, n + 1 + Pa Kc]
    ids = torch.cat([cond, context], dim=1)
    uncond_ids = None if uncond is None else torch.cat([uncond, context], dim=1)
    num_new = (n * per - done) * Kc
    gens = _generators(seeds, "coarse", B, device)
    region = cond.shape[1] + n + 1  # the first acoustic id of the window
    frames = _frames(cfg, contour, B, n, region, ids.shape[1] + num_new, device)
    bias = None
    if sampling.pitch_guidance:
        if contour is None or pitch_probe is None:
            raise ValueError("pitch_guidance needs the melody contour and a pitch probe (checkpoints/pitch_probe, "
                             "`musiclm train pitch_probe`), and a coarse stage trained with the contour")
        target = check_codes(contour, "contour", (B, n), cfg.transformer.frame_classes, device)
        bias = pitch_bias(pitch_probe, cfg, target, done, sampling.pitch_guidance)
    new = _draw(model, ids, uncond_ids, num_new, sampling, layout.allowed_ranges(num_new), gens, frames, bias)
    return layout.generated_codes(new).cpu().numpy()  # [B, Kc, p n - Pa]


def fine_window(
    model: StageTransformer,
    cfg: StageConfig,
    mulan: Any,
    coarse: Any,
    prefix: Any,
    sampling: Sampling,
    seeds: Sequence[SeedRow] | None = None,
    melody: Any = None,
    contour: Any = None,
) -> np.ndarray:
    """Fine codes [B, K - Kc, f - Pa] of the frames after ``prefix`` [B, K - Kc, Pa] for the window's
    coarse codes ``coarse`` [B, Kc, f] (f <= the crop's acoustic frames), and its ``contour``
    [B, f / p] for a stage trained with the melody contour."""
    _check_stage(cfg, "fine")
    device, layout, r = model_device(model), cfg.layout, cfg.rates
    cond, uncond = _conditions(cfg, mulan, melody, sampling, device)
    B, Kc, Kf = cond.shape[0], r.coarse_levels, len(layout.generated_levels)
    coarse = check_codes(coarse, "coarse", (B, Kc, None), r.acoustic_codebook_size, device)
    prefix = check_codes(prefix, "prefix", (B, Kf, None), r.acoustic_codebook_size, device)
    f, done = coarse.shape[2], prefix.shape[2]
    crop = cfg.crop_frames * r.frames_per_semantic
    if not 1 <= f <= crop:
        raise ValueError(f"a fine window holds 1..{crop} acoustic frames, got {f}")
    if done >= f:
        raise ValueError(f"fine prefix of {done} frames leaves nothing to generate in a {f}-frame window")
    sep = torch.full((B, 1), layout.sep, dtype=torch.long, device=device)
    given_coarse = layout.acoustic_ids(coarse.transpose(1, 2), tuple(range(Kc)))  # [B, Kc, f] -> [B, f * Kc]
    given_fine = layout.acoustic_ids(prefix.transpose(1, 2), layout.generated_levels)  # [B, Kf, Pa] -> [B, Pa * Kf]
    context = torch.cat([given_coarse, sep, given_fine], dim=1)
    ids = torch.cat([cond, context], dim=1)
    uncond_ids = None if uncond is None else torch.cat([uncond, context], dim=1)
    num_new = (f - done) * Kf
    gens = _generators(seeds, "fine", B, device)
    region = cond.shape[1] + f * Kc + 1  # the first fine id of the window
    n = -(-f // r.frames_per_semantic)  # semantic frames of the window
    frames = _frames(cfg, contour, B, n, region, ids.shape[1] + num_new, device)
    new = _draw(model, ids, uncond_ids, num_new, sampling, layout.allowed_ranges(num_new), gens, frames)
    return layout.generated_codes(new).cpu().numpy()  # [B, Kf, f - Pa]


# ----------------------------------------------------------------------------- codes -> audio, chunk by chunk


class _Feed:
    """An endless iterator returning the chunk set last: drives a pull-style ``decode_stream`` push by push."""

    def __init__(self) -> None:
        self.item: torch.Tensor | None = None

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> torch.Tensor:
        if self.item is None:
            raise StopIteration
        item, self.item = self.item, None
        return item


def _codec_device(codec: Any) -> torch.device:
    device = getattr(codec, "device", None)
    if isinstance(device, torch.device):
        return device
    params = getattr(codec, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


class ChunkDecoder:
    """Acoustic codes ``[N, K, f_i]`` arriving window after window -> audio chunks ``[N, T_i]`` that
    concatenate to one continuous waveform (one decoder per request: it keeps the codec's state).

    * A codec with streaming state (``decode_stream``; SoundStream when causal): each chunk is decoded
      with the state left by the previous ones, so the chunks are exactly ``decode`` of all the codes.
    * Any other codec (EnCodec here, a non-causal SoundStream): each chunk is decoded together with
      ``context`` (the previous frames, given by the plan) so its start has its left receptive field;
      the last ``fade_frames`` of every chunk are held back and, once the next chunk's decode (which
      covers them as context, now with right context too) arrives, cross-faded into it with a raised
      cosine. The output lags by ``fade_frames``; ``final=True`` flushes the tail. For a frame-local
      codec this is exact; for a convolutional one the error is confined to the held-back frames.

    ``streaming=None`` picks the codec's streaming state when it has one; ``False`` forces the overlap
    join (what an executor whose codec replicas are stateless, the Serve ingress, does: pass the same
    to the in-process cascade to get the same bytes).

    Rows are decoded one by one (a convolution's rounding depends on the batch size): a row's audio is
    bit-for-bit the same whichever batch it was generated in.
    """

    def __init__(self, codec: Any, fade_frames: int = 4, streaming: bool | None = None) -> None:
        if fade_frames < 1:
            raise ValueError(f"fade_frames must be >= 1, got {fade_frames}")
        self.codec = codec
        self.fade_frames = fade_frames
        can_stream = callable(getattr(codec, "decode_stream", None)) and bool(
            getattr(getattr(codec, "config", None), "causal", True)
        )
        if streaming and not can_stream:
            raise ValueError("this codec has no streaming decode (decode_stream of a causal codec)")
        self.streaming = can_stream if streaming is None else streaming  # False: the overlap join, stateless codec
        self._streams: list[tuple[_Feed, Any]] = []  # per row (streaming mode)
        self._pending: np.ndarray | None = None  # held-back tail [N, S] (overlap mode)
        self._device = _codec_device(codec)

    def _decode(self, codes: torch.Tensor) -> np.ndarray:
        """codes [N, K, f] -> wav [N, f * hop], row by row (with each row's streaming state)."""
        if self.streaming and not self._streams:
            self._streams = [(feed, self.codec.decode_stream(feed)) for feed in (_Feed() for _ in range(len(codes)))]
        if self.streaming and len(self._streams) != len(codes):
            raise ValueError(f"decode got {len(codes)} rows after {len(self._streams)}")
        rows = []
        with torch.inference_mode():
            for i in range(len(codes)):
                if self.streaming:
                    feed, stream = self._streams[i]
                    feed.item = codes[i : i + 1]
                    wav = next(stream)
                else:
                    wav = self.codec.decode(codes[i : i + 1])
                rows.append(torch.as_tensor(wav).float().cpu().numpy())
        return np.concatenate(rows, axis=0)

    def __call__(self, codes: Any, context: Any = None, final: bool = False) -> np.ndarray:
        codes = torch.as_tensor(np.asarray(codes)).long().to(self._device)
        if codes.ndim != 3 or codes.shape[-1] == 0:
            raise ValueError(f"decode expects codes [N, K, f] with f >= 1, got shape {tuple(codes.shape)}")
        if self.streaming:
            return self._decode(codes)
        c = 0
        if context is not None:
            context = torch.as_tensor(np.asarray(context)).long().to(self._device)
            c = context.shape[-1]
            codes = torch.cat([context, codes], dim=-1) if c else codes  # [N, K, c + f]
        full = self._decode(codes)  # [N, (c + f) hop]
        hop = full.shape[1] // codes.shape[-1]
        out = full[:, c * hop :]
        if self._pending is not None:
            p = self._pending.shape[1]
            if p > c * hop:
                raise ValueError(f"decode context of {c} frames does not cover the {p // hop} held-back frames")
            ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(p) + 0.5) / p)  # raised cosine 0 -> 1
            faded = self._pending * (1 - ramp) + full[:, c * hop - p : c * hop] * ramp
            out = np.concatenate([faded.astype(np.float32), out], axis=1)
            self._pending = None
        if final:
            return out
        hold = min(self.fade_frames * hop, full.shape[1] - c * hop)
        self._pending = out[:, out.shape[1] - hold :]
        return out[:, : out.shape[1] - hold]
