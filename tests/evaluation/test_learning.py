import math

import pytest
import torch

from musiclm.evaluation.learning import si_snr


def test_si_snr_known_values():
    torch.manual_seed(0)
    target = torch.randn(2, 8000)
    noise = torch.randn(2, 8000)
    noise = noise - (noise * target).sum(-1, keepdim=True) / target.pow(2).sum(-1, keepdim=True) * target  # orthogonal
    noise = noise / noise.norm(dim=-1, keepdim=True) * target.norm(dim=-1, keepdim=True) / math.sqrt(10)  # 10 dB below
    measured = si_snr(3.0 * target + 3.0 * noise, target)  # scale must not matter
    assert torch.allclose(measured, torch.full((2,), 10.0), atol=0.05)
    assert si_snr(target, target).min() > 60


def test_stage_cross_entropy_is_measured_within_each_codebook(tmp_path):
    """The coarse head holds 4 blocks of 1024 ids; the sampler draws each position from its own block, so an
    untrained stage scores about log(1024) = 6.93, not log(4096) = 8.32 as a whole-head cross-entropy would."""
    import numpy as np

    from musiclm.evaluation.learning import stage_cross_entropy
    from musiclm.training.stage_learner import StageLearner

    rng = np.random.default_rng(0)

    def sample() -> dict:
        return {"acoustic": rng.integers(0, 1024, (100, 12)).astype(np.int16),
                "semantic": rng.integers(0, 1024, 50).astype(np.int16),
                "mulan": rng.integers(0, 1024, 12).astype(np.int16)}

    learner = StageLearner("tiny", "cpu", stage="coarse")
    with torch.no_grad():
        learner.model.head.weight.zero_()  # every logit 0: uniform over whatever the ids are compared within
    learner.export(str(tmp_path / "coarse"))
    result = stage_cross_entropy(tmp_path / "coarse", [sample() for _ in range(2)], [sample() for _ in range(128)])
    assert result["uniform_cross_entropy"] == pytest.approx(np.log(1024))
    assert result["cross_entropy"] == pytest.approx(np.log(1024), abs=1e-4)  # log(4096) over the whole head
    assert abs(result["unigram_cross_entropy"] - np.log(1024)) < 0.2  # uniform random tokens: unigram ≈ uniform
