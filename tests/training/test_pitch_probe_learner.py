"""The pitch probe's learner: it learns which codes play which pitch class, from token samples."""

import numpy as np
import pytest
import torch

from musiclm.checkpoint import save_artifact
from musiclm.tokenizers.soundstream import SoundStream, SoundStreamConfig
from musiclm.training.pitch_probe_learner import PitchProbeLearner, load_pitch_probe

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def codec_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = SoundStream(SoundStreamConfig.preset("tiny"))
    model.train()(0.1 * torch.randn(2, 4800))
    folder = tmp_path_factory.mktemp("ckpt")
    save_artifact(folder / "soundstream", kind="soundstream", preset="tiny", config=model.config,
                  state_dict=model.eval().state_dict())
    return folder


def pitched_samples(count: int, seed: int) -> list[dict]:
    """Token samples whose level-0 code tells the pitch class (code = 40 * class + noise); rests at class 12."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        contour = rng.integers(0, 13, 50)  # 50 semantic frames
        acoustic = rng.integers(0, 1024, (100, 12))  # 2 acoustic frames per semantic frame
        acoustic[:, 0] = 40 * np.repeat(contour, 2) + rng.integers(0, 3, 100)
        out.append({"__key__": f"s{i}", "contour": contour, "acoustic": acoustic, "semantic": rng.integers(0, 1024, 50)})
    return out


def test_the_probe_learns_the_pitch_from_the_codes_and_exports(codec_folder, tmp_path):
    learner = PitchProbeLearner("tiny", codec_init=str(codec_folder), lr=1e-2, seed=0)
    train, held = pitched_samples(16, 0), pitched_samples(4, 1)
    batch = learner.collate(train[:2])
    assert batch["codes"].shape[1] == 4 and (batch["pitch"] < 12).all()  # rests are skipped
    before = learner.eval_step(learner.collate(held))
    rng = np.random.default_rng(0)
    for _ in range(150):
        learner.train_step(learner.collate([train[i] for i in rng.integers(0, 16, 4)]))
    after = learner.eval_step(learner.collate(held))
    assert after["ce"] < 0.5 * after["prior_ce"] and after["accuracy"] > 0.8, (before, after)
    assert after["ce"] < before["ce"]
    learner.export(str(tmp_path / "pitch_probe"))
    probe = load_pitch_probe(str(tmp_path / "pitch_probe"))
    assert torch.equal(probe.code_vectors, learner.module.code_vectors)
    resumed = PitchProbeLearner("tiny", codec_init=str(codec_folder))
    resumed.load_state_dict(learner.state_dict())
    assert resumed.eval_step(learner.collate(held))["ce"] == pytest.approx(after["ce"], rel=1e-5)


def test_clear_errors(codec_folder, tmp_path):
    with pytest.raises(ValueError, match="needs codec_init"):
        PitchProbeLearner("tiny")
    with pytest.raises(ValueError, match="no trained SoundStream"):
        PitchProbeLearner("tiny", codec_init=str(tmp_path))
    info = {"acoustic": {"ids": {"soundstream": "another-codec"}}}
    with pytest.raises(ValueError, match="tokenized with another-codec"):
        PitchProbeLearner("tiny", codec_init=str(codec_folder), token_info=info)
    learner = PitchProbeLearner("tiny", codec_init=str(codec_folder))
    sample = pitched_samples(1, 0)[0]
    del sample["contour"]
    with pytest.raises(ValueError, match="no contour.npy"):
        learner.collate([sample])
