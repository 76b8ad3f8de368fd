"""Each tokenizer on awkward audio: silence, full-scale clipping, DC offset, too short, long.

What the pipeline cannot rule out reaches the tokenizers and must come out right: finite
embeddings, token ids inside their codebooks, the documented shapes, the same answer twice, and
one row of a batch never changing another. NaN/Inf, channel counts and sample rates are the
reader's business (``musiclm.audio``; dead letters in ``tests/pipelines/test_bad_input.py``).
The tokenizers load through ``musiclm.tokenizers.backends`` like every caller does.
"""

import numpy as np
import pytest
import torch

from musiclm.tokenizers.backends import load_acoustic, load_conditioner, load_semantic
from musiclm.tokenizers.bundle import save_random_tokenizers

SR = 24000


def _tone(seconds: float, freq: float = 440.0, amp: float = 0.3) -> torch.Tensor:
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    return (amp * torch.sin(2 * torch.pi * freq * t)).float()


def _inputs(seconds: float = 1.0) -> dict[str, torch.Tensor]:
    tone = _tone(seconds)
    return {
        "silence": torch.zeros(int(seconds * SR)),
        "clipped": (10 * tone).clamp(-1.0, 1.0),  # a full-scale square wave: every sample at +-1
        "dc_offset": 0.9 + 0.1 * tone,  # almost at full scale, hardly any swing
        "dc_only": torch.full((int(seconds * SR),), -0.5),
        "noise": torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, int(seconds * SR)).astype(np.float32)),
        "tone": tone,
    }


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tokenizers")
    save_random_tokenizers(folder, "tiny", seed=0)
    return load_acoustic(folder), load_semantic(folder), load_conditioner(folder)


@torch.no_grad()
def test_acoustic_tokens_of_awkward_audio(tokenizers):
    acoustic, _, _ = tokenizers
    inputs = _inputs()
    batch = torch.stack(list(inputs.values()))  # [6, 24000]
    codes = acoustic.encode(batch)
    assert codes.shape == (6, acoustic.num_codebooks, SR // 480) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < acoustic.codebook_size
    assert torch.equal(codes, acoustic.encode(batch))  # deterministic
    for row, wav in enumerate(inputs.values()):  # a silent or clipped row leaves its neighbours alone
        alone = acoustic.encode(wav[None])
        assert (alone == codes[row : row + 1]).float().mean() >= 0.98
    audio = acoustic.decode(codes)
    assert audio.shape == (6, SR) and torch.isfinite(audio).all()
    # a length that is not a multiple of the hop: whole frames only
    assert acoustic.encode(_tone(1.0)[None, : SR + 300]).shape == (1, acoustic.num_codebooks, SR // 480)


@torch.no_grad()
def test_semantic_tokens_of_awkward_audio(tokenizers):
    _, semantic, _ = tokenizers
    inputs = _inputs()
    batch = torch.stack(list(inputs.values()))
    features = semantic.features(batch)
    assert features.shape[:2] == (6, SR // 960) and torch.isfinite(features).all()
    tokens = semantic.tokens(batch)
    assert tokens.shape == (6, SR // 960) and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() < semantic.codebook_size
    assert torch.equal(tokens, semantic.tokens(batch))
    for row, wav in enumerate(inputs.values()):
        assert (semantic.tokens(wav[None]) == tokens[row : row + 1]).float().mean() >= 0.96


@torch.no_grad()
def test_conditioner_of_awkward_audio_and_text(tokenizers):
    _, _, conditioner = tokenizers
    inputs = _inputs()
    batch = torch.stack(list(inputs.values()))
    embeddings = conditioner.embed_audio(batch)
    assert embeddings.shape == (6, 128) and torch.isfinite(embeddings).all()
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(6), atol=1e-4, rtol=0)  # silence too
    tokens = conditioner.tokens_audio(batch)
    assert tokens.shape == (6, conditioner.num_codebooks) and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() < conditioner.codebook_size
    assert torch.equal(tokens, conditioner.tokens_audio(batch))
    texts = ["", " ", "piano " * 2000, "\U0001f3b5 guitarra suave, 80 bpm \u00e9t\u00e9", "\x00\x01"]
    text_embeddings = conditioner.embed_text(texts)
    assert text_embeddings.shape == (5, 128) and torch.isfinite(text_embeddings).all()
    torch.testing.assert_close(text_embeddings.norm(dim=-1), torch.ones(5), atol=1e-4, rtol=0)
    text_tokens = conditioner.tokens_text(texts)
    assert text_tokens.shape == (5, conditioner.num_codebooks)
    assert text_tokens.min() >= 0 and text_tokens.max() < conditioner.codebook_size
    assert torch.equal(text_tokens, conditioner.tokens_text(texts))


@torch.no_grad()
def test_too_short_audio_is_a_clear_error(tokenizers):
    acoustic, semantic, conditioner = tokenizers
    for samples in (0, 1, 479):
        with pytest.raises(ValueError, match="at least 480 samples"):
            acoustic.encode(torch.zeros(1, samples))
    for samples in (0, 479, 959):
        with pytest.raises(ValueError, match="shorter than one semantic frame"):
            semantic.tokens(torch.zeros(1, samples))
    for samples in (0, 100, 239):
        with pytest.raises(ValueError, match="too short to embed"):
            conditioner.embed_audio(torch.zeros(1, samples))
    # one frame is enough
    assert acoustic.encode(torch.zeros(1, 480)).shape == (1, acoustic.num_codebooks, 1)
    assert semantic.tokens(torch.zeros(1, 960)).shape == (1, 1)
    assert conditioner.tokens_audio(torch.zeros(1, 240)).shape == (1, conditioner.num_codebooks)


@torch.no_grad()
def test_long_input_the_longest_crop(tokenizers):
    # 30 s: the paper's longest crop, the most the pipeline ever hands a tokenizer in one piece (longer
    # files are windowed as they stream, see tests/audio/test_io.py and benchmarks/bench_memory.py)
    acoustic, semantic, conditioner = tokenizers
    long = _tone(30.0, 220.0) + 0.05 * torch.from_numpy(np.random.default_rng(1).standard_normal(30 * SR)).float()
    codes = acoustic.encode(long[None])
    assert codes.shape == (1, acoustic.num_codebooks, 30 * 50) and 0 <= codes.min() and codes.max() < 1024
    # convolutional codes do not drift with position: the first second alone codes (almost) the same
    head = acoustic.encode(long[None, :SR])
    assert (head[..., :40] == codes[..., :40]).float().mean() >= 0.95
    tokens = semantic.tokens(long[None])
    assert tokens.shape == (1, 30 * 25) and 0 <= tokens.min() and tokens.max() < semantic.codebook_size
    embedding = conditioner.embed_audio(long[None])  # the mean over 21 ten-second windows, 1-s stride
    assert embedding.shape == (1, 128) and torch.isfinite(embedding).all()
    assert abs(float(embedding.norm()) - 1.0) < 1e-4
