import dataclasses
import math

import numpy as np
import pytest
import torch

from musiclm.checkpoint import CheckpointError
from musiclm.tokenizers.kmeans import KMeans
from musiclm.tokenizers.semantic import (
    ContrastiveModule,
    SelfAttention,
    SemanticTokenizer,
    W2VBert,
    W2VBertConfig,
    compute_span_mask,
    count_parameters,
    fit_semantic_kmeans,
    load_kmeans,
    load_semantic_tokenizer,
    load_w2vbert,
    relative_positions,
    save_w2vbert,
)

torch.set_num_threads(1)
SR = 24000


@pytest.fixture(scope="module")
def model() -> W2VBert:
    torch.manual_seed(0)
    return W2VBert(W2VBertConfig.preset("tiny")).eval()


def tones(batch: int, seconds: float, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    rows = [0.5 * np.sin(2 * np.pi * rng.choice([220, 330, 440, 660]) * t) for _ in range(batch)]
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def test_presets():
    paper = W2VBertConfig.preset("paper")
    assert (paper.contrastive_layers, paper.mlm_layers, paper.dim, paper.feature_layer) == (12, 12, 1024, 7)
    assert paper.codebook_size == 1024
    tiny = W2VBertConfig.preset("tiny")
    assert 1 <= tiny.feature_layer <= tiny.mlm_layers
    with pytest.raises(ValueError, match="tiny, paper"):
        W2VBertConfig.preset("huge")
    with pytest.raises(ValueError, match="feature_layer"):
        W2VBertConfig(mlm_layers=2, feature_layer=3)


def test_paper_preset_is_600m_parameters():
    n = count_parameters(W2VBertConfig.preset("paper"))
    assert 550e6 < n < 650e6, n


@pytest.mark.parametrize("samples,frames", [(24000, 25), (24000 + 959, 25), (960, 1), (48000 + 960, 51)])
def test_features_at_25_hz(model, samples, frames):
    with torch.no_grad():
        feats = model.features(torch.randn(2, samples) * 0.1)
    assert feats.shape == (2, frames, model.config.dim)
    assert torch.isfinite(feats).all()


def test_too_short_audio_is_refused(model):
    with pytest.raises(ValueError, match="shorter than one semantic frame"):
        model.features(torch.zeros(1, 959))


def test_forward_outputs_and_mask_check(model):
    cfg = model.config
    mask = compute_span_mask(2, 50, cfg.mask_prob, cfg.mask_span, np.random.default_rng(0), min_spans=2)
    with torch.no_grad():
        out = model(tones(2, 2.0), mask)
    assert out.contexts.shape == out.targets.shape == (2, 50, cfg.final_dim)
    assert out.mlm_logits.shape == (2, 50, cfg.codebook_size)
    assert out.codes.shape == (2, 50) and out.codes.dtype == torch.long
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < cfg.codebook_size
    assert torch.allclose(out.avg_probs.sum(), torch.tensor(1.0), atol=1e-5)
    with pytest.raises(ValueError, match="mask shape"):
        model(tones(2, 2.0), mask[:, :49])


def test_span_mask():
    rng = np.random.default_rng(0)
    mask = compute_span_mask(64, 250, 0.065, 10, rng)
    assert mask.shape == (64, 250) and mask.dtype == torch.bool
    # wav2vec 2.0 with p=0.065, span 10 masks about half of the frames
    assert 0.35 < mask.float().mean() < 0.6
    # masked runs are at least one span long (except when cut by the end of the crop)
    row = mask[0].numpy().astype(int)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], row, [0]])))
    runs = edges[1::2] - edges[::2]
    ends = edges[1::2]
    assert all(r >= 10 or e == 250 for r, e in zip(runs, ends))
    # every row gets masked frames even when the probability is tiny
    sparse = compute_span_mask(16, 30, 1e-6, 5, rng, min_spans=2)
    assert (sparse.sum(1) >= 5).all()
    # deterministic for a given generator state
    a = compute_span_mask(4, 100, 0.065, 10, np.random.default_rng(3))
    b = compute_span_mask(4, 100, 0.065, 10, np.random.default_rng(3))
    assert torch.equal(a, b)


def test_masked_frames_hide_their_content():
    cfg = W2VBertConfig.preset("tiny")
    module = ContrastiveModule(cfg).eval()
    x1, x2 = torch.randn(1, 20, cfg.dim), torch.randn(1, 20, cfg.dim)
    everything = torch.ones(1, 20, dtype=torch.bool)

    def run(x, mask=None, seed=0):
        torch.manual_seed(seed)  # the random vectors that replace masked frames
        return module(x, mask)

    with torch.no_grad():
        assert torch.allclose(run(x1, everything), run(x2, everything))
        assert not torch.allclose(run(x1), run(x2))
        # masked frames are random vectors (w2v-BERT), not one learned vector: other draws, other output
        assert not torch.allclose(run(x1, everything, seed=0), run(x1, everything, seed=1))
        # unmasked frames keep their content: masking half changes the output
        half = torch.zeros(1, 20, dtype=torch.bool)
        half[:, :10] = True
        assert not torch.allclose(run(x1, half), run(x1))
    learned = ContrastiveModule(dataclasses.replace(cfg, mask_with="learned")).eval()
    with torch.no_grad():
        assert torch.allclose(learned(x1, everything), learned(x2, everything))


def test_relative_attention_matches_its_definition():
    # score(i, j) = (q_i + u) . k_j + (q_i + v) . W p(i - j), p a sinusoid of the distance (Transformer-XL)
    torch.manual_seed(0)
    T, D, H = 5, 16, 2
    attn = SelfAttention(D, H, 0.0).eval()
    with torch.no_grad():
        attn.pos_bias_u.normal_()
        attn.pos_bias_v.normal_()
        x = torch.randn(1, T, D)
        y = attn(x, relative_positions(T, D, x.device, x.dtype))
        q, k, v = (t.view(T, H, D // H) for t in attn.qkv(attn.norm(x))[0].chunk(3, dim=-1))  # [T, H, Dh]
        inv_freq = 10000.0 ** (-torch.arange(0, D, 2) / D)

        def p(d: int) -> torch.Tensor:
            return torch.stack([(d * inv_freq).sin(), (d * inv_freq).cos()], -1).flatten()  # [D]

        out = torch.zeros(T, H, D // H)
        for h in range(H):
            scores = torch.zeros(T, T)
            for i in range(T):
                for j in range(T):
                    wp = attn.pos(p(i - j)).view(H, D // H)[h]
                    scores[i, j] = (q[i, h] + attn.pos_bias_u[h]) @ k[j, h] + (q[i, h] + attn.pos_bias_v[h]) @ wp
            out[:, h] = torch.softmax(scores / math.sqrt(D // H), -1) @ v[:, h]
        expected = attn.out(out.reshape(1, T, D))
    assert torch.allclose(y, expected, atol=1e-5)


def test_semantic_tokenizer_and_artifacts(model, tmp_path):
    batches = [tones(2, 2.0, seed=s) for s in range(4)]  # 4 x 2 x 50 = 400 frames
    with pytest.raises(ValueError, match="preset"):
        fit_semantic_kmeans(model, batches, k=16, out_dir=tmp_path / "nopreset")
    kmeans = fit_semantic_kmeans(model, batches, k=16, out_dir=tmp_path / "semantic_kmeans", preset="tiny")
    tok = SemanticTokenizer(model, kmeans)
    assert tok.frame_rate == 25 and tok.codebook_size == 16
    wav = tones(3, 1.0, seed=9)
    tokens = tok.tokens(wav)
    assert tokens.shape == (3, 25) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 16
    assert torch.equal(tokens, kmeans.assign(tok.features(wav)))

    save_w2vbert(model, tmp_path / "w2vbert", "tiny")
    loaded = load_semantic_tokenizer(tmp_path / "w2vbert", tmp_path / "semantic_kmeans", preset="tiny")
    assert torch.equal(loaded.tokens(wav), tokens)
    assert load_w2vbert(tmp_path / "w2vbert").preset == "tiny"
    with pytest.raises(CheckpointError, match="preset 'paper'"):
        load_w2vbert(tmp_path / "w2vbert", preset="paper")
    with pytest.raises(CheckpointError, match="expected 'semantic_kmeans'"):
        load_kmeans(tmp_path / "w2vbert")
    with pytest.raises(CheckpointError, match="expected 'w2vbert'"):
        load_w2vbert(tmp_path / "semantic_kmeans")


def test_kmeans_on_few_frames_warns(model):
    with pytest.warns(UserWarning, match="only 25 feature frames"):
        kmeans = fit_semantic_kmeans(model, [tones(1, 1.0)], k=64, iters=3)
    assert kmeans.centroids.shape == (64, model.config.dim)
    with pytest.raises(ValueError, match="no audio"):
        fit_semantic_kmeans(model, [], k=8)


def test_tokenizer_refuses_mismatched_kmeans(model):
    with pytest.raises(ValueError, match="dim"):
        SemanticTokenizer(model, KMeans(8, model.config.dim + 1))
