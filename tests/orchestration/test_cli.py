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
