"""The MusicLM cascade: text -> M_T -> semantic tokens -> coarse acoustic -> fine acoustic -> audio.

Per-stage functions (the Serve deployments call them one by one) take and return *codes*
(0..1023 per codebook), never stage ids: the layout of each stage stays inside this module.

Lengths beyond one training crop:
* semantic: the first crop is sampled from [M]; then the window slides by half a crop, the last
  half crop of tokens being the prefix (the paper's 15-s stride with a 15-s prefix for 30-s crops);
* coarse and fine: the sequence is cut into crop-sized windows decoded as ONE batch (independent
  windows, as in AudioLM's fine stage). A last partial window is taken ending at the end and only
  its frames not covered by the previous window are kept, so all windows have the same length.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musiclm.constants import ACOUSTIC_CODEBOOKS, COARSE_LEVELS, MULAN_CODEBOOKS, SEMANTIC_FRAME_RATE
from musiclm.generation.sampler import sample
from musiclm.models.stages import FRAMES_PER_SEMANTIC, StageConfig
from musiclm.models.transformer import StageTransformer


def _device(model: StageTransformer) -> torch.device:
    return model.embed.weight.device


def _check_codes(x: torch.Tensor, name: str, shape: tuple[int | None, ...]) -> torch.Tensor:
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape} (None = any)")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= 1024):
        raise ValueError(f"{name} has codes outside [0, 1024)")
    return x.long()


def _window_starts(total: int, window: int) -> list[int]:
    """Starts of equal windows covering [0, total): stride ``window``, the last one ending at ``total``."""
    if total <= window:
        return [0]
    starts = list(range(0, total - window + 1, window))
    if starts[-1] + window < total:
        starts.append(total - window)
    return starts


def _stitch(windows: torch.Tensor, starts: list[int], total: int) -> torch.Tensor:
    """windows [W, B, Q, n] at ``starts`` -> [B, Q, total], each frame from the first window that covers it."""
    n = windows.shape[-1]
    out = windows.new_empty(*windows.shape[1:-1], total)  # [B, Q, total]
    covered = 0
    for w, start in enumerate(starts):
        end = min(start + n, total)
        out[..., covered:end] = windows[w, ..., covered - start : end - start]
        covered = end
    return out


def generate_semantic(
    model: StageTransformer,
    cfg: StageConfig,
    mulan_tokens: torch.Tensor,
    seconds: float,
    temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Semantic tokens [B, round(seconds * 25)] for MuLan tokens [B, 12]; slides by half a crop past one crop."""
    layout = cfg.layout
    mulan_tokens = _check_codes(mulan_tokens, "mulan_tokens", (None, MULAN_CODEBOOKS)).to(_device(model))
    temperature = cfg.temperature if temperature is None else temperature
    total = int(round(seconds * SEMANTIC_FRAME_RATE))
    if total <= 0:
        raise ValueError(f"seconds={seconds} gives no semantic frame")
    cond = layout.mulan_ids(mulan_tokens)  # [B, 12]
    crop = cfg.crop_frames
    keep = crop // 2  # prefix kept when sliding (the paper: 15 s of a 30-s crop), stride crop - keep
    ids = sample(model, cond, min(crop, total), temperature, allowed_range=(0, 1024), generator=generator)
    while ids.shape[1] < total:
        new = min(crop - keep, total - ids.shape[1])
        prefix = torch.cat([cond, ids[:, ids.shape[1] - keep :]], dim=1)  # [B, 12 + keep]
        more = sample(model, prefix, new, temperature, allowed_range=(0, 1024), generator=generator)
        ids = torch.cat([ids, more], dim=1)
    return layout.generated_codes(ids)


def generate_coarse(
    model: StageTransformer,
    cfg: StageConfig,
    mulan_tokens: torch.Tensor,
    semantic: torch.Tensor,
    temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Coarse acoustic codes [B, 4, 2 * Fs] for semantic tokens [B, Fs]; crop windows as one batch."""
    layout = cfg.layout
    device = _device(model)
    mulan_tokens = _check_codes(mulan_tokens, "mulan_tokens", (None, MULAN_CODEBOOKS)).to(device)
    semantic = _check_codes(semantic, "semantic", (mulan_tokens.shape[0], None)).to(device)
    temperature = cfg.temperature if temperature is None else temperature
    B, Fs = semantic.shape
    n = min(cfg.crop_frames, Fs)  # semantic frames per window
    starts = _window_starts(Fs, n)
    W = len(starts)
    sem = torch.stack([semantic[:, s : s + n] for s in starts])  # [W, B, n]
    sep = torch.full((W, B, 1), layout.sep, dtype=torch.long, device=device)
    cond = layout.mulan_ids(mulan_tokens).expand(W, B, MULAN_CODEBOOKS)  # [W, B, 12]
    prefix = torch.cat([cond, layout.semantic_ids(sem), sep], dim=-1).reshape(W * B, -1)  # [W*B, 12 + n + 1]
    num_new = n * FRAMES_PER_SEMANTIC * COARSE_LEVELS
    ids = sample(model, prefix, num_new, temperature, allowed_range=layout.allowed_ranges(num_new), generator=generator)
    codes = layout.generated_codes(ids).reshape(W, B, COARSE_LEVELS, -1)  # [W*B, 4, 2n] -> [W, B, 4, 2n]
    return _stitch(codes, [s * FRAMES_PER_SEMANTIC for s in starts], Fs * FRAMES_PER_SEMANTIC)


def generate_fine(
    model: StageTransformer,
    cfg: StageConfig,
    mulan_tokens: torch.Tensor,
    coarse: torch.Tensor,
    temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """All 12 RVQ levels [B, 12, Fa] for coarse codes [B, 4, Fa]; crop windows as one batch."""
    layout = cfg.layout
    device = _device(model)
    mulan_tokens = _check_codes(mulan_tokens, "mulan_tokens", (None, MULAN_CODEBOOKS)).to(device)
    coarse = _check_codes(coarse, "coarse", (mulan_tokens.shape[0], COARSE_LEVELS, None)).to(device)
    temperature = cfg.temperature if temperature is None else temperature
    B, _, Fa = coarse.shape
    n = min(cfg.crop_frames * FRAMES_PER_SEMANTIC, Fa)  # acoustic frames per window
    starts = _window_starts(Fa, n)
    W = len(starts)
    frames = torch.stack([coarse[:, :, s : s + n] for s in starts]).transpose(-1, -2)  # [W, B, 4, n] -> [W, B, n, 4]
    coarse_ids = layout.acoustic_ids(frames, tuple(range(COARSE_LEVELS)))  # [W, B, n * 4]
    sep = torch.full((W, B, 1), layout.sep, dtype=torch.long, device=device)
    cond = layout.mulan_ids(mulan_tokens).expand(W, B, MULAN_CODEBOOKS)  # [W, B, 12]
    prefix = torch.cat([cond, coarse_ids, sep], dim=-1).reshape(W * B, -1)  # [W*B, 12 + 4n + 1]
    num_new = n * len(layout.generated_levels)
    ids = sample(model, prefix, num_new, temperature, allowed_range=layout.allowed_ranges(num_new), generator=generator)
    fine = layout.generated_codes(ids).reshape(W, B, ACOUSTIC_CODEBOOKS - COARSE_LEVELS, -1)  # [W, B, 8, n]
    return torch.cat([coarse, _stitch(fine, starts, Fa)], dim=1)  # [B, 12, Fa]


STAGE_SEED_OFFSET = {"semantic": 0, "coarse": 1, "fine": 2}


def stage_generator(seed: int, stage: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one stage for one request (the same as the Serve deployments use)."""
    return torch.Generator(device=device).manual_seed(int(seed) * len(STAGE_SEED_OFFSET) + STAGE_SEED_OFFSET[stage])


@dataclass
class Stage:
    """A loaded stage: its Transformer and config."""

    model: StageTransformer
    config: StageConfig


class Cascade:
    """Text prompt -> 24-kHz audio through the conditioner, the three stages and the acoustic codec.

    ``conditioner`` needs ``tokens_text(list[str]) -> long[B, 12]``; ``codec`` needs
    ``decode(codes[B, 12, F]) -> wav[B, F * 480]`` and ``sample_rate`` (the contract's MuLan / SoundStream).
    """

    def __init__(self, semantic: Stage, coarse: Stage, fine: Stage, conditioner: Any, codec: Any) -> None:
        for name, stage in (("semantic", semantic), ("coarse", coarse), ("fine", fine)):
            if stage.config.stage != name:
                raise ValueError(f"the {name} slot holds a {stage.config.stage} stage")
        self.semantic, self.coarse, self.fine = semantic, coarse, fine
        self.conditioner = conditioner
        self.codec = codec

    @classmethod
    def load(cls, ckpt_dir: str | os.PathLike, preset: str | None = None, device: str | torch.device = "cpu") -> Cascade:
        """Load the system from a checkpoint folder (``semantic/ coarse/ fine/ mulan/ mulan_rvq/ soundstream/``)."""
        from musiclm.tokenizers.mulan import load_conditioner
        from musiclm.tokenizers.soundstream import load_soundstream
        from musiclm.training.stage_learner import load_stage

        root = Path(ckpt_dir)
        stages = {}
        for name in ("semantic", "coarse", "fine"):
            model, cfg = load_stage(root / name, stage=name, preset=preset)
            stages[name] = Stage(model.to(device), cfg)
        conditioner = load_conditioner(str(root / "mulan"), str(root / "mulan_rvq"), preset=preset)
        codec = load_soundstream(str(root / "soundstream"), preset=preset)
        return cls(stages["semantic"], stages["coarse"], stages["fine"], conditioner, codec)

    def generate_tokens(
        self,
        prompt: str,
        seconds: float,
        seed: int,
        temperatures: dict[str, float] | None = None,
        mulan_tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """All intermediate tokens (batch 1): mulan [1, 12], semantic [1, Fs], coarse [1, 4, Fa], acoustic [1, 12, Fa].

        ``mulan_tokens`` (e.g. of an audio prompt, or M_T with melody tokens elsewhere) replaces the text's.
        """
        temps = {s.config.stage: s.config.temperature for s in (self.semantic, self.coarse, self.fine)}
        unknown = set(temperatures or {}) - set(temps)
        if unknown:
            raise ValueError(f"temperatures for unknown stages {sorted(unknown)}")
        temps.update(temperatures or {})
        if mulan_tokens is None:
            with torch.inference_mode():
                mulan_tokens = self.conditioner.tokens_text([prompt])
        mulan_tokens = torch.as_tensor(mulan_tokens).long().cpu()
        semantic = generate_semantic(
            self.semantic.model, self.semantic.config, mulan_tokens, seconds, temps["semantic"],
            stage_generator(seed, "semantic", _device(self.semantic.model)),
        )
        coarse = generate_coarse(
            self.coarse.model, self.coarse.config, mulan_tokens, semantic, temps["coarse"],
            stage_generator(seed, "coarse", _device(self.coarse.model)),
        )
        acoustic = generate_fine(
            self.fine.model, self.fine.config, mulan_tokens, coarse, temps["fine"],
            stage_generator(seed, "fine", _device(self.fine.model)),
        )
        return {"mulan": mulan_tokens, "semantic": semantic.cpu(), "coarse": coarse.cpu(), "acoustic": acoustic.cpu()}

    def decode(self, acoustic: torch.Tensor) -> np.ndarray:
        """Acoustic codes [1, 12, F] -> float32 waveform [F * 480] at 24 kHz."""
        with torch.inference_mode():
            wav = self.codec.decode(acoustic.long())
        return torch.as_tensor(wav).reshape(-1).float().cpu().numpy()

    def generate(self, prompt: str, seconds: float, seed: int = 0, temperatures: dict[str, float] | None = None) -> np.ndarray:
        """Text -> float32 audio [round(seconds * 25) * 960] at 24 kHz, reproducible for a seed."""
        tokens = self.generate_tokens(prompt, seconds, seed, temperatures)
        return self.decode(tokens["acoustic"])
