import io
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from musiclm.checkpoint import load_artifact
from musiclm.data import shards as sh
from musiclm.tokenizers.melody import load_melody
from musiclm.training import registry
from musiclm.training.melody_learner import (
    MelodyLearner,
    aligned_crops,
    retrieval_metrics,
    segment_ids,
    semi_hard_triplet_loss,
    squared_distances,
)

torch.set_num_threads(1)
SR = 24000

# ----------------------------------------------------------------------------- synthetic renditions

SCALE = np.array([0, 2, 4, 5, 7, 9, 11])
TIMBRES = ("sine", "square", "noisy", "hum")
ACC_ROOTS = (36, 40, 43, 46)  # rendition r's accompaniment key (MIDI root, + 0..2), the same for every melody


def make_melody(rng: np.random.Generator, notes: int = 12) -> list[tuple[int, float]]:
    """A random walk on a major scale (MIDI 60..86) with note lengths of 1/4 .. 3/4 s: [(pitch, seconds)]."""
    degree, out = int(rng.integers(7, 12)), []
    for _ in range(notes):
        degree = int(np.clip(degree + rng.choice([-3, -2, -1, 1, 2, 3]), 0, 16))
        out.append(
            (60 + 12 * (degree // 7) + int(SCALE[degree % 7]), float(rng.choice([0.25, 0.5, 0.5, 0.75])))
        )
    return out


def hz(midi) -> np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(midi, dtype=float) - 69) / 12)


def render(
    melody, timbre: str, tempo: float, acc_root: int, rng: np.random.Generator, seconds: float
) -> np.ndarray:
    """The melody (looped) at ``tempo`` in one of four timbres (sine, odd-harmonic square, a tone buried in
    noise, a hum with vibrato) over a square-wave chord accompaniment (I-IV-V-I, a chord per second) in
    the key ``acc_root``, at a random level."""
    n = int(seconds * SR)
    durations = np.array([d for _, d in melody]) / tempo
    reps = int(np.ceil(seconds / durations.sum())) + 1
    onsets = np.concatenate([[0.0], np.cumsum(np.tile(durations, reps))])
    t = np.arange(n) / SR
    note = np.searchsorted(onsets, t, side="right") - 1  # [n] the sounding note
    f0 = hz(np.tile([p for p, _ in melody], reps))[note]
    env = np.minimum(1.0, np.minimum((t - onsets[note]) / 0.01, (onsets[note + 1] - t) / 0.03))
    if timbre == "hum":
        f0 = f0 * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    if timbre == "sine":
        voice = np.sin(phase)
    elif timbre == "square":
        voice = sum(np.sin(k * phase) / k for k in (1, 3, 5, 7, 9))
    elif timbre == "noisy":
        voice = 0.7 * np.sin(phase) + 0.35 * np.sin(2 * phase) + 0.5 * rng.standard_normal(n)
    else:
        voice = np.sin(phase) + 0.3 * np.sin(2 * phase)
    voice = voice * env
    chords = hz(acc_root + np.array([0, 5, 7, 0]))[(np.arange(n) // SR) % 4]  # [n] chord root per sample
    acc = sum(np.where((chords * 2 ** (i / 12) * t) % 1.0 < 0.5, 1.0, -1.0) for i in (0, 4, 7))
    acc = acc * np.exp(-3 * (t % 1.0))
    mix = voice / np.abs(voice).max() + 0.8 * acc / np.abs(acc).max() + 0.02 * rng.standard_normal(n)
    return (rng.uniform(0.2, 0.6) * mix / np.abs(mix).max()).astype(np.float32)


def renditions(melodies: int, seed: int, prefix: str, seconds: float = 5.0) -> list[dict]:
    """``melodies`` groups x 4 renditions (one per timbre, tempo x0.9..1.1, accompaniment in another key):
    shard samples whose json carries ``melody_group``."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(melodies):
        melody = make_melody(rng)
        for r, timbre in enumerate(TIMBRES):
            wav = render(
                melody, timbre, rng.uniform(0.9, 1.1), ACC_ROOTS[r] + int(rng.integers(0, 3)), rng, seconds
            )
            out.append(
                {
                    "__key__": f"{prefix}{g:03d}r{r}",
                    "wav": wav,
                    "json": {
                        "source": f"{prefix}{g}-{r}.wav",
                        "start": 0.0,
                        "end": seconds,
                        "melody_group": f"{prefix}{g}",
                    },
                }
            )
    return out


# ----------------------------------------------------------------------------- mining and metrics


def _unit(degrees: list[float]) -> torch.Tensor:
    a = torch.tensor(degrees) * torch.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)  # [N, 2]


def test_semi_hard_negative_is_the_closest_one_farther_than_the_positive():
    # anchor 0 deg, positive 30 deg; negatives at 20 (closer: hard), 40 (semi-hard), 90 and 180 degrees
    emb = _unit([0, 30, 20, 40, 90, 180])
    ids = torch.tensor([7, 7, 1, 2, 3, 4])
    d = squared_distances(emb)
    loss, stats = semi_hard_triplet_loss(emb, ids, margin=0.2)
    # pair (0, 1): the 40-deg negative (semi-hard); pair (1, 0): from 30 deg, d(1, 0) = d(30, 0) and the
    # 40-deg negative is closer (10 deg), 20 deg too (10 deg): farther than 30 deg apart are 90 (60 deg)
    pair01 = torch.relu(d[0, 1] - d[0, 3] + 0.2)
    pair10 = torch.relu(d[1, 0] - d[1, 4] + 0.2)
    assert stats["pairs"] == 2 and stats["semi_hard"] == 1.0
    assert float(loss) == pytest.approx(float((pair01 + pair10) / 2), abs=1e-6)
    # no negative farther than the positive: the hardest (closest) one
    emb = _unit([0, 90, 10, 20])
    loss, stats = semi_hard_triplet_loss(emb, torch.tensor([5, 5, 1, 2]), margin=0.2)
    d = squared_distances(emb)
    assert stats["semi_hard"] == 0.0
    assert float(loss) == pytest.approx(
        float((d[0, 1] - d[0, 2] + 0.2 + d[1, 0] - d[1, 3] + 0.2) / 2), abs=1e-6
    )
    # well separated clusters: no loss; no pair at all: a zero loss with a graph
    emb = _unit([0, 1, 180, 181])
    assert float(semi_hard_triplet_loss(emb, torch.tensor([0, 0, 1, 1]), 0.2)[0]) == 0.0
    x = _unit([0, 90]).requires_grad_()
    zero, stats = semi_hard_triplet_loss(x, torch.tensor([0, 1]), 0.2)
    assert float(zero.detach()) == 0.0 and stats["pairs"] == 0 and zero.requires_grad


def test_gradient_pulls_positives_together_and_pushes_the_negative_away():
    emb = _unit([0, 30, 40]).requires_grad_()
    loss, _ = semi_hard_triplet_loss(emb, torch.tensor([0, 0, 1]), margin=0.5)
    loss.backward()
    step = F.normalize(emb.detach() - 0.1 * emb.grad, dim=-1)
    d_before, d_after = squared_distances(emb.detach()), squared_distances(step)
    assert d_after[0, 1] < d_before[0, 1] and d_after[0, 2] > d_before[0, 2]


def test_retrieval_metrics_known_answers():
    ids = torch.tensor([0, 0, 1, 1, 2])
    perfect = retrieval_metrics(_unit([0, 1, 90, 91, 200]), ids)
    assert perfect["r1"] == 1.0 and perfect["triplet_acc"] == 1.0
    assert perfect["anchors"] == pytest.approx(4 / 5) and perfect["chance_r1"] == pytest.approx(1 / 4)
    swapped = retrieval_metrics(_unit([0, 90, 1, 91, 200]), ids)  # every nearest neighbour is another melody
    assert swapped["r1"] == 0.0
    assert retrieval_metrics(_unit([0, 90]), torch.tensor([0, 1])) == {}  # no row has a positive


def test_segment_ids_and_aligned_crops():
    ids = segment_ids(["a", "a", "a", "b"], [0.0, 0.0, 10.0, 0.0])
    assert (
        ids[0] == ids[1] and ids[0] != ids[2] and ids[0] != ids[3]
    )  # another window of "a" is another segment
    ramp = np.arange(3 * SR, dtype=np.float32)
    crops = aligned_crops(
        [ramp, ramp.copy(), ramp, np.ones(100, np.float32)], [1, 1, 2, 3], SR, np.random.default_rng(0)
    )
    assert crops.shape == (4, SR) and torch.equal(crops[0], crops[1])  # one segment: the same position
    assert not torch.equal(crops[0], crops[2])  # other segments: their own draw
    assert float(crops[0, 1] - crops[0, 0]) == 1.0  # contiguous samples
    assert crops[3, :100].sum() == 100 and crops[3, 100:].abs().sum() == 0  # short clips zero-padded


# ----------------------------------------------------------------------------- the learner


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """20 training melodies in two audio shards (plus 3 samples without melody_group), 10 unseen melodies."""
    root = tmp_path_factory.mktemp("melody")
    train = renditions(20, seed=0, prefix="m")
    loose = [
        {"__key__": f"x{i}", "wav": train[i]["wav"], "json": {"source": f"x{i}.wav", "start": 0.0}}
        for i in range(3)
    ]
    samples = train + loose
    entries = [sh.write_shard(root / "audio" / sh.shard_name("audio", k), samples[k::2]) for k in range(2)]
    sh.write_manifest(str(root / "audio"), entries, kind="audio", extra={"window_seconds": 5.0})
    return {"root": root, "held": renditions(10, seed=1, prefix="h")}


def test_collate_skips_samples_without_a_group(caplog):
    learner = MelodyLearner("tiny", torch.device("cpu"), batch_size=4)
    wav = np.zeros(5 * SR, np.float32)
    samples = [
        {"__key__": "a", "wav": wav, "json": {"melody_group": "g", "start": 0.0}},
        {"__key__": "b", "wav": wav, "json": {"melody_group": 3}},
        {"__key__": "c", "wav": wav, "json": {"caption": "no group"}},
        {"__key__": "d", "wav": wav, "json": {"melody_group": ""}},
    ]
    with caplog.at_level(logging.WARNING):
        batch = learner.collate(samples)
    assert batch["wav"].shape == (2, 4 * SR) and batch["groups"] == ["g", "3"]
    assert learner.skipped_no_group == 2 and "without melody_group" in caplog.text
    assert learner.collate(samples[2:]) is None and learner.skipped_no_group == 4
    assert learner.train_step(None) == {}


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="valid presets"):
        MelodyLearner("huge", torch.device("cpu"))
    with pytest.raises(ValueError, match="crop_seconds"):
        MelodyLearner("tiny", torch.device("cpu"), crop_seconds=5.0)
    with pytest.raises(ValueError, match="margin"):
        MelodyLearner("tiny", torch.device("cpu"), margin=-1.0)


def test_training_raises_same_melody_recall_on_unseen_melodies(corpus):
    """Renditions differ in timbre, tempo and accompaniment key; every rendition index shares its
    accompaniment and timbre across melodies, so an embedding of the acoustics retrieves other melodies.
    A few dozen steps of triplet training must retrieve the same melody among melodies it never saw."""
    samples = list(sh.iter_samples(str(corpus["root"] / "audio"), split_by_node=False, split_by_worker=False))
    assert len(samples) == 83
    learner = MelodyLearner("tiny", torch.device("cpu"), seed=0)
    held = learner.collate(corpus["held"])  # one fixed set of crops: 10 melodies x 4 renditions
    before = learner.eval_step(held)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(30):
        batch = learner.collate(
            [samples[i] for i in rng.choice(len(samples), learner.batch_size, replace=False)]
        )
        metrics = learner.train_step(batch)
        losses.append(metrics["loss"])
        assert np.isfinite(metrics["loss"]) and metrics["pairs"] > 0 and 0 < metrics["anchors"] <= 1
    after = learner.eval_step(held)
    print(
        f"held-out recall@1: untrained {before['r1']:.3f}, trained {after['r1']:.3f}, "
        f"chance {after['chance_r1']:.3f}; "
        f"triplet accuracy {before['triplet_acc']:.3f} -> {after['triplet_acc']:.3f}"
    )
    assert after["chance_r1"] == pytest.approx(3 / 39) and after["anchors"] == 1.0
    assert after["r1"] >= before["r1"] + 0.25 and after["r1"] >= 0.6, (before, after)
    assert after["triplet_acc"] > before["triplet_acc"]
    assert learner.skipped_no_group >= 1  # the three loose samples were drawn and skipped


def test_state_round_trip_and_export(tmp_path):
    learner = MelodyLearner("tiny", torch.device("cpu"), batch_size=8)
    batch = learner.collate(renditions(2, seed=3, prefix="s"))
    learner.train_step(batch)
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)  # the runner reads training_state/ back with weights_only
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    learner.export(str(tmp_path / "melody"))
    document, _ = load_artifact(tmp_path / "melody", kind="melody", preset="tiny")
    assert document["meta"]["step"] == 1 and document["config"]["layers"] == 3
    model = load_melody(tmp_path / "melody")
    learner.module.eval()
    with torch.no_grad():
        assert torch.allclose(model.embed(batch["wav"]), learner.module.embed(batch["wav"]), atol=1e-6)
    fresh = MelodyLearner("tiny", torch.device("cpu"), batch_size=8, seed=1)
    fresh.load_state_dict(state)
    assert fresh.step == 1
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.module.state_dict().values(), learner.module.state_dict().values())
    )


def test_registered_and_trained_by_the_runner_from_audio_shards(corpus, tmp_path):
    from musiclm.training import runner

    assert registry.required_shard_kind("melody") == registry.AUDIO
    assert registry.shard_kind(sh.list_shards(str(corpus["root"] / "audio"))[0]) == registry.AUDIO
    out = tmp_path / "melody"
    result = runner.train(
        "melody",
        str(corpus["root"] / "audio"),
        out,
        workers=0,
        max_steps=2,
        log_every=1,
        batch_size=16,
        eval_fraction=0.4,
        eval_batches=2,
    )
    assert result["step"] == 2
    rows = runner.read_metrics_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all("loss" in r for r in rows)
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["held_out"] and "r1" in evaluation and "chance_r1" in evaluation
    assert load_melody(out, preset="tiny").config.embed_dim == 192
