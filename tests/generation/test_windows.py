"""One window per stage: the prefix is prefilled as given tokens, rows draw independently, and the
codec's chunk decoder joins windows without a seam."""

import dataclasses

import numpy as np
import pytest
import torch

from musiclm.generation.sampler import sample
from musiclm.generation.spec import Sampling
from musiclm.generation.windows import (
    ChunkDecoder,
    coarse_window,
    fine_window,
    row_generator,
    semantic_window,
)
from musiclm.models.stages import StageConfig, sequence_lengths
from musiclm.models.transformer import StageTransformer, TransformerConfig
from musiclm.tokenizers.soundstream import SoundStream, SoundStreamConfig
from tests.generation.test_sampler import TableCodec, tiny_stage

torch.set_num_threads(1)
GREEDY = Sampling(0.0)
HOT = Sampling(1.0)


@pytest.fixture(scope="module")
def stages():
    return {name: tiny_stage(name, crop, seed=i) for i, (name, crop) in
            enumerate((("semantic", 0.4), ("coarse", 0.2), ("fine", 0.2)))}


def mulan(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1024, (rows, 12))


def seeds(rows, window=0, seed=7):
    return [(seed, r, window) for r in rows]


def test_row_generator_is_deterministic_and_independent():
    draw = lambda *a: torch.randint(0, 1 << 30, (4,), generator=row_generator(*a)).tolist()  # noqa: E731
    assert draw(3, 1, "coarse", 2) == draw(3, 1, "coarse", 2)
    others = [draw(3, 2, "coarse", 2), draw(3, 1, "fine", 2), draw(3, 1, "coarse", 3), draw(4, 1, "coarse", 2)]
    assert all(o != draw(3, 1, "coarse", 2) for o in others)
    with pytest.raises(ValueError, match="unknown stage"):
        row_generator(0, 0, "melody", 0)
    with pytest.raises(ValueError, match=">= 0"):
        row_generator(-1, 0, "fine", 0)


def test_semantic_window_continues_its_prefix(stages):
    model, cfg = stages["semantic"]
    m = mulan(2)
    whole = semantic_window(model, cfg, m, np.zeros((2, 0), np.int64), 10, GREEDY)
    assert whole.shape == (2, 10) and whole.min() >= 0 and whole.max() < 1024
    # greedy: continuing the first 4 frames as a given prefix reproduces the rest exactly
    assert np.array_equal(semantic_window(model, cfg, m, whole[:, :4], 6, GREEDY), whole[:, 4:])
    # the prefix is laid out as [M][S prefix]: the same as sampling those ids directly
    layout = cfg.layout
    ids = torch.cat([layout.mulan_ids(torch.as_tensor(m)), layout.semantic_ids(torch.as_tensor(whole[:, :4]))], 1)
    direct = sample(model, ids, 6, 0.0, allowed_range=(0, layout.num_outputs))
    assert np.array_equal(layout.generated_codes(direct).numpy(), whole[:, 4:])
    with pytest.raises(ValueError, match="1..10 new frames"):
        semantic_window(model, cfg, m, whole[:, :5], 6, GREEDY)
    with pytest.raises(ValueError, match="prefix has shape"):
        semantic_window(model, cfg, m, whole[:1], 2, GREEDY)
    with pytest.raises(ValueError, match="mulan has codes outside"):
        semantic_window(model, cfg, m + 1024, whole[:, :2], 2, GREEDY)
    with pytest.raises(ValueError, match="coarse window needs the coarse"):
        coarse_window(model, cfg, m, whole[:, :5], np.zeros((2, 4, 0), np.int64), GREEDY)


def test_coarse_and_fine_windows_continue_the_previous_half(stages):
    c_model, c_cfg = stages["coarse"]
    f_model, f_cfg = stages["fine"]
    m, sem = mulan(2), np.random.default_rng(1).integers(0, 1024, (2, 5))
    whole = coarse_window(c_model, c_cfg, m, sem, np.zeros((2, 4, 0), np.int64), GREEDY)
    assert whole.shape == (2, 4, 10)
    # prefilled with its first 6 frames (3 semantic frames' worth), the window draws the other 4 the same
    assert np.array_equal(coarse_window(c_model, c_cfg, m, sem, whole[:, :, :6], GREEDY), whole[:, :, 6:])
    fine = fine_window(f_model, f_cfg, m, whole, np.zeros((2, 8, 0), np.int64), GREEDY)
    assert fine.shape == (2, 8, 10) and fine.min() >= 0 and fine.max() < 1024
    assert np.array_equal(fine_window(f_model, f_cfg, m, whole, fine[:, :, :7], GREEDY), fine[:, :, 7:])
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        fine_window(f_model, f_cfg, m, whole, fine, GREEDY)
    with pytest.raises(ValueError, match="1..10 acoustic frames"):
        fine_window(f_model, f_cfg, m, np.concatenate([whole, whole], 2), fine[:, :, :1], GREEDY)
    with pytest.raises(ValueError, match="1..5 semantic frames"):
        coarse_window(c_model, c_cfg, m, np.concatenate([sem, sem], 1), whole[:, :, :1], GREEDY)


def test_rows_draw_the_same_whatever_batch_they_are_in(stages):
    model, cfg = stages["coarse"]
    m, sem = mulan(3), np.random.default_rng(2).integers(0, 1024, (3, 5))
    prefix = np.random.default_rng(3).integers(0, 1024, (3, 4, 4))
    batch = coarse_window(model, cfg, m, sem, prefix, HOT, seeds(range(3)))
    alone = coarse_window(model, cfg, m[2:], sem[2:], prefix[2:], HOT, seeds([2]))
    assert np.array_equal(batch[2:], alone)
    again = coarse_window(model, cfg, m, sem, prefix, HOT, seeds(range(3)))
    other = coarse_window(model, cfg, m, sem, prefix, HOT, seeds(range(3), window=1))
    assert np.array_equal(batch, again) and not np.array_equal(batch, other)
    with pytest.raises(ValueError, match="2 seeds for 3 rows"):
        coarse_window(model, cfg, m, sem, prefix, HOT, seeds(range(2)))


def melody_stage(crop_seconds: float = 0.4, codebooks: int = 2, size: int = 8):
    """A random very small semantic stage whose prefix holds melody tokens."""
    cfg = StageConfig.preset("semantic", "tiny", melody_codebooks=codebooks, melody_codebook_size=size)
    layout = cfg.layout
    transformer = TransformerConfig(
        vocab_size=layout.vocab_size, output_size=layout.num_outputs, dim=32, n_layers=2, n_heads=2, ff_dim=64,
        dropout=0.0, attn_dropout=0.0, max_seq_len=sum(sequence_lengths("semantic", crop_seconds, None, codebooks)) + 8,
    )
    cfg = dataclasses.replace(cfg, crop_seconds=crop_seconds, transformer=transformer)
    torch.manual_seed(5)
    model = StageTransformer(transformer).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # peaky distributions: a changed prefix shows in the draws
    return model, cfg


def test_melody_tokens_condition_a_stage_trained_with_them(stages):
    model, cfg = melody_stage()
    rows = 8  # 8 rows x 7 draws: a changed prefix shows in some draw
    m, prefix = mulan(rows), np.random.default_rng(5).integers(0, 1024, (rows, 3))
    tune = np.random.default_rng(6).integers(0, 8, (rows, cfg.melody_frames, 2))
    plain = semantic_window(model, cfg, m, prefix, 7, HOT, seeds(range(rows)))  # NULL melody ids in the prefix
    with_tune = semantic_window(model, cfg, m, prefix, 7, HOT, seeds(range(rows)), melody=tune)
    assert not np.array_equal(plain, with_tune)
    # the prefix is [M][melody frames, frame-major][S prefix]
    layout = cfg.layout
    ids = torch.cat([torch.as_tensor(layout.condition_ids(m, tune)), layout.semantic_ids(torch.as_tensor(prefix))], 1)
    gens = [row_generator(7, row, "semantic", 0) for row in range(rows)]
    direct = sample(model, ids, 7, 1.0, allowed_range=(0, layout.num_outputs), generator=gens)
    assert np.array_equal(layout.generated_codes(direct).numpy(), with_tune)
    with pytest.raises(ValueError, match="melody has codes outside"):
        semantic_window(model, cfg, m, prefix, 6, GREEDY, melody=tune + 8)
    with pytest.raises(ValueError, match="melody has shape"):
        semantic_window(model, cfg, m, prefix, 6, GREEDY, melody=tune[:, :, :1])
    no_melody_model, no_melody_cfg = stages["semantic"]
    with pytest.raises(ValueError, match="trained without melody"):
        semantic_window(no_melody_model, no_melody_cfg, m, prefix, 6, GREEDY, melody=tune)


def test_guidance_mixes_an_unconditional_prefix(stages):
    model, cfg = stages["semantic"]
    m, prefix = mulan(2), np.random.default_rng(4).integers(0, 1024, (2, 3))
    plain = semantic_window(model, cfg, m, prefix, 6, GREEDY)
    assert np.array_equal(plain, semantic_window(model, cfg, m, prefix, 6, Sampling(0.0, guidance_scale=1.0)))
    guided = semantic_window(model, cfg, m, prefix, 6, Sampling(0.0, guidance_scale=8.0))
    assert not np.array_equal(plain, guided)
    assert np.array_equal(guided, semantic_window(model, cfg, m, prefix, 6, Sampling(0.0, guidance_scale=8.0)))


def test_chunk_decoder_streams_soundstream_exactly():
    torch.manual_seed(0)
    codec = SoundStream(SoundStreamConfig.preset("tiny")).eval()
    codes = torch.randint(0, 1024, (2, 12, 30))
    decoder = ChunkDecoder(codec)
    assert decoder.streaming
    parts = [decoder(codes[..., a:b]) for a, b in ((0, 7), (7, 20), (20, 30))]
    assert [p.shape for p in parts] == [(2, 7 * 480), (2, 13 * 480), (2, 10 * 480)]
    with torch.no_grad():
        whole = codec.decode(codes).numpy()
    assert np.abs(np.concatenate(parts, 1) - whole).max() < 1e-5 * np.abs(whole).max()


def decode_in_chunks(codec, codes, cuts, context=8, fade=3):
    decoder = ChunkDecoder(codec, fade_frames=fade)
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        out.append(decoder(codes[..., a:b], codes[..., max(0, a - context) : a], final=b == cuts[-1]))
    return np.concatenate(out, 1)


def test_chunk_decoder_overlaps_codecs_without_streaming_state():
    codes = torch.randint(0, 1024, (2, 12, 30))
    table = TableCodec()
    cuts = [0, 7, 20, 30]
    assert not ChunkDecoder(table).streaming
    assert np.allclose(decode_in_chunks(table, codes, cuts), table.decode(codes).numpy(), atol=1e-6)  # frame-local

    torch.manual_seed(0)
    config = SoundStreamConfig.preset("tiny")
    config.causal = False  # sees the future: decoding a chunk alone differs near both of its edges
    codec = SoundStream(config).eval()
    with torch.no_grad():
        whole = codec.decode(codes).numpy()
        naive = np.concatenate([codec.decode(codes[..., a:b]).numpy() for a, b in zip(cuts[:-1], cuts[1:])], 1)
    overlapped = decode_in_chunks(codec, codes, cuts)
    assert overlapped.shape == whole.shape
    naive_error, error = np.abs(naive - whole).max(), np.abs(overlapped - whole).max()
    assert error < 0.2 * naive_error, (error, naive_error)
    with pytest.raises(ValueError, match="no streaming decode"):
        ChunkDecoder(table, streaming=True)
    with pytest.raises(ValueError, match="does not cover"):
        decoder = ChunkDecoder(table, fade_frames=3)
        decoder(codes[..., :10])
        decoder(codes[..., 10:20], codes[..., 9:10])


def contour_stage(stage: str = "coarse", crop_seconds: float = 0.2):
    """A random very small stage with the melody contour, its frame classes strong enough to show."""
    cfg = StageConfig.preset(stage, "tiny", contour=True)
    layout = cfg.layout
    transformer = TransformerConfig(
        vocab_size=layout.vocab_size, output_size=layout.num_outputs, dim=32, n_layers=2, n_heads=2, ff_dim=64,
        dropout=0.0, attn_dropout=0.0, max_seq_len=sum(sequence_lengths(stage, crop_seconds)) + 8, frame_classes=13,
    )
    cfg = dataclasses.replace(cfg, crop_seconds=crop_seconds, transformer=transformer)
    torch.manual_seed(8)
    model = StageTransformer(transformer).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    torch.nn.init.normal_(model.frame_embed.weight, std=2.0)
    return model, cfg


def test_the_contour_conditions_a_window_position_by_position(stages):
    from musiclm.models.stages import contour_positions

    model, cfg = contour_stage()
    m, sem = mulan(2), np.random.default_rng(1).integers(0, 1024, (2, 5))
    contour = np.random.default_rng(2).integers(0, 13, (2, 5))
    empty = np.zeros((2, 4, 0), np.int64)
    whole = coarse_window(model, cfg, m, sem, empty, GREEDY, contour=contour)
    assert not np.array_equal(whole, coarse_window(model, cfg, m, sem, empty, GREEDY))  # without: NULL classes
    # continuing from a prefix gives each position the same class as the whole window did
    assert np.array_equal(coarse_window(model, cfg, m, sem, whole[:, :, :6], GREEDY, contour=contour), whole[:, :, 6:])
    layout = cfg.layout
    ids = torch.cat([layout.mulan_ids(torch.as_tensor(m)), layout.semantic_ids(torch.as_tensor(sem)),
                     torch.full((2, 1), layout.sep)], 1)
    frames = torch.as_tensor(contour_positions(cfg, contour, ids.shape[1], ids.shape[1] + 40))
    direct = sample(model, ids, 40, 0.0, allowed_range=layout.allowed_ranges(40), frames=frames)
    assert np.array_equal(layout.generated_codes(direct).numpy(), whole)
    with pytest.raises(ValueError, match="contour has shape"):
        coarse_window(model, cfg, m, sem, empty, GREEDY, contour=contour[:, :4])
    with pytest.raises(ValueError, match="contour has codes outside"):
        coarse_window(model, cfg, m, sem, empty, GREEDY, contour=contour + 13)
    plain_model, plain_cfg = stages["coarse"]
    with pytest.raises(ValueError, match="trained without the melody contour"):
        coarse_window(plain_model, plain_cfg, m, sem, empty, GREEDY, contour=contour)


def test_pitch_guidance_steers_the_coarse_draws_toward_the_contour(stages):
    from musiclm.models.pitch_probe import PitchProbe, PitchProbeConfig

    model, cfg = contour_stage()
    # a probe that reads the pitch class off level 0's code: code c plays class c % 12
    probe = PitchProbe(PitchProbeConfig(levels=4, codebook_size=1024, latent_dim=12, hidden=12))
    probe.code_vectors.zero_()
    probe.code_vectors[0] = torch.eye(12)[torch.arange(1024) % 12] * 10.0
    with torch.no_grad():
        for level in range(4):
            probe.hidden[level].weight.copy_(torch.eye(12))
            probe.hidden[level].bias.zero_()
            probe.out[level].weight.copy_(torch.eye(12))
            probe.out[level].bias.zero_()
    m, sem = mulan(2), np.random.default_rng(1).integers(0, 1024, (2, 5))
    contour = np.array([[0, 3, 12, 7, 7], [11, 11, 2, 2, 12]])
    empty = np.zeros((2, 4, 0), np.int64)
    steered = Sampling(1.0, pitch_guidance=20.0)
    codes = coarse_window(model, cfg, m, sem, empty, steered, seeds=[(0, 0, 0), (0, 1, 0)], contour=contour,
                          pitch_probe=probe)  # [2, 4, 10]
    target = np.repeat(contour, 2, axis=1)  # [2, 10]: the class of each acoustic frame
    pitched = target < 12
    assert np.array_equal(codes[:, 0][pitched] % 12, target[pitched])  # level 0 plays the contour's class
    plain = coarse_window(model, cfg, m, sem, empty, Sampling(1.0), seeds=[(0, 0, 0), (0, 1, 0)], contour=contour)
    assert np.mean(plain[:, 0][pitched] % 12 == target[pitched]) < 0.5
    # continuing from a prefix steers by the same frames as the whole window did
    tail = coarse_window(model, cfg, m, sem, codes[:, :, :4], steered, seeds=[(0, 0, 0), (0, 1, 0)],
                         contour=contour, pitch_probe=probe)
    assert np.array_equal(tail[:, 0][pitched[:, 4:]] % 12, target[:, 4:][pitched[:, 4:]])
    with pytest.raises(ValueError, match="needs the melody contour and a pitch probe"):
        coarse_window(model, cfg, m, sem, empty, steered, contour=contour)
    with pytest.raises(ValueError, match="needs the melody contour and a pitch probe"):
        coarse_window(model, cfg, m, sem, empty, steered, pitch_probe=probe)
    with pytest.raises(ValueError, match="pitch_guidance must be"):
        Sampling(1.0, pitch_guidance=-1.0)
