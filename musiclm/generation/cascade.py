"""The MusicLM cascade: text -> M_T -> semantic tokens -> coarse acoustic -> fine acoustic -> audio.

Per-stage functions (the Serve deployments call them one by one) take and return *codes*
(0..codebook size - 1 per codebook), never stage ids: the layout of each stage stays inside this
module. Shapes follow the stage config's token rates (``cfg.rates``): the paper's SoundStream tokens
are 50 Hz x 12 levels (4 coarse), EnCodec's 75 Hz x 8; semantic tokens are 25 Hz.

Lengths beyond one training crop:
* semantic: the first crop is sampled from [M]; then the window slides by half a crop, the last
  half crop of tokens being the prefix (the paper's 15-s stride with a 15-s prefix for 30-s crops);
* coarse and fine: the sequence is cut into crop-sized windows decoded as ONE batch (independent
  windows, as in AudioLM's fine stage). A last partial window is taken ending at the end and only
  its frames not covered by the previous window are kept, so all windows have the same length.

Those per-stage functions (``generate_semantic`` / ``generate_coarse`` / ``generate_fine``) and
``Cascade.generate`` are the older whole-piece path (independent acoustic windows as one batch; kept
for ``bench_long_generation``'s comparison). Everything else, the Serve deployments included (long
generation, story mode, batches of N, top-k / top-p, guidance, re-ranking) goes through ``Cascade.stream(spec)`` /
``generate_spec(spec)``: the plan of :mod:`musiclm.generation.plan` executed with the window
functions of :mod:`musiclm.generation.windows` (acoustic windows continue the previous window's
second half as a prefix, and the codec decodes window by window), memory bounded by one window.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from musiclm.constants import SAMPLE_RATE
from musiclm.generation.plan import Call, drive, plan_steps
from musiclm.generation.sampler import sample
from musiclm.generation.spec import GenerationSpec
from musiclm.generation.windows import ChunkDecoder, coarse_window, fine_window, semantic_window
from musiclm.models.stages import StageConfig, describe_rates
from musiclm.models.transformer import StageTransformer
from musiclm.tokenizers.backends import TokenRates


def _device(model: StageTransformer) -> torch.device:
    return model.embed.weight.device


def _check_codes(x: torch.Tensor, name: str, shape: tuple[int | None, ...], size: int) -> torch.Tensor:
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape} (None = any)")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= size):
        raise ValueError(f"{name} has codes outside [0, {size})")
    return x.long()


def _check_mulan(mulan_tokens: torch.Tensor, cfg: StageConfig) -> torch.Tensor:
    r = cfg.rates
    return _check_codes(mulan_tokens, "mulan_tokens", (None, r.conditioning_codebooks), r.conditioning_codebook_size)


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
    """Semantic tokens [B, round(seconds * 25)] for conditioning tokens [B, 12]; slides by half a crop past one crop."""
    layout = cfg.layout
    mulan_tokens = _check_mulan(mulan_tokens, cfg).to(_device(model))
    temperature = cfg.temperature if temperature is None else temperature
    total = int(round(seconds * cfg.rates.semantic_frame_rate))
    if total <= 0:
        raise ValueError(f"seconds={seconds} gives no semantic frame")
    cond = layout.mulan_ids(mulan_tokens)  # [B, Qm]
    crop = cfg.crop_frames
    keep = crop // 2  # prefix kept when sliding (the paper: 15 s of a 30-s crop), stride crop - keep
    allowed = (0, layout.num_outputs)  # the semantic block
    ids = sample(model, cond, min(crop, total), temperature, allowed_range=allowed, generator=generator)
    while ids.shape[1] < total:
        new = min(crop - keep, total - ids.shape[1])
        prefix = torch.cat([cond, ids[:, ids.shape[1] - keep :]], dim=1)  # [B, Qm + keep]
        more = sample(model, prefix, new, temperature, allowed_range=allowed, generator=generator)
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
    """Coarse acoustic codes [B, Kc, p * Fs] for semantic tokens [B, Fs]; crop windows as one batch.

    ``Kc`` = ``cfg.rates.coarse_levels`` (4), ``p`` = acoustic frames per semantic frame (2 for SoundStream,
    3 for EnCodec).
    """
    layout, r = cfg.layout, cfg.rates
    device = _device(model)
    mulan_tokens = _check_mulan(mulan_tokens, cfg).to(device)
    semantic = _check_codes(semantic, "semantic", (mulan_tokens.shape[0], None), r.semantic_codebook_size).to(device)
    temperature = cfg.temperature if temperature is None else temperature
    B, Fs = semantic.shape
    per = r.frames_per_semantic
    n = min(cfg.crop_frames, Fs)  # semantic frames per window
    starts = _window_starts(Fs, n)
    W = len(starts)
    sem = torch.stack([semantic[:, s : s + n] for s in starts])  # [W, B, n]
    sep = torch.full((W, B, 1), layout.sep, dtype=torch.long, device=device)
    cond = layout.mulan_ids(mulan_tokens).expand(W, B, r.conditioning_codebooks)  # [W, B, Qm]
    prefix = torch.cat([cond, layout.semantic_ids(sem), sep], dim=-1).reshape(W * B, -1)  # [W*B, Qm + n + 1]
    num_new = n * per * r.coarse_levels
    ids = sample(model, prefix, num_new, temperature, allowed_range=layout.allowed_ranges(num_new), generator=generator)
    codes = layout.generated_codes(ids).reshape(W, B, r.coarse_levels, -1)  # [W*B, Kc, p n] -> [W, B, Kc, p n]
    return _stitch(codes, [s * per for s in starts], Fs * per)


def generate_fine(
    model: StageTransformer,
    cfg: StageConfig,
    mulan_tokens: torch.Tensor,
    coarse: torch.Tensor,
    temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """All K levels [B, K, Fa] for coarse codes [B, Kc, Fa] (12 and 4 for SoundStream, 8 and 4 for EnCodec);
    crop windows as one batch."""
    layout, r = cfg.layout, cfg.rates
    device = _device(model)
    mulan_tokens = _check_mulan(mulan_tokens, cfg).to(device)
    coarse = _check_codes(
        coarse, "coarse", (mulan_tokens.shape[0], r.coarse_levels, None), r.acoustic_codebook_size
    ).to(device)
    temperature = cfg.temperature if temperature is None else temperature
    B, _, Fa = coarse.shape
    n = min(cfg.crop_frames * r.frames_per_semantic, Fa)  # acoustic frames per window
    starts = _window_starts(Fa, n)
    W = len(starts)
    frames = torch.stack([coarse[:, :, s : s + n] for s in starts]).transpose(-1, -2)  # [W, B, Kc, n] -> [W, B, n, Kc]
    coarse_ids = layout.acoustic_ids(frames, tuple(range(r.coarse_levels)))  # [W, B, n * Kc]
    sep = torch.full((W, B, 1), layout.sep, dtype=torch.long, device=device)
    cond = layout.mulan_ids(mulan_tokens).expand(W, B, r.conditioning_codebooks)  # [W, B, Qm]
    prefix = torch.cat([cond, coarse_ids, sep], dim=-1).reshape(W * B, -1)  # [W*B, Qm + Kc n + 1]
    num_new = n * len(layout.generated_levels)
    ids = sample(model, prefix, num_new, temperature, allowed_range=layout.allowed_ranges(num_new), generator=generator)
    fine = layout.generated_codes(ids).reshape(W, B, len(layout.generated_levels), -1)  # [W, B, K - Kc, n]
    return torch.cat([coarse, _stitch(fine, starts, Fa)], dim=1)  # [B, K, Fa]


@dataclass(frozen=True)
class Collected:
    """A streamed generation gathered: ``audio`` float32 [N, T], wall seconds to the first chunk and in all."""

    audio: np.ndarray
    first_audio_s: float
    elapsed_s: float
    chunks: int

    @property
    def real_time_factor(self) -> float:
        return self.elapsed_s / max(self.audio.shape[1] / SAMPLE_RATE, 1e-9)


def collect(chunks: Iterable[np.ndarray], progress: Callable[[float, float], None] | None = None) -> Collected:
    """Concatenate the chunks ``[N, T_i]`` of ``Cascade.stream`` along time, timing the first one;
    ``progress(audio_seconds_so_far, wall_seconds)`` is called after each chunk."""
    start = time.perf_counter()
    parts, first, samples = [], None, 0
    for chunk in chunks:
        first = first if first is not None else time.perf_counter() - start
        parts.append(chunk)
        samples += chunk.shape[1]
        if progress is not None:
            progress(samples / SAMPLE_RATE, time.perf_counter() - start)
    if not parts:
        raise ValueError("the stream gave no audio")
    elapsed = time.perf_counter() - start
    audio = np.concatenate(parts, axis=1).astype(np.float32, copy=False)  # [N, T]
    return Collected(audio=audio, first_audio_s=first, elapsed_s=elapsed, chunks=len(parts))


STAGE_SEED_OFFSET = {"semantic": 0, "coarse": 1, "fine": 2}


def stage_generator(seed: int, stage: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one stage for one request (the same as the Serve deployments use)."""
    return torch.Generator(device=device).manual_seed(int(seed) * len(STAGE_SEED_OFFSET) + STAGE_SEED_OFFSET[stage])


@dataclass
class Stage:
    """A loaded stage: its Transformer and config."""

    model: StageTransformer
    config: StageConfig


def check_rates(stages: dict[str, StageConfig], tokenizer_rates: TokenRates | None = None, where: str = "") -> TokenRates:
    """The one token-rate set of the three stages (and the tokenizers, when given); a clear error otherwise."""
    rates = {name: cfg.rates for name, cfg in stages.items()}
    if tokenizer_rates is not None:
        rates["tokenizers"] = tokenizer_rates
    distinct = list(dict.fromkeys(rates.values()))
    if len(distinct) > 1:
        a, b = distinct[:2]
        names_a = [n for n, r in rates.items() if r == a]
        names_b = [n for n, r in rates.items() if r == b]
        raise ValueError(
            f"{where}the cascade's parts model different token rates: {', '.join(names_a)} at {describe_rates(a)}; "
            f"{', '.join(names_b)} at {describe_rates(b)} (train every stage on shards of the same tokenizers)"
        )
    return distinct[0]


def _tokenizer_rates(codec: Any, conditioner: Any, rates: TokenRates) -> list[str]:
    """What the codec/conditioner objects say (when they say it) that disagrees with ``rates``."""
    problems = []
    for obj, attr, want in (
        (codec, "frame_rate", rates.acoustic_frame_rate),
        (codec, "num_codebooks", rates.acoustic_codebooks),
        (codec, "codebook_size", rates.acoustic_codebook_size),
        (conditioner, "num_codebooks", rates.conditioning_codebooks),
        (conditioner, "codebook_size", rates.conditioning_codebook_size),
    ):
        have = getattr(obj, attr, None)
        if isinstance(have, (int, float)) and not isinstance(have, bool) and have != want:
            problems.append(f"{'codec' if obj is codec else 'conditioner'} {attr} {have:g} != {want}")
    return problems


class Cascade:
    """Text prompt -> 24-kHz audio through the conditioner, the three stages and the acoustic codec.

    ``conditioner`` needs ``tokens_text(list[str]) -> long[B, Qm]``; ``codec`` needs
    ``decode(codes[B, K, F]) -> wav[B, F * hop]`` (the contract's conditioner / acoustic tokenizer). The
    three stages must model the same token rates, and a codec or conditioner that states its
    ``frame_rate`` / ``num_codebooks`` / ``codebook_size`` must agree with them.
    """

    def __init__(self, semantic: Stage, coarse: Stage, fine: Stage, conditioner: Any, codec: Any,
                 pitch_probe: Any = None) -> None:
        for name, stage in (("semantic", semantic), ("coarse", coarse), ("fine", fine)):
            if stage.config.stage != name:
                raise ValueError(f"the {name} slot holds a {stage.config.stage} stage")
        self.rates = check_rates({"semantic": semantic.config, "coarse": coarse.config, "fine": fine.config})
        problems = _tokenizer_rates(codec, conditioner, self.rates)
        if problems:
            raise ValueError(
                f"the tokenizers do not make the stages' tokens ({describe_rates(self.rates)}): {'; '.join(problems)}"
            )
        self.semantic, self.coarse, self.fine = semantic, coarse, fine
        self.conditioner = conditioner
        self.codec = codec
        self.pitch_probe = pitch_probe  # optional: steers the coarse draws toward a melody (spec.pitch_guidance)

    @classmethod
    def load(cls, ckpt_dir: str | os.PathLike, preset: str | None = None, device: str | torch.device = "cpu") -> Cascade:
        """Load the system from a checkpoint folder: ``semantic/ coarse/ fine/`` and the tokenizers chosen by
        ``backends.json`` (ours: ``mulan/ mulan_rvq/ soundstream/``). Refuses stages whose token rates
        differ from each other's or from the tokenizers'."""
        from musiclm.tokenizers import backends
        from musiclm.training.stage_learner import load_stage

        root = Path(ckpt_dir)
        stages = {}
        for name in ("semantic", "coarse", "fine"):
            model, cfg = load_stage(root / name, stage=name, preset=preset)
            stages[name] = Stage(model.to(device), cfg)
        check_rates({n: s.config for n, s in stages.items()}, backends.token_rates(root), where=f"{root}: ")
        # the conditioner and the codec run once per request: they stay on the CPU
        conditioner = backends.load_conditioner(root, preset=preset)
        codec = backends.load_acoustic(root, preset=preset)
        from musiclm.training.pitch_probe_learner import load_pitch_probe_in

        probe = load_pitch_probe_in(root, device=_device(stages["coarse"].model))  # optional: None without one
        return cls(stages["semantic"], stages["coarse"], stages["fine"], conditioner, codec, probe)

    def generate_tokens(
        self,
        prompt: str,
        seconds: float,
        seed: int,
        temperatures: dict[str, float] | None = None,
        mulan_tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """All intermediate tokens (batch 1): mulan [1, Qm], semantic [1, Fs], coarse [1, Kc, Fa], acoustic [1, K, Fa]
        (12, 4 and 12 at the paper's rates).

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
        """Acoustic codes [1, K, F] -> float32 waveform [F * hop] at 24 kHz (hop 480 for SoundStream, 320 for EnCodec)."""
        with torch.inference_mode():
            wav = self.codec.decode(acoustic.long())
        return torch.as_tensor(wav).reshape(-1).float().cpu().numpy()

    def generate(self, prompt: str, seconds: float, seed: int = 0, temperatures: dict[str, float] | None = None) -> np.ndarray:
        """Text -> float32 audio [round(seconds * 25) * 960] at 24 kHz, reproducible for a seed."""
        tokens = self.generate_tokens(prompt, seconds, seed, temperatures)
        return self.decode(tokens["acoustic"])

    # ---- long generation, story mode, batches (the plan) ----------------------------------------

    @property
    def configs(self) -> dict[str, StageConfig]:
        return {"semantic": self.semantic.config, "coarse": self.coarse.config, "fine": self.fine.config}

    def executor(self, streaming: bool | None = None) -> Callable[[Call], Any]:
        """``execute(call) -> result`` for one run of ``plan_steps`` (it holds that run's codec state);
        ``streaming`` as in :class:`ChunkDecoder` (None: the codec's streaming state when it has one)."""
        decoder = ChunkDecoder(self.codec, streaming=streaming)
        windows = {"semantic": (semantic_window, self.semantic), "coarse": (coarse_window, self.coarse),
                   "fine": (fine_window, self.fine)}

        def execute(call: Call) -> Any:
            if call.kind in windows:
                window, stage = windows[call.kind]
                extra = {"pitch_probe": self.pitch_probe} if call.kind == "coarse" else {}
                return window(stage.model, stage.config, **call.kwargs, **extra)
            if call.kind == "condition":
                with torch.inference_mode():
                    return torch.as_tensor(self.conditioner.tokens_text(call.kwargs["prompts"])).cpu().numpy()
            if call.kind == "decode":
                return decoder(**call.kwargs)
            if call.kind == "score":
                return self.score(call.kwargs["audio"], call.kwargs["prompt"])
            raise ValueError(f"the cascade does not execute '{call.kind}' calls")

        return execute

    def score(self, audio: np.ndarray, prompt: str) -> np.ndarray:
        """MuLan text-audio cosine similarity of each row of ``audio`` [N, T] to ``prompt``: [N]."""
        embed_audio = getattr(self.conditioner, "embed_audio", None)
        embed_text = getattr(self.conditioner, "embed_text", None)
        if embed_audio is None or embed_text is None:
            raise ValueError("re-ranking needs a conditioner with embed_audio and embed_text (MuLan / CLAP)")
        with torch.inference_mode():
            a = F.normalize(embed_audio(torch.as_tensor(np.asarray(audio, dtype=np.float32))).float(), dim=-1)
            t = F.normalize(embed_text([prompt]).float(), dim=-1)  # [1, D]
        return (a @ t.T)[:, 0].cpu().numpy()  # [N]

    def stream(self, spec: GenerationSpec, streaming: bool | None = None) -> Iterator[np.ndarray]:
        """Audio chunks float32 [N, T_i] at 24 kHz as the windows finish (with ``rerank``: one chunk at the
        end, best row first); concatenated along time they are ``generate_spec(spec)``."""
        yield from drive(plan_steps(spec, self.configs), self.executor(streaming))

    def generate_spec(self, spec: GenerationSpec, streaming: bool | None = None) -> np.ndarray:
        """float32 audio [N, round(seconds * 25) * 960] at 24 kHz: the same spec gives the same audio, and
        row i is the same whatever N (each row draws from its own (seed, row) streams)."""
        return np.concatenate(list(self.stream(spec, streaming)), axis=1).astype(np.float32, copy=False)
