import dataclasses
import json

import pytest
import torch

from musiclm.checkpoint import (
    CheckpointError,
    artifact_id,
    config_from_dict,
    load_artifact,
    read_artifact_config,
    save_artifact,
)


@dataclasses.dataclass
class ToyConfig:
    dim: int = 4
    strides: tuple = (2, 4)
    name: str = "toy"


def test_round_trip_keeps_weights_config_and_tuples(tmp_path):
    weights = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}
    save_artifact(tmp_path / "a", kind="toy", preset="tiny", config=ToyConfig(), state_dict=weights, meta={"steps": 3})
    document, loaded = load_artifact(tmp_path / "a", kind="toy", preset="tiny")
    assert torch.equal(loaded["w"], weights["w"])
    assert document["meta"] == {"steps": 3}
    assert config_from_dict(ToyConfig, document["config"]) == ToyConfig()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "model.safetensors"]


def test_wrong_kind_or_preset_is_refused_with_a_clear_message(tmp_path):
    save_artifact(tmp_path / "a", kind="coarse", preset="tiny", config=ToyConfig(), state_dict={"w": torch.ones(1)})
    with pytest.raises(CheckpointError, match="holds a 'coarse' checkpoint, expected 'fine'"):
        load_artifact(tmp_path / "a", kind="fine")
    with pytest.raises(CheckpointError, match="preset 'tiny', but preset 'paper'"):
        load_artifact(tmp_path / "a", kind="coarse", preset="paper")


def test_missing_and_broken_folders(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_artifact_config(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        read_artifact_config(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_artifact_config(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"kind": "x", "preset": "tiny", "config": {}}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_artifact(tmp_path / "empty", kind="x")


def test_unknown_config_fields_are_refused():
    with pytest.raises(CheckpointError, match="no field"):
        config_from_dict(ToyConfig, {"dim": 3, "depth": 9})


def test_artifact_id_changes_with_the_weights(tmp_path):
    save_artifact(tmp_path / "a", kind="toy", preset="tiny", config=ToyConfig(), state_dict={"w": torch.ones(2)})
    first = artifact_id(tmp_path / "a")
    assert first.startswith("toy:tiny:")
    assert artifact_id(tmp_path / "a") == first
    save_artifact(tmp_path / "a", kind="toy", preset="tiny", config=ToyConfig(), state_dict={"w": torch.zeros(2)})
    assert artifact_id(tmp_path / "a") != first


def test_weights_of_another_architecture_version_are_one_clear_error(tmp_path):
    from musiclm.checkpoint import load_weights

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    old = {"0.weight": torch.zeros(3, 5), "0.bias": torch.zeros(3), "2.weight": torch.zeros(2, 3)}
    with pytest.raises(CheckpointError, match=r"2 missing, 1 unexpected and 1 differently shaped tensors"):
        load_weights(model, old, tmp_path)
    good = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    load_weights(model, good, tmp_path)
    assert torch.equal(model[1].bias, torch.ones(2))
