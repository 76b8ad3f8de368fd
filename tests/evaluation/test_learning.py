import math

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
