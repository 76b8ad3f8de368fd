"""Stage configs and sequence layouts: lengths, offsets, loss masks and 40-ms crop alignment."""

import numpy as np
import pytest
import torch

from musiclm.models.stages import (
    STAGES,
    StageConfig,
    VocabLayout,
    build_training_example,
    max_seq_len_for,
    sequence_lengths,
)
from musiclm.models.transformer import StageTransformer


def aligned_sample(seconds: float) -> dict:
    """Semantic frame t holds t % 1024; both acoustic frames of it hold (t + 7 * level) % 1024 at each level."""
    fs = int(seconds * 25)
    semantic = np.arange(fs) % 1024
    frame_of = np.arange(2 * fs) // 2  # acoustic frame -> semantic frame
    acoustic = (frame_of[:, None] + 7 * np.arange(12)[None, :]) % 1024  # [F, 12]
    return {"semantic": semantic.astype(np.int16), "acoustic": acoustic.astype(np.int16),
            "mulan": np.arange(100, 112, dtype=np.int16)}


def test_vocab_blocks_do_not_overlap_and_generated_blocks_come_first():
    for stage in STAGES:
        layout = VocabLayout.for_stage(stage)
        starts = [layout.mulan_offset + q * 1024 for q in range(12)]
        starts += [o for o in layout.acoustic_offsets if o is not None]
        if layout.semantic_offset is not None:
            starts.append(layout.semantic_offset)
        assert len(set(starts)) == len(starts)
        assert sorted(starts) == list(range(0, len(starts) * 1024, 1024))  # contiguous 1024-id blocks
        assert layout.sep == len(starts) * 1024 and layout.pad == layout.sep + 1 == layout.vocab_size - 1
    assert VocabLayout.for_stage("semantic").num_outputs == 1024 and VocabLayout.for_stage("semantic").semantic_offset == 0
    coarse, fine = VocabLayout.for_stage("coarse"), VocabLayout.for_stage("fine")
    assert coarse.num_outputs == 4096 and coarse.acoustic_offsets[:4] == (0, 1024, 2048, 3072)
    assert fine.num_outputs == 8192 and fine.acoustic_offsets[4] == 0 and fine.acoustic_offsets[11] == 7 * 1024
    assert fine.acoustic_offsets[0] == 8192 and fine.semantic_offset is None


def test_sequence_lengths_of_paper_and_tiny_crops():
    assert sequence_lengths("semantic", 30) == (12, 750)
    assert sequence_lengths("coarse", 10) == (12 + 250 + 1, 2000)
    assert sequence_lengths("fine", 3) == (12 + 600 + 1, 1200)
    assert sum(sequence_lengths("coarse", 4)) == 913 and sum(sequence_lengths("fine", 2)) == 1213
    for name in ("tiny", "paper"):
        for stage in STAGES:
            cfg = StageConfig.preset(stage, name)
            assert cfg.transformer.max_seq_len == max_seq_len_for(stage, cfg.crop_seconds)
            assert cfg.transformer.max_seq_len >= sum(sequence_lengths(stage, cfg.crop_seconds))
    # tiny semantic generation of 10 s fits in one window
    assert StageConfig.preset("semantic", "tiny").transformer.max_seq_len >= 262


def test_presets():
    tiny = StageConfig.preset("coarse", "tiny")
    assert (tiny.transformer.dim, tiny.transformer.n_layers, tiny.transformer.n_heads, tiny.transformer.ff_dim) == (256, 4, 4, 1024)
    assert tiny.crop_seconds == 2.0 and tiny.transformer.dropout == 0.1 and tiny.temperature == 0.95
    paper = StageConfig.preset("semantic", "paper")
    assert (paper.transformer.dim, paper.transformer.n_layers, paper.transformer.n_heads, paper.transformer.ff_dim) == (1024, 24, 16, 4096)
    assert [StageConfig.preset(s, "paper").crop_seconds for s in STAGES] == [30.0, 10.0, 3.0]
    with pytest.raises(ValueError, match="tiny, paper"):
        StageConfig.preset("semantic", "huge")
    with pytest.raises(ValueError, match="semantic, coarse, fine"):
        StageConfig.preset("melody", "tiny")


def test_paper_stages_have_about_430m_parameters():
    with torch.device("meta"):  # no memory, no init cost
        counts = {s: StageTransformer(StageConfig.preset(s, "paper").transformer).num_parameters() for s in STAGES}
    assert counts == {"semantic": 417_385_984, "coarse": 424_726_016, "fine": 436_260_352}


def test_semantic_layout():
    cfg = StageConfig.preset("semantic", "tiny")
    tokens, mask = build_training_example(aligned_sample(4.0), "semantic", cfg, np.random.default_rng(0))
    layout = cfg.layout
    assert tokens.dtype == np.int64 and mask.dtype == bool and tokens.shape == mask.shape == (12 + 100,)
    assert tokens[:12].tolist() == [layout.mulan_offset + q * 1024 + 100 + q for q in range(12)]
    assert tokens[12:].tolist() == list(range(100))  # a 4-s sample is shorter than the crop: used whole
    assert not mask[:12].any() and mask[12:].all()


def test_coarse_layout_is_aligned_on_40_ms():
    cfg = StageConfig.preset("coarse", "tiny")
    layout = cfg.layout
    rng = np.random.default_rng(1)
    starts = set()
    for _ in range(5):
        tokens, mask = build_training_example(aligned_sample(12.0), "coarse", cfg, rng)
        assert len(tokens) == 463 and mask.sum() == 400 and mask[63:].all() and not mask[:63].any()
        semantic = tokens[12:62] - layout.semantic_offset  # 2 s of semantic tokens
        assert tokens[62] == layout.sep
        assert np.all(np.diff(semantic) == 1)  # one contiguous crop
        acoustic = tokens[63:].reshape(100, 4) - np.array(layout.acoustic_offsets[:4])  # frame-major
        # acoustic frame f belongs to semantic frame f // 2 of the same crop
        expected = (np.repeat(semantic, 2)[:, None] + 7 * np.arange(4)[None, :]) % 1024
        assert np.array_equal(acoustic, expected)
        starts.add(int(semantic[0]))
    assert len(starts) > 1  # the crop is random


def test_fine_layout_conditions_on_coarse():
    cfg = StageConfig.preset("fine", "tiny")
    layout = cfg.layout
    tokens, mask = build_training_example(aligned_sample(5.0), "fine", cfg, np.random.default_rng(2))
    assert len(tokens) == 12 + 200 + 1 + 400 and mask.sum() == 400 and mask[213:].all()  # a 1-s crop
    coarse = tokens[12:212].reshape(50, 4) - np.array(layout.acoustic_offsets[:4])
    fine = tokens[213:].reshape(50, 8) - np.array(layout.acoustic_offsets[4:])
    assert tokens[212] == layout.sep
    assert np.array_equal(fine - coarse[:, :1], (7 * np.arange(4, 12))[None, :].repeat(50, 0))
    # the generated part decodes back to codes [8, F] per level
    assert np.array_equal(layout.generated_codes(tokens[213:]), (fine % 1024).T)
    assert layout.allowed_ranges(10)[9].tolist() == [1024, 2048]


def test_bad_samples_are_refused():
    cfg = StageConfig.preset("coarse", "tiny")
    sample = aligned_sample(1.0)
    with pytest.raises(ValueError, match="outside"):
        build_training_example({**sample, "semantic": sample["semantic"] + 2000}, "coarse", cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match="mulan"):
        build_training_example({**sample, "mulan": np.zeros(11)}, "coarse", cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no complete"):
        build_training_example({**sample, "acoustic": sample["acoustic"][:1]}, "coarse", cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match="not fine"):
        build_training_example(sample, "fine", cfg, np.random.default_rng(0))
