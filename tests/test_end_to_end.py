"""The whole pipeline once, at a tiny size: the same driver as `musiclm demo`, with few steps.

corpus + melody pairs → audio shards (Beam) → SoundStream, w2v-BERT, MuLan, melody embedder (Ray Train)
→ k-means, MuLan RVQ, melody RVQ → token shards with melody tokens (Beam) → three stages with melody
conditioning (Ray Train) → Ray Serve → POST /generate → WAV; a hummed melody and a story → report.
"""

import json
import wave

import pytest

from musiclm.orchestration.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow


def test_demo_pipeline_end_to_end(tmp_path, ray_session):
    config = DemoConfig(
        workdir=tmp_path / "demo",
        clips=8,
        heldout_clips=4,
        seconds=10.0,
        generate_seconds=2.0,
        melodies=4,
        renditions=2,
        story=(("calm piano", 1.0), ("fast techno", 1.0)),
        steps={name: 6 for name in ("soundstream", "w2vbert", "mulan", "melody", "semantic", "coarse", "fine",
                                    "pitch_probe")},
        melody_samples=2,
    )
    report = run_demo(config)
    import torch

    assert torch.is_grad_enabled()  # the in-process Beam runner must not leak global torch state into its caller
    work = config.workdir
    assert report == work.resolve() / "report.md"
    results = json.loads((work / "report.json").read_text())

    # every component trained into its own artifact folder
    for name in ("soundstream", "w2vbert", "semantic_kmeans", "mulan", "mulan_rvq", "melody", "melody_rvq",
                 "semantic", "coarse", "fine", "pitch_probe"):
        folder = work / "checkpoints" / name
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file(), name

    # Beam wrote real shards with manifests; nothing was dead-lettered from the clean corpus
    for shards in ("audio", "melody-audio", "tokens", "heldout-tokens", "heldout-audio"):
        manifest = json.loads((work / "shards" / shards / "manifest.json").read_text())
        assert manifest["shards"], shards
    assert results["tokenize"]["files_ok"] == 8 and results["tokenize"]["files_dead"] == 0

    # Ray Serve answered a real HTTP request with 2 s of 24-kHz audio, and a bad one with a 4xx JSON
    with wave.open(str(work / "generated.wav")) as w:
        assert w.getframerate() == 24000 and w.getnchannels() == 1
        assert abs(w.getnframes() - 2 * 24000) <= 960
    assert 400 <= results["serve"]["bad_request_status"] < 500
    assert "prompt" in json.dumps(results["serve"]["bad_request_body"])
    assert (work / "generated.png").stat().st_size > 10_000

    # the report carries every learning measurement, with its baseline
    learning = results["learning"]
    assert {"trained_mel_distance", "untrained_mel_distance"} <= set(learning["codec"])
    mulan = learning["mulan_eval"]  # `musiclm eval mulan` on the 4 held-out clips (distinct captions)
    assert mulan["clips"] == 4 and mulan["text_to_audio"]["chance_r1"] == pytest.approx(1 / 4)
    assert mulan["tagging"]["aspects_evaluated"] > 0
    codec = learning["codec_eval"]  # `musiclm eval codec`: the full-rate row against Opus where ffmpeg has it
    assert codec["rows"][-1]["levels"] == 12 and codec["rows"][-1]["kbps"] == pytest.approx(6.0)
    assert (work / "eval" / "codec_spectrograms.png").is_file() and (work / "eval" / "mulan_eval.md").is_file()
    for stage in ("semantic", "coarse", "fine"):
        assert learning[stage]["heldout_tokens"] > 0
        assert learning[stage]["cross_entropy"] > 0
    # the CLI generates from the same checkpoint folder, reproducibly for a seed
    from musiclm.orchestration.cli import main

    for name in ("a.wav", "b.wav"):
        assert main(["generate", "calm piano", "--checkpoints", str(work / "checkpoints"), "--seconds", "1",
                     "--seed", "3", "--out", str(work / name)]) == 0
    assert (work / "a.wav").read_bytes() == (work / "b.wav").read_bytes()
    with wave.open(str(work / "a.wav")) as w:
        assert w.getnframes() == 24000

    # melody tokens reached the shards and the stages are conditioned on them
    from musiclm.data.shards import iter_samples

    sample = next(iter(iter_samples(str(work / "shards" / "tokens"), split_by_node=False, split_by_worker=False)))
    assert sample["melody"].ndim == 2 and sample["json"]["token_info"]["melody"]["num_codebooks"] == sample["melody"].shape[1]
    stage = json.loads((work / "checkpoints" / "semantic" / "config.json").read_text())["config"]
    assert stage["melody_codebooks"] == sample["melody"].shape[1]
    melody = results["melody"]  # adherence to the hum with and without it, same prompt and seeds
    assert 0 <= melody["conditioned"] <= 1 and 0 <= melody["unconditioned"] <= 1
    assert 0 <= melody["steered"] <= 1 and melody["pitch_guidance"] == config.pitch_guidance  # the pitch probe's row
    assert main(["generate", "calm piano", "--checkpoints", str(work / "checkpoints"), "--seconds", "1",
                 "--melody", str(work / "hum.wav"), "--pitch-guidance", "10", "--out", str(work / "steered.wav")]) == 0
    retrieval = results["learning"]["melody"]  # the embedder on melodies of another seed, every rendition a query
    assert retrieval["recordings"] == retrieval["melodies"] * 2 and 0 <= retrieval["chance_r1"] < 1
    assert 0 <= retrieval["r1"] <= 1 and retrieval["anchors"] == 1.0
    story = results["story"]  # two prompts of 1 s: continuity measured at the windows' joins
    assert story["audio_seconds"] == pytest.approx(2.0, abs=0.05) and len(story["tempo_bpm"]) == 2
    assert story["spectral_flux_at_joins"]  # measured, or the reason it could not be (1-s segments are short)
    assert all(v.get("ratio", 1.0) > 0 and ("ratio" in v or "skipped" in v) for v in story["spectral_flux_at_joins"].values())
    assert (work / "story.wav").is_file() and (work / "generated_melody.wav").is_file()

    text = report.read_text()
    assert "Did it learn?" in text and "unigram" in text and "chance" in text
    assert "## Melody conditioning" in text and "## Story mode" in text and "unseen melodies" in text
