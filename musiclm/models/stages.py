"""MusicLM's three stages: their configs and their token sequence layouts.

Every stage sees the 12 MuLan tokens M_A first (M_T at inference), then its own context:

    semantic   [M][S_1 .. S_n]                                    p(S_t | S_<t, M)
    coarse     [M][S of the crop][SEP][A levels 0..3, frame-major]    p(A_t | A_<t, S, M)
    fine       [M][A levels 0..3, frame-major][SEP][A levels 4..11, frame-major]   (AudioLM's fine stage)

Each stage has one vocabulary made of 1024-id blocks (one per MuLan level, one for semantic codes,
one per RVQ level) plus SEP and PAD. The blocks the stage *generates* come first, so the output
head only spans ``[0, num_outputs)`` and logit j is token id j; generated position i of an acoustic
stage is level ``first_level + i % levels`` and may only take the ids of that level's block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from musiclm.constants import (
    ACOUSTIC_CODEBOOK_SIZE,
    ACOUSTIC_CODEBOOKS,
    ACOUSTIC_FRAME_RATE,
    COARSE_LEVELS,
    MULAN_CODEBOOK_SIZE,
    MULAN_CODEBOOKS,
    SAMPLING_TEMPERATURES,
    SEMANTIC_CODEBOOK_SIZE,
    SEMANTIC_FRAME_RATE,
)
from musiclm.models.transformer import TransformerConfig

STAGES = ("semantic", "coarse", "fine")
PRESETS = ("tiny", "paper")
BLOCK = 1024  # every codebook of the paper has 1024 codes
assert ACOUSTIC_CODEBOOK_SIZE == SEMANTIC_CODEBOOK_SIZE == MULAN_CODEBOOK_SIZE == BLOCK
FRAMES_PER_SEMANTIC = ACOUSTIC_FRAME_RATE // SEMANTIC_FRAME_RATE  # 2 acoustic frames per 40-ms semantic frame

CROP_SECONDS = {"paper": {"semantic": 30.0, "coarse": 10.0, "fine": 3.0}, "tiny": {"semantic": 10.0, "coarse": 2.0, "fine": 1.0}}


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}': valid stages are {', '.join(STAGES)}")


@dataclass(frozen=True)
class VocabLayout:
    """Where each codebook's 1024 ids start in one stage's vocabulary."""

    stage: str
    generated_levels: tuple[int, ...]  # RVQ levels generated (empty for the semantic stage)
    mulan_offset: int  # MuLan level q is at mulan_offset + q * 1024
    semantic_offset: int | None  # None when the stage never sees semantic tokens
    acoustic_offsets: tuple[int | None, ...]  # per RVQ level, None when unused by the stage
    sep: int
    pad: int
    vocab_size: int
    num_outputs: int  # ids [0, num_outputs) are the generated blocks (the output head)

    @staticmethod
    def for_stage(stage: str) -> VocabLayout:
        _check_stage(stage)
        acoustic: list[int | None] = [None] * ACOUSTIC_CODEBOOKS
        if stage == "semantic":
            levels: tuple[int, ...] = ()
            semantic, outputs = 0, BLOCK
            mulan = BLOCK
            end = mulan + MULAN_CODEBOOKS * BLOCK
        elif stage == "coarse":
            levels = tuple(range(COARSE_LEVELS))
            for q in levels:
                acoustic[q] = q * BLOCK
            outputs = len(levels) * BLOCK
            mulan = outputs
            semantic = mulan + MULAN_CODEBOOKS * BLOCK
            end = semantic + BLOCK
        else:  # fine: generated levels 4..11 first, then the coarse levels it is conditioned on
            levels = tuple(range(COARSE_LEVELS, ACOUSTIC_CODEBOOKS))
            for i, q in enumerate(levels):
                acoustic[q] = i * BLOCK
            outputs = len(levels) * BLOCK
            for q in range(COARSE_LEVELS):
                acoustic[q] = outputs + q * BLOCK
            mulan = outputs + COARSE_LEVELS * BLOCK
            semantic = None
            end = mulan + MULAN_CODEBOOKS * BLOCK
        return VocabLayout(stage, levels, mulan, semantic, tuple(acoustic), end, end + 1, end + 2, outputs)

    @property
    def levels_per_frame(self) -> int:
        """Tokens generated per acoustic frame (1 per semantic frame for the semantic stage)."""
        return max(1, len(self.generated_levels))

    def allowed_ranges(self, num_new: int) -> np.ndarray:
        """Valid id range [lo, hi) of each of ``num_new`` generated positions: int64 [num_new, 2]."""
        block = np.arange(num_new) % self.levels_per_frame  # the generated block of each position
        return np.stack([block * BLOCK, (block + 1) * BLOCK], axis=1).astype(np.int64)

    # ---- codes -> ids (numpy or torch, same arithmetic) -------------------------------------

    def mulan_ids(self, mulan):
        """MuLan tokens [..., 12] -> ids [..., 12] (level q offset by q * 1024)."""
        return mulan + _like(mulan, [self.mulan_offset + q * BLOCK for q in range(MULAN_CODEBOOKS)])

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
        codes = ids % BLOCK  # generated blocks start at 0, one block per level
        if not self.generated_levels:
            return codes
        q = len(self.generated_levels)
        codes = codes.reshape(*codes.shape[:-1], -1, q)  # [..., F * Q] -> [..., F, Q]
        return codes.swapaxes(-1, -2) if isinstance(codes, np.ndarray) else codes.transpose(-1, -2)


def _like(x, values: list[int]):
    if isinstance(x, torch.Tensor):
        return torch.tensor(values, dtype=x.dtype, device=x.device)
    return np.asarray(values, dtype=np.int64)


def sequence_lengths(stage: str, seconds: float) -> tuple[int, int]:
    """(prefix length, generated length) of a stage's sequence covering ``seconds`` of audio."""
    _check_stage(stage)
    sem = int(round(seconds * SEMANTIC_FRAME_RATE))
    ac = sem * FRAMES_PER_SEMANTIC
    if stage == "semantic":
        return MULAN_CODEBOOKS, sem
    if stage == "coarse":
        return MULAN_CODEBOOKS + sem + 1, ac * COARSE_LEVELS
    return MULAN_CODEBOOKS + ac * COARSE_LEVELS + 1, ac * (ACOUSTIC_CODEBOOKS - COARSE_LEVELS)


def max_seq_len_for(stage: str, crop_seconds: float) -> int:
    """Cache/bias length for a stage: its crop's sequence rounded up to a multiple of 256.

    Generation never exceeds one crop (semantic slides by half a crop; acoustic stages use crop windows).
    """
    prefix, generated = sequence_lengths(stage, crop_seconds)
    return int(math.ceil((prefix + generated) / 256) * 256)


@dataclass
class StageConfig:
    """One stage: its Transformer, its training crop and its sampling temperature (paper defaults)."""

    stage: str = "semantic"
    crop_seconds: float = 30.0
    temperature: float = SAMPLING_TEMPERATURES["semantic"]
    transformer: TransformerConfig = field(default_factory=TransformerConfig)

    def __post_init__(self) -> None:
        _check_stage(self.stage)
        layout = self.layout
        if self.transformer.vocab_size != layout.vocab_size or self.transformer.num_outputs != layout.num_outputs:
            raise ValueError(
                f"{self.stage} stage needs vocab_size={layout.vocab_size}, output_size={layout.num_outputs}; "
                f"got {self.transformer.vocab_size}, {self.transformer.output_size}"
            )
        needed = sum(sequence_lengths(self.stage, self.crop_seconds))
        if self.transformer.max_seq_len < needed:
            raise ValueError(f"max_seq_len {self.transformer.max_seq_len} < {needed} tokens of a {self.crop_seconds}-s crop")

    @property
    def layout(self) -> VocabLayout:
        return VocabLayout.for_stage(self.stage)

    @property
    def crop_frames(self) -> int:
        """Semantic frames (40 ms each) in one crop."""
        return int(round(self.crop_seconds * SEMANTIC_FRAME_RATE))

    @classmethod
    def preset(cls, stage: str, name: str) -> StageConfig:
        """``tiny``: dim 256, 4 layers, 4 heads, FF 1024 (GELU), crops 10/2/1 s (short acoustic crops: more steps in the CPU demo's minutes); ``paper``: 24 x 1024, 16 heads, GEGLU 4096, 30/10/3 s."""
        _check_stage(stage)
        if name not in PRESETS:
            raise ValueError(f"unknown preset '{name}': valid presets are {', '.join(PRESETS)}")
        crop = CROP_SECONDS[name][stage]
        layout = VocabLayout.for_stage(stage)
        # tiny trades the paper's gated FF and attention-probability dropout for ~25% faster CPU steps
        sizes = dict(dim=256, n_layers=4, n_heads=4, ff_dim=1024, gated_ff=False, attn_dropout=0.0) if name == "tiny" else {}
        transformer = TransformerConfig(
            vocab_size=layout.vocab_size,
            output_size=layout.num_outputs,
            max_seq_len=max_seq_len_for(stage, crop),
            dropout=0.1,
            **sizes,
        )
        return cls(stage=stage, crop_seconds=crop, temperature=SAMPLING_TEMPERATURES[stage], transformer=transformer)


def _as_codes(x, name: str, shape_rank: int, last: int | None = None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != shape_rank or (last is not None and a.shape[-1] != last):
        raise ValueError(f"sample['{name}'] has shape {a.shape}, expected rank {shape_rank}" + (f" with last dim {last}" if last else ""))
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= BLOCK):
        raise ValueError(f"sample['{name}'] has codes outside [0, {BLOCK})")
    return a


def build_training_example(
    sample: dict, stage: str, config: StageConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random ``crop_seconds`` crop of a token-shard sample laid out for ``stage``.

    The crop starts on a 40-ms boundary (one semantic frame = two acoustic frames) so that the
    semantic and acoustic tokens describe the same audio; shorter samples are used whole.
    Returns (tokens int64 [L], loss_mask bool [L]) with the loss only on the generated tokens.
    """
    _check_stage(stage)
    if config.stage != stage:
        raise ValueError(f"config is for the {config.stage} stage, not {stage}")
    layout = config.layout
    mulan = _as_codes(sample["mulan"], "mulan", 1, MULAN_CODEBOOKS)
    semantic = _as_codes(sample["semantic"], "semantic", 1)
    frames = len(semantic)
    acoustic = None
    if stage != "semantic":
        acoustic = _as_codes(sample["acoustic"], "acoustic", 2, ACOUSTIC_CODEBOOKS)
        frames = min(frames, acoustic.shape[0] // FRAMES_PER_SEMANTIC)  # semantic frames with both acoustic frames
    if frames <= 0:
        raise ValueError("sample has no complete 40-ms frame")
    n = min(config.crop_frames, frames)
    start = int(rng.integers(0, frames - n + 1))
    prefix = [layout.mulan_ids(mulan)]
    if stage == "semantic":
        generated = layout.semantic_ids(semantic[start : start + n])
    else:
        a = acoustic[start * FRAMES_PER_SEMANTIC : (start + n) * FRAMES_PER_SEMANTIC]  # [2n, 12]
        coarse = layout.acoustic_ids(a[:, :COARSE_LEVELS], tuple(range(COARSE_LEVELS)))  # [2n * 4]
        if stage == "coarse":
            prefix += [layout.semantic_ids(semantic[start : start + n]), [layout.sep]]
            generated = coarse
        else:
            prefix += [coarse, [layout.sep]]
            generated = layout.acoustic_ids(a[:, COARSE_LEVELS:], layout.generated_levels)  # [2n * 8]
    prefix_ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in prefix])
    tokens = np.concatenate([prefix_ids, generated.astype(np.int64)])
    loss_mask = np.zeros(len(tokens), dtype=bool)
    loss_mask[len(prefix_ids) :] = True
    return tokens, loss_mask
