import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from musiclm.checkpoint import load_artifact
from musiclm.tokenizers.mulan import load_mulan
from musiclm.training.mulan_learner import MuLanLearner, contrastive_loss, retrieval_recall, same_caption

torch.set_num_threads(1)
SR = 24000

# four kinds of sound, each with its own caption: whether MuLan ties them together is measurable
KINDS = {
    "a low hum": lambda t, rng: 0.5 * np.sin(2 * np.pi * rng.uniform(80, 120) * t),
    "a high whistle": lambda t, rng: 0.5 * np.sin(2 * np.pi * rng.uniform(2500, 3500) * t),
    "harsh white noise": lambda t, rng: 0.3 * rng.standard_normal(len(t)),
    "a fast ticking click track": lambda t, rng: (np.sin(2 * np.pi * 8 * t) > 0.95).astype(float),
}


def clips(count: int, seed: int, seconds: float = 1.5) -> list[dict]:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    names = list(KINDS)
    out = []
    for i in range(count):
        name = names[i % len(names)]
        out.append({"__key__": f"c{i}", "wav": KINDS[name](t, rng).astype(np.float32), "json": {"caption": name}})
    return out


@pytest.fixture(scope="module")
def learner() -> MuLanLearner:
    return MuLanLearner("tiny", torch.device("cpu"), batch_size=8, crop_seconds=1.0, lr=3e-3)


def test_loss_and_recall_known_answers():
    e = torch.eye(4)
    same = same_caption(["a", "b", "c", "d"])
    assert torch.equal(same, torch.eye(4, dtype=torch.bool))
    assert float(contrastive_loss(e, e, torch.tensor(100.0), same)) < 1e-6
    # random pairing at scale 1 of orthogonal vectors: every choice equally likely -> log B
    assert abs(float(contrastive_loss(e, e.roll(1, 0), torch.tensor(0.0), same)) - math.log(4)) < 1e-6
    assert retrieval_recall(e, e, same, 1) == 1.0
    assert retrieval_recall(e, e.roll(1, 0), same, 1) == 0.0
    # a repeated caption has two right answers: the loss spreads its target over both
    dup = same_caption(["a", "a", "b"])
    assert dup.sum().item() == 5
    v = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    assert float(contrastive_loss(v, v, torch.tensor(100.0), dup)) < math.log(2) + 1e-4


def test_collate_skips_uncaptioned(learner, caplog):
    samples = clips(3, 0) + [{"__key__": "nocap", "wav": np.zeros(SR, np.float32), "json": {}}]
    before = learner.skipped_no_caption
    batch = learner.collate(samples)
    assert batch["wav"].shape == (3, SR) and len(batch["captions"]) == 3
    assert learner.skipped_no_caption == before + 1 and "no caption" in caplog.text
    assert learner.collate([{"__key__": "x", "wav": np.zeros(10, np.float32), "json": {"caption": ""}}]) is None


def test_text_features_are_cached(learner, monkeypatch):
    tower = learner.module.text_tower
    calls = []
    original = tower.forward
    monkeypatch.setattr(tower, "forward", lambda texts: calls.append(list(texts)) or original(texts))
    learner._text_cache.clear()
    a = learner.text_features(["a low hum", "a high whistle", "a low hum"])
    b = learner.text_features(["a high whistle", "a low hum"])
    assert calls == [["a low hum", "a high whistle"]]  # each distinct caption through the tower once
    assert torch.equal(a[1], b[0]) and torch.equal(a[0], a[2])


def test_training_beats_chance_on_held_out_clips(learner):
    train, held = clips(32, seed=1), clips(8, seed=2)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(30):
        idx = rng.choice(len(train), 8, replace=False)
        m = learner.train_step(learner.collate([train[i] for i in idx]))
        losses.append(m["loss"])
        assert math.isfinite(m["loss"]) and m["logit_scale"] > 0
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    metrics = learner.eval_step(learner.collate(held))
    assert metrics["chance_r1"] == pytest.approx(1 / 8) and metrics["chance_r5"] == pytest.approx(5 / 8)
    # 4 captions over 8 clips: a caption is right for 2 of them, so chance recall@1 is 2/8
    assert metrics["r1"] > 0.5, metrics
    # only the audio side and the projections learned; the pretrained text tower did not move
    assert all(p.grad is None for p in learner.module.text_tower.parameters())


def test_state_round_trip_and_export(learner, tmp_path):
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)  # the runner's training_state/ is read back with weights_only
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert not any(k.startswith("text_tower.") for k in state["model"])
    learner.export(str(tmp_path / "mulan"))
    document, weights = load_artifact(tmp_path / "mulan", kind="mulan", preset="tiny")
    assert document["meta"]["step"] == learner.step
    model = load_mulan(tmp_path / "mulan")
    wav = torch.from_numpy(clips(2, 3)[1]["wav"][None])
    learner.module.eval()
    with torch.no_grad():
        assert torch.allclose(model.embed_audio(wav), learner.module.embed_audio(wav), atol=1e-6)
        assert torch.allclose(model.embed_text(["a low hum"]), learner.module.embed_text(["a low hum"]), atol=1e-6)
    learner.module.train()
    step = learner.step
    learner.load_state_dict(state)
    assert learner.step == step
