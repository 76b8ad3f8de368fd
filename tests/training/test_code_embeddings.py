"""Stages whose acoustic embeddings and output rows start from the codec's code vectors."""

import numpy as np
import pytest
import torch

from musiclm.checkpoint import artifact_id, save_artifact
from musiclm.models.stages import StageConfig
from musiclm.models.transformer import StageTransformer
from musiclm.tokenizers.soundstream import SoundStream, SoundStreamConfig
from musiclm.training.code_embeddings import INIT_STD, acoustic_code_vectors, add_code_vectors
from musiclm.training.stage_learner import StageLearner

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    model = SoundStream(SoundStreamConfig.preset("tiny"))
    model.train()(0.1 * torch.randn(2, 4800))  # running statistics of the code norm
    return model.eval()


def test_code_vectors_are_what_each_code_adds_to_the_latent(codec):
    vectors = acoustic_code_vectors(codec)  # [12, 1024, 64]
    assert vectors.shape == (12, 1024, 64)
    codes = torch.tensor([[[3, 700, 5]]])  # [B=1, F=1, K=3]
    expected = vectors[0, 3] + vectors[1, 700] + vectors[2, 5]
    assert torch.allclose(codec.quantizer.decode(codes)[0, 0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="residual quantizer"):
        acoustic_code_vectors(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("stage, generated, read", [("coarse", range(4), range(4)), ("fine", range(4, 12), range(12))])
def test_the_rows_of_the_acoustic_ids_get_the_projected_vectors(codec, stage, generated, read):
    config = StageConfig.preset(stage, "tiny")
    torch.manual_seed(1)
    plain = StageTransformer(config.transformer)
    started = StageTransformer(config.transformer)
    started.load_state_dict(plain.state_dict())
    vectors = acoustic_code_vectors(codec)
    rows = add_code_vectors(started, config, vectors)
    layout, size = config.layout, 1024
    assert rows == size * (len(read) + len(generated))
    added = started.embed.weight - plain.embed.weight  # [V, D]
    changed = torch.zeros(added.shape[0], dtype=torch.bool)
    for q in read:
        changed[layout.acoustic_offsets[q] : layout.acoustic_offsets[q] + size] = True
    assert added[changed].abs().sum(1).gt(0).all() and added[~changed].eq(0).all()  # MuLan, semantic rows untouched
    level0 = added[layout.acoustic_offsets[read[0]] : layout.acoustic_offsets[read[0]] + size]
    assert level0.pow(2).mean().sqrt().item() == pytest.approx(INIT_STD, rel=1e-4)
    # the projection is an isometry (up to one scale): distances between codes are kept
    q = read[0]
    d_codec = torch.cdist(vectors[q, :50], vectors[q, :50])
    d_embed = torch.cdist(added[layout.acoustic_offsets[q] :][:50], added[layout.acoustic_offsets[q] :][:50])
    apart = d_codec > 1e-3 * d_codec.max()  # not float noise between (near-)identical untrained codes
    ratio = d_embed[apart] / d_codec[apart]
    assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-3)
    head = started.head.weight - plain.head.weight  # [V_out, D]: the generated levels' rows only
    assert head.abs().sum(1).gt(0).all()
    assert torch.allclose(head, added[: head.shape[0]])


def test_the_semantic_stage_and_bad_vectors(codec):
    semantic = StageConfig.preset("semantic", "tiny")
    model = StageTransformer(semantic.transformer)
    before = model.embed.weight.clone()
    assert add_code_vectors(model, semantic, acoustic_code_vectors(codec)) == 0
    assert torch.equal(model.embed.weight, before)
    coarse = StageConfig.preset("coarse", "tiny")
    with pytest.raises(ValueError, match="code vectors must be"):
        add_code_vectors(StageTransformer(coarse.transformer), coarse, torch.zeros(12, 512, 64))
    with pytest.raises(ValueError, match="level 3"):
        add_code_vectors(StageTransformer(coarse.transformer), coarse, torch.zeros(2, 1024, 64))


def _sample(rng: np.random.Generator) -> dict:
    return {"semantic": rng.integers(0, 1024, 10).astype(np.int16),
            "acoustic": rng.integers(0, 1024, (20, 12)).astype(np.int16),
            "mulan": rng.integers(0, 1024, 12).astype(np.int16)}


def test_the_learner_option_checks_the_codec_is_the_shards(codec, tmp_path):
    save_artifact(tmp_path / "soundstream", kind="soundstream", preset="tiny", config=codec.config,
                  state_dict=codec.state_dict())
    codec_id = artifact_id(tmp_path / "soundstream")
    info = {"acoustic": {"backend": "soundstream", "ids": {"soundstream": codec_id}}}
    plain = StageLearner("tiny", "cpu", stage="coarse", seed=3)
    started = StageLearner("tiny", "cpu", stage="coarse", seed=3, token_info=info, codec_init=str(tmp_path))
    offset = started.config.layout.acoustic_offsets[0]
    assert not torch.equal(started.model.embed.weight[offset], plain.model.embed.weight[offset])
    out = started.train_step(started.collate([_sample(np.random.default_rng(0)) for _ in range(2)]))
    assert np.isfinite(out["loss"])
    other = {"acoustic": {"backend": "soundstream", "ids": {"soundstream": "soundstream:tiny:000000000000"}}}
    with pytest.raises(ValueError, match="tokenized with soundstream:tiny:000000000000"):
        StageLearner("tiny", "cpu", stage="coarse", token_info=other, codec_init=str(tmp_path))
    with pytest.raises(ValueError, match="no trained SoundStream"):
        StageLearner("tiny", "cpu", stage="coarse", codec_init=str(tmp_path / "elsewhere"))
