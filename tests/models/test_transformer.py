"""The stage Transformer: T5 bucketing, causality, gradient flow, KV cache against recomputation."""

import pytest
import torch

from musiclm.models.transformer import (
    RelativePositionBias,
    StageTransformer,
    TransformerConfig,
    relative_position_bucket,
)

torch.set_num_threads(1)


def small_config(**overrides) -> TransformerConfig:
    values = dict(vocab_size=50, output_size=40, dim=32, n_layers=2, n_heads=4, ff_dim=64, dropout=0.0,
                  attn_dropout=0.0, max_seq_len=64, rel_buckets=8, rel_max_distance=32)
    values.update(overrides)
    return TransformerConfig(**values)


def test_bucketing_matches_hand_computed_t5_values():
    # 32 buckets, max distance 128: distances 0..15 exact, then 16 + floor(log(d/16)/log(8) * 16), capped at 31
    distance = torch.tensor([0, 1, 7, 15, 16, 20, 32, 64, 100, 127, 128, 1000])
    expected = torch.tensor([0, 1, 7, 15, 16, 17, 21, 26, 30, 31, 31, 31])
    assert torch.equal(relative_position_bucket(distance, 32, 128), expected)
    # e.g. d = 100: 16 + floor(log(6.25) / log(8) * 16) = 16 + floor(14.10) = 30
    # smaller table: 8 buckets, max distance 32 -> exact 0..3, then 4 + floor(log(d/4)/log(8) * 4)
    assert relative_position_bucket(torch.tensor([3, 4, 8, 16, 31, 40]), 8, 32).tolist() == [3, 4, 5, 6, 7, 7]


def test_full_bias_is_causal_and_shares_the_table():
    cfg = small_config()
    bias = RelativePositionBias(cfg)
    with torch.no_grad():
        bias.table.weight.copy_(torch.arange(cfg.rel_buckets * cfg.n_heads, dtype=torch.float).view(cfg.rel_buckets, -1))
    full = bias.full(10)[0]  # [H, L, L]
    assert full.shape == (cfg.n_heads, 10, 10)
    assert torch.isinf(full[:, 2, 3]).all() and (full[:, 2, 3] < 0).all()
    for q in range(10):
        for k in range(10):
            if k > q:
                assert (full[:, q, k] == float("-inf")).all()
            else:
                bucket = relative_position_bucket(torch.tensor(q - k), cfg.rel_buckets, cfg.rel_max_distance)
                assert torch.equal(full[:, q, k], bias.table.weight[bucket])
    with pytest.raises(ValueError, match="max_seq_len"):
        bias.full(cfg.max_seq_len + 1)


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    torch.manual_seed(0)
    model = StageTransformer(small_config()).eval()
    x = torch.randint(0, 50, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 50
    a, b = model(x), model(y)
    assert a.shape == (2, 20, 40)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = StageTransformer(small_config(gated_ff=True, dropout=0.1, attn_dropout=0.1))
    x = torch.randint(0, 50, (2, 16))
    logits = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), (x[:, 1:] % 40).reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_select_returns_only_the_selected_positions():
    torch.manual_seed(0)
    model = StageTransformer(small_config()).eval()
    x = torch.randint(0, 50, (2, 10))
    select = torch.zeros(2, 10, dtype=torch.bool)
    select[0, 3], select[1, 7] = True, True
    torch.testing.assert_close(model(x, select), model(x)[select])


@pytest.mark.parametrize("gated", [False, True])
def test_kv_cache_decoding_equals_full_recomputation(gated):
    torch.manual_seed(0)
    model = StageTransformer(small_config(gated_ff=gated)).eval()
    # a bias table with real structure so that a wrong bias slice would show
    torch.nn.init.normal_(model.rel_bias.table.weight, std=1.0)
    x = torch.randint(0, 50, (3, 48))
    with torch.inference_mode():
        full = model(x)
        model.setup_cache(3, 48)
        first = model.prefill(x[:, :17])
        torch.testing.assert_close(first, full[:, 16], atol=1e-4, rtol=0)
        for pos in range(17, 48):
            step = model.decode_one_token(x[:, pos : pos + 1], pos)
            torch.testing.assert_close(step, full[:, pos], atol=1e-4, rtol=0)
        with pytest.raises(ValueError, match="outside the cache"):
            model.decode_one_token(x[:, :1], 48)
    model.clear_cache()


@pytest.mark.parametrize("gated", [False, True])
def test_restricted_head_gives_the_full_logits_sliced_bit_for_bit(gated):
    """``decode_one_token(..., outputs=(lo, hi))`` multiplies only head rows lo..hi-1: the sampler relies on
    it giving exactly the full step's logits there (so restricting changes no sampled token)."""
    torch.manual_seed(0)
    model = StageTransformer(small_config(gated_ff=gated, output_size=48)).eval()
    for batch in (1, 2, 4):
        x = torch.randint(0, 50, (batch, 30))
        with torch.inference_mode():
            model.setup_cache(batch, 30)
            model.prefill(x[:, :10])
            for pos in range(10, 30):
                full = model.decode_one_token(x[:, pos : pos + 1], pos)
                lo = 16 * (pos % 3)
                part = model.decode_one_token(x[:, pos : pos + 1], pos, (lo, lo + 16))  # rewrites the same k/v
                assert part.shape == (batch, 16) and torch.equal(part, full[:, lo : lo + 16])
            with pytest.raises(ValueError, match="outputs"):
                model.decode_one_token(x[:, :1], 12, (40, 49))
        model.clear_cache()
    with pytest.raises(RuntimeError, match="setup_cache"):
        model.decode_one_token(x[:, :1], 0)


def test_cache_guards():
    model = StageTransformer(small_config()).eval()
    with pytest.raises(RuntimeError, match="setup_cache"):
        model.prefill(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.setup_cache(1, 65)
    model.setup_cache(1, 8)
    with pytest.raises(ValueError, match="exceeds the cache"):
        model.prefill(torch.zeros(1, 9, dtype=torch.long))


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        small_config(dim=30)
    with pytest.raises(ValueError, match="output_size"):
        small_config(output_size=51)
    assert TransformerConfig().num_outputs == TransformerConfig().vocab_size


def test_frame_classes_are_added_per_position_and_the_cache_agrees():
    torch.manual_seed(0)
    model = StageTransformer(small_config(frame_classes=5)).eval()
    assert model.frame_embed.weight.shape == (6, 32)  # 5 classes + NULL
    x = torch.randint(0, 50, (2, 40))
    frames = torch.randint(0, 6, (2, 40))
    with torch.inference_mode():
        # zero-initialised: a fresh model is the model without frames
        torch.testing.assert_close(model(x, frames=frames), model(x))
        torch.nn.init.normal_(model.frame_embed.weight, std=1.0)
        full = model(x, frames=frames)
        torch.testing.assert_close(model(x), model(x, frames=torch.full_like(frames, 5)))  # None = NULL
        changed = frames.clone()
        changed[:, 30] = (changed[:, 30] + 1) % 5
        other = model(x, frames=changed)
        torch.testing.assert_close(other[:, :30], full[:, :30])  # causal: only positions from 30 on move
        assert not torch.allclose(other[:, 30], full[:, 30])
        model.setup_cache(2, 40)
        torch.testing.assert_close(model.prefill(x[:, :10], frames[:, :10]), full[:, 9], atol=1e-4, rtol=0)
        for pos in range(10, 40):
            step = model.decode_one_token(x[:, pos : pos + 1], pos, None, frames[:, pos : pos + 1])
            torch.testing.assert_close(step, full[:, pos], atol=1e-4, rtol=0)
        model.clear_cache()


def test_frames_are_refused_by_a_model_without_frame_classes():
    model = StageTransformer(small_config()).eval()
    x = torch.randint(0, 50, (1, 8))
    with pytest.raises(ValueError, match="no frame conditioning"):
        model(x, frames=torch.zeros_like(x))
    with pytest.raises(ValueError, match="frame_classes"):
        small_config(frame_classes=-1)
    framed = StageTransformer(small_config(frame_classes=3)).eval()
    with pytest.raises(ValueError, match="must match tokens"):
        framed(x, frames=torch.zeros(1, 7, dtype=torch.long))
