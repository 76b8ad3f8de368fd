"""MusicLM's three stages: their configs and their token sequence layouts.

Every stage sees the conditioning tokens M_A first (M_T at inference; 12 MuLan tokens), then its own context:

    semantic   [M][S_1 .. S_n]                                    p(S_t | S_<t, M)
    coarse     [M][S of the crop][SEP][A levels 0..3, frame-major]    p(A_t | A_<t, S, M)
    fine       [M][A levels 0..3, frame-major][SEP][A levels 4..11, frame-major]   (AudioLM's fine stage)

The numbers above are the paper's (SoundStream 50 Hz x 12 levels, 4 coarse); every layout is built
from the stage's :class:`~musiclm.tokenizers.backends.TokenRates`, so EnCodec's 75 Hz x 8 levels
(coarse 0..3, fine 4..7, three acoustic frames per 40-ms semantic frame) lay out the same way.

Each stage has one vocabulary made of blocks, one per codebook (one per conditioning level, one for
semantic codes, one per RVQ level), each as large as its codebook, plus SEP, PAD and NULL. The blocks the
stage *generates* come first, so the output head only spans ``[0, num_outputs)`` and logit j is token
id j; generated position i of an acoustic stage is level ``first_level + i % levels`` and may only
take the ids of that level's block.

Conditioning (issue 4). The prefix starts with the *condition*: ``[M (Qm)][melody (n x Qmel, frame-major)]``,
the melody part only in a stage with ``melody_codebooks > 0`` (appendix C: melody tokens concatenated with
M), ``n = melody_frame_count(crop_seconds)`` embeddings of 4 s with a 3-s hop (10 s -> 3, 30 s -> 9).
Melody blocks (one per melody RVQ level, ``melody_codebook_size`` ids) come after all other codebook
blocks, so the layout of a stage without melody is unchanged. Replacing every condition token by NULL
gives the *unconditional* prefix: training drops M and the melody independently with probability
``conditioning_dropout``, so one model learns p(x | c) and p(x), and classifier-free guidance mixes them.

Melody contour (beyond the paper; :mod:`musiclm.tokenizers.contour`). A stage with ``contour=True`` also
takes the pitch class of every 40-ms frame, not as tokens but as a class added to each position's
embedding (``TransformerConfig.frame_classes``): the position that predicts a token of semantic frame t
gets the contour of frame t, every other position NULL (``contour_positions``). The melody tokens say
which tune; the contour says which pitch now, where the frame's codes are drawn. It is dropped together
with the melody tokens, so the unconditional branch of guidance has neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from musiclm.constants import (
    MELODY_CODEBOOK_SIZE,
    MELODY_HOP_SECONDS,
    MELODY_WINDOW_SECONDS,
    SAMPLING_TEMPERATURES,
)
from musiclm.models.transformer import TransformerConfig
from musiclm.tokenizers.backends import TokenRates
from musiclm.tokenizers.contour import CONTOUR_CLASSES

STAGES = ("semantic", "coarse", "fine")
PRESETS = ("tiny", "paper")
PAPER_RATES = TokenRates()
BLOCK = PAPER_RATES.acoustic_codebook_size  # the paper's codebook size (1024); layouts use their rates' sizes
FRAMES_PER_SEMANTIC = PAPER_RATES.frames_per_semantic  # the paper's 2 acoustic frames per 40-ms semantic frame

CROP_SECONDS = {"paper": {"semantic": 30.0, "coarse": 10.0, "fine": 3.0}, "tiny": {"semantic": 10.0, "coarse": 2.0, "fine": 1.0}}


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}': valid stages are {', '.join(STAGES)}")


def melody_frame_count(seconds: float) -> int:
    """Melody embeddings of ``seconds`` of audio: 4-s windows with a 3-s hop, at least one (10 s -> 3, 30 s -> 9)."""
    return max(1, math.floor((seconds - MELODY_WINDOW_SECONDS) / MELODY_HOP_SECONDS + 1e-9) + 1)


def melody_slice(melody, start_seconds: float, n: int):
    """The ``n`` melody frames [..., n, Q] of a window starting at ``start_seconds`` in melody [..., Fm, Q].

    Frame j covers [3j, 3j + 4) s; the window's first frame is ``round(start / 3)``, clamped so that the
    window stays inside the melody; a melody shorter than ``n`` frames is repeated (tiled). numpy or torch.
    """
    if melody.ndim < 2 or melody.shape[-2] == 0:
        raise ValueError(f"melody must be [..., Fm >= 1, Q], got shape {tuple(melody.shape)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total = melody.shape[-2]
    start = min(max(0, int(round(start_seconds / MELODY_HOP_SECONDS))), max(0, total - n))
    index = [(start + j) % total for j in range(n)]
    return melody[..., index, :]


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
    null: int  # replaces every condition token in the unconditional prefix (classifier-free guidance)
    vocab_size: int
    num_outputs: int  # ids [0, num_outputs) are the generated blocks (the output head)
    rates: TokenRates = PAPER_RATES
    melody_offset: int | None = None  # melody level q at melody_offset + q * melody_codebook_size
    melody_codebooks: int = 0  # 0: no melody in the prefix
    melody_codebook_size: int = MELODY_CODEBOOK_SIZE
    melody_frames: int = 0  # melody embeddings in the prefix (0 without melody)

    @staticmethod
    def for_stage(
        stage: str,
        rates: TokenRates | dict[str, Any] | None = None,
        melody_codebooks: int = 0,
        melody_codebook_size: int = MELODY_CODEBOOK_SIZE,
        melody_frames: int = 1,
    ) -> VocabLayout:
        """The layout of ``stage`` at ``rates``; with ``melody_codebooks > 0`` the prefix also holds
        ``melody_frames`` melody embeddings of ``melody_codebooks`` tokens each."""
        _check_stage(stage)
        _check_melody(melody_codebooks, melody_codebook_size)
        if melody_codebooks and melody_frames < 1:
            raise ValueError(f"melody_frames must be >= 1, got {melody_frames}")
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
        melody = end if melody_codebooks else None  # after every other block: a melody-free layout is unchanged
        end += melody_codebooks * melody_codebook_size
        return VocabLayout(
            stage=stage, generated_levels=levels, mulan_offset=mulan, semantic_offset=semantic,
            acoustic_offsets=tuple(acoustic), sep=end, pad=end + 1, null=end + 2, vocab_size=end + 3,
            num_outputs=outputs, rates=r, melody_offset=melody, melody_codebooks=melody_codebooks,
            melody_codebook_size=melody_codebook_size, melody_frames=melody_frames if melody_codebooks else 0,
        )

    @property
    def melody_len(self) -> int:
        """Melody tokens in the prefix: ``melody_frames x melody_codebooks`` (0 without melody)."""
        return self.melody_frames * self.melody_codebooks

    @property
    def cond_len(self) -> int:
        """Condition tokens at the start of every sequence: M, then the melody."""
        return self.rates.conditioning_codebooks + self.melody_len

    @property
    def levels_per_frame(self) -> int:
        """Tokens generated per acoustic frame (1 per semantic frame for the semantic stage)."""
        return max(1, len(self.generated_levels))

    @property
    def tokens_per_semantic_frame(self) -> int:
        """Generated tokens per 40-ms semantic frame: 1 (semantic), ``p x levels`` (acoustic, frame-major)."""
        return self.levels_per_frame * (self.rates.frames_per_semantic if self.generated_levels else 1)

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

    def melody_ids(self, melody):
        """Melody tokens [..., n, Qmel] -> ids flattened frame-major [..., n * Qmel]."""
        if not self.melody_codebooks:
            raise ValueError(f"this {self.stage} stage has no melody conditioning (melody_codebooks=0)")
        offsets = [self.melody_offset + q * self.melody_codebook_size for q in range(self.melody_codebooks)]
        ids = melody + _like(melody, offsets)
        return ids.reshape(*ids.shape[:-2], -1)  # [..., n, Q] -> [..., n * Q]

    def condition_ids(self, mulan=None, melody=None):
        """The condition prefix ``[M][melody]`` -> ids [..., cond_len] (numpy or torch, like ``mulan_ids``).

        ``mulan`` [..., Qm] and ``melody`` [..., melody_frames, Qmel] are codes; either may be None,
        which gives NULL ids in its place (both None: a 1-D numpy array of NULL ids, to broadcast). A
        stage without melody takes ``melody=None`` only.
        """
        r = self.rates
        if mulan is not None and not isinstance(mulan, torch.Tensor):
            mulan = torch.as_tensor(mulan, device=melody.device) if isinstance(melody, torch.Tensor) else np.asarray(mulan)
        if melody is not None and not isinstance(melody, torch.Tensor):
            melody = torch.as_tensor(melody, device=mulan.device) if isinstance(mulan, torch.Tensor) else np.asarray(melody)
        if melody is not None and not self.melody_codebooks:
            raise ValueError(f"this {self.stage} stage has no melody conditioning (melody_codebooks=0)")
        if mulan is not None:
            _check_code_array(mulan, "mulan", (r.conditioning_codebooks,), r.conditioning_codebook_size)
        if melody is not None:
            _check_code_array(melody, "melody", (self.melody_frames, self.melody_codebooks), self.melody_codebook_size)
        if mulan is not None and melody is not None and tuple(mulan.shape[:-1]) != tuple(melody.shape[:-2]):
            raise ValueError(f"mulan {tuple(mulan.shape)} and melody {tuple(melody.shape)} have different batch shapes")
        template = mulan if mulan is not None else melody
        batch = () if template is None else tuple(template.shape[: template.ndim - (1 if mulan is not None else 2)])
        parts = [self.mulan_ids(mulan) if mulan is not None else self._nulls(template, batch, r.conditioning_codebooks)]
        if self.melody_codebooks:
            parts.append(self.melody_ids(melody) if melody is not None else self._nulls(template, batch, self.melody_len))
        if isinstance(parts[0], torch.Tensor):
            return torch.cat([p.to(torch.long) for p in parts], dim=-1)
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts], axis=-1)

    def _nulls(self, like, batch: tuple[int, ...], n: int):
        if isinstance(like, torch.Tensor):
            return torch.full((*batch, n), self.null, dtype=torch.long, device=like.device)
        return np.full((*batch, n), self.null, dtype=np.int64)

    def unconditional(self, ids, mulan: bool = True, melody: bool = True):
        """A copy of sequences ``ids`` [..., L] (L >= cond_len) with the condition (M and/or melody) set to NULL:
        ``unconditional(prefix)`` is the prefix of classifier-free guidance's unconditional branch."""
        if ids.shape[-1] < self.cond_len:
            raise ValueError(f"sequences of {ids.shape[-1]} tokens are shorter than the {self.cond_len}-token condition")
        out = ids.clone() if isinstance(ids, torch.Tensor) else np.array(ids, dtype=np.int64, copy=True)
        qm = self.rates.conditioning_codebooks
        if mulan:
            out[..., :qm] = self.null
        if melody:
            out[..., qm : self.cond_len] = self.null
        return out

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


def _check_melody(codebooks: int, size: int) -> None:
    if not isinstance(codebooks, int) or codebooks < 0:
        raise ValueError(f"melody_codebooks must be an int >= 0 (0: no melody), got {codebooks!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"melody_codebook_size must be an int >= 1, got {size!r}")


def _check_code_array(x, name: str, last: tuple[int, ...], size: int) -> None:
    """Codes [..., *last] in [0, size), numpy or torch; a ValueError naming ``name`` otherwise."""
    if x.ndim < len(last) or tuple(x.shape[x.ndim - len(last) :]) != last:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected [..., {', '.join(map(str, last))}]")
    if x.numel() if isinstance(x, torch.Tensor) else x.size:
        if int(x.min()) < 0 or int(x.max()) >= size:
            raise ValueError(f"{name} has codes outside [0, {size})")


def sequence_lengths(
    stage: str,
    seconds: float,
    rates: TokenRates | dict[str, Any] | None = None,
    melody_codebooks: int = 0,
    melody_frames: int | None = None,
) -> tuple[int, int]:
    """(prefix length, generated length) of a stage's sequence covering ``seconds`` of audio.

    With ``melody_codebooks > 0`` the prefix holds ``melody_frames`` (default ``melody_frame_count(seconds)``)
    melody embeddings of that many tokens after M.
    """
    _check_stage(stage)
    r = as_rates(rates)
    sem = int(round(seconds * r.semantic_frame_rate))
    ac = sem * r.frames_per_semantic
    if melody_frames is None:
        melody_frames = melody_frame_count(seconds)
    cond = r.conditioning_codebooks + (melody_codebooks * melody_frames if melody_codebooks else 0)
    if stage == "semantic":
        return cond, sem
    if stage == "coarse":
        return cond + sem + 1, ac * r.coarse_levels
    return cond + ac * r.coarse_levels + 1, ac * (r.acoustic_codebooks - r.coarse_levels)


def max_seq_len_for(
    stage: str, crop_seconds: float, rates: TokenRates | dict[str, Any] | None = None, melody_codebooks: int = 0
) -> int:
    """Cache/bias length for a stage: its crop's sequence (melody prefix included) rounded up to a multiple of 256.

    Generation never exceeds one crop (semantic slides by half a crop; acoustic stages use crop windows).
    """
    prefix, generated = sequence_lengths(stage, crop_seconds, rates, melody_codebooks)
    return int(math.ceil((prefix + generated) / 256) * 256)


@dataclass
class StageConfig:
    """One stage: its Transformer, its training crop, its sampling temperature, the token rates it
    models (paper defaults; a config saved before rates were recorded loads with the paper's) and its
    melody conditioning (``melody_codebooks`` = 0: none)."""

    stage: str = "semantic"
    crop_seconds: float = 30.0
    temperature: float = SAMPLING_TEMPERATURES["semantic"]
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    rates: TokenRates = field(default_factory=TokenRates)
    melody_codebooks: int = 0
    melody_codebook_size: int = MELODY_CODEBOOK_SIZE
    contour: bool = False  # the melody contour added per position (module docstring)

    def __post_init__(self) -> None:
        _check_stage(self.stage)
        _check_melody(self.melody_codebooks, self.melody_codebook_size)
        if self.transformer.frame_classes != (CONTOUR_CLASSES if self.contour else 0):
            raise ValueError(
                f"a {self.stage} stage {'with' if self.contour else 'without'} the melody contour needs "
                f"frame_classes={CONTOUR_CLASSES if self.contour else 0}, got {self.transformer.frame_classes}"
            )
        self.rates = as_rates(self.rates)  # a dict when rebuilt from config.json
        layout = self.layout
        if self.transformer.vocab_size != layout.vocab_size or self.transformer.num_outputs != layout.num_outputs:
            raise ValueError(
                f"{self.stage} stage needs vocab_size={layout.vocab_size}, output_size={layout.num_outputs} "
                f"for its token rates; got {self.transformer.vocab_size}, {self.transformer.output_size}"
            )
        needed = sum(sequence_lengths(self.stage, self.crop_seconds, self.rates, self.melody_codebooks))
        if self.transformer.max_seq_len < needed:
            raise ValueError(f"max_seq_len {self.transformer.max_seq_len} < {needed} tokens of a {self.crop_seconds}-s crop")

    @property
    def layout(self) -> VocabLayout:
        return VocabLayout.for_stage(
            self.stage, self.rates, self.melody_codebooks, self.melody_codebook_size, self.melody_frames
        )

    @property
    def melody_frames(self) -> int:
        """Melody embeddings in one crop's prefix (when the stage has melody): ``melody_frame_count(crop_seconds)``."""
        return melody_frame_count(self.crop_seconds)

    @property
    def crop_frames(self) -> int:
        """Semantic frames (40 ms each at 25 Hz) in one crop."""
        return int(round(self.crop_seconds * self.rates.semantic_frame_rate))

    @classmethod
    def preset(
        cls,
        stage: str,
        name: str,
        rates: TokenRates | dict[str, Any] | None = None,
        melody_codebooks: int = 0,
        melody_codebook_size: int = MELODY_CODEBOOK_SIZE,
        contour: bool = False,
    ) -> StageConfig:
        """``tiny``: dim 256, 4 layers, 4 heads, FF 1024 (GELU), crops 10/2/1 s (short acoustic crops: more steps in the CPU demo's minutes); ``paper``: 24 x 1024, 16 heads, GEGLU 4096, 30/10/3 s.

        ``rates`` (default: the paper's) set the vocabulary and sequence lengths, e.g. EnCodec's 75 Hz x 8;
        ``melody_codebooks`` > 0 adds melody tokens (of the melody tokenizer's RVQ) to the prefix;
        ``contour`` adds the melody contour to every position (module docstring).
        """
        _check_stage(stage)
        if name not in PRESETS:
            raise ValueError(f"unknown preset '{name}': valid presets are {', '.join(PRESETS)}")
        _check_melody(melody_codebooks, melody_codebook_size)
        rates = as_rates(rates)
        crop = CROP_SECONDS[name][stage]
        layout = VocabLayout.for_stage(stage, rates, melody_codebooks, melody_codebook_size, melody_frame_count(crop))
        # tiny trades the paper's gated FF and attention-probability dropout for ~25% faster CPU steps
        sizes = dict(dim=256, n_layers=4, n_heads=4, ff_dim=1024, gated_ff=False, attn_dropout=0.0) if name == "tiny" else {}
        transformer = TransformerConfig(
            vocab_size=layout.vocab_size,
            output_size=layout.num_outputs,
            max_seq_len=max_seq_len_for(stage, crop, rates, melody_codebooks),
            dropout=0.1,
            frame_classes=CONTOUR_CLASSES if contour else 0,
            **sizes,
        )
        return cls(stage=stage, crop_seconds=crop, temperature=SAMPLING_TEMPERATURES[stage], transformer=transformer,
                   rates=rates, melody_codebooks=melody_codebooks, melody_codebook_size=melody_codebook_size,
                   contour=bool(contour))


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


def contour_positions(config: StageConfig, contour: Any, region_start: int, length: int) -> np.ndarray:
    """The frame class of every position of a stage sequence, int64 [..., length].

    The sequence's generated region (frame-major) starts at ``region_start``; ``contour`` [..., n] holds the
    classes of its semantic frames. Position ``region_start - 1 + g`` predicts generated token g, of semantic
    frame ``g // tokens_per_semantic_frame``, and gets that frame's class; every other position gets NULL.
    """
    null = config.transformer.frame_null
    c = np.asarray(contour, dtype=np.int64)
    if c.ndim < 1:
        raise ValueError(f"contour must be [..., frames], got shape {c.shape}")
    if c.size and (c.min() < 0 or c.max() >= CONTOUR_CLASSES):
        raise ValueError(f"contour has classes outside [0, {CONTOUR_CLASSES})")
    if not 1 <= region_start <= length:
        raise ValueError(f"region_start {region_start} is outside a sequence of {length} positions")
    out = np.full((*c.shape[:-1], length), null, dtype=np.int64)
    per = config.layout.tokens_per_semantic_frame
    g = np.arange(length - region_start)  # generated tokens predicted from positions region_start - 1 ...
    frame = g // per
    keep = frame < c.shape[-1]
    out[..., region_start - 1 + g[keep]] = c[..., frame[keep]]
    return out


def drop_conditioning(
    tokens: np.ndarray,
    layout: VocabLayout,
    rng: np.random.Generator,
    conditioning_dropout: float,
    frames: np.ndarray | None = None,
    frame_null: int = CONTOUR_CLASSES,
) -> np.ndarray:
    """Classifier-free guidance's training half: with probability ``conditioning_dropout`` set M to NULL
    and, independently, the melody (a stage with melody tokens or a contour: ``frames`` [L], set to
    ``frame_null`` with the melody). ``tokens`` [L] starts with the condition; both are changed in place,
    the tokens returned. Draws nothing from ``rng`` when the probability is 0 (crops stay reproducible)."""
    if not 0.0 <= conditioning_dropout <= 1.0:
        raise ValueError(f"conditioning_dropout must be in [0, 1], got {conditioning_dropout}")
    if conditioning_dropout > 0:
        drop_m = rng.random() < conditioning_dropout
        has_melody = bool(layout.melody_codebooks) or frames is not None
        drop_melody = has_melody and rng.random() < conditioning_dropout
        if drop_m or drop_melody:
            tokens[:] = layout.unconditional(tokens, mulan=drop_m, melody=drop_melody and bool(layout.melody_codebooks))
        if drop_melody and frames is not None:
            frames[:] = frame_null
    return tokens


def build_training_example(
    sample: dict, stage: str, config: StageConfig, rng: np.random.Generator, conditioning_dropout: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss_mask) of :func:`build_training_crop` (its frame classes dropped)."""
    tokens, loss_mask, _ = build_training_crop(sample, stage, config, rng, conditioning_dropout)
    return tokens, loss_mask


def build_training_crop(
    sample: dict, stage: str, config: StageConfig, rng: np.random.Generator, conditioning_dropout: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A random ``crop_seconds`` crop of a token-shard sample laid out for ``stage`` (at ``config.rates``).

    The crop starts on a 40-ms boundary (one semantic frame = ``frames_per_semantic`` acoustic frames:
    2 for SoundStream, 3 for EnCodec) so that the semantic and acoustic tokens describe the same audio;
    shorter samples are used whole. A stage with melody takes ``sample["melody"]`` (int [Fm, Qmel], frames
    3 s apart from the sample's start) sliced at the crop's start (``melody_slice``); a sample without
    melody gets NULL melody ids. ``conditioning_dropout``: see ``drop_conditioning``. Returns (tokens int64
    [L], loss_mask bool [L], frames int64 [L] or None) with the loss only on the generated tokens; ``frames``
    (a stage with ``contour``) are ``contour_positions`` of ``sample["contour"]`` (int [F], one class per
    semantic frame), all NULL for a sample without a contour.
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
    melody = None
    if config.melody_codebooks and sample.get("melody") is not None and np.asarray(sample["melody"]).size:
        melody = _as_codes(sample["melody"], "melody", 2, config.melody_codebook_size, config.melody_codebooks)
        melody = melody_slice(melody, start / r.semantic_frame_rate, config.melody_frames)  # [n_mel, Qmel]
    prefix = [layout.condition_ids(mulan, melody)]
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
    frames = None
    if config.contour:
        contour = sample.get("contour")
        if contour is not None and np.asarray(contour).size:
            contour = np.asarray(contour, dtype=np.int64).reshape(-1)
            if len(contour) < start + n:
                raise ValueError(f"sample['contour'] has {len(contour)} frames; the crop needs {start + n}")
            frames = contour_positions(config, contour[start : start + n], len(prefix_ids), len(tokens))
        else:
            frames = np.full(len(tokens), config.transformer.frame_null, dtype=np.int64)
    tokens = drop_conditioning(tokens, layout, rng, conditioning_dropout, frames, config.transformer.frame_null)
    return tokens, loss_mask, frames
