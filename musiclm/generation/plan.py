"""Long generation and story mode as one algorithm, run by any executor.

:func:`plan_steps` is a generator: it yields :class:`Call` s (what to compute) and receives each
result through ``send()``. The in-process :class:`~musiclm.generation.cascade.Cascade` executes the
calls with its models; the Serve ingress executes the same calls with deployment handles (batched
with other requests'). Keeping the algorithm in one place keeps the two bit-for-bit alike.

Calls (all arrays numpy, N = ``spec.num_samples`` rows):

    condition  {prompts: [P]}                                     -> M_T tokens [P, Qm]
    semantic   {mulan [N,Qm], melody, contour, prefix [N,P], num_new,
                sampling, seeds}                                 -> semantic codes [N, num_new]
    coarse     {mulan, melody, contour, semantic [N,n],
                prefix [N,Kc,Pa], sampling, seeds}               -> coarse codes [N, Kc, p n - Pa]
    fine       {mulan, melody, contour, coarse [N,Kc,f],
                prefix [N,Kf,Pa], sampling, seeds}               -> fine codes [N, Kf, f - Pa]
    decode     {codes [N,K,f], context [N,K,c], final}           -> audio [N, T_i] (a ChunkDecoder)
    score      {audio [N,T], prompt}                             -> MuLan text-audio cosine [N]
    emit       {audio [N,T_i]} (+ scores, order after rerank)     -> None

The stage calls are exactly the arguments of :mod:`musiclm.generation.windows`'s functions. ``melody``
[N, n, Qmel] and ``contour`` [N, n] (the window's semantic frames) are None for a stage trained without
them or a request without a melody.

Windows (:func:`plan_windows`, in semantic frames): every stage slides a window of its crop (the
paper: semantic 30 s, coarse 10 s, fine 3 s) by ``LONG_STRIDE_SECONDS / LONG_WINDOW_SECONDS`` of it
(15 s of 30: half), the kept half being the next window's prefix; only the new frames are drawn.
Windows are also cut at story boundaries, and each window is conditioned on the segment its new
frames start in, so M_T switches exactly at the boundary while the prefix carries the music across.

The stages run depth first: after each semantic window every coarse window whose semantic frames
are ready runs, after each coarse window the fine windows it enables, then the new frames are
decoded and emitted. Only the frames later windows still need are kept, so the memory (and every
call's size) is bounded by one window of each stage, not by the duration. Re-ranking is the one
exception: it needs every candidate's whole audio before it can order them, so it keeps the audio
(never the tokens) and emits once at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from musiclm.constants import LONG_STRIDE_SECONDS, LONG_WINDOW_SECONDS
from musiclm.generation.spec import STAGE_NAMES, GenerationSpec
from musiclm.models.stages import StageConfig, melody_slice
from musiclm.tokenizers.contour import contour_slice

CALL_KINDS = ("condition", "semantic", "coarse", "fine", "decode", "emit", "score")
DECODE_CONTEXT_SECONDS = 0.5  # left context given with each decode (for codecs without streaming state)


@dataclass(frozen=True)
class Call:
    """One step of the plan: ``kind`` (one of ``CALL_KINDS``) and its arguments."""

    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in CALL_KINDS:
            raise ValueError(f"unknown call kind '{self.kind}': valid kinds are {', '.join(CALL_KINDS)}")


@dataclass(frozen=True)
class Window:
    """One window of a stage in semantic frames (x frames_per_semantic for the acoustic stages):
    ``[start, new_start)`` is the given prefix, ``[new_start, end)`` the frames drawn, conditioned on
    segment ``segment``."""

    stage: str
    index: int
    start: int
    new_start: int
    end: int
    segment: int


def segment_edges(spec: GenerationSpec, frame_rate: float) -> list[int]:
    """Semantic-frame boundaries of the segments: [0, e_1, ..., total] (cumulative rounding, so the
    total is ``round(seconds * rate)``); a segment shorter than one frame is refused."""
    edges, elapsed = [0], 0.0
    for i, segment in enumerate(spec.segments):
        elapsed += segment.seconds
        edge = int(round(elapsed * frame_rate))
        if edge <= edges[-1]:
            raise ValueError(
                f"segment {i} ({segment.prompt!r}, {segment.seconds:g} s) is shorter than one "
                f"{1000 / frame_rate:g}-ms frame"
            )
        edges.append(edge)
    return edges


def stride_frames(crop: int) -> int:
    """New frames per window after the first: the paper's 15 s of a 30-s window, scaled to ``crop``."""
    return max(1, int(round(crop * LONG_STRIDE_SECONDS / LONG_WINDOW_SECONDS)))


def schedule(stage: str, crop: int, edges: list[int]) -> list[Window]:
    """Windows of ``crop`` frames covering [0, edges[-1]): the first draws a whole crop, each next one
    keeps the last ``crop - stride`` frames as prefix and draws up to ``stride``; none crosses an edge."""
    if crop < 1:
        raise ValueError(f"the {stage} stage's crop holds no semantic frame")
    keep = crop - stride_frames(crop)
    windows: list[Window] = []
    done, segment = 0, 0
    while done < edges[-1]:
        while edges[segment + 1] <= done:
            segment += 1
        start = done - min(keep, done)
        end = min(start + crop, edges[segment + 1])
        windows.append(Window(stage, len(windows), start, done, end, segment))
        done = end
    return windows


def check_configs(configs: dict[str, StageConfig]) -> dict[str, StageConfig]:
    """The three stage configs, one per stage, modelling the same token rates."""
    if not isinstance(configs, dict) or set(configs) != set(STAGE_NAMES):
        raise ValueError(f"configs must map each of {', '.join(STAGE_NAMES)} to its StageConfig")
    for name, cfg in configs.items():
        if not isinstance(cfg, StageConfig) or cfg.stage != name:
            raise ValueError(f"configs['{name}'] is not the {name} stage's StageConfig")
    if len({cfg.rates for cfg in configs.values()}) != 1:
        raise ValueError("the three stages model different token rates")
    return configs


def plan_windows(spec: GenerationSpec, configs: dict[str, StageConfig]) -> dict[str, list[Window]]:
    """Every stage's windows for ``spec`` (a pure function of the spec and the crops)."""
    configs = check_configs(configs)
    edges = segment_edges(spec, configs["semantic"].rates.semantic_frame_rate)
    return {name: schedule(name, configs[name].crop_frames, edges) for name in STAGE_NAMES}


def join_seconds(spec: GenerationSpec, configs: dict[str, StageConfig]) -> dict[str, list[float]]:
    """Where each stage's windows join (the start of every window's new frames but the first), in seconds:
    the places to look for clicks (``evaluation.continuity.spectral_flux_at_joins``)."""
    rate = configs["semantic"].rates.semantic_frame_rate
    return {name: [w.new_start / rate for w in ws[1:]] for name, ws in plan_windows(spec, configs).items()}


class _Track:
    """The frames ``[base, end)`` of codes ``[N, ..., F]`` that windows still to come need."""

    def __init__(self, *shape: int) -> None:
        self.data = np.zeros((*shape, 0), dtype=np.int64)
        self.base = 0

    @property
    def end(self) -> int:
        return self.base + self.data.shape[-1]

    def append(self, x: np.ndarray) -> None:
        self.data = np.concatenate([self.data, x.astype(np.int64)], axis=-1)

    def get(self, a: int, b: int) -> np.ndarray:
        if not self.base <= a <= b <= self.end:
            raise RuntimeError(f"frames [{a}, {b}) are not held (holding [{self.base}, {self.end}))")
        return self.data[..., a - self.base : b - self.base]

    def drop_before(self, a: int) -> None:
        a = min(a, self.end)
        if a > self.base:
            self.data = self.data[..., a - self.base :].copy()  # a copy: the dropped frames are freed
            self.base = a


def _result(value: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    out = np.asarray(value)
    if out.shape != shape:
        raise RuntimeError(f"the executor's {name} result has shape {out.shape}, expected {shape}")
    return out


def _melody_for(spec: GenerationSpec, configs: dict[str, StageConfig]) -> Callable[[str, int], np.ndarray | None]:
    """melody(stage, start_frame) -> the window's melody frames [N, n, Qmel], or None."""
    takes = {name: cfg.melody_codebooks for name, cfg in configs.items()}
    melody = spec.melody_tokens
    if melody is None:
        return lambda stage, start: None
    if not any(takes.values()):
        raise ValueError("melody tokens given, but none of the stages was trained with melody conditioning")
    for name, q in takes.items():
        if q and melody.shape[1] != q:
            raise ValueError(f"melody tokens have {melody.shape[1]} codebooks; the {name} stage takes {q}")
        if q and melody.max() >= configs[name].melody_codebook_size:
            raise ValueError(f"melody tokens exceed the {name} stage's codebook of {configs[name].melody_codebook_size}")
    rate = configs["semantic"].rates.semantic_frame_rate

    def window_melody(stage: str, start: int) -> np.ndarray | None:
        if not takes[stage]:
            return None
        frames = np.asarray(melody_slice(melody, start / rate, configs[stage].melody_frames))  # [n, Qmel]
        return np.broadcast_to(frames, (spec.num_samples, *frames.shape)).copy()  # [N, n, Qmel]

    return window_melody


def _contour_for(spec: GenerationSpec, configs: dict[str, StageConfig]) -> Callable[[str, int, int], np.ndarray | None]:
    """contour(stage, start_frame, end_frame) -> the window's contour [N, end - start] (tiled), or None."""
    contour = spec.melody_contour
    if contour is None or not any(cfg.contour for cfg in configs.values()):
        return lambda stage, start, end: None  # a stage without contour still follows the melody tokens

    def window_contour(stage: str, start: int, end: int) -> np.ndarray | None:
        if not configs[stage].contour:
            return None
        frames = contour_slice(contour, start, end - start)  # [n]
        return np.broadcast_to(frames, (spec.num_samples, frames.size)).copy()  # [N, n]

    return window_contour


def plan_steps(
    spec: GenerationSpec, configs: dict[str, StageConfig], context_seconds: float = DECODE_CONTEXT_SECONDS
) -> Generator[Call, Any, None]:
    """The calls that generate ``spec``; send each call's result back (None for ``emit``).

    Emits audio chunks ``[N, T_i]`` as windows finish (one per coarse window), or, with ``rerank``,
    one chunk ``[N, T]`` at the end with the rows best first (``scores`` and ``order`` alongside).
    """
    if not isinstance(spec, GenerationSpec):
        raise ValueError(f"plan_steps needs a GenerationSpec, got {type(spec).__name__}")
    windows = plan_windows(spec, configs)
    r = configs["semantic"].rates
    N, per, Kc = spec.num_samples, r.frames_per_semantic, r.coarse_levels
    Kf = r.acoustic_codebooks - Kc
    melody_of = _melody_for(spec, configs)
    contour_of = _contour_for(spec, configs)
    sampling = {name: spec.sampling(name, configs[name].temperature) for name in STAGE_NAMES}
    total = windows["semantic"][-1].end  # semantic frames
    context_frames = max(1, int(round(context_seconds * r.acoustic_frame_rate)))

    prompts = list(dict.fromkeys(s.prompt for s in spec.segments))
    tokens = _result((yield Call("condition", {"prompts": prompts})), "condition",
                     (len(prompts), r.conditioning_codebooks)).astype(np.int64)
    mulan = [np.repeat(tokens[prompts.index(s.prompt)][None], N, axis=0) for s in spec.segments]  # [N, Qm] each

    def common(w: Window) -> dict[str, Any]:
        return {
            "mulan": mulan[w.segment],
            "melody": melody_of(w.stage, w.start),
            "contour": contour_of(w.stage, w.start, w.end),
            "sampling": sampling[w.stage],
            "seeds": [(spec.seed, row, w.index) for row in range(N)],
        }

    semantic, coarse, acoustic = _Track(N), _Track(N, Kc), _Track(N, Kc + Kf)  # codes [N, F], [N, Kc, F], [N, K, F]
    sem_ws, coarse_ws, fine_ws = windows["semantic"], windows["coarse"], windows["fine"]
    ci = fi = 0  # next coarse / fine window
    decoded = 0  # acoustic frames decoded
    chunks: list[np.ndarray] = []  # rerank only: the audio waits for the scores
    for si, sw in enumerate(sem_ws):
        new = sw.end - sw.new_start
        kwargs = {**common(sw), "prefix": semantic.get(sw.start, sw.new_start), "num_new": new}
        semantic.append(_result((yield Call("semantic", kwargs)), "semantic", (N, new)))
        while ci < len(coarse_ws) and coarse_ws[ci].end <= semantic.end:
            cw = coarse_ws[ci]
            ci += 1
            kwargs = {**common(cw), "semantic": semantic.get(cw.start, cw.end),
                      "prefix": coarse.get(cw.start * per, cw.new_start * per)}
            shape = (N, Kc, (cw.end - cw.new_start) * per)
            coarse.append(_result((yield Call("coarse", kwargs)), "coarse", shape))
            while fi < len(fine_ws) and fine_ws[fi].end * per <= coarse.end:
                fw = fine_ws[fi]
                fi += 1
                a, b, c = fw.start * per, fw.new_start * per, fw.end * per
                kwargs = {**common(fw), "coarse": coarse.get(a, c), "prefix": acoustic.get(a, b)[:, Kc:]}
                fine = _result((yield Call("fine", kwargs)), "fine", (N, Kf, c - b))
                acoustic.append(np.concatenate([coarse.get(b, c), fine], axis=1))  # [N, K, c - b]
            coarse.drop_before(min(fine_ws[fi].start if fi < len(fine_ws) else total,
                                   coarse_ws[ci].start if ci < len(coarse_ws) else total) * per)
            if acoustic.end > decoded:
                lo = max(acoustic.base, decoded - context_frames)
                kwargs = {"codes": acoustic.get(decoded, acoustic.end), "context": acoustic.get(lo, decoded),
                          "final": acoustic.end == total * per}
                wav = np.asarray((yield Call("decode", kwargs)))
                decoded = acoustic.end
                if spec.rerank:
                    chunks.append(wav)
                elif wav.shape[-1]:
                    yield Call("emit", {"audio": wav})
            need = fine_ws[fi].start * per if fi < len(fine_ws) else acoustic.end
            acoustic.drop_before(min(need, decoded - context_frames))
        need = min(sem_ws[si + 1].start if si + 1 < len(sem_ws) else semantic.end,
                   coarse_ws[ci].start if ci < len(coarse_ws) else semantic.end)
        semantic.drop_before(need)
    if not spec.rerank:
        return
    audio = np.concatenate(chunks, axis=1)  # [N, T]
    per_frame = audio.shape[1] // total  # samples per semantic frame
    edges = segment_edges(spec, r.semantic_frame_rate)
    scores = np.zeros(N)
    for i, segment in enumerate(spec.segments):
        part = audio[:, edges[i] * per_frame : edges[i + 1] * per_frame]
        cosine = _result((yield Call("score", {"audio": part, "prompt": segment.prompt})), "score", (N,))
        scores += cosine * (edges[i + 1] - edges[i]) / total  # weighted by the segment's duration
    order = np.argsort(-scores, kind="stable")
    yield Call("emit", {"audio": audio[order], "scores": scores[order], "order": order})


def drive(plan: Generator[Call, Any, None], execute: Callable[[Call], Any]) -> Iterator[np.ndarray]:
    """Run ``plan`` with a synchronous ``execute(call) -> result``; yield the emitted audio chunks.

    (An async executor, e.g. the Serve ingress, runs the same loop with ``await``.)
    """
    result = None
    while True:
        try:
            call = plan.send(result)
        except StopIteration:
            return
        if call.kind == "emit":
            result = None
            yield call.kwargs["audio"]
        else:
            result = execute(call)
