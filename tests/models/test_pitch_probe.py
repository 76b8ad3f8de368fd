"""The pitch probe: partial latents of a coarse frame, and the candidate scores the sampler adds."""

import pytest
import torch

from musiclm.models.pitch_probe import PitchProbe, PitchProbeConfig

torch.set_num_threads(1)


def random_probe(levels: int = 3, size: int = 16, dim: int = 8) -> PitchProbe:
    torch.manual_seed(0)
    probe = PitchProbe(PitchProbeConfig(levels=levels, codebook_size=size, latent_dim=dim, hidden=32))
    probe.code_vectors.normal_()
    probe.mean.normal_()
    probe.std.uniform_(0.5, 2.0)
    for layer in (*probe.hidden, *probe.out):
        torch.nn.init.normal_(layer.weight, std=0.5)
    return probe.eval()


def test_partial_latents_sum_the_levels_so_far():
    probe = random_probe()
    codes = torch.tensor([[1, 2, 3], [15, 0, 7]])
    parts = probe.partial_latents(codes)  # [3, 2, 8]
    v = probe.code_vectors
    assert parts.shape == (3, 2, 8)
    assert torch.allclose(parts[2, 1], v[0, 15] + v[1, 0] + v[2, 7])
    assert torch.allclose(parts[0, 0], v[0, 1])
    with pytest.raises(ValueError, match=r"codes must be \[N, 3\]"):
        probe.partial_latents(codes[:, :2])


@pytest.mark.parametrize("level", [0, 2])
def test_candidate_scores_are_the_probe_on_each_candidate_latent(level):
    probe = random_probe()
    latent = torch.randn(2, 8)  # the frame's levels < level
    target = torch.tensor([4, 11])
    scores = probe.candidate_log_probs(latent, level, target)  # [2, 16]
    candidates = latent[:, None, :] + probe.code_vectors[level][None]  # [2, 16, 8]
    direct = probe(candidates.reshape(-1, 8), level).log_softmax(-1).reshape(2, 16, 12)
    assert scores.shape == (2, 16)
    assert torch.allclose(scores, direct[torch.arange(2), :, target], atol=1e-5)
    assert (scores <= 0).all() and scores.std() > 0  # log-probabilities that tell the codes apart
