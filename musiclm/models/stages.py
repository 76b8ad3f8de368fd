"""MusicLM's three stages: their configs and their token sequence layouts.

Every stage sees the conditioning tokens M_A first (M_T at inference; 12 MuLan tokens), then its own context:

    semantic   [M][S_1 .. S_n]                                    p(S_t | S_<t, M)
    coarse     [M][S of the crop][SEP][A levels 0..3, frame-major]    p(A_t | A_<t, S, M)
    fine       [M][A levels 0..3, frame-major][SEP][A levels 4..11, frame-major]   (AudioLM's fine stage)

The numbers above are the paper's (SoundStream 50 Hz x 12 levels, 4 coarse); every layout is built
from the stage's :class:`~musiclm.tokenizers.backends.TokenRates`, so EnCodec's 75 Hz x 8 levels
(coarse 0..3, fine 4..7, three acoustic frames per 40-ms semantic frame) lay out the same way.

Each stage has one vocabulary made of blocks, one per codebook (one per conditioning level, one for
semantic codes, one per RVQ level), each as large as its codebook, plus SEP and PAD. The blocks the
stage *generates* come first, so the output head only spans ``[0, num_outputs)`` and logit j is token
id j; generated position i of an acoustic stage is level ``first_level + i % levels`` and may only
take the ids of that level's block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from musiclm.constants import SAMPLING_TEMPERATURES
from musiclm.models.transformer import TransformerConfig
from musiclm.tokenizers.backends import TokenRates

STAGES = ("semantic", "coarse", "fine")
PRESETS = ("tiny", "paper")
PAPER_RATES = TokenRates()
BLOCK = PAPER_RATES.acoustic_codebook_size  # the paper's codebook size (1024); layouts use their rates' sizes
FRAMES_PER_SEMANTIC = PAPER_RATES.frames_per_semantic  # the paper's 2 acoustic frames per 40-ms semantic frame

CROP_SECONDS = {"paper": {"semantic": 30.0, "coarse": 10.0, "fine": 3.0}, "tiny": {"semantic": 10.0, "coarse": 2.0, "fine": 1.0}}


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}': valid stages are {', '.join(STAGES)}")


def as_rates(rates: TokenRates | dict[str, Any] | None) -> TokenRates:
    """``TokenRates`` from a ``TokenRates``, its ``to_dict()`` (JSON, learner options) or None (the paper's)."""
    if rates is None:
        return PAPER_RATES
    if isinstance(rates, TokenRates):
        return rates
    if isinstance(rates, dict):
        return TokenRates.from_dict(rates)
    raise TypeError(f"rates must be a TokenRates or a dict, got {type(rates).__name__}")


def describe_rates(rates: TokenRates | dict[str, Any] | None) -> str:
    """``acoustic 75 Hz x 8 x 1024 (coarse 4), semantic 25 Hz x 1024, conditioning 12 x 1024``"""
    r = as_rates(rates)
    return (f"acoustic {r.acoustic_frame_rate} Hz x {r.acoustic_codebooks} x {r.acoustic_codebook_size} "
            f"(coarse {r.coarse_levels}), semantic {r.semantic_frame_rate} Hz x {r.semantic_codebook_size}, "
            f"conditioning {r.conditioning_codebooks} x {r.conditioning_codebook_size}")


@dataclass(frozen=True)
class VocabLayout:
    """Where each codebook's ids start in one stage's vocabulary (blocks as large as their codebooks)."""

    stage: str
    generated_levels: tuple[int, ...]  # RVQ levels generated (empty for the semantic stage)
    mulan_offset: int  # conditioning level q is at mulan_offset + q * rates.conditioning_codebook_size
    semantic_offset: int | None  # None when the stage never sees semantic tokens
    acoustic_offsets: tuple[int | None, ...]  # per RVQ level, None when unused by the stage
    sep: int
    pad: int
    vocab_size: int
    num_outputs: int  # ids [0, num_outputs) are the generated blocks (the output head)
    rates: TokenRates = PAPER_RATES

    @staticmethod
    def for_stage(stage: str, rates: TokenRates | dict[str, Any] | None = None) -> VocabLayout:
        _check_stage(stage)
        r = as_rates(rates)
        a_size, s_size = r.acoustic_codebook_size, r.semantic_codebook_size
        m_span = r.conditioning_codebooks * r.conditioning_codebook_size  # all conditioning blocks
        acoustic: list[int | None] = [None] * r.acoustic_codebooks
        if stage == "semantic":
            levels: tuple[int, ...] = ()
            semantic, outputs = 0, s_size
            mulan = outputs
            end = mulan + m_span
        elif stage == "coarse":
            levels = tuple(range(r.coarse_levels))
            for q in levels:
                acoustic[q] = q * a_size
            outputs = len(levels) * a_size
            mulan = outputs
            semantic = mulan + m_span
            end = semantic + s_size
        else:  # fine: the generated levels first, then the coarse levels it is conditioned on
            levels = tuple(range(r.coarse_levels, r.acoustic_codebooks))
            for i, q in enumerate(levels):
                acoustic[q] = i * a_size
            outputs = len(levels) * a_size
            for q in range(r.coarse_levels):
                acoustic[q] = outputs + q * a_size
            mulan = outputs + r.coarse_levels * a_size
            semantic = None
            end = mulan + m_span
        return VocabLayout(stage, levels, mulan, semantic, tuple(acoustic), end, end + 1, end + 2, outputs, r)

    @property
    def levels_per_frame(self) -> int:
        """Tokens generated per acoustic frame (1 per semantic frame for the semantic stage)."""
        return max(1, len(self.generated_levels))

    @property
    def output_block_size(self) -> int:
        """Ids per generated block: the semantic codebook's size, or an acoustic level's."""
        return self.rates.semantic_codebook_size if not self.generated_levels else self.rates.acoustic_codebook_size

    def allowed_ranges(self, num_new: int) -> np.ndarray:
        """Valid id range [lo, hi) of each of ``num_new`` generated positions: int64 [num_new, 2]."""
        size = self.output_block_size
        block = np.arange(num_new) % self.levels_per_frame  # the generated block of each position
        return np.stack([block * size, (block + 1) * size], axis=1).astype(np.int64)

    # ---- codes -> ids (numpy or torch, same arithmetic) -------------------------------------

    def mulan_ids(self, mulan):
        """Conditioning tokens [..., Qm] -> ids [..., Qm] (level q offset by q * its codebook size)."""
        size = self.rates.conditioning_codebook_size
        return mulan + _like(mulan, [self.mulan_offset + q * size for q in range(self.rates.conditioning_codebooks)])

    def semantic_ids(self, semantic):
        if self.semantic_offset is None:
            raise ValueError(f"the {self.stage} stage has no semantic tokens")
        return semantic + self.semantic_offset

    def acoustic_ids(self, frames, levels: tuple[int, ...]):
        """Acoustic codes [..., F, len(levels)] -> ids flattened frame-major [..., F * len(levels)]."""
        offsets = [self.acoustic_offsets[q] for q in levels]
        if any(o is None for o in offsets):
            raise ValueError(f"the {self.stage} stage has no ids for acoustic levels {levels}")
        ids = frames + _like(frames, offsets)
        return ids.reshape(*ids.shape[:-2], -1)  # [..., F, Q] -> [..., F * Q]

    def generated_codes(self, ids):
        """Generated ids [..., F * Q] (frame-major) -> codes [..., Q, F]; [..., F] for the semantic stage."""
        if not self.generated_levels:
            return ids - self.semantic_offset
        q = len(self.generated_levels)
        frames = ids.reshape(*ids.shape[:-1], -1, q)  # [..., F * Q] -> [..., F, Q]
        codes = frames - _like(frames, [self.acoustic_offsets[level] for level in self.generated_levels])
        return codes.swapaxes(-1, -2) if isinstance(codes, np.ndarray) else codes.transpose(-1, -2)


def _like(x, values: list[int]):
    if isinstance(x, torch.Tensor):
        return torch.tensor(values, dtype=x.dtype, device=x.device)
    return np.asarray(values, dtype=np.int64)


def sequence_lengths(stage: str, seconds: float, rates: TokenRates | dict[str, Any] | None = None) -> tuple[int, int]:
    """(prefix length, generated length) of a stage's sequence covering ``seconds`` of audio."""
    _check_stage(stage)
    r = as_rates(rates)
    sem = int(round(seconds * r.semantic_frame_rate))
    ac = sem * r.frames_per_semantic
    cond = r.conditioning_codebooks
    if stage == "semantic":
        return cond, sem
    if stage == "coarse":
        return cond + sem + 1, ac * r.coarse_levels
    return cond + ac * r.coarse_levels + 1, ac * (r.acoustic_codebooks - r.coarse_levels)


def max_seq_len_for(stage: str, crop_seconds: float, rates: TokenRates | dict[str, Any] | None = None) -> int:
    """Cache/bias length for a stage: its crop's sequence rounded up to a multiple of 256.

    Generation never exceeds one crop (semantic slides by half a crop; acoustic stages use crop windows).
    """
    prefix, generated = sequence_lengths(stage, crop_seconds, rates)
    return int(math.ceil((prefix + generated) / 256) * 256)


@dataclass
class StageConfig:
    """One stage: its Transformer, its training crop, its sampling temperature and the token rates it
    models (paper defaults; a config saved before rates were recorded loads with the paper's)."""

    stage: str = "semantic"
    crop_seconds: float = 30.0
    temperature: float = SAMPLING_TEMPERATURES["semantic"]
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    rates: TokenRates = field(default_factory=TokenRates)

    def __post_init__(self) -> None:
        _check_stage(self.stage)
        self.rates = as_rates(self.rates)  # a dict when rebuilt from config.json
        layout = self.layout
        if self.transformer.vocab_size != layout.vocab_size or self.transformer.num_outputs != layout.num_outputs:
            raise ValueError(
                f"{self.stage} stage needs vocab_size={layout.vocab_size}, output_size={layout.num_outputs} "
                f"for its token rates; got {self.transformer.vocab_size}, {self.transformer.output_size}"
            )
        needed = sum(sequence_lengths(self.stage, self.crop_seconds, self.rates))
        if self.transformer.max_seq_len < needed:
            raise ValueError(f"max_seq_len {self.transformer.max_seq_len} < {needed} tokens of a {self.crop_seconds}-s crop")

    @property
    def layout(self) -> VocabLayout:
        return VocabLayout.for_stage(self.stage, self.rates)

    @property
    def crop_frames(self) -> int:
        """Semantic frames (40 ms each at 25 Hz) in one crop."""
        return int(round(self.crop_seconds * self.rates.semantic_frame_rate))

    @classmethod
    def preset(cls, stage: str, name: str, rates: TokenRates | dict[str, Any] | None = None) -> StageConfig:
        """``tiny``: dim 256, 4 layers, 4 heads, FF 1024 (GELU), crops 10/2/1 s (short acoustic crops: more steps in the CPU demo's minutes); ``paper``: 24 x 1024, 16 heads, GEGLU 4096, 30/10/3 s.

        ``rates`` (default: the paper's) set the vocabulary and sequence lengths, e.g. EnCodec's 75 Hz x 8.
        """
        _check_stage(stage)
        if name not in PRESETS:
            raise ValueError(f"unknown preset '{name}': valid presets are {', '.join(PRESETS)}")
        rates = as_rates(rates)
        crop = CROP_SECONDS[name][stage]
        layout = VocabLayout.for_stage(stage, rates)
        # tiny trades the paper's gated FF and attention-probability dropout for ~25% faster CPU steps
        sizes = dict(dim=256, n_layers=4, n_heads=4, ff_dim=1024, gated_ff=False, attn_dropout=0.0) if name == "tiny" else {}
        transformer = TransformerConfig(
            vocab_size=layout.vocab_size,
            output_size=layout.num_outputs,
            max_seq_len=max_seq_len_for(stage, crop, rates),
            dropout=0.1,
            **sizes,
        )
        return cls(stage=stage, crop_seconds=crop, temperature=SAMPLING_TEMPERATURES[stage], transformer=transformer,
                   rates=rates)


def _as_codes(x, name: str, shape_rank: int, size: int, last: int | None = None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != shape_rank or (last is not None and a.shape[-1] != last):
        raise ValueError(
            f"sample['{name}'] has shape {a.shape}, expected rank {shape_rank}" + (f" with last dim {last}" if last else "")
            + " (the stage's token rates; shards of another tokenizer?)"
        )
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= size):
        raise ValueError(f"sample['{name}'] has codes outside [0, {size})")
    return a


def build_training_example(
    sample: dict, stage: str, config: StageConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random ``crop_seconds`` crop of a token-shard sample laid out for ``stage`` (at ``config.rates``).

    The crop starts on a 40-ms boundary (one semantic frame = ``frames_per_semantic`` acoustic frames:
    2 for SoundStream, 3 for EnCodec) so that the semantic and acoustic tokens describe the same audio;
    shorter samples are used whole. Returns (tokens int64 [L], loss_mask bool [L]) with the loss only on
    the generated tokens.
    """
    _check_stage(stage)
    if config.stage != stage:
        raise ValueError(f"config is for the {config.stage} stage, not {stage}")
    layout, r = config.layout, config.rates
    per = r.frames_per_semantic
    mulan = _as_codes(sample["mulan"], "mulan", 1, r.conditioning_codebook_size, r.conditioning_codebooks)
    semantic = _as_codes(sample["semantic"], "semantic", 1, r.semantic_codebook_size)
    frames = len(semantic)
    acoustic = None
    if stage != "semantic":
        acoustic = _as_codes(sample["acoustic"], "acoustic", 2, r.acoustic_codebook_size, r.acoustic_codebooks)
        frames = min(frames, acoustic.shape[0] // per)  # semantic frames with all their acoustic frames
    if frames <= 0:
        raise ValueError("sample has no complete 40-ms frame")
    n = min(config.crop_frames, frames)
    start = int(rng.integers(0, frames - n + 1))
    prefix = [layout.mulan_ids(mulan)]
    if stage == "semantic":
        generated = layout.semantic_ids(semantic[start : start + n])
    else:
        a = acoustic[start * per : (start + n) * per]  # [per * n, K]
        coarse_levels = tuple(range(r.coarse_levels))
        coarse = layout.acoustic_ids(a[:, : r.coarse_levels], coarse_levels)  # [per * n * Kc]
        if stage == "coarse":
            prefix += [layout.semantic_ids(semantic[start : start + n]), [layout.sep]]
            generated = coarse
        else:
            prefix += [coarse, [layout.sep]]
            generated = layout.acoustic_ids(a[:, r.coarse_levels :], layout.generated_levels)  # [per * n * (K - Kc)]
    prefix_ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in prefix])
    tokens = np.concatenate([prefix_ids, generated.astype(np.int64)])
    loss_mask = np.zeros(len(tokens), dtype=bool)
    loss_mask[len(prefix_ids) :] = True
    return tokens, loss_mask
