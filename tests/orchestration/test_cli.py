"""The CLI's contract with a user: mistakes are one `error:` line and exit status 2."""

import pytest

from musiclm.checkpoint import save_artifact
from musiclm.orchestration.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_checkpoint_folder_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "calm piano", "--checkpoints", str(tmp_path / "nope"))
    assert code == 2
    assert err.strip() == f"error: --checkpoints {tmp_path / 'nope'}: no such folder"


def test_checkpoint_folder_without_components_names_what_is_missing(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "calm piano", "--checkpoints", str(tmp_path))
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "does not exist" in err or "no config.json" in err


def test_checkpoint_of_another_preset_is_refused(capsys, tmp_path):
    import torch

    save_artifact(tmp_path / "semantic", kind="semantic", preset="paper", config={"x": 1}, state_dict={"w": torch.ones(1)})
    code, _, err = run(capsys, "train", "semantic", "--data", str(tmp_path), "--out", str(tmp_path / "semantic"),
                       "--preset", "tiny")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_data_folder_without_shards(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "train", "coarse", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "c"))
    assert code == 2
    assert "shard" in err and len(err.strip().splitlines()) == 1


def test_bad_values_are_refused(capsys, tmp_path):
    code, _, err = run(capsys, "corpus", "demo", str(tmp_path), "--clips", "0")
    assert code == 2 and "positive" in err


def test_unknown_component_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "vocoder", "--data", "x", "--out", "y"])
    assert exc.value.code == 2


def test_unknown_learner_option_names_the_valid_ones(capsys, tmp_path):
    code, _, err = run(capsys, "train", "mulan", "--data", str(tmp_path), "--out", str(tmp_path / "m"),
                       "--option", "text_trainabel=true")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "text_trainabel" in err and "text_trainable" in err


def test_option_without_equals_is_refused(capsys, tmp_path):
    code, _, err = run(capsys, "train", "mulan", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--option", "lr")
    assert code == 2 and "KEY=VALUE" in err


def test_backends_set_and_show(capsys, tmp_path):
    from musiclm.tokenizers.backends import read_backends
    from musiclm.tokenizers.pretrained import save_random_backend

    model = save_random_backend("encodec", tmp_path / "encodec", "tiny")
    ckpt = tmp_path / "ckpt"
    code, out, _ = run(capsys, "backends", "set", "acoustic", "encodec", str(model), "--tokenizers", str(ckpt),
                       "--option", "bandwidth=6.0")
    assert code == 0
    spec = read_backends(ckpt)["acoustic"]
    assert (spec.backend, spec.options["bandwidth"]) == ("encodec", 6.0)
    assert "75 Hz × 8 × 1024" in out  # the token rates the stages will be built with

    code, _, err = run(capsys, "backends", "set", "semantic", "hubert", str(model), "--tokenizers", str(ckpt))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "hubert" in err  # an encodec folder is not a HuBERT

    code, out, _ = run(capsys, "backends", "set", "acoustic", "soundstream", "--tokenizers", str(ckpt))
    assert code == 0 and not read_backends(ckpt)["acoustic"].pretrained


def test_eval_codec_writes_a_report(capsys, tmp_path):
    from musiclm.data.demo_corpus import generate_corpus
    from musiclm.tokenizers.bundle import save_random_tokenizers

    save_random_tokenizers(tmp_path / "ckpt")
    generate_corpus(tmp_path / "corpus", clips=2, seconds=2.0, seed=3)
    code, out, _ = run(capsys, "eval", "codec", "--tokenizers", str(tmp_path / "ckpt"), "--data",
                       str(tmp_path / "corpus" / "audio"), "--out", str(tmp_path / "eval"), "--max-clips", "2")
    assert code == 0
    assert "| 12 | 6 |" in out  # the full-rate row: 12 levels x 10 bits x 50 Hz = 6 kbps
    assert (tmp_path / "eval" / "codec_eval.json").is_file() and (tmp_path / "eval" / "codec_spectrograms.png").is_file()


def test_eval_needs_existing_folders(capsys, tmp_path):
    code, _, err = run(capsys, "eval", "mulan", "--tokenizers", str(tmp_path / "nope"), "--data", str(tmp_path))
    assert code == 2 and "no such folder" in err


# ----------------------------------------------------------------------------- generate: story, melody, samples


@pytest.fixture(scope="module")
def random_system(tmp_path_factory):
    from musiclm.orchestration.serve import save_random_system

    return save_random_system(tmp_path_factory.mktemp("cli_system"), "tiny", melody=True)


def test_generate_story_with_a_melody_and_reranked_samples(capsys, tmp_path, random_system):
    import soundfile as sf

    from musiclm.data.melody_pairs import write_demo_hum

    hum = tmp_path / "hum.wav"
    write_demo_hum(str(hum), seed=1, seconds=3.0)
    out = tmp_path / "song.wav"
    code, stdout, err = run(capsys, "generate", "--checkpoints", str(random_system), "--story", "calm piano:0.6",
                            "fast techno:0.4", "--melody", str(hum), "--num-samples", "2", "--rerank",
                            "--top-k", "50", "--guidance-scale", "2", "--report-melody", "--out", str(out))
    assert code == 0, err
    for i in range(2):
        wav, sr = sf.read(str(tmp_path / f"song_{i}.wav"))
        assert sr == 24000 and len(wav) == 24000  # the story's 1.0 s
    assert "first audio after" in stdout
    assert "melody adherence" in stdout and "with the melody" in stdout and "without it" in stdout


@pytest.mark.parametrize("argv, message", [
    (["calm piano", "--story", "techno:5"], "a prompt or --story, not both"),
    (["--story", "techno"], '"prompt:seconds"'),
    ([""], "the prompt is empty"),
    (["calm", "--num-samples", "0"], "num_samples"),
    (["calm", "--top-p", "1.5"], "top_p"),
    (["calm", "--rerank"], "rerank needs num_samples"),
    (["calm", "--melody", "nope.wav"], "no such file"),
    (["calm", "--report-melody"], "--report-melody needs --melody"),
    (["calm", "--pitch-guidance", "5"], "--pitch-guidance steers toward a melody"),
])
def test_generate_refuses_bad_flags_in_one_line(capsys, random_system, argv, message):
    code, _, err = run(capsys, "generate", *argv, "--checkpoints", str(random_system))
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err, err


def test_melody_demo_corpus_is_a_pairs_manifest(capsys, tmp_path):
    from musiclm.data.melody_pairs import check_melody_groups, load_melody_pairs

    code, stdout, err = run(capsys, "corpus", "melody-demo", str(tmp_path / "m"), "--melodies", "2",
                            "--renditions", "2", "--seconds", "2")
    assert code == 0, err
    rows = load_melody_pairs(str(tmp_path / "m" / "captions.jsonl"))
    assert len(rows) == 4 and (tmp_path / "m" / "hum.wav").is_file()
    report = check_melody_groups(rows)
    assert report["ok"] and report["groups"] == 2 and not report["short_groups"]


def test_serve_config_file_errors_are_one_line(capsys, tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("deployments:\n  fine:\n    num_gpu: 1\n")
    code, _, err = run(capsys, "serve", "--config", str(bad), "--checkpoints", str(tmp_path))
    assert code == 2 and "num_gpu" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run(capsys, "serve", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "no such file" in err
