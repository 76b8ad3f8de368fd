"""Did learning happen? Honest, held-out measurements for the demo report.

Each number is set against a baseline measured the same way: the codec against the same
architecture untrained, each stage's cross-entropy against the
unigram distribution of the training tokens. MuLan's retrieval is
``musiclm.evaluation.mulan`` and the codec against Opus ``musiclm.evaluation.codec``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from musiclm.constants import SAMPLE_RATE


def si_snr(estimate: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant SNR in dB per row of ``[B, T]``."""
    target = target - target.mean(dim=-1, keepdim=True)
    estimate = estimate - estimate.mean(dim=-1, keepdim=True)
    scale = (estimate * target).sum(-1, keepdim=True) / (target.pow(2).sum(-1, keepdim=True) + eps)
    projection = scale * target
    noise = estimate - projection
    return 10 * torch.log10(projection.pow(2).sum(-1) / (noise.pow(2).sum(-1) + eps) + eps)


def mel_distance(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multi-scale mel distance per row of ``[B, T]``: the mean absolute log-mel difference over the
    window lengths 2^6 .. 2^11 of SoundStream's reconstruction loss (``MultiScaleMel.distance``)."""
    from musiclm.audio.mel import MultiScaleMel

    return MultiScaleMel(sample_rate=SAMPLE_RATE).to(target.device).distance(target, estimate)


@torch.inference_mode()
def codec_quality(soundstream_dir: str | Path, wavs: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Reconstruction of held-out audio ``[B, T]`` by the trained codec and by the same codec untrained."""
    from musiclm.tokenizers.soundstream import SoundStream, load_soundstream

    trained = load_soundstream(soundstream_dir)
    torch.manual_seed(seed)
    untrained = SoundStream(trained.config).eval()
    length = wavs.shape[-1] // 480 * 480
    wavs = wavs[:, :length]
    result: dict[str, float] = {}
    for name, model in (("trained", trained), ("untrained", untrained)):
        recon = model.decode(model.encode(wavs))[:, :length]
        result[f"{name}_mel_distance"] = float(mel_distance(recon, wavs).mean())
        result[f"{name}_si_snr_db"] = float(si_snr(recon, wavs).mean())
    return result


@torch.inference_mode()
@torch.inference_mode()
def stage_cross_entropy(
    stage_dir: str | Path,
    heldout: Iterable[dict],
    train: Iterable[dict],
    *,
    max_examples: int = 32,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out cross-entropy (nats/token) of a stage against the unigram model of the training tokens.

    Measured as the sampler draws: each position's distribution is restricted to its own codebook's block
    of the output head (coarse interleaves 4 levels, each a block of ``size`` ids), so the uniform
    baseline is ``log(size)`` and the unigram is normalised per block."""
    from musiclm.models.stages import VocabLayout, build_training_crop, build_training_example
    from musiclm.training.stage_learner import block_cross_entropy, load_stage

    model, config = load_stage(stage_dir)
    stage = config.stage
    size = VocabLayout.for_stage(stage, config.rates).output_block_size
    rng = np.random.default_rng(seed)
    # the output head covers only the tokens this stage generates: logit j is token id j
    vocab = model(torch.zeros(1, 1, dtype=torch.long)).shape[-1]
    counts = np.full(vocab, 1e-2)  # a small pseudo-count: held-out tokens unseen in training stay possible
    for i, sample in enumerate(train):
        tokens, mask = build_training_example(sample, stage, config, rng)
        np.add.at(counts, tokens[mask], 1)
        if i + 1 >= 4 * max_examples:
            break
    per_block = counts.reshape(-1, size)  # [blocks, size]
    log_unigram = np.log(per_block / per_block.sum(axis=1, keepdims=True)).reshape(-1)  # [vocab]

    model_nll, unigram_nll, n_tokens = 0.0, 0.0, 0
    for i, sample in enumerate(heldout):
        tokens, mask, frames = build_training_crop(sample, stage, config, rng)  # frames: the melody contour
        x = torch.from_numpy(tokens).long().unsqueeze(0)  # [1, L]
        f = None if frames is None else torch.from_numpy(frames[None, :-1])  # [1, L - 1]
        target_mask = torch.from_numpy(mask[1:])  # position t predicts token t + 1
        logits = model(x[:, :-1], select=target_mask.unsqueeze(0), frames=f).float()  # [N, V_out]
        targets = x[0, 1:][target_mask]  # [N]
        nll = block_cross_entropy(logits, targets, size, reduction="none")  # the target's codebook only
        model_nll += float(nll.sum())
        unigram_nll += float(-log_unigram[targets.numpy()].sum())
        n_tokens += int(target_mask.sum())
        if i + 1 >= max_examples:
            break
    if n_tokens == 0:
        raise ValueError(f"no held-out examples for the {stage} stage")
    return {
        "heldout_tokens": n_tokens,
        "cross_entropy": model_nll / n_tokens,
        "unigram_cross_entropy": unigram_nll / n_tokens,
        "uniform_cross_entropy": float(np.log(size)),  # every generated token is one of `size` codes
    }
