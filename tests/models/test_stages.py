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
    melody_frame_count,
    melody_slice,
    sequence_lengths,
)
from musiclm.models.transformer import StageTransformer
from musiclm.tokenizers.backends import TokenRates


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
        assert layout.sep == len(starts) * 1024 and layout.pad == layout.sep + 1 == layout.null - 1 == layout.vocab_size - 2
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
    assert counts == {"semantic": 417_387_008, "coarse": 424_727_040, "fine": 436_261_376}  # NULL: one 1024-d row more


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


# ----------------------------------------------------------------------------- other token rates (issue 3)

ENCODEC = TokenRates(acoustic_frame_rate=75, acoustic_codebooks=8)  # EnCodec 24 kHz at 6 kbps: 75 Hz x 8 x 1024


def encodec_sample(seconds: float) -> dict:
    """Like ``aligned_sample`` at 75 Hz x 8: three acoustic frames per semantic frame."""
    fs = int(seconds * 25)
    frame_of = np.arange(3 * fs) // 3
    acoustic = (frame_of[:, None] + 7 * np.arange(8)[None, :]) % 1024  # [F, 8]
    return {"semantic": (np.arange(fs) % 1024).astype(np.int16), "acoustic": acoustic.astype(np.int16),
            "mulan": np.arange(100, 112, dtype=np.int16)}


def test_paper_rates_are_the_default():
    assert StageConfig.preset("coarse", "tiny").rates == TokenRates() == StageConfig.preset("fine", "paper").rates
    assert VocabLayout.for_stage("fine") == VocabLayout.for_stage("fine", TokenRates().to_dict())
    assert sequence_lengths("coarse", 10) == sequence_lengths("coarse", 10, TokenRates())


def test_encodec_layouts_and_lengths():
    coarse, fine = VocabLayout.for_stage("coarse", ENCODEC), VocabLayout.for_stage("fine", ENCODEC)
    assert coarse.num_outputs == 4 * 1024 and coarse.acoustic_offsets[4:] == (None,) * 4
    assert fine.generated_levels == (4, 5, 6, 7) and fine.num_outputs == 4 * 1024
    assert fine.acoustic_offsets == (4096, 5120, 6144, 7168, 0, 1024, 2048, 3072)
    assert fine.vocab_size == (4 + 4 + 12) * 1024 + 3 and len(fine.acoustic_offsets) == 8
    assert sequence_lengths("coarse", 2, ENCODEC) == (12 + 50 + 1, 150 * 4)
    assert sequence_lengths("fine", 1, ENCODEC) == (12 + 75 * 4 + 1, 75 * 4)
    cfg = StageConfig.preset("fine", "tiny", ENCODEC.to_dict())  # a dict (learner option, config.json) works too
    assert cfg.rates == ENCODEC and cfg.transformer.vocab_size == fine.vocab_size
    assert cfg.transformer.max_seq_len == max_seq_len_for("fine", 1.0, ENCODEC) >= 613
    with pytest.raises(ValueError, match="vocab_size"):  # a transformer sized for other rates
        StageConfig(stage="fine", crop_seconds=1.0, transformer=StageConfig.preset("fine", "tiny").transformer, rates=ENCODEC)


def test_blocks_are_sized_per_codebook():
    rates = TokenRates(acoustic_codebook_size=2048, semantic_codebook_size=500, conditioning_codebook_size=256,
                       conditioning_codebooks=6, acoustic_codebooks=6, coarse_levels=2)
    for stage in STAGES:
        layout = VocabLayout.for_stage(stage, rates)
        blocks = [(layout.mulan_offset + q * 256, 256) for q in range(6)]
        blocks += [(o, 2048) for o in layout.acoustic_offsets if o is not None]
        if layout.semantic_offset is not None:
            blocks.append((layout.semantic_offset, 500))
        blocks.sort()
        assert blocks[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(blocks, blocks[1:]))  # contiguous
        assert layout.sep == blocks[-1][0] + blocks[-1][1] and layout.vocab_size == layout.sep + 3 == layout.null + 1
    fine = VocabLayout.for_stage("fine", rates)
    assert fine.num_outputs == 4 * 2048 and fine.allowed_ranges(5)[:, 0].tolist() == [0, 2048, 4096, 6144, 0]
    codes = np.array([[2047, 0, 5, 1000], [1, 2, 3, 4]])  # [F=2, Q=4]
    assert np.array_equal(fine.generated_codes(fine.acoustic_ids(codes, fine.generated_levels)), codes.T)
    semantic = VocabLayout.for_stage("semantic", rates)
    assert semantic.num_outputs == 500 and semantic.allowed_ranges(2).tolist() == [[0, 500], [0, 500]]
    assert semantic.mulan_ids(np.full(6, 255)).tolist() == [500 + q * 256 + 255 for q in range(6)]
    cfg = StageConfig.preset("coarse", "tiny", rates)
    sample = {"semantic": np.array([499, 3]), "acoustic": np.full((6, 6), 2047), "mulan": np.full(6, 255)}
    tokens, mask = build_training_example(sample, "coarse", cfg, np.random.default_rng(0))
    assert len(tokens) == 6 + 2 + 1 + 4 * 2 and mask.sum() == 8 and tokens[6:8].tolist() == [cfg.layout.semantic_offset + 499, cfg.layout.semantic_offset + 3]
    with pytest.raises(ValueError, match="outside \\[0, 500\\)"):
        build_training_example({**sample, "semantic": np.array([500, 0])}, "coarse", cfg, np.random.default_rng(0))


def test_encodec_examples_are_aligned_on_40_ms():
    cfg = StageConfig.preset("fine", "tiny", ENCODEC)  # a 1-s crop: 25 semantic frames, 75 acoustic frames
    layout = cfg.layout
    tokens, mask = build_training_example(encodec_sample(3.0), "fine", cfg, np.random.default_rng(4))
    assert len(tokens) == 12 + 300 + 1 + 300 and mask.sum() == 300 and mask[313:].all() and not mask[:313].any()
    coarse = tokens[12:312].reshape(75, 4) - np.array(layout.acoustic_offsets[:4])
    fine = tokens[313:].reshape(75, 4) - np.array(layout.acoustic_offsets[4:])
    first = coarse[0, 0]
    assert np.array_equal(coarse[:, 0], first + np.arange(75) // 3)  # three frames per semantic frame, from a boundary
    assert np.array_equal(fine - coarse[:, :1], (7 * np.arange(4, 8))[None, :].repeat(75, 0))
    coarse_cfg = StageConfig.preset("coarse", "tiny", ENCODEC)
    tokens, mask = build_training_example(encodec_sample(3.0), "coarse", coarse_cfg, np.random.default_rng(5))
    semantic = tokens[12:62] - coarse_cfg.layout.semantic_offset
    acoustic = tokens[63:].reshape(150, 4) - np.array(coarse_cfg.layout.acoustic_offsets[:4])
    assert np.array_equal(acoustic[:, 0], np.repeat(semantic, 3))


def test_shards_of_other_rates_are_refused_clearly():
    paper = StageConfig.preset("coarse", "tiny")
    with pytest.raises(ValueError, match="last dim 12.*another tokenizer"):
        build_training_example(encodec_sample(1.0), "coarse", paper, np.random.default_rng(0))
    with pytest.raises(ValueError, match="last dim 8"):
        build_training_example(aligned_sample(1.0), "coarse", StageConfig.preset("coarse", "tiny", ENCODEC),
                               np.random.default_rng(0))


# ----------------------------------------------------------------------------- conditioning (issue 4)

def melody_sample(seconds: float, q: int = 3, size: int = 16) -> dict:
    """``aligned_sample`` plus melody tokens: frame j (covering [3j, 3j + 4) s) holds (j + 5 q') % size at level q'."""
    fm = max(1, int((seconds - 4) // 3) + 1)
    melody = (np.arange(fm)[:, None] + 5 * np.arange(q)[None, :]) % size  # [Fm, Q]
    return {**aligned_sample(seconds), "melody": melody.astype(np.int16)}


def test_melody_frames_and_slices():
    assert [melody_frame_count(s) for s in (10.0, 30.0, 2.0, 4.0, 6.9, 7.0)] == [3, 9, 1, 1, 1, 2]
    assert [StageConfig.preset(s, "paper").melody_frames for s in STAGES] == [9, 3, 1]
    melody = np.stack([np.arange(10), 100 + np.arange(10)], axis=1)  # [Fm=10, Q=2]: frame j holds j
    assert melody_slice(melody, 0.0, 3)[:, 0].tolist() == [0, 1, 2]
    assert melody_slice(melody, 10.0, 3)[:, 0].tolist() == [3, 4, 5]  # round(10 / 3) = 3
    assert melody_slice(melody, 4.4, 3)[:, 0].tolist() == [1, 2, 3]  # round(1.47) = 1
    assert melody_slice(melody, 29.0, 3)[:, 0].tolist() == [7, 8, 9]  # clamped: the window stays inside
    assert melody_slice(melody, -5.0, 1)[:, 1].tolist() == [100]
    assert melody_slice(melody[:2], 12.0, 5)[:, 0].tolist() == [0, 1, 0, 1, 0]  # a short melody is tiled
    assert torch.equal(melody_slice(torch.from_numpy(melody), 10.0, 3), torch.from_numpy(melody[3:6]))
    with pytest.raises(ValueError, match="Fm >= 1"):
        melody_slice(np.zeros((0, 2), dtype=np.int64), 0.0, 3)


def test_null_id_and_melody_blocks():
    for stage in STAGES:
        plain = VocabLayout.for_stage(stage)
        melody = VocabLayout.for_stage(stage, None, melody_codebooks=24, melody_codebook_size=512, melody_frames=3)
        assert plain.null == plain.pad + 1 == plain.vocab_size - 1 and plain.cond_len == 12 and plain.melody_len == 0
        # melody blocks come after every other block: all other offsets and the outputs are unchanged
        assert melody.melody_offset == plain.sep and melody.sep == plain.sep + 24 * 512
        assert (melody.mulan_offset, melody.semantic_offset, melody.acoustic_offsets, melody.num_outputs) == (
            plain.mulan_offset, plain.semantic_offset, plain.acoustic_offsets, plain.num_outputs)
        assert melody.null == melody.vocab_size - 1 and melody.cond_len == 12 + 3 * 24
    assert sequence_lengths("semantic", 30, melody_codebooks=24) == (12 + 9 * 24, 750)
    assert sequence_lengths("coarse", 10, melody_codebooks=24) == (12 + 3 * 24 + 250 + 1, 2000)
    assert sequence_lengths("fine", 3, melody_codebooks=24, melody_frames=2) == (12 + 2 * 24 + 600 + 1, 1200)
    for name in ("tiny", "paper"):
        for stage in STAGES:
            cfg = StageConfig.preset(stage, name, melody_codebooks=24, melody_codebook_size=512)
            assert cfg.layout.melody_frames == cfg.melody_frames and cfg.layout.vocab_size == cfg.transformer.vocab_size
            assert cfg.transformer.max_seq_len >= sum(sequence_lengths(stage, cfg.crop_seconds, None, 24))
    assert StageConfig.preset("semantic", "paper", melody_codebooks=24).transformer.max_seq_len == 1024  # 228 + 750
    with pytest.raises(ValueError, match="melody_codebooks"):
        StageConfig.preset("semantic", "tiny", melody_codebooks=-1)
    with pytest.raises(ValueError, match="vocab_size"):  # a transformer sized without the melody blocks
        StageConfig(stage="fine", crop_seconds=1.0, transformer=StageConfig.preset("fine", "tiny").transformer,
                    melody_codebooks=2)


def test_condition_ids_numpy_torch_and_null():
    layout = StageConfig.preset("coarse", "tiny", melody_codebooks=3, melody_codebook_size=16).layout  # 2-s crop: 1 frame
    mulan = np.arange(100, 112).reshape(1, 12).repeat(2, 0)  # [B=2, 12]
    melody = np.array([[[1, 2, 15]], [[0, 0, 0]]])  # [B=2, n=1, Q=3]
    ids = layout.condition_ids(mulan, melody)
    assert ids.shape == (2, 15) and ids.dtype == np.int64
    assert ids[0, :12].tolist() == layout.mulan_ids(mulan[0]).tolist()
    assert ids[0, 12:].tolist() == [layout.melody_offset + 1, layout.melody_offset + 16 + 2, layout.melody_offset + 32 + 15]
    as_torch = layout.condition_ids(torch.from_numpy(mulan), torch.from_numpy(melody))
    assert isinstance(as_torch, torch.Tensor) and as_torch.tolist() == ids.tolist()
    no_melody = layout.condition_ids(mulan, None)
    assert (no_melody[:, :12] == ids[:, :12]).all() and (no_melody[:, 12:] == layout.null).all()
    no_m = layout.condition_ids(None, torch.from_numpy(melody))
    assert (no_m[:, :12] == layout.null).all() and no_m[:, 12:].tolist() == ids[:, 12:].tolist()
    assert layout.condition_ids(None, None).tolist() == [layout.null] * 15
    assert layout.unconditional(ids).tolist() == layout.condition_ids(None, None)[None].repeat(2, 0).tolist()
    seq = torch.cat([as_torch, torch.arange(5).expand(2, 5)], dim=1)  # condition then context
    nulled = layout.unconditional(seq, mulan=False)
    assert torch.equal(nulled[:, :12], seq[:, :12]) and (nulled[:, 12:15] == layout.null).all()
    assert torch.equal(nulled[:, 15:], seq[:, 15:]) and not torch.equal(nulled, seq)
    with pytest.raises(ValueError, match="melody has shape"):
        layout.condition_ids(mulan, np.zeros((2, 2, 3), dtype=np.int64))  # 2 frames, the crop holds 1
    with pytest.raises(ValueError, match="melody has codes outside"):
        layout.condition_ids(mulan, melody + 1)
    with pytest.raises(ValueError, match="mulan has shape"):
        layout.condition_ids(mulan[:, :11], melody)
    with pytest.raises(ValueError, match="batch shapes"):
        layout.condition_ids(mulan[:1], melody)
    with pytest.raises(ValueError, match="no melody conditioning"):
        VocabLayout.for_stage("coarse").condition_ids(mulan, melody)
    assert VocabLayout.for_stage("coarse").condition_ids(mulan, None).tolist() == VocabLayout.for_stage(
        "coarse").mulan_ids(mulan).tolist()  # a stage without melody: the condition is M


def test_training_examples_take_the_melody_of_their_crop():
    cfg = StageConfig.preset("semantic", "tiny", melody_codebooks=3, melody_codebook_size=16)  # 10-s crop: 3 frames
    layout = cfg.layout
    rng = np.random.default_rng(0)
    firsts = set()
    for _ in range(12):
        tokens, mask = build_training_example(melody_sample(30.0), "semantic", cfg, rng)  # 9 melody frames
        assert len(tokens) == 12 + 9 + 250 and not mask[:21].any() and mask[21:].all()
        start_seconds = tokens[21] / 25  # semantic frame t holds t: the crop's start
        first = min(max(0, round(start_seconds / 3)), 9 - 3)
        melody = (tokens[12:21].reshape(3, 3) - layout.melody_offset - 16 * np.arange(3)) % 16  # [n, Q]
        assert melody[:, 0].tolist() == [first, first + 1, first + 2] and melody[:, 1].tolist() == [
            (first + j + 5) % 16 for j in range(3)]
        firsts.add(first)
    assert len(firsts) > 2
    without = {k: v for k, v in melody_sample(12.0).items() if k != "melody"}
    tokens, _ = build_training_example(without, "semantic", cfg, np.random.default_rng(0))
    assert (tokens[12:21] == layout.null).all() and (tokens[:12] < layout.sep).all()
    with pytest.raises(ValueError, match="melody"):
        build_training_example({**melody_sample(12.0), "melody": np.zeros((3, 2))}, "semantic", cfg, rng)
    # a stage without melody ignores the shards' melody tokens
    plain = StageConfig.preset("semantic", "tiny")
    a, _ = build_training_example(melody_sample(12.0), "semantic", plain, np.random.default_rng(1))
    b, _ = build_training_example(aligned_sample(12.0), "semantic", plain, np.random.default_rng(1))
    assert np.array_equal(a, b)


def test_conditioning_dropout_nulls_m_and_melody_independently():
    cfg = StageConfig.preset("coarse", "tiny", melody_codebooks=3, melody_codebook_size=16)
    null = cfg.layout.null
    sample = melody_sample(6.0)
    plain, _ = build_training_example(sample, "coarse", cfg, np.random.default_rng(7))
    again, _ = build_training_example(sample, "coarse", cfg, np.random.default_rng(7), conditioning_dropout=0.0)
    assert np.array_equal(plain, again) and not (plain == null).any()  # p = 0 draws nothing: the same crop
    rng = np.random.default_rng(8)
    drops = []
    for _ in range(600):
        tokens, mask = build_training_example(sample, "coarse", cfg, rng, conditioning_dropout=0.4)
        m, mel = tokens[:12] == null, tokens[12:15] == null
        assert (m.all() or not m.any()) and (mel.all() or not mel.any())  # all of a part or none of it
        assert not (tokens[15:] == null).any() and mask[15 + 50 + 1 :].all()  # the context and targets stay
        drops.append((m.all(), mel.all()))
    m_rate, mel_rate = np.mean(drops, axis=0)
    both = np.mean([a and b for a, b in drops])
    assert abs(m_rate - 0.4) < 0.06 and abs(mel_rate - 0.4) < 0.06 and abs(both - 0.16) < 0.05  # independent
    tokens, _ = build_training_example(sample, "coarse", cfg, rng, conditioning_dropout=1.0)
    assert (tokens[:15] == null).all()
    with pytest.raises(ValueError, match="conditioning_dropout"):
        build_training_example(sample, "coarse", cfg, rng, conditioning_dropout=1.5)


def test_contour_reaches_the_position_that_predicts_each_frame():
    from musiclm.models.stages import build_training_crop, contour_positions

    cfg = StageConfig.preset("coarse", "tiny", melody_codebooks=3, melody_codebook_size=16, contour=True)
    assert cfg.transformer.frame_classes == 13 and cfg.layout.tokens_per_semantic_frame == 8  # 2 frames x 4 levels
    null = cfg.transformer.frame_null
    frames = contour_positions(cfg, np.array([3, 5]), region_start=10, length=30)
    assert (frames[:9] == null).all() and (frames[9:17] == 3).all() and (frames[17:25] == 5).all()
    assert (frames[25:] == null).all()  # past the contour's frames
    sample = {**melody_sample(6.0), "contour": (np.arange(150) % 12).astype(np.int8)}
    rng = np.random.default_rng(3)
    for _ in range(5):
        tokens, mask, frames = build_training_crop(sample, "coarse", cfg, rng)
        region = int(np.argmax(mask))  # the first acoustic id
        start = int(tokens[15] - cfg.layout.semantic_offset)  # semantic frame t holds t: the crop's start
        g = np.arange(len(tokens) - region)
        assert (frames[region - 1 + g] == (start + g // 8) % 12).all()  # the frame each position predicts
        assert (frames[: region - 1] == null).all()
    without = {k: v for k, v in sample.items() if k != "contour"}
    assert (build_training_crop(without, "coarse", cfg, rng)[2] == null).all()  # no contour: NULL everywhere
    assert build_training_crop(sample, "coarse", StageConfig.preset("coarse", "tiny"), rng)[2] is None
    with pytest.raises(ValueError, match="contour"):
        build_training_crop({**sample, "contour": np.zeros(3, dtype=np.int8)}, "coarse", cfg, rng)
    with pytest.raises(ValueError, match="frame_classes"):
        StageConfig(stage="coarse", crop_seconds=2.0, transformer=cfg.transformer, contour=False)


def test_conditioning_dropout_drops_the_contour_with_the_melody():
    from musiclm.models.stages import build_training_crop

    cfg = StageConfig.preset("coarse", "tiny", melody_codebooks=3, melody_codebook_size=16, contour=True)
    null, layout = cfg.transformer.frame_null, cfg.layout
    sample = {**melody_sample(6.0), "contour": np.full(150, 4, dtype=np.int8)}
    rng = np.random.default_rng(9)
    seen = set()
    for _ in range(200):
        tokens, _, frames = build_training_crop(sample, "coarse", cfg, rng, conditioning_dropout=0.5)
        melody_dropped = bool((tokens[12:15] == layout.null).all())
        contour_dropped = bool((frames == null).all())
        assert melody_dropped == contour_dropped
        seen.add(melody_dropped)
    assert seen == {True, False}
    # a stage with a contour but no melody tokens still drops its contour
    plain = StageConfig.preset("coarse", "tiny", contour=True)
    dropped = [bool((build_training_crop(sample, "coarse", plain, rng, conditioning_dropout=0.5)[2] == null).all())
               for _ in range(100)]
    assert 0.3 < np.mean(dropped) < 0.7
