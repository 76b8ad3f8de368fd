import pytest
import torch

from musiclm.tokenizers.rvq import (
    FactorizedResidualVQ,
    FactorizedVectorQuantizer,
    ResidualVQ,
    RVQOutput,
    VectorQuantizer,
)

torch.set_num_threads(1)


def test_codes_of_codebook_vectors_map_back_exactly():
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, kmeans_init=False).eval()
    vectors = rvq.layers[0].codebook[:10].clone()  # exact level-0 codebook vectors
    codes = rvq.encode(vectors[None])  # [1, 10, 3]
    assert codes.dtype == torch.long and codes.shape == (1, 10, 3)
    assert torch.equal(codes[0, :, 0], torch.arange(10))
    assert torch.allclose(rvq.decode(codes[..., :1])[0], vectors, atol=1e-6)
    # arbitrary codes decode to the sum of their code vectors and encode back to themselves (for
    # codebooks whose later levels are much smaller than the earlier ones)
    for k, layer in enumerate(rvq.layers):
        layer.codebook.mul_(0.05**k)
    codes = torch.randint(0, 16, (2, 5, 3))
    x = rvq.decode(codes)
    expected = sum(rvq.layers[k].codebook[codes[..., k]] for k in range(3))
    assert torch.allclose(x, expected)
    assert torch.equal(rvq.encode(x), codes)


def test_forward_shapes_straight_through_and_decode_agree():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=16, num_quantizers=4, codebook_size=32)
    x = torch.randn(2, 50, 16, requires_grad=True)
    out = rvq(x)  # first training batch: k-means init
    assert isinstance(out, RVQOutput)
    assert out.quantized.shape == x.shape and out.codes.shape == (2, 50, 4) and out.commit_loss.ndim == 0
    assert all(bool(layer.initted) for layer in rvq.layers)
    (out.quantized.sum() + out.commit_loss).backward()
    # straight-through: d sum(quantized) / dx = 1 everywhere, plus the commitment gradient
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad - 1).abs().mean() < 0.5
    rvq.eval()
    q = rvq(x).quantized
    assert torch.allclose(rvq.decode(rvq.encode(x)), q, atol=1e-5)
    assert torch.equal(rvq.encode(x), rvq(x).codes)


def test_residual_error_shrinks_with_levels():
    torch.manual_seed(0)
    x = torch.randn(600, 8)
    rvq = ResidualVQ(dim=8, num_quantizers=6, codebook_size=16).fit(x, iters=15)
    codes = rvq.encode(x[None])
    errors = [(rvq.decode(codes[..., :n])[0] - x).pow(2).mean().item() for n in range(1, 7)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.25 * errors[0]
    assert (rvq.decode(torch.full((1, 1, 6), -1)) == 0).all()  # -1 = dropped level contributes nothing


def test_fit_with_fewer_points_than_codes():
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(0))
    rvq = ResidualVQ(dim=128, num_quantizers=12, codebook_size=1024).fit(x, iters=5)
    codes = rvq.encode(x[None])
    assert codes.shape == (1, 40, 12) and int(codes.max()) < 1024
    assert torch.allclose(rvq.decode(codes)[0], x, atol=1e-4)
    assert torch.isfinite(rvq.codebooks).all() and rvq.codebooks.shape == (12, 1024, 128)


def test_dead_codes_are_replaced_by_batch_vectors():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=8, kmeans_init=False, dead_code_threshold=0.5)
    vq.codebook.copy_(torch.randn(8, 4) + 100.0)  # far from the data: only one code ever wins
    vq.cluster_size.fill_(1.0)
    x = torch.randn(64, 4)
    for _ in range(80):
        vq(x)
    # the codes that never won were moved onto data points
    dist = torch.cdist(vq.codebook, x).min(dim=1).values
    assert (dist < 3.0).all(), dist
    assert vq.quantize(x).unique().numel() > 1


def test_ema_moves_codebook_toward_data():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=2, codebook_size=2, kmeans_init=False, decay=0.9, dead_code_threshold=0.0)
    vq.codebook.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    vq.embed_sum.copy_(vq.codebook)
    targets = torch.tensor([[5.0, 5.0], [-5.0, -5.0]])
    x = targets.repeat_interleave(50, dim=0) + 0.01 * torch.randn(100, 2)
    before = (vq.codebook - targets).norm(dim=1)
    for _ in range(60):
        vq(x)
    after = (vq.codebook - targets).norm(dim=1)
    assert (after < 0.05 * before).all(), (before, after)
    vq.eval()
    frozen = vq.codebook.clone()
    vq(x + 3.0)
    assert torch.equal(vq.codebook, frozen)  # no updates in eval mode


def test_quantizer_dropout_uses_a_prefix_of_levels():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=6, codebook_size=16, quantizer_dropout=1.0)
    used = set()
    for _ in range(30):
        codes = rvq(torch.randn(2, 20, 8)).codes
        n = int((codes[0, 0] >= 0).sum())
        assert (codes[0, :, :n] >= 0).all() and (codes[0, :, n:] == -1).all()
        used.add(n)
    assert len(used) > 2 and min(used) >= 1 and max(used) <= 6
    rvq.eval()
    assert (rvq(torch.randn(1, 5, 8)).codes >= 0).all()


def test_errors():
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=4)
    with pytest.raises(ValueError):
        rvq(torch.randn(1, 3, 7))
    with pytest.raises(ValueError):
        rvq.decode(torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        rvq.decode(torch.full((1, 3, 2), 4))


def test_factorized_codes_spread_over_offset_latents_and_round_trip():
    # latents dominated by one large shared offset (what a collapsing encoder produces): matching
    # directions without centring would give every vector the same code
    torch.manual_seed(0)
    rvq = FactorizedResidualVQ(dim=16, num_quantizers=3, codebook_size=64, code_dim=4)
    x = 50.0 + torch.randn(4, 100, 16)
    for _ in range(60):
        out = rvq(x)  # training: running statistics of the code-space norm (momentum 0.1) settle
    assert isinstance(out, RVQOutput) and out.codes.shape == (4, 100, 3) and out.commit_loss.ndim == 0
    rvq.eval()
    codes = rvq.encode(x)
    assert codes.shape == (4, 100, 3) and codes.dtype == torch.long and 0 <= int(codes.min()) and int(codes.max()) < 64
    assert codes[..., 0].unique().numel() > 20
    assert torch.equal(codes, rvq(x).codes)
    assert torch.allclose(rvq.decode(codes), rvq(x).quantized, atol=1e-5)
    assert (rvq.decode(torch.full((1, 2, 3), -1)) == 0).all()


def test_factorized_gradients_reach_input_codebook_and_projections():
    torch.manual_seed(0)
    rvq = FactorizedResidualVQ(dim=8, num_quantizers=2, codebook_size=16, code_dim=4)
    x = torch.randn(2, 30, 8, requires_grad=True)
    out = rvq(x)
    (out.quantized.pow(2).sum() + out.commit_loss).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for layer in rvq.layers:
        assert layer.codebook.grad is not None and layer.codebook.grad.abs().sum() > 0
        assert layer.in_proj.weight.grad.abs().sum() > 0 and layer.out_proj.weight.grad.abs().sum() > 0


def test_factorized_dead_codes_restart_without_churn():
    torch.manual_seed(0)
    vq = FactorizedVectorQuantizer(dim=4, codebook_size=32, code_dim=4, decay=0.9, dead_code_threshold=0.05)
    x = torch.randn(64, 4)
    replaced = []
    for _ in range(60):
        vq(x)
        replaced.append(int((vq.usage == 2 * vq.dead_code_threshold).sum()))
    # a restarted code's usage is reset above the threshold: it is not restarted on the next step
    steps_with_restarts = sum(1 for r in replaced if r > 0)
    assert steps_with_restarts < 20, replaced
    vq.eval()
    assert vq.quantize(x).unique().numel() > 8


def test_factorized_fit_for_untrained_bundles():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    rvq = FactorizedResidualVQ(dim=16, num_quantizers=4, codebook_size=32, code_dim=4).eval().fit(x, iters=5)
    codes = rvq.encode(x[None])
    assert codes.shape == (1, 300, 4) and codes[0, :, 0].unique().numel() > 10


@pytest.mark.parametrize("factorized", [False, True])
def test_quantizer_dropout_per_example_masks_levels(factorized):
    torch.manual_seed(0)
    make = FactorizedResidualVQ if factorized else ResidualVQ
    rvq = make(dim=8, num_quantizers=6, codebook_size=16, quantizer_dropout=1.0)
    x = torch.randn(16, 10, 8, requires_grad=True)
    out = rvq(x)
    kept = (out.codes[:, 0] >= 0).sum(dim=-1)  # [B]: levels each example kept
    assert kept.unique().numel() > 2  # examples differ within one batch
    for b in range(16):
        n = int(kept[b])
        assert (out.codes[b, :, :n] >= 0).all() and (out.codes[b, :, n:] == -1).all()
    out.quantized.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(out.commit_loss)
    # the dropped levels contribute nothing: the output is the decode of the kept codes
    assert torch.allclose(rvq.decode(out.codes), out.quantized.detach(), atol=1e-5)
    none = make(dim=8, num_quantizers=6, codebook_size=16, quantizer_dropout=0.0)
    assert (none(torch.randn(4, 5, 8)).codes >= 0).all()
    half = make(dim=8, num_quantizers=6, codebook_size=16, quantizer_dropout=0.5)
    levels = half.dropout_levels(4000)
    assert 0.55 < float((levels == 6).float().mean()) < 0.62  # 1/2 kept whole + 1/2 * 1/6 drawn 6


def test_masked_vectors_do_not_train_ema_codebooks():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=2, codebook_size=2, kmeans_init=False, decay=0.5, dead_code_threshold=0.0)
    vq.codebook.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    vq.embed_sum.copy_(vq.codebook)
    x = torch.tensor([[1.0, 0.0], [50.0, 0.0]])
    q, codes, loss = vq(x, mask=torch.tensor([True, False]))
    assert codes.tolist() == [0, -1] and torch.equal(q[1], torch.zeros(2)) and float(loss) < 1e-9
    assert torch.allclose(vq.codebook[0], torch.tensor([1.0, 0.0]))  # the masked outlier moved nothing


def test_encode_first_levels_and_dead_code_restart_grace():
    torch.manual_seed(0)
    x = torch.randn(300, 8)
    rvq = ResidualVQ(dim=8, num_quantizers=4, codebook_size=16).fit(x, iters=5)
    codes = rvq.encode(x[None])
    assert torch.equal(rvq.encode(x[None], n_q=2), codes[..., :2])
    with pytest.raises(ValueError):
        rvq.encode(x[None], n_q=5)
    vq = VectorQuantizer(dim=4, codebook_size=8, kmeans_init=False, dead_code_threshold=0.5)
    vq.cluster_size.fill_(0.0)
    vq(torch.randn(32, 4))
    assert (vq.cluster_size >= 0.5).all()  # restarted codes get 2x the threshold: not restarted again at once
