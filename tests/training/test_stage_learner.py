"""StageLearner: it learns a repetitive token language, beats its unigram baseline, resumes, exports."""

import io
import json

import numpy as np
import pytest
import torch

from musiclm.checkpoint import CheckpointError
from musiclm.tokenizers.backends import TokenRates
from musiclm.training.stage_learner import StageLearner, block_cross_entropy, load_stage

torch.set_num_threads(1)

CYCLE = np.array([5, 900, 17, 333, 64, 512, 2, 777])  # the "music": a fixed cycle of semantic tokens


def cyclic_sample(rng: np.random.Generator, seconds: float = 1.6) -> dict:
    fs = int(seconds * 25)
    semantic = CYCLE[(rng.integers(len(CYCLE)) + np.arange(fs)) % len(CYCLE)]
    acoustic = np.stack([(np.repeat(semantic, 2) + q) % 1024 for q in range(12)], axis=1)  # [2 fs, 12]
    return {"semantic": semantic.astype(np.int16), "acoustic": acoustic.astype(np.int16),
            "mulan": rng.integers(0, 1024, 12).astype(np.int16)}


def test_loss_falls_and_beats_the_unigram_baseline():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    learner = StageLearner("tiny", "cpu", stage="semantic", batch_size=8, lr=2e-3, warmup_steps=3)
    losses = [learner.train_step(learner.collate([cyclic_sample(rng) for _ in range(8)]))["loss"] for _ in range(20)]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    metrics = learner.eval_step(learner.collate([cyclic_sample(rng) for _ in range(8)]))
    # unigram over a uniform 8-token cycle is ~log 8; the model predicts the successor
    assert abs(metrics["unigram_ce"] - np.log(8)) < 0.1
    assert metrics["ce"] < metrics["unigram_ce"] - 1.0 and metrics["ce_gain"] > 1.0
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3)


@pytest.mark.parametrize("stage, generated", [("coarse", 4 * 20), ("fine", 8 * 20)])
def test_acoustic_stage_batches_and_steps(stage, generated):
    rng = np.random.default_rng(1)
    learner = StageLearner("tiny", "cpu", stage=stage, batch_size=2)
    samples = [cyclic_sample(rng, 0.4), cyclic_sample(rng, 0.2)]  # different lengths: padded
    batch = learner.collate(samples)
    assert batch["tokens"].shape[0] == 2 and batch["loss_mask"].dtype == torch.bool
    assert int(batch["loss_mask"][0].sum()) == generated and int(batch["loss_mask"][1].sum()) == generated // 2
    assert (batch["tokens"][1, ~batch["loss_mask"][1]][-3:] == learner.config.layout.pad).all()  # right padding
    out = learner.train_step(batch)
    assert np.isfinite(out["loss"]) and out["tokens"] == 1.5 * generated
    assert learner.counts.sum() == 1.5 * generated


def test_state_round_trip_resumes_identically():
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    a = StageLearner("tiny", "cpu", stage="semantic", batch_size=4)
    for _ in range(2):
        a.train_step(a.collate([cyclic_sample(rng) for _ in range(4)]))
    buffer = io.BytesIO()  # as the runner does: torch.save, then torch.load(weights_only=True)
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    b = StageLearner("tiny", "cpu", stage="semantic", batch_size=4, seed=123)
    b.load_state_dict(state)
    assert b.step == 2 and torch.equal(a.counts, b.counts)
    samples = [cyclic_sample(rng) for _ in range(4)]
    batch_a, batch_b = a.collate(samples), b.collate(samples)  # same crop rng state
    assert torch.equal(batch_a["tokens"], batch_b["tokens"])
    torch.manual_seed(5)  # the same dropout masks
    loss_a = a.train_step(batch_a)["loss"]
    torch.manual_seed(5)
    assert loss_a == pytest.approx(b.train_step(batch_b)["loss"], rel=1e-5)
    torch.testing.assert_close(a.model.head.weight, b.model.head.weight)


def test_export_and_load_stage(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    learner = StageLearner("tiny", "cpu", stage="coarse", batch_size=1)
    learner.train_step(learner.collate([cyclic_sample(rng, 0.4)]))
    learner.export(str(tmp_path / "coarse"))
    model, config = load_stage(tmp_path / "coarse")
    assert config == learner.config and not model.training
    x = learner.collate([cyclic_sample(rng, 0.4)])["tokens"]
    learner.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), learner.model(x))
    with pytest.raises(CheckpointError, match="'coarse'"):
        load_stage(tmp_path / "coarse", stage="fine")
    with pytest.raises(CheckpointError, match="preset"):
        load_stage(tmp_path / "coarse", preset="paper")


def test_bad_arguments():
    with pytest.raises(ValueError, match="stage"):
        StageLearner("tiny", "cpu", stage="melody")
    with pytest.raises(ValueError, match="preset"):
        StageLearner("small", "cpu", stage="semantic")


ENCODEC = TokenRates(acoustic_frame_rate=75, acoustic_codebooks=8)


def test_a_stage_saved_before_rates_were_recorded_loads_with_the_papers(tmp_path):
    learner = StageLearner("tiny", "cpu", stage="fine", batch_size=1)
    learner.export(str(tmp_path / "fine"))
    path = tmp_path / "fine" / "config.json"
    document = json.loads(path.read_text())
    assert document["config"]["rates"] == TokenRates().to_dict()
    del document["config"]["rates"]  # as issue 2 wrote it
    path.write_text(json.dumps(document))
    model, config = load_stage(tmp_path / "fine")
    assert config.rates == TokenRates() and config == learner.config
    state = learner.state_dict()
    del state["rates"]  # a training state of issue 2
    StageLearner("tiny", "cpu", stage="fine").load_state_dict(state)


def test_encodec_rates_size_the_model_and_a_state_of_other_rates_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    learner = StageLearner("tiny", "cpu", stage="fine", batch_size=2, rates=ENCODEC.to_dict(),
                           token_info={"rates": ENCODEC.to_dict()})
    assert learner.config.rates == ENCODEC and learner.model.head.out_features == 4 * 1024
    sample = {"semantic": rng.integers(0, 1024, 10).astype(np.int16), "mulan": rng.integers(0, 1024, 12).astype(np.int16),
              "acoustic": rng.integers(0, 1024, (30, 8)).astype(np.int16)}
    out = learner.train_step(learner.collate([sample, sample]))
    assert out["tokens"] == 2 * 30 * 4 and learner.unigram_log_probs().shape == (4 * 1024,)
    learner.export(str(tmp_path / "fine"))
    _, config = load_stage(tmp_path / "fine")
    assert config.rates == ENCODEC
    assert json.loads((tmp_path / "fine" / "config.json").read_text())["meta"]["token_info"] == {"rates": ENCODEC.to_dict()}
    with pytest.raises(ValueError, match="75 Hz x 8.*50 Hz x 12"):
        StageLearner("tiny", "cpu", stage="fine").load_state_dict(learner.state_dict())


# ----------------------------------------------------------------------------- conditioning (issue 4)

MODES = np.array([5, 900, 17, 333])  # the token the condition c in 0..3 makes likely
POOL = np.array([2, 64, 512, 777, 100, 200, 300, 400])


def melody_conditioned_sample(rng: np.random.Generator) -> dict:
    """0.4 s whose semantic tokens are MODES[c] with probability 1/2, else uniform over POOL, where c is the
    melody's first code (one melody frame [1, 2]); M is random, so only the melody informs."""
    c = int(rng.integers(4))
    semantic = np.where(rng.random(10) < 0.5, MODES[c], POOL[rng.integers(0, 8, 10)])
    return {"semantic": semantic.astype(np.int16), "mulan": rng.integers(0, 1024, 12).astype(np.int16),
            "acoustic": np.zeros((20, 12), dtype=np.int16), "melody": np.array([[c, 7]], dtype=np.int16)}


def test_melody_conditioning_is_learned_and_measured():
    torch.manual_seed(0)
    rng = np.random.default_rng(5)
    learner = StageLearner("tiny", "cpu", stage="semantic", batch_size=16, lr=2e-3, warmup_steps=3,
                           conditioning_dropout=0.2, melody_codebooks=2, melody_codebook_size=8)
    layout = learner.config.layout
    assert learner.config.melody_frames == 3 and layout.cond_len == 12 + 3 * 2
    batch = learner.collate([melody_conditioned_sample(rng) for _ in range(200)])
    condition, tokens = batch["condition"], batch["tokens"]
    assert condition.shape == (200, 18) and not (condition == layout.null).any()
    assert torch.equal(condition[:, 12:14], condition[:, 14:16])  # one melody frame, tiled to the crop's 3
    dropped_m = (tokens[:, :12] == layout.null).all(1).float().mean()
    dropped_melody = (tokens[:, 12:18] == layout.null).all(1).float().mean()
    assert abs(dropped_m - 0.2) < 0.08 and abs(dropped_melody - 0.2) < 0.08
    kept = (tokens[:, :18] != layout.null).all(1)
    assert torch.equal(tokens[kept, :18], condition[kept])
    for _ in range(25):
        learner.train_step(learner.collate([melody_conditioned_sample(rng) for _ in range(16)]))
    metrics = learner.eval_step(learner.collate([melody_conditioned_sample(rng) for _ in range(64)]))
    # the melody is the only informative condition: nulling it costs what nulling everything costs
    assert metrics["ce"] < metrics["unigram_ce"] - 0.2
    assert metrics["ce_without_melody"] > metrics["ce"] + 0.15
    assert metrics["ce_unconditioned"] > metrics["ce"] + 0.15
    assert abs(metrics["ce_unconditioned"] - metrics["ce_without_melody"]) < 0.1


def test_melody_options_configs_and_states(tmp_path):
    info = {"rates": TokenRates().to_dict(), "melody": {"num_codebooks": 3, "codebook_size": 16}}
    learner = StageLearner("tiny", "cpu", stage="coarse", batch_size=1, melody=True, token_info=info)
    assert (learner.config.melody_codebooks, learner.config.melody_codebook_size) == (3, 16)
    assert StageLearner("tiny", "cpu", stage="coarse").config.melody_codebooks == 0
    with pytest.raises(ValueError, match="melody=True needs shards with melody tokens"):
        StageLearner("tiny", "cpu", stage="coarse", melody=True, token_info={"rates": TokenRates().to_dict()})
    with pytest.raises(ValueError, match="conditioning_dropout"):
        StageLearner("tiny", "cpu", stage="coarse", conditioning_dropout=2.0)
    rng = np.random.default_rng(6)
    sample = {**cyclic_sample(rng, 0.4), "melody": rng.integers(0, 16, (1, 3)).astype(np.int16)}
    batch = learner.collate([sample])
    assert batch["tokens"].shape == (1, 12 + 3 + 10 + 1 + 80)
    assert np.isfinite(learner.train_step(batch)["loss"])
    learner.export(str(tmp_path / "coarse"))
    model, config = load_stage(tmp_path / "coarse")
    assert config == learner.config and config.melody_codebooks == 3
    learner.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch["tokens"]), learner.model(batch["tokens"]))
    with pytest.raises(ValueError, match="melody conditioning 3 x 16.*none"):
        StageLearner("tiny", "cpu", stage="coarse").load_state_dict(learner.state_dict())


def test_a_stage_saved_before_the_null_id_still_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    learner = StageLearner("tiny", "cpu", stage="fine", batch_size=1)
    learner.export(str(tmp_path / "fine"))
    path = tmp_path / "fine"
    document = json.loads((path / "config.json").read_text())
    for key in ("melody_codebooks", "melody_codebook_size"):  # as issues 2-3 wrote it: no melody, no NULL
        del document["config"][key]
    document["config"]["transformer"]["vocab_size"] -= 1
    (path / "config.json").write_text(json.dumps(document))
    weights = load_file(str(path / "model.safetensors"))
    weights["embed.weight"] = weights["embed.weight"][:-1].contiguous()
    save_file(weights, str(path / "model.safetensors"))
    with pytest.warns(UserWarning, match="before classifier-free guidance"):
        model, config = load_stage(path)
    assert config == learner.config and model.embed.weight.shape[0] == config.layout.vocab_size
    x = learner.collate([cyclic_sample(np.random.default_rng(7), 0.2)])["tokens"]  # no NULL in it
    learner.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), learner.model(x))
    # the NULL row is the mean of the M rows, not a random vector
    layout = config.layout
    m_rows = model.embed.weight[layout.mulan_offset : layout.mulan_offset + 12 * 1024]
    torch.testing.assert_close(model.embed.weight[layout.null], m_rows.mean(0))
    state = learner.state_dict()
    state["model"] = {**state["model"], "embed.weight": state["model"]["embed.weight"][:-1]}
    with pytest.raises(ValueError, match="predates the null id"):
        StageLearner("tiny", "cpu", stage="fine").load_state_dict(state)
    document["config"]["transformer"]["vocab_size"] -= 5  # neither layout: a clear error
    (path / "config.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="retrain"):
        load_stage(path)


def test_block_cross_entropy_is_the_softmax_sampling_draws_from():
    """The loss of each target over its own codebook block only: other blocks' logits do not matter, and it
    equals the full softmax's cross-entropy once those are masked out (what ``allowed_ranges`` does)."""
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 3 * 4), torch.tensor([0, 5, 11, 3, 4, 8])  # 3 blocks of 4 ids
    block = targets // 4
    masked = logits.masked_fill(torch.arange(12)[None] // 4 != block[:, None], float("-inf"))
    loss = block_cross_entropy(logits, targets, 4)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(masked, targets))
    assert loss < torch.nn.functional.cross_entropy(logits, targets)  # never more than the full softmax's
    shifted = logits.clone()
    shifted[block != 0, :4] += 100.0  # another block's logits: no effect on those rows
    assert torch.allclose(block_cross_entropy(shifted, targets, 4), loss)


def contour_sample(rng: np.random.Generator, seconds: float = 0.4) -> dict:
    """Random codes, except that level 0 of both acoustic frames of semantic frame t is 100 + contour[t]:
    only the contour tells the coarse stage what level 0 is."""
    fs = int(seconds * 25)
    contour = rng.integers(0, 13, fs)
    acoustic = rng.integers(0, 1024, (2 * fs, 12))
    acoustic[:, 0] = 100 + np.repeat(contour, 2)
    return {"semantic": rng.integers(0, 1024, fs).astype(np.int16), "acoustic": acoustic.astype(np.int16),
            "mulan": rng.integers(0, 1024, 12).astype(np.int16), "contour": contour.astype(np.int8)}


def test_the_melody_contour_is_learned_measured_and_exported(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(7)
    learner = StageLearner("tiny", "cpu", stage="coarse", batch_size=16, lr=3e-3, warmup_steps=3,
                           conditioning_dropout=0.2, contour=True)
    null = learner.config.transformer.frame_null
    batch = learner.collate([contour_sample(rng) for _ in range(64)])
    assert batch["frames"].shape == batch["tokens"].shape == batch["frames_given"].shape
    dropped = (batch["frames"] == null).all(1).float().mean()
    assert 0.05 < dropped < 0.4 and not (batch["frames_given"] == null).all(1).any()
    for _ in range(40):
        learner.train_step(learner.collate([contour_sample(rng) for _ in range(16)]))
    metrics = learner.eval_step(learner.collate([contour_sample(rng) for _ in range(32)]))
    # level 0, a quarter of the targets, takes 13 values; the contour names it: up to log(13) / 4 = 0.64 nats per
    # token, of which 40 steps learn a good part (0.22 when written); without it the model cannot know it
    assert metrics["ce_without_melody"] > metrics["ce"] + 0.12
    assert metrics["ce_unconditioned"] > metrics["ce"] + 0.12
    learner.export(str(tmp_path / "coarse"))
    model, config = load_stage(tmp_path / "coarse")
    assert config == learner.config and config.contour and model.config.frame_classes == 13
    learner.model.eval()
    tokens, frames = batch["tokens"][:4], batch["frames_given"][:4]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, frames=frames), learner.model(tokens, frames=frames))
    with pytest.raises(ValueError, match="frame_classes"):
        StageLearner("tiny", "cpu", stage="coarse").load_state_dict(learner.state_dict())
