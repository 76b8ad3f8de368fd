import io
import math

import numpy as np
import pytest
import torch

from musiclm.tokenizers.semantic import W2VBertConfig, W2VBertOutput, load_w2vbert
from musiclm.training.w2vbert_learner import W2VBertLearner, contrastive_loss, diversity_loss, mlm_loss

torch.set_num_threads(1)
SR = 24000


def melody(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Notes of a few pitches, 0.24 s each: structure that masked prediction can learn."""
    n, note = int(seconds * SR), int(0.24 * SR)
    t = np.arange(note) / SR
    notes = [0.5 * np.sin(2 * np.pi * rng.choice([220.0, 277.0, 330.0, 440.0]) * t) for _ in range(n // note + 1)]
    return np.concatenate(notes)[:n].astype(np.float32)


def corpus(count: int = 12, seconds: float = 3.0) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"__key__": f"k{i}", "wav": melody(rng, seconds), "json": {}} for i in range(count)]


def small_learner(**kw) -> W2VBertLearner:
    return W2VBertLearner("tiny", torch.device("cpu"), batch_size=4, crop_seconds=2.0, warmup_steps=5, **kw)


def test_collate_crops_and_masks(caplog):
    learner = small_learner()
    samples = corpus(3) + [{"__key__": "short", "wav": np.ones(30000, np.float32), "json": {}}, {"json": {}}]
    batch = learner.collate(samples)
    assert batch["wav"].shape == (4, 2 * SR)
    assert batch["mask"].shape == (4, 50) and batch["mask"].dtype == torch.bool
    assert (batch["mask"].sum(1) >= learner.config.mask_span).all()
    assert float(batch["wav"][3, 30000:].abs().max()) == 0.0  # a short clip is zero-padded
    assert learner.skipped == 1 and "without usable audio" in caplog.text
    assert learner.collate([{"json": {}}]) is None and learner.train_step(None) == {}


def test_loss_known_answers():
    # contexts equal to their targets, targets orthogonal to each other: the positive always wins
    targets = torch.eye(8).unsqueeze(0)  # [1, 8, 8]
    out = W2VBertOutput(
        contexts=targets.clone(),
        targets=targets,
        codes=torch.arange(8).unsqueeze(0),
        mlm_logits=torch.nn.functional.one_hot(torch.arange(8), 8).float().unsqueeze(0) * 20,
        avg_probs=torch.full((8,), 1 / 8),
        mask=torch.ones(1, 8, dtype=torch.bool),
    )
    g = torch.Generator().manual_seed(0)
    expected = -math.log(math.exp(10) / (math.exp(10) + 7))  # cosine 1 vs 0 at temperature 0.1, 7 distractors
    assert abs(float(contrastive_loss(out, 7, 0.1, g)) - expected) < 1e-4
    loss, accuracy = mlm_loss(out)
    assert float(loss) < 1e-6 and float(accuracy) == 1.0
    assert abs(float(diversity_loss(torch.full((8,), 1 / 8)))) < 1e-5
    assert abs(float(diversity_loss(torch.eye(8)[0])) - 7 / 8) < 1e-4
    # identical targets give the contrastive task nothing to separate: log(1 + K) ...
    same = out._replace(targets=torch.ones(1, 8, 8), codes=torch.zeros(1, 8, dtype=torch.long))
    assert abs(float(contrastive_loss(same, 7, 0.1, g)) - math.log(8)) < 1e-4
    # ... unless distractors with the positive's code are excluded (wav2vec 2.0's rule): nothing left to beat
    assert float(contrastive_loss(same, 7, 0.1, g, exclude_same_code=True)) < 1e-6


def test_train_step_gradients_and_metrics():
    learner = small_learner()
    batch = learner.collate(corpus(4))
    metrics = learner.train_step(batch)
    for key in ("loss", "contrastive_loss", "mlm_loss", "mlm_accuracy", "code_perplexity"):
        assert math.isfinite(metrics[key]), key
    # one backward reached every learned part
    m = learner.module
    for name, p in [
        ("subsampler", m.subsampler.conv[0].weight),
        ("contrastive", m.contrastive.blocks[0].attn.qkv.weight),
        ("input projection", m.contrastive.projection.weight),
        ("relative positions", m.contrastive.blocks[0].attn.pos.weight),
        ("position bias", m.mlm.blocks[0].attn.pos_bias_v),
        ("mlm", m.mlm.blocks[-1].ff2.net[1].weight),
        ("mlm head", m.mlm.head.weight),
        ("target projection", m.project_targets.weight),
    ]:
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert learner.step == 1
    evaluation = learner.eval_step(batch)
    assert {"loss", "contrastive_loss", "mlm_loss", "mlm_accuracy"} <= set(evaluation)


def test_gumbel_quantizer_trains_too():
    cfg = W2VBertConfig.preset("tiny")
    cfg.quantizer, cfg.code_dim = "gumbel", 128
    learner = small_learner(config=cfg)
    metrics = learner.train_step(learner.collate(corpus(4)))
    assert math.isfinite(metrics["loss"]) and metrics["diversity_loss"] > 0
    assert metrics["gumbel_temperature"] == cfg.gumbel_temperature[0]
    assert learner.module.quantizer.logits.weight.grad is not None


def test_loss_falls():
    # a codebook in proportion to the 200 frames of these small batches (256 codes would mostly be dead)
    cfg = W2VBertConfig.preset("tiny")
    cfg.codebook_size = 32
    learner = small_learner(lr=3e-3, config=cfg)
    data = corpus(12)
    rng = np.random.default_rng(1)
    losses = []
    for _ in range(30):
        idx = rng.choice(len(data), 4, replace=False)
        losses.append(learner.train_step(learner.collate([data[i] for i in idx]))["mlm_loss"])
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert first > math.log(32) - 0.1  # starts at chance ...
    assert last < math.log(32) - 0.15, (first, last)  # ... and learns to predict masked codes


def test_state_round_trip_and_export(tmp_path):
    learner = small_learner()
    data = corpus(4)
    learner.train_step(learner.collate(data))
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)  # the runner's training_state/ is read back with weights_only
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = small_learner(seed=5)
    other.load_state_dict(state)
    assert other.step == 1
    for (name, a), b in zip(learner.module.state_dict().items(), other.module.state_dict().values()):
        assert torch.equal(a, b), name
    # the same next batch gives the same update
    batch = learner.collate(data)
    assert torch.equal(batch["wav"], other.collate(data)["wav"])
    learner.export(str(tmp_path / "w2vbert"))
    model = load_w2vbert(tmp_path / "w2vbert", preset="tiny")
    wav = torch.from_numpy(data[0]["wav"][None, : SR])
    learner.module.eval()
    with torch.no_grad():
        assert torch.allclose(model.features(wav), learner.module.features(wav), atol=1e-6)


def test_unknown_preset():
    with pytest.raises((KeyError, ValueError)):
        W2VBertLearner("huge", torch.device("cpu"))
