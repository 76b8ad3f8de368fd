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
