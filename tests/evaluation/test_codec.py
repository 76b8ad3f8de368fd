"""``musiclm eval codec``: held-out selection, per-level figures, Opus beside the codec, the written files."""

import json
import shutil

import numpy as np
import pytest
import torch

from musiclm.audio import write_wav
from musiclm.checkpoint import save_artifact
from musiclm.data.shards import write_shard
from musiclm.evaluation.codec import OPUS_MIN_KBPS, evaluate_codec, opus_available, opus_round_trip
from musiclm.evaluation.learning import si_snr
from musiclm.tokenizers.soundstream import SoundStream, SoundStreamConfig
from musiclm.training.runner import is_held_out

torch.set_num_threads(1)
needs_opus = pytest.mark.skipif(not opus_available()[0], reason="ffmpeg with libopus is not installed")


def tones(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 24000)) / 24000
    wav = sum(0.2 / h * np.sin(2 * np.pi * rng.uniform(100, 800) * h * t) for h in (1, 2, 3))
    return (wav + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A system folder with only ``soundstream/``: an untrained tiny codec whose codebooks are fitted
    (k-means) on its own latents, as an untrained bundle would be."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ckpt")
    config = SoundStreamConfig.preset("tiny")
    model = SoundStream(config).eval()
    with torch.no_grad():
        audio = torch.from_numpy(np.stack([tones(1.0, i) for i in range(4)]))
        latents = model.encoder(audio[:, None]).transpose(1, 2)  # [4, 50, D]
        model.quantizer.fit(latents.reshape(-1, latents.shape[-1]), iters=2)
    save_artifact(root / "soundstream", kind="soundstream", preset="tiny", config=config, state_dict=model.state_dict())
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audio_shards")
    samples = [{"__key__": f"clip{i:03d}", "json": {"caption": ""}, "wav": tones(0.6, 100 + i)} for i in range(12)]
    write_shard(folder / "audio-000000.tar", samples)
    return folder


@needs_opus
def test_report_on_held_out_shards(ckpt, shards, tmp_path):
    fraction = 0.4
    held = [f"clip{i:03d}" for i in range(12) if is_held_out(f"clip{i:03d}", fraction)]
    assert 0 < len(held) < 12  # the split is not trivial for these keys
    report = evaluate_codec(ckpt, shards, tmp_path / "out", max_clips=2, eval_fraction=fraction)

    assert report["held_out"] and report["clip_names"] == held[:2] and report["clips"] == min(2, len(held))
    assert [r["levels"] for r in report["rows"]] == [1, 2, 4, 8, 12]
    assert [r["kbps"] for r in report["rows"]] == [0.5, 1.0, 2.0, 4.0, 6.0]  # K x 10 bits x 50 Hz
    for row in report["rows"]:
        assert np.isfinite(row["si_snr_db"]) and np.isfinite(row["mel_distance"]) and row["mel_distance"] > 0
        if row["kbps"] < OPUS_MIN_KBPS:
            assert "opus_si_snr_db" not in row and "minimum" in row["opus_note"]
    full = report["rows"][-1]
    assert full["opus_kbps"] == 6.0 and 5.0 < full["opus_actual_kbps"] < 10.0
    # Opus at 6 kbps keeps the waveform of tones far better than an untrained codec
    assert full["opus_si_snr_db"] > full["si_snr_db"] + 10 and np.isfinite(full["opus_mel_distance"])

    out = tmp_path / "out"
    assert json.loads((out / "codec_eval.json").read_text())["rows"] == report["rows"]
    table = (out / "codec_eval.md").read_text()
    assert "| 12 | 6 |" in table and "below Opus' 6 kbps minimum" in table
    png = (out / "codec_spectrograms.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_audio_files_levels_and_no_opus(ckpt, tmp_path, monkeypatch):
    folder = tmp_path / "files"
    folder.mkdir()
    for i in range(2):
        write_wav(str(folder / f"song{i}.wav"), tones(0.6, i), 24000)
    (folder / "notes.txt").write_text("not audio")
    monkeypatch.setattr(shutil, "which", lambda name: None)  # as on a machine without ffmpeg
    report = evaluate_codec(ckpt, folder, tmp_path / "out", num_quantizers=(12, 3))
    assert report["clip_names"] == ["song0.wav", "song1.wav"] and report["held_out"]
    assert report["seconds"] == pytest.approx(0.6)  # whole 20-ms frames
    assert [r["levels"] for r in report["rows"]] == [3, 12]
    assert not report["opus"]["available"] and "ffmpeg is not installed" in report["opus"]["reason"]
    assert all("ffmpeg is not installed" in r["opus_note"] for r in report["rows"])
    assert "ffmpeg is not installed" in (tmp_path / "out" / "codec_eval.md").read_text()

    with pytest.raises(ValueError, match="1..12"):
        evaluate_codec(ckpt, folder, tmp_path / "bad", num_quantizers=(13,))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither shards"):
        evaluate_codec(ckpt, tmp_path / "empty", tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        evaluate_codec(ckpt, tmp_path / "missing", tmp_path / "bad")


@needs_opus
def test_opus_round_trip_is_aligned_and_rate_limited():
    wav = tones(1.0, 7)
    decoded, kbps = opus_round_trip(wav, 24.0)
    assert decoded.shape == wav.shape and 15.0 < kbps < 40.0
    assert float(si_snr(torch.from_numpy(decoded)[None], torch.from_numpy(wav)[None])) > 10.0  # aligned, not delayed
    with pytest.raises(ValueError, match="6 kbps"):
        opus_round_trip(wav, 3.0)
