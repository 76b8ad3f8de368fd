"""KV-cached sampling against recomputation, allowed ranges, and the cascade's stage functions."""

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from musiclm.generation import sampler
from musiclm.generation.cascade import (
    Cascade,
    Stage,
    _stitch,
    _window_starts,
    generate_coarse,
    generate_fine,
    generate_semantic,
)
from musiclm.generation.sampler import sample, sample_without_cache
from musiclm.models.stages import StageConfig, VocabLayout, sequence_lengths
from musiclm.models.transformer import StageTransformer, TransformerConfig
from musiclm.tokenizers.backends import TokenRates

torch.set_num_threads(1)


def tiny_stage(
    stage: str, crop_seconds: float, seed: int = 0, rates: TokenRates | None = None
) -> tuple[StageTransformer, StageConfig]:
    """A randomly initialised, very small stage with a short crop (fast to sample)."""
    rates = rates or TokenRates()
    layout = VocabLayout.for_stage(stage, rates)
    transformer = TransformerConfig(
        vocab_size=layout.vocab_size, output_size=layout.num_outputs, dim=32, n_layers=2, n_heads=2, ff_dim=64,
        dropout=0.0, attn_dropout=0.0, max_seq_len=sum(sequence_lengths(stage, crop_seconds, rates)) + 8,
    )
    cfg = dataclasses.replace(StageConfig.preset(stage, "tiny", rates), crop_seconds=crop_seconds, transformer=transformer)
    torch.manual_seed(seed)
    return StageTransformer(transformer).eval(), cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=60, output_size=48, dim=32, n_layers=2, n_heads=4, ff_dim=64,
                            dropout=0.0, attn_dropout=0.0, max_seq_len=64)
    m = StageTransformer(cfg).eval()
    torch.nn.init.normal_(m.head.weight, std=0.5)  # peaky distributions: sampling differences would show
    return m


def test_greedy_with_cache_equals_recomputation(model):
    prefix = torch.randint(0, 60, (3, 7))
    a = sample(model, prefix, 30, temperature=0.0)
    b = sample_without_cache(model, prefix, 30, temperature=0.0)
    assert a.shape == (3, 30) and torch.equal(a, b)
    assert torch.equal(sample(model, prefix, 30, temperature=1.0, top_k=1), a)  # top-1 is greedy


def test_seeded_sampling_with_cache_equals_recomputation(model):
    prefix = torch.randint(0, 60, (2, 5))
    a = sample(model, prefix, 25, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = sample_without_cache(model, prefix, 25, temperature=1.0, generator=torch.Generator().manual_seed(3))
    c = sample(model, prefix, 25, temperature=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_allowed_ranges_are_respected(model):
    prefix = torch.randint(0, 60, (4, 3))
    ranges = np.array([[0, 8], [8, 16], [16, 48]] * 10)
    out = sample(model, prefix, 30, temperature=2.0, allowed_range=ranges, generator=torch.Generator().manual_seed(0))
    assert ((out >= torch.from_numpy(ranges[:, 0])) & (out < torch.from_numpy(ranges[:, 1]))).all()
    out = sample(model, prefix, 30, temperature=2.0, top_k=3, allowed_range=(40, 44))
    assert ((out >= 40) & (out < 44)).all()
    with pytest.raises(ValueError, match="outputs"):
        sample(model, prefix, 3, allowed_range=(40, 60))
    with pytest.raises(ValueError, match="3 allowed ranges"):
        sample(model, prefix, 4, allowed_range=[(0, 1)] * 3)
    with pytest.raises(ValueError, match="max_seq_len"):
        sample(model, prefix, 62)
    assert model.training is False and model.blocks[0].attn.cache is None  # no cache left behind


def test_window_starts_and_stitching():
    assert _window_starts(5, 10) == [0]
    assert _window_starts(20, 10) == [0, 10]
    assert _window_starts(25, 10) == [0, 10, 15]
    windows = torch.stack([torch.full((1, 1, 10), w) for w in range(3)])  # [W, B, Q, n]
    out = _stitch(windows, [0, 10, 15], 25)
    assert out.tolist() == [[[0] * 10 + [1] * 10 + [2] * 5]]


def test_generate_semantic_slides_past_one_crop():
    model, cfg = tiny_stage("semantic", 0.8)  # 20 frames per crop, slide by 10
    mulan = torch.randint(0, 1024, (2, 12))
    out = generate_semantic(model, cfg, mulan, 2.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 50) and out.dtype == torch.long
    assert ((out >= 0) & (out < 1024)).all()
    again = generate_semantic(model, cfg, mulan, 2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    # replay: one crop from [M], then windows whose prefix is [M] + the last half crop (10 tokens)
    layout, gen = cfg.layout, torch.Generator().manual_seed(0)
    cond = layout.mulan_ids(mulan)
    ids = sample(model, cond, 20, cfg.temperature, allowed_range=(0, 1024), generator=gen)
    for new in (10, 10, 10):
        prefix = torch.cat([cond, ids[:, -10:]], dim=1)
        ids = torch.cat([ids, sample(model, prefix, new, cfg.temperature, allowed_range=(0, 1024), generator=gen)], 1)
    assert torch.equal(out, ids)


def test_generate_coarse_and_fine_in_windows():
    mulan = torch.randint(0, 1024, (2, 12))
    semantic = torch.randint(0, 1024, (2, 25))  # 1 s
    c_model, c_cfg = tiny_stage("coarse", 0.4)  # 10 semantic frames per window: 3 windows
    coarse = generate_coarse(c_model, c_cfg, mulan, semantic, generator=torch.Generator().manual_seed(0))
    assert coarse.shape == (2, 4, 50) and ((coarse >= 0) & (coarse < 1024)).all()
    f_model, f_cfg = tiny_stage("fine", 0.2)  # 10 acoustic frames per window: 5 windows
    acoustic = generate_fine(f_model, f_cfg, mulan, coarse, temperature=0.4, generator=torch.Generator().manual_seed(0))
    assert acoustic.shape == (2, 12, 50) and ((acoustic >= 0) & (acoustic < 1024)).all()
    assert torch.equal(acoustic[:, :4], coarse)
    # one batch item decoded alone gives the same windows (independent windows, batched)
    alone = generate_fine(f_model, f_cfg, mulan[:1], coarse[:1], temperature=0.0)
    assert torch.equal(alone, generate_fine(f_model, f_cfg, mulan, coarse, temperature=0.0)[:1])
    with pytest.raises(ValueError, match="coarse"):
        generate_fine(f_model, f_cfg, mulan, coarse[:, :3])
    with pytest.raises(ValueError, match="outside"):
        generate_coarse(c_model, c_cfg, mulan, semantic + 1024)


class HashConditioner:
    """Test double for MuLan: 12 deterministic tokens per prompt."""

    def tokens_text(self, prompts):
        return torch.tensor([[(hash(p) >> q) % 1024 for q in range(12)] for p in prompts])


class TableCodec:
    """Test double for SoundStream: each frame becomes ``hop`` samples of a code-dependent constant."""

    sample_rate = 24000

    def __init__(self, hop: int = 480, num_codebooks: int | None = None):
        self.hop = hop
        if num_codebooks is not None:  # a codec that states its codebooks is checked against the stages
            self.num_codebooks = num_codebooks

    def decode(self, codes):
        level_sum = codes.float().sum(dim=1) / (codes.shape[1] * 1024)  # [B, F]
        return level_sum.repeat_interleave(self.hop, dim=1)  # [B, F * hop]


def test_cascade_generates_reproducible_audio():
    cascade = Cascade(
        Stage(*tiny_stage("semantic", 0.4)), Stage(*tiny_stage("coarse", 0.2)), Stage(*tiny_stage("fine", 0.2)),
        HashConditioner(), TableCodec(),
    )
    wav = cascade.generate("calm piano", seconds=0.4, seed=1)
    assert wav.dtype == np.float32 and wav.shape == (10 * 960,)
    assert np.array_equal(wav, cascade.generate("calm piano", seconds=0.4, seed=1))
    assert not np.array_equal(wav, cascade.generate("calm piano", seconds=0.4, seed=2))
    tokens = cascade.generate_tokens("calm piano", 0.4, seed=1, temperatures={"fine": 0.0})
    assert tokens["semantic"].shape == (1, 10) and tokens["coarse"].shape == (1, 4, 20)
    assert tokens["acoustic"].shape == (1, 12, 20)
    with pytest.raises(ValueError, match="unknown stages"):
        cascade.generate_tokens("x", 0.4, seed=0, temperatures={"melody": 1.0})
    with pytest.raises(ValueError, match="slot"):
        Cascade(cascade.coarse, cascade.coarse, cascade.fine, HashConditioner(), TableCodec())


# ----------------------------------------------------------------------------- EnCodec's rates (issue 3)

ENCODEC = TokenRates(acoustic_frame_rate=75, acoustic_codebooks=8)  # 75 Hz x 8 x 1024, 3 frames per semantic frame


def test_stage_functions_generate_encodec_shaped_tokens():
    mulan = torch.randint(0, 1024, (2, 12))
    s_model, s_cfg = tiny_stage("semantic", 0.4, rates=ENCODEC)
    semantic = generate_semantic(s_model, s_cfg, mulan, 0.6, generator=torch.Generator().manual_seed(0))
    assert semantic.shape == (2, 15) and ((semantic >= 0) & (semantic < 1024)).all()
    c_model, c_cfg = tiny_stage("coarse", 0.2, rates=ENCODEC)  # 5 semantic frames per window: 3 windows
    coarse = generate_coarse(c_model, c_cfg, mulan, semantic, generator=torch.Generator().manual_seed(1))
    assert coarse.shape == (2, 4, 45) and ((coarse >= 0) & (coarse < 1024)).all()
    f_model, f_cfg = tiny_stage("fine", 0.2, rates=ENCODEC)  # 15 acoustic frames per window
    acoustic = generate_fine(f_model, f_cfg, mulan, coarse, generator=torch.Generator().manual_seed(2))
    assert acoustic.shape == (2, 8, 45) and ((acoustic >= 0) & (acoustic < 1024)).all()
    assert torch.equal(acoustic[:, :4], coarse)
    # greedy replay of the first window: [M][S of 5 frames][SEP] -> 5 x 3 frames x 4 levels, frame-major
    greedy = generate_coarse(c_model, c_cfg, mulan, semantic, temperature=0.0)
    layout = c_cfg.layout
    prefix = torch.cat([layout.mulan_ids(mulan), layout.semantic_ids(semantic[:, :5]), torch.full((2, 1), layout.sep)], 1)
    first = sample(c_model, prefix, 5 * 3 * 4, 0.0, allowed_range=layout.allowed_ranges(60))
    assert torch.equal(layout.generated_codes(first), greedy[:, :, :15])
    with pytest.raises(ValueError, match="coarse"):
        generate_fine(f_model, f_cfg, mulan, torch.zeros(2, 8, 45, dtype=torch.long))  # all levels, not the coarse 4


def test_cascade_generates_encodec_tokens_and_refuses_mixed_rates(tmp_path):
    stages = [Stage(*tiny_stage(name, 0.2, rates=ENCODEC)) for name in ("semantic", "coarse", "fine")]
    cascade = Cascade(*stages, HashConditioner(), TableCodec(hop=320, num_codebooks=8))
    tokens = cascade.generate_tokens("calm piano", 0.4, seed=1)
    assert tokens["semantic"].shape == (1, 10) and tokens["coarse"].shape == (1, 4, 30)
    assert tokens["acoustic"].shape == (1, 8, 30)
    wav = cascade.generate("calm piano", seconds=0.4, seed=1)
    assert wav.shape == (10 * 960,) and np.array_equal(wav, cascade.generate("calm piano", seconds=0.4, seed=1))

    paper_fine = Stage(*tiny_stage("fine", 0.2))
    with pytest.raises(ValueError, match="different token rates.*fine at acoustic 50 Hz x 12"):
        Cascade(stages[0], stages[1], paper_fine, HashConditioner(), TableCodec())
    with pytest.raises(ValueError, match="codec num_codebooks 12 != 8"):
        Cascade(*stages, HashConditioner(), TableCodec(hop=320, num_codebooks=12))

    # from a folder: stages trained on EnCodec tokens next to our own tokenizers (SoundStream) are refused
    from musiclm.checkpoint import save_artifact

    for stage in stages:
        save_artifact(tmp_path / stage.config.stage, kind=stage.config.stage, preset="tiny", config=stage.config,
                      state_dict=stage.model.state_dict())
    with pytest.raises(ValueError, match="semantic, coarse, fine at acoustic 75 Hz x 8.*tokenizers at acoustic 50 Hz x 12"):
        Cascade.load(tmp_path)


# ----------------------------------------------------------------------------- top-p, per-row streams, guidance (issue 4)

def first_token_frequencies(model, prefix, rows: int, seed: int, **options) -> np.ndarray:
    """Empirical distribution of the first sampled token over ``rows`` copies of one prefix [1, L0]."""
    out = sample(model, prefix.expand(rows, -1), 1, generator=torch.Generator().manual_seed(seed), **options)
    return np.bincount(out[:, 0].numpy(), minlength=model.config.num_outputs) / rows


def test_top_p_keeps_the_nucleus_and_its_proportions(model):
    prefix = torch.randint(0, 60, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = torch.softmax(model(prefix)[0, -1].double() / 2.0, dim=-1).numpy()  # [48] at temperature 2
    order = np.argsort(-probs)
    rows = 4000
    # top_p = 1 is plain sampling; a tiny top_p is greedy
    full = first_token_frequencies(model, prefix, rows, seed=0, top_p=1.0, temperature=2.0)
    assert np.array_equal(full, first_token_frequencies(model, prefix, rows, seed=0, temperature=2.0))
    assert 0.5 * np.abs(full - probs).sum() < 0.06
    greedy = sample(model, prefix.expand(3, -1), 20, temperature=0.0)
    assert torch.equal(sample(model, prefix.expand(3, -1), 20, top_p=1e-6, generator=torch.Generator().manual_seed(1)),
                       greedy)
    # top_p = 0.6: the smallest set of most probable ids whose mass reaches 0.6, renormalised
    mass_before = np.cumsum(probs[order]) - probs[order]
    nucleus = order[mass_before < 0.6]
    assert 3 < len(nucleus) < 20  # the distribution at temperature 2 makes the cut meaningful
    expected = np.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    got = first_token_frequencies(model, prefix, rows, seed=2, top_p=0.6, temperature=2.0)
    assert got[np.setdiff1d(np.arange(48), nucleus)].sum() == 0
    assert 0.5 * np.abs(got - expected).sum() < 0.05 < 0.5 * np.abs(full - expected).sum()
    # after temperature and top-k: top_k=2 then top_p=0.999 keeps both, top_p tiny keeps the first
    two = first_token_frequencies(model, prefix, 500, seed=3, top_k=2, top_p=0.999)
    assert set(np.flatnonzero(two)) == set(order[:2])
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="top_p"):
            sample(model, prefix, 2, top_p=bad)
    with pytest.raises(ValueError, match="top_k"):
        sample(model, prefix, 2, top_k=0)


def test_a_row_draws_the_same_tokens_alone_or_in_a_batch(model):
    prefixes = torch.randint(0, 60, (3, 6))
    options = dict(temperature=1.3, top_k=20, top_p=0.9, allowed_range=np.array([[0, 16], [16, 48]] * 12))

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = sample(model, prefixes, 24, generator=gens(10, 11, 12), **options)
    for i, seed in enumerate((10, 11, 12)):
        alone = sample(model, prefixes[i : i + 1], 24, generator=gens(seed), **options)
        assert torch.equal(batch[i : i + 1], alone)
    reordered = sample(model, prefixes[[2, 0, 1]], 24, generator=gens(12, 10, 11), **options)
    assert torch.equal(reordered, batch[[2, 0, 1]])
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch, sample(model, prefixes, 24, generator=gens(
        10, 11, 13), **options))
    # one generator in a list for one row is the same stream as that generator alone
    single = sample(model, prefixes[:1], 24, generator=torch.Generator().manual_seed(10), **options)
    assert torch.equal(single, batch[:1])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sample(model, prefixes, 4, generator=gens(1, 2))


def test_new_options_with_cache_equal_recomputation(model):
    prefix = torch.randint(0, 60, (3, 5))
    uncond = prefix.clone()
    uncond[:, :2] = 59  # a "null" condition
    ranges = np.array([[0, 16], [16, 48]] * 10)
    for options in (
        dict(top_p=0.7),
        dict(top_k=10, top_p=0.8, temperature=0.8),
        dict(guidance_scale=3.0, uncond_prefix=uncond),
        dict(guidance_scale=0.0, uncond_prefix=uncond, top_p=0.9, allowed_range=ranges),
        dict(guidance_scale=2.0, uncond_prefix=uncond, temperature=0.0),
    ):
        for per_row in (False, True):
            def gen(per_row: bool = per_row):
                return [torch.Generator().manual_seed(5 + i) for i in range(3)] if per_row else torch.Generator().manual_seed(5)

            a = sample(model, prefix, 20, generator=gen(), **options)
            b = sample_without_cache(model, prefix, 20, generator=gen(), **options)
            assert torch.equal(a, b), options


def test_guidance_scale_one_is_no_guidance_and_bad_guidance_is_refused(model):
    prefix = torch.randint(0, 60, (2, 5))
    uncond = prefix.clone()
    uncond[:, :2] = 59
    plain = sample(model, prefix, 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, sample(model, prefix, 20, generator=torch.Generator().manual_seed(0), guidance_scale=1.0,
                                     uncond_prefix=uncond))
    # through the guided path (2B rows, one forward): the conditioned rows are untouched by the unconditional ones
    near_one = sample(model, prefix, 20, generator=torch.Generator().manual_seed(0), guidance_scale=1.0 + 1e-6,
                      uncond_prefix=uncond)
    assert torch.equal(plain, near_one)
    # s = 0 samples from the unconditional prefix alone
    zero = sample(model, prefix, 20, temperature=0.0, guidance_scale=0.0, uncond_prefix=uncond)
    assert torch.equal(zero, sample(model, uncond, 20, temperature=0.0))
    with pytest.raises(ValueError, match="needs uncond_prefix"):
        sample(model, prefix, 2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="uncond_prefix has shape"):
        sample(model, prefix, 2, guidance_scale=2.0, uncond_prefix=uncond[:, :4])
    with pytest.raises(ValueError, match="guidance_scale"):
        sample_without_cache(model, prefix, 2, guidance_scale=-1.0, uncond_prefix=uncond)
    assert model.blocks[0].attn.cache is None


GUIDED_RATES = TokenRates(semantic_codebook_size=8, conditioning_codebooks=1, conditioning_codebook_size=4)


def conditioned_sample(rng: np.random.Generator) -> dict:
    """Condition c in 0..3; each of 5 semantic tokens is 2c with probability 1/2, else uniform over 0..7."""
    c = int(rng.integers(4))
    tokens = np.where(rng.random(5) < 0.5, 2 * c, rng.integers(0, 8, 5))
    return {"mulan": np.array([c]), "semantic": tokens, "acoustic": np.zeros((10, 12), dtype=np.int64)}


def test_guidance_sharpens_toward_the_condition_on_a_trained_model():
    """A small stage trained with conditioning dropout: p(mode | c) = 9/16, p(mode) = 3/16 without c, and
    guidance u + s (c - u) at s = 3 puts ~95 % on the mode (log-linear: 3/16 * 3^3 against the rest)."""
    from musiclm.models.stages import build_training_example

    model, cfg = tiny_stage("semantic", 0.2, rates=GUIDED_RATES)  # 5 frames per crop
    layout = cfg.layout
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        examples = [build_training_example(conditioned_sample(rng), "semantic", cfg, rng, conditioning_dropout=0.3)
                    for _ in range(64)]
        tokens = torch.from_numpy(np.stack([t for t, _ in examples]))  # [64, 1 + 5]
        logits = model(tokens[:, :-1])  # [64, 5, 8]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 8), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    conditions = torch.arange(4).repeat_interleave(150)[:, None]  # [600, 1]
    prefix = torch.as_tensor(layout.condition_ids(conditions))  # [600, 1]
    uncond = layout.unconditional(prefix)
    assert (uncond == layout.null).all()

    def mode_rate(scale: float) -> float:
        out = sample(model, prefix, 1, generator=torch.Generator().manual_seed(1), guidance_scale=scale,
                     uncond_prefix=uncond, allowed_range=(0, 8))  # [600, 1]
        return float((out[:, 0] == 2 * conditions[:, 0]).float().mean())

    unconditional, conditional, guided = mode_rate(0.0), mode_rate(1.0), mode_rate(3.0)
    assert abs(unconditional - 3 / 16) < 0.08 and abs(conditional - 9 / 16) < 0.08
    assert guided > 0.85 and guided > conditional + 0.2


# ----------------------------------------------------------------------------- the fast cached loop (issue 4, long generation)

def previous_sample(model, prefix, num_new, temperature=1.0, top_k=None, top_p=None, allowed_range=None,
                    generator=None, guidance_scale=1.0, uncond_prefix=None):
    """The cached loop as it was before the fast path: the whole head each step, sliced afterwards, and
    ``torch.multinomial`` (per row for a list of generators)."""
    B, L0 = prefix.shape
    guided = sampler._check_options(B, top_k, top_p, generator, guidance_scale, prefix, uncond_prefix)
    ranges = sampler._ranges(allowed_range, num_new, model.config.num_outputs)
    rows = torch.cat([prefix, uncond_prefix]) if guided else prefix
    scale = guidance_scale if guided else None
    out = torch.empty(B, num_new, dtype=torch.long)
    with torch.inference_mode():
        model.setup_cache(rows.shape[0], L0 + num_new)
        logits = model.prefill(rows)
        for i, (lo, hi) in enumerate(ranges):
            out[:, i] = sampler._pick(sampler._guide(logits[:, lo:hi], B, scale), temperature, top_k, generator, top_p,
                                      sampler._multinomial_reference) + lo
            if i + 1 < num_new:
                token = out[:, i : i + 1]
                logits = model.decode_one_token(torch.cat([token, token]) if guided else token, L0 + i)
        model.clear_cache()
    return out


def generators(seeds):
    return torch.Generator().manual_seed(seeds) if isinstance(seeds, int) else [torch.Generator().manual_seed(s)
                                                                              for s in seeds]


def states(gen) -> list[torch.Tensor]:
    return [g.get_state() for g in (gen if isinstance(gen, list) else [gen])]


@pytest.mark.parametrize("rows,seeds", [(1, 7), (1, [7]), (3, 7), (3, [7, 8, 9])])
def test_multinomial_replica_draws_what_torch_multinomial_draws(rows, seeds):
    """Same ids and the same generator states afterwards: the next draws are unchanged too."""
    for n in (1024, 5):
        for trial in range(40):
            logits = torch.randn(rows, n, generator=torch.Generator().manual_seed(trial)) * 3
            probs = torch.softmax(logits, dim=-1)
            a_gen, b_gen = generators(seeds), generators(seeds)
            for _ in range(3):
                a = sampler._multinomial(probs, a_gen)
                b = sampler._multinomial_reference(probs, b_gen)
                assert a.shape == (rows,) and torch.equal(a, b)
            assert all(torch.equal(x, y) for x, y in zip(states(a_gen), states(b_gen)))
    torch.manual_seed(3)  # None: the global generator
    a = sampler._multinomial(probs, None)
    torch.manual_seed(3)
    assert torch.equal(a, sampler._multinomial_reference(probs, None))


@pytest.fixture(scope="module")
def fine_like():
    """A fine-stage-shaped head: 3 levels x 16 ids generated in turn (frame-major), more ids for the context."""
    torch.manual_seed(1)
    cfg = TransformerConfig(vocab_size=70, output_size=48, dim=32, n_layers=2, n_heads=4, ff_dim=64,
                            dropout=0.0, attn_dropout=0.0, max_seq_len=80, gated_ff=True)
    m = StageTransformer(cfg).eval()
    torch.nn.init.normal_(m.head.weight, std=0.3)
    return m


@pytest.mark.parametrize("options", [
    dict(temperature=0.0),
    dict(temperature=0.9, seeds=5),
    dict(temperature=1.2, seeds=[5, 6, 7], top_k=6),
    dict(temperature=1.0, seeds=[5, 6, 7], top_p=0.8),
    dict(temperature=0.7, seeds=[5, 6, 7], top_k=10, top_p=0.9, guidance_scale=2.5),
    dict(temperature=1.0, seeds=None, guidance_scale=0.5),
], ids=["greedy", "one-generator", "rows+top-k", "rows+top-p", "rows+guidance", "global-rng+guidance"])
def test_fast_cached_loop_draws_exactly_the_previous_tokens(fine_like, options):
    options = dict(options)
    seeds = options.pop("seeds", 1)
    prefix = torch.randint(0, 70, (3, 9), generator=torch.Generator().manual_seed(2))
    if "guidance_scale" in options:
        options["uncond_prefix"] = torch.cat([torch.full((3, 2), 69), prefix[:, 2:]], dim=1)
    ranges = np.array([[0, 16], [16, 32], [32, 48]] * 20)  # a level per position, as an acoustic stage
    a_gen, b_gen = (None, None) if seeds is None else (generators(seeds), generators(seeds))
    torch.manual_seed(0)
    fast = sample(fine_like, prefix, 60, allowed_range=ranges, generator=a_gen, **options)
    torch.manual_seed(0)
    previous = previous_sample(fine_like, prefix, 60, allowed_range=ranges, generator=b_gen, **options)
    assert fast.shape == (3, 60) and fast.is_contiguous() and torch.equal(fast, previous)
    if seeds is not None:
        assert all(torch.equal(x, y) for x, y in zip(states(a_gen), states(b_gen)))
    assert ((fast >= torch.from_numpy(ranges[:, 0])) & (fast < torch.from_numpy(ranges[:, 1]))).all()


class OpCounter(TorchDispatchMode):
    """ATen ops run under it, by name, and the weight elements the matmuls (``linear``) read."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.weights_read = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name == "linear":
            self.weights_read += args[1].numel()
        return func(*args, **(kwargs or {}))


def test_fast_loop_reads_one_level_of_the_head_per_token(fine_like):
    """At batch 1 a CPU step is bound by the weights it reads: the fast loop's head matmul reads one
    level's rows (16 of 48 here, 1024 of 8192 for the fine stage), the previous loop the whole head;
    no more ATen ops per token than before, and no ``torch.multinomial`` (its checks sync the host)."""
    prefix = torch.randint(0, 70, (1, 9), generator=torch.Generator().manual_seed(2))
    ranges = np.array([[0, 16], [16, 32], [32, 48]] * 20)
    counters = []
    for fn in (sample, previous_sample):
        with OpCounter() as counter:
            fn(fine_like, prefix, 60, temperature=1.0, allowed_range=ranges, generator=[torch.Generator().manual_seed(0)])
        counters.append(counter)
    fast, previous = counters
    head, D = fine_like.head.weight.shape
    saved = (previous.weights_read - fast.weights_read) / 59  # 59 decoding steps after the prefill
    assert saved == (head - 16) * D  # the rows of the two other levels, each step
    assert sum(fast.ops.values()) <= sum(previous.ops.values())
    assert fast.ops["multinomial"] == 0 and fast.ops["exponential_"] == 60 and previous.ops["multinomial"] == 60


def test_frame_classes_with_cache_equal_recomputation_and_steer_the_draws():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=60, output_size=48, dim=32, n_layers=2, n_heads=4, ff_dim=64,
                            dropout=0.0, attn_dropout=0.0, max_seq_len=64, frame_classes=3)
    m = StageTransformer(cfg).eval()
    torch.nn.init.normal_(m.head.weight, std=0.5)
    torch.nn.init.normal_(m.frame_embed.weight, std=2.0)  # strong classes: their effect must show
    prefix = torch.randint(0, 60, (2, 7))
    frames = torch.randint(0, 4, (2, 7 + 20))
    uncond = prefix.clone()
    uncond[:, :2] = 59
    for options in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 5, "guidance_scale": 2.0, "uncond_prefix": uncond}):
        gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        a = sample(m, prefix, 20, frames=frames, generator=gen_a, **options)
        b = sample_without_cache(m, prefix, 20, frames=frames, generator=gen_b, **options)
        assert torch.equal(a, b)
    greedy = sample(m, prefix, 20, temperature=0.0, frames=frames)
    assert not torch.equal(greedy, sample(m, prefix, 20, temperature=0.0))  # None (NULL) draws otherwise
    assert torch.equal(sample(m, prefix, 20, temperature=0.0), sample(m, prefix, 20, temperature=0.0,
                                                                    frames=torch.full_like(frames, 3)))
    with pytest.raises(ValueError, match=r"expected \[B, L0 \+ num_new\]"):
        sample(m, prefix, 20, frames=frames[:, :-1])
    with pytest.raises(ValueError, match="classes outside"):
        sample(m, prefix, 20, frames=frames + 4)
    plain = StageTransformer(dataclasses.replace(cfg, frame_classes=0)).eval()
    with pytest.raises(ValueError, match="no frame conditioning"):
        sample(plain, prefix, 20, frames=frames)


def test_a_logit_bias_sees_the_draws_so_far_and_steers_them(model):
    prefix = torch.randint(0, 60, (2, 5))
    uncond = prefix.clone()
    uncond[:, :2] = 59
    seen = []

    def bias(i, drawn):  # favour token (previous + 1) % 48: a chain only the bias can make
        seen.append(tuple(drawn.shape))
        out = torch.zeros(2, 48)
        if i:
            out[torch.arange(2), (drawn[-1] + 1) % 48] = 1e4
        return out

    for options in ({"temperature": 1.0}, {"guidance_scale": 2.0, "uncond_prefix": uncond, "top_k": 5}):
        a = sample(model, prefix, 12, logit_bias=bias, generator=torch.Generator().manual_seed(1), **options)
        assert seen[:3] == [(0, 2), (1, 2), (2, 2)]  # draw i sees the i tokens before it
        seen.clear()
        b = sample_without_cache(model, prefix, 12, logit_bias=bias, generator=torch.Generator().manual_seed(1), **options)
        seen.clear()
        assert torch.equal(a, b)
        assert torch.equal(a[:, 1:], (a[:, :-1] + 1) % 48)
