import numpy as np
import pytest
import torch

from musiclm.evaluation.learning import mel_distance
from musiclm.tokenizers.soundstream import load_soundstream
from musiclm.training.soundstream_learner import MultiScaleMel, SoundStreamLearner, si_snr

torch.set_num_threads(1)


def melody(seconds: float, seed: int) -> np.ndarray:
    """Decaying harmonic notes, a quarter second each: music-like audio with a learnable structure."""
    rng = np.random.default_rng(seed)
    sr = 24000
    out = np.zeros(int(seconds * sr))
    for i in range(int(seconds / 0.25)):
        f = 220 * 2 ** (rng.integers(0, 12) / 12)
        t = np.arange(int(0.25 * sr)) / sr
        note = sum(np.sin(2 * np.pi * f * h * t) / h for h in range(1, 4)) * np.exp(-6 * t)
        out[int(i * 0.25 * sr) : int(i * 0.25 * sr) + len(t)] = note
    return (0.2 * out).astype(np.float32)


@pytest.fixture(scope="module")
def samples():
    return [{"__key__": f"s{i}", "wav": melody(2.0, i), "json": {"caption": ""}} for i in range(3)]


def test_collate_random_crops_and_padding(samples):
    learner = SoundStreamLearner("tiny", "cpu", crop_seconds=0.2, batch_size=2)
    batch = learner.collate(samples + [{"wav": np.ones(1000, np.float32)}])
    assert batch.shape == (4, 4800) and batch.dtype == torch.float32
    assert torch.all(batch[3, 1000:] == 0) and torch.all(batch[3, :1000] == 1)
    again = learner.collate(samples)
    assert not torch.equal(batch[:3], again)  # fresh random crops
    with pytest.raises(KeyError):
        learner.collate([{"json": {}}])
    with pytest.raises(TypeError):
        SoundStreamLearner("tiny", "cpu", learning_rate=1.0)
    assert SoundStreamLearner("tiny", "cpu", quantizer="factorized").model.config.quantizer == "factorized"
    with pytest.raises(ValueError):
        SoundStreamLearner("medium", "cpu")


def test_losses_know_the_answer():
    mel = MultiScaleMel((256, 512), 32)
    x = torch.randn(2, 4800)
    loss, distance = mel(x, x)
    assert float(loss) == 0.0 and float(distance) == 0.0
    assert float(mel(x, 0.5 * x)[1]) == pytest.approx(np.log(2), rel=1e-3)  # log-mel shifts by log 2
    noise = 0.1 * torch.randn(2, 4800)
    assert si_snr(x, 3 * x).min() > 60  # scale invariant
    assert si_snr(x, x + noise).mean().item() == pytest.approx(20.0, abs=1.0)


def test_short_run_reduces_reconstruction_error_and_round_trips(samples, tmp_path):
    torch.manual_seed(0)
    # a faster lr than the tiny preset's (tuned for 400 steps): 27 steps must visibly lower the mel loss
    options = dict(batch_size=2, crop_seconds=0.12, adversarial_start=24, quantizer_warmup=12, init_batches=4, lr=2e-3)
    learner = SoundStreamLearner("tiny", "cpu", **options)
    held_out = learner.collate([{"wav": melody(0.5, 99)}])  # [1, 2880]: 6 frames
    history, levels = [], []
    for step in range(27):
        metrics = learner.train_step(learner.collate(samples))
        history.append(metrics["mel_loss"])
        levels.append(metrics["levels_mean"])
        assert all(np.isfinite(v) for v in metrics.values()), metrics
        if step == 11:  # the last autoencoder step: the RVQ is not used yet
            assert metrics["codes_used_level0"] == 0
            before_fit = learner.model.quantizer.layers[0].codebook.detach().clone()
    # fitted by k-means on the warm-up latents at step 12
    assert not torch.equal(learner.model.quantizer.layers[0].codebook.detach(), before_fit)
    assert "disc_loss" in metrics and "adv_loss" in metrics and "feature_loss" in metrics  # GAN phase ran
    assert learner.step == 27
    assert np.mean(history[-5:]) < 0.8 * np.mean(history[:3]), history
    assert len(set(levels[12:])) > 1  # quantizer dropout: the number of levels varies
    report = learner.eval_step(held_out)
    assert set(report) >= {"mel_distance", "si_snr", "wave_l1", "codes_perplexity_l0"}
    assert np.isfinite(report["mel_distance"]) and 1.0 <= report["codes_perplexity_l0"] <= 6

    # every prefix of levels decodes; more levels do not reconstruct worse (quantizer dropout)
    learner.model.eval()
    clip = learner.collate([{"wav": melody(2.0, 98)}])
    with torch.no_grad():
        codes = learner.model.encode(clip)
        distances = [float(mel_distance(learner.model.decode(codes[:, :k]), clip[:, : codes.shape[-1] * 480]))
                     for k in (1, 4, 12)]
    assert all(np.isfinite(distances)) and distances[-1] <= distances[0] + 0.05, distances

    # resume: a fresh learner picks up models, optimizers, step and crop RNG
    state = learner.state_dict()
    other = SoundStreamLearner("tiny", "cpu", **options)
    other.load_state_dict(state)
    assert other.step == 27
    assert torch.equal(other.collate(samples), learner.collate(samples))
    for (name, a), b in zip(learner.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), name

    # export -> load_soundstream gives the same codec
    learner.export(str(tmp_path / "soundstream"))
    codec = load_soundstream(tmp_path / "soundstream", preset="tiny")
    learner.model.eval()
    assert torch.equal(codec.encode(held_out), learner.model.encode(held_out))
    assert codec.encode(held_out).shape == (1, 12, 6)


def test_code_perplexity_known_answers():
    from musiclm.training.soundstream_learner import code_perplexity

    assert code_perplexity(torch.zeros(2, 50, dtype=torch.long), 1024) == pytest.approx(1.0)
    assert code_perplexity(torch.arange(64).repeat(3), 1024) == pytest.approx(64.0, rel=1e-5)
