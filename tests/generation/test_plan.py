"""The long-generation plan: specs, window schedules, and the calls it makes when run with real
(tiny, random) stages: prefixes are the previous windows' second halves, story prompts switch at the
boundary, and no call grows with the duration."""

import numpy as np
import pytest
import torch

from musiclm.generation.cascade import Cascade, Stage
from musiclm.generation.plan import (
    Call,
    drive,
    join_seconds,
    plan_steps,
    plan_windows,
    schedule,
    segment_edges,
)
from musiclm.generation.spec import GenerationSpec, Sampling, Segment, parse_story
from musiclm.models.stages import StageConfig
from tests.generation.test_sampler import HashConditioner, TableCodec, tiny_stage

torch.set_num_threads(1)
PAPER = {name: StageConfig.preset(name, "paper") for name in ("semantic", "coarse", "fine")}
TINY = {name: StageConfig.preset(name, "tiny") for name in ("semantic", "coarse", "fine")}


# ----------------------------------------------------------------------------- specs


def test_spec_validation_names_the_field():
    spec = GenerationSpec.single("calm piano", 12.5, seed=3, num_samples=2, temperatures={"fine": 0.0}, top_k=50)
    assert spec.seconds == 12.5 and spec.segments == (Segment("calm piano", 12.5),)
    assert spec.sampling("fine", 0.4) == Sampling(0.0, top_k=50) and spec.sampling("coarse", 0.95).temperature == 0.95
    for kwargs, match in [
        (dict(segments=[]), "non-empty list"),
        (dict(segments=[("a", 1.0)]), "Segment"),
        (dict(seed=-1), "seed"),
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples=1.5), "num_samples"),
        (dict(temperatures={"melody": 1.0}), "unknown stages"),
        (dict(temperatures={"coarse": -1}), r"temperatures\['coarse'\]"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(rerank=True), "num_samples >= 2"),
        (dict(melody_tokens=np.zeros(5, int)), "melody_tokens must be"),
        (dict(melody_tokens=np.full((3, 2), 0.5)), "integer codes"),
        (dict(pitch_guidance=-2.0), "pitch_guidance must be"),
        (dict(pitch_guidance=5.0), "give a melody"),
    ]:
        args = {"segments": [Segment("x", 1.0)], **kwargs}
        with pytest.raises(ValueError, match=match):
            GenerationSpec(**args)
    steered = GenerationSpec.single("x", 2.0, melody_contour=np.array([0, 5, 12]), pitch_guidance=8.0)
    assert steered.sampling("coarse", 0.95).pitch_guidance == 8.0  # the coarse stage draws the pitch
    assert steered.sampling("semantic", 1.0).pitch_guidance == steered.sampling("fine", 0.4).pitch_guidance == 0.0
    with pytest.raises(ValueError, match="seconds must be"):
        Segment("x", 0)
    with pytest.raises(ValueError, match="prompt"):
        Segment("  ", 3)


def test_parse_story():
    assert parse_story(["calm piano:15", "energetic techno: 7.5", "a:b c:2"]) == (
        Segment("calm piano", 15.0), Segment("energetic techno", 7.5), Segment("a:b c", 2.0))
    for items, match in [([], "non-empty"), (["calm piano"], "prompt:seconds"), (["x:ten"], "not a number"),
                         (["x:-3"], "seconds must be"), ([":4"], "prompt")]:
        with pytest.raises(ValueError, match=match):
            parse_story(items)


# ----------------------------------------------------------------------------- schedules


def check_schedule(windows, crop, edges):
    keep = crop - crop // 2 if crop % 2 == 0 else None
    assert windows[0].start == windows[0].new_start == 0 and windows[-1].end == edges[-1]
    for prev, w in zip(windows, windows[1:]):
        assert w.new_start == prev.end  # contiguous, no frame twice
        assert w.end - w.start <= crop  # one crop at most
        assert w.new_start - w.start == min(crop - max(1, round(crop / 2)), w.new_start)  # the kept half
        if keep is not None and w.new_start >= keep:
            assert w.new_start - w.start == keep
    for w in windows:
        assert edges[w.segment] <= w.new_start < edges[w.segment + 1] and w.end <= edges[w.segment + 1]


def test_paper_windows_are_30_s_advancing_by_15():
    spec = GenerationSpec.single("x", 300.0)  # 5 minutes
    windows = plan_windows(spec, PAPER)
    semantic = windows["semantic"]
    assert [(w.start, w.new_start, w.end) for w in semantic[:3]] == [(0, 0, 750), (375, 750, 1125), (750, 1125, 1500)]
    assert len(semantic) == 1 + (7500 - 750) // 375 and max(w.end - w.start for w in semantic) == 750
    for name, crop in (("semantic", 750), ("coarse", 250), ("fine", 75)):
        check_schedule(windows[name], crop, [0, 7500])
    assert join_seconds(spec, PAPER)["semantic"][:3] == [30.0, 45.0, 60.0]


def test_tiny_windows_24_s_and_story_edges():
    spec = GenerationSpec(segments=[Segment("calm piano", 7.0), Segment("energetic techno", 17.0)])
    edges = segment_edges(spec, 25)
    assert edges == [0, 175, 600]
    windows = plan_windows(spec, TINY)
    semantic = windows["semantic"]  # 10-s crop: 250 frames, 125 kept
    assert [(w.start, w.new_start, w.end, w.segment) for w in semantic] == [
        (0, 0, 175, 0), (50, 175, 300, 1), (175, 300, 425, 1), (300, 425, 550, 1), (425, 550, 600, 1)]
    for name in ("semantic", "coarse", "fine"):
        check_schedule(windows[name], TINY[name].crop_frames, edges)
    assert schedule("fine", 1, [0, 3])[2].new_start == 2
    with pytest.raises(ValueError, match="shorter than one 40-ms frame"):
        segment_edges(GenerationSpec(segments=[Segment("a", 1.0), Segment("b", 0.01)]), 25)


# ----------------------------------------------------------------------------- running the plan


@pytest.fixture(scope="module")
def cascade():
    """Random very small stages with short crops: semantic 10 frames, coarse and fine 5 frames (0.2 s)."""
    stages = [Stage(*tiny_stage(name, crop, seed=i)) for i, (name, crop) in
              enumerate((("semantic", 0.4), ("coarse", 0.2), ("fine", 0.2)))]
    return Cascade(*stages, HashConditioner(), TableCodec())


def run(cascade, spec):
    """Audio [N, T] and every (call, result) of the plan."""
    execute, calls = cascade.executor(), []

    def recording(call):
        result = execute(call)
        calls.append((call, result))
        return result

    audio = np.concatenate(list(drive(plan_steps(spec, cascade.configs), recording)), axis=1)
    return audio, calls


def of_kind(calls, kind):
    return [(c.kwargs, r) for c, r in calls if c.kind == kind]


def test_each_window_continues_the_previous_windows_half(cascade):
    spec = GenerationSpec.single("calm piano", 1.2, seed=1, num_samples=2)  # 30 semantic frames: 5 windows
    audio, calls = run(cascade, spec)
    windows, per = plan_windows(spec, cascade.configs), 2
    semantic, coarse, fine = of_kind(calls, "semantic"), of_kind(calls, "coarse"), of_kind(calls, "fine")
    assert [len(semantic), len(coarse), len(fine)] == [len(windows[s]) for s in ("semantic", "coarse", "fine")]
    assert len(semantic) == 5 and len(coarse) == len(fine) == 14
    all_semantic = np.concatenate([r for _, r in semantic], axis=1)  # [2, 30]
    all_coarse = np.concatenate([r for _, r in coarse], axis=2)  # [2, 4, 60]
    all_fine = np.concatenate([r for _, r in fine], axis=2)  # [2, 8, 60]
    assert all_semantic.shape == (2, 30) and all_coarse.shape == (2, 4, 60) and all_fine.shape == (2, 8, 60)
    for w, (kw, _) in zip(windows["semantic"], semantic):
        assert np.array_equal(kw["prefix"], all_semantic[:, w.start : w.new_start])
        assert kw["num_new"] == w.end - w.new_start and kw["seeds"] == [(1, 0, w.index), (1, 1, w.index)]
    assert [kw["prefix"].shape[1] for kw, _ in semantic] == [0, 5, 5, 5, 5]  # half of the 10-frame crop
    for w, (kw, _) in zip(windows["coarse"], coarse):
        assert np.array_equal(kw["semantic"], all_semantic[:, w.start : w.end])
        assert np.array_equal(kw["prefix"], all_coarse[:, :, w.start * per : w.new_start * per])
    for w, (kw, _) in zip(windows["fine"], fine):
        assert np.array_equal(kw["coarse"], all_coarse[:, :, w.start * per : w.end * per])
        assert np.array_equal(kw["prefix"], all_fine[:, :, w.start * per : w.new_start * per])
    # the decoded chunks cover every frame once; TableCodec is frame-local, so the audio is exact
    decodes = of_kind(calls, "decode")
    assert sum(kw["codes"].shape[2] for kw, _ in decodes) == 60 and decodes[-1][0]["final"]
    whole = TableCodec().decode(torch.as_tensor(np.concatenate([all_coarse, all_fine], axis=1))).numpy()
    assert audio.shape == (2, 30 * 960) and np.allclose(audio, whole, atol=1e-6)


def test_story_prompt_switches_at_the_boundary(cascade):
    spec = GenerationSpec(segments=[Segment("calm piano", 0.5), Segment("energetic techno", 0.7)], seed=2)
    _, calls = run(cascade, spec)
    condition = of_kind(calls, "condition")
    assert len(condition) == 1 and condition[0][0]["prompts"] == ["calm piano", "energetic techno"]
    tokens = condition[0][1]  # [2, 12]
    assert not np.array_equal(tokens[0], tokens[1])
    windows = plan_windows(spec, cascade.configs)
    for stage in ("semantic", "coarse", "fine"):
        ws = windows[stage]
        used = [kw["mulan"] for kw, _ in of_kind(calls, stage)]
        for w, m in zip(ws, used):
            assert np.array_equal(m, tokens[None, int(w.new_start >= 12)])  # the boundary: 0.5 s = frame 12.5 -> 12
        assert any(w.new_start == 12 for w in ws)  # a window starts exactly at the boundary
    semantic = of_kind(calls, "semantic")
    first_b = next(i for i, w in enumerate(windows["semantic"]) if w.segment == 1)
    assert semantic[first_b][0]["prefix"].shape[1] == 5  # the music before the boundary carries over


def test_calls_do_not_grow_with_the_duration(cascade):
    """Memory bounded by one window: every call's arrays and every model's prefill are as large for
    2.4 s as for 1.2 s (crops 0.4 / 0.2 / 0.2 s)."""
    seen: dict[str, int] = {}
    hooks = []
    for stage in (cascade.semantic, cascade.coarse, cascade.fine):
        name = stage.config.stage
        hook = lambda _m, args, name=name: seen.__setitem__(name, max(seen.get(name, 0), args[0].numel()))  # noqa: E731
        hooks.append(stage.model.embed.register_forward_pre_hook(hook))
    try:
        sizes = []
        for seconds in (1.2, 2.4):
            seen.clear()
            _, calls = run(cascade, GenerationSpec.single("drums", seconds, num_samples=2))
            biggest = {}
            for call, result in calls:
                arrays = [v for v in call.kwargs.values() if isinstance(v, np.ndarray)] + [np.asarray(result)]
                biggest[call.kind] = max(biggest.get(call.kind, 0), *(a.size for a in arrays))
            sizes.append((dict(seen), biggest, len(calls)))
    finally:
        for hook in hooks:
            hook.remove()
    (seen_short, calls_short, n_short), (seen_long, calls_long, n_long) = sizes
    assert n_long > 1.8 * n_short  # twice the windows...
    assert seen_long == seen_short  # ...the same largest prefill per stage
    assert calls_long == calls_short  # ...and the same largest array per kind of call


def test_plan_refuses_bad_results_and_inputs(cascade):
    spec = GenerationSpec.single("x", 0.4)
    plan = plan_steps(spec, cascade.configs)
    assert next(plan) == Call("condition", {"prompts": ["x"]})
    with pytest.raises(RuntimeError, match="condition result has shape"):
        plan.send(np.zeros((1, 11), int))
    with pytest.raises(ValueError, match="GenerationSpec"):
        next(plan_steps({"prompt": "x"}, cascade.configs))
    with pytest.raises(ValueError, match="configs must map"):
        next(plan_steps(spec, {"semantic": cascade.configs["semantic"]}))
    with pytest.raises(ValueError, match="none of the stages was trained with melody"):
        next(plan_steps(GenerationSpec.single("x", 0.4, melody_tokens=np.zeros((3, 2), int)), cascade.configs))
    with pytest.raises(ValueError, match="unknown call kind"):
        Call("train", {})


def test_the_melody_contour_reaches_only_stages_trained_with_it_tiled_over_the_piece(cascade):
    from tests.generation.test_windows import contour_stage

    framed = Cascade(cascade.semantic, Stage(*contour_stage("coarse", 0.2)), cascade.fine, HashConditioner(), TableCodec())
    contour = np.array([0, 1, 2, 3, 4, 5, 6], dtype=np.int8)  # 7 frames, tiled over 30
    spec = GenerationSpec.single("hum", 1.2, seed=1, num_samples=2, melody_contour=contour)
    with_contour, calls = run(framed, spec)
    tiled = np.arange(30) % 7
    coarse = of_kind(calls, "coarse")
    assert coarse and all(kwargs["contour"] is None for kind in ("semantic", "fine") for kwargs, _ in of_kind(calls, kind))
    windows = plan_windows(spec, framed.configs)["coarse"]
    for (kwargs, _), w in zip(coarse, windows):
        assert kwargs["contour"].shape == (2, w.end - w.start)
        assert (kwargs["contour"] == tiled[w.start : w.end]).all()
    without, _ = run(framed, GenerationSpec.single("hum", 1.2, seed=1, num_samples=2))
    assert not np.array_equal(with_contour, without)
    assert np.array_equal(run(framed, spec)[0], with_contour)  # reproducible
    # stages without a contour ignore it: the melody tokens are the paper's route
    assert np.array_equal(run(cascade, spec)[0], run(cascade, GenerationSpec.single("hum", 1.2, seed=1, num_samples=2))[0])
    with pytest.raises(ValueError, match="melody_contour must hold integer classes"):
        GenerationSpec.single("hum", 1.0, melody_contour=np.array([13]))
    with pytest.raises(ValueError, match="melody_contour must be"):
        GenerationSpec.single("hum", 1.0, melody_contour=np.zeros((2, 3), int))
