"""StageLearner's mixed precision: bf16 (autocast) trains on a CPU, weights stay fp32, bad values are refused."""

import json

import numpy as np
import pytest
import torch

from musiclm.orchestration.cli import main
from musiclm.training.stage_learner import StageLearner

torch.set_num_threads(1)

CYCLE = np.array([5, 900, 17, 333, 64, 512, 2, 777])  # a fixed cycle of semantic tokens: easy to learn


def cyclic_sample(offset: int, frames: int = 40) -> dict:
    semantic = CYCLE[(offset + np.arange(frames)) % len(CYCLE)]
    acoustic = np.stack([(np.repeat(semantic, 2) + q) % 1024 for q in range(12)], axis=1)  # [2 frames, 12]
    return {"semantic": semantic.astype(np.int16), "acoustic": acoustic.astype(np.int16),
            "mulan": np.arange(12, dtype=np.int16)}


def test_bf16_trains_on_cpu_with_fp32_weights(tmp_path):
    torch.manual_seed(0)
    learner = StageLearner("tiny", "cpu", stage="semantic", batch_size=2, lr=2e-3, warmup_steps=3, precision="bf16")
    assert learner.precision == "bf16"
    # one small fixed batch, stepped on 20 times (bf16 matmuls are slow on CPUs without native bf16)
    batch = learner.collate([cyclic_sample(i, frames=8) for i in range(2)])
    with torch.no_grad():  # the forward does run in bfloat16
        assert learner._forward(batch["tokens"][:, :-1], batch["loss_mask"][:, 1:]).dtype == torch.bfloat16
    losses = [learner.train_step(batch)["loss"] for _ in range(20)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())
    assert all(v.dtype == torch.float32 for state in learner.optimizer.state.values()
               for v in state.values() if v.is_floating_point() and v.dim() > 0)
    metrics = learner.eval_step(batch)
    assert np.isfinite(list(metrics.values())).all() and metrics["ce"] < losses[0]
    learner.export(str(tmp_path / "semantic"))
    assert json.loads((tmp_path / "semantic" / "config.json").read_text())["meta"]["precision"] == "bf16"


def test_fp32_is_the_default_and_runs_without_autocast():
    learner = StageLearner("tiny", "cpu", stage="coarse", batch_size=2)
    assert learner.precision == "fp32"
    batch = learner.collate([cyclic_sample(0, 10), cyclic_sample(3, 10)])
    assert learner._forward(batch["tokens"][:, :-1], batch["loss_mask"][:, 1:]).dtype == torch.float32
    assert np.isfinite(learner.train_step(batch)["loss"])


@pytest.mark.parametrize("precision", ["fp16", "bfloat16", "FP32", ""])
def test_unknown_precision_names_the_valid_ones(precision):
    with pytest.raises(ValueError, match="fp32, bf16"):
        StageLearner("tiny", "cpu", stage="fine", precision=precision)


def test_cli_precision_is_a_stage_learner_option(capsys, tmp_path):
    # mulan's learner has no precision option: refused before anything starts, like any unknown --option
    code = main(["train", "mulan", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--precision", "bf16"])
    assert code == 2 and "precision" in capsys.readouterr().err
    code = main(["train", "semantic", "--data", str(tmp_path), "--out", str(tmp_path / "s"), "--precision", "bf16",
                 "--option", "precision=fp32"])
    assert code == 2 and "disagree" in capsys.readouterr().err
