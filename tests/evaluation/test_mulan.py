"""``musiclm eval mulan``: retrieval, zero-shot tagging and token consistency on held-out clips."""

from __future__ import annotations

import hashlib
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from musiclm.data.shards import write_shard
from musiclm.evaluation.mulan import (
    EVAL_JSON,
    EVAL_MD,
    Clip,
    average_precision,
    chance_average_precision,
    default_eval_fraction,
    evaluate_mulan,
    hit_probability,
    mulan_metrics,
    recall_at_k,
    roc_auc,
    token_consistency,
)
from musiclm.tokenizers.mulan import MuLan, MuLanConfig, fit_mulan_rvq, save_mulan, save_random_text_model
from musiclm.training.runner import is_held_out

torch.set_num_threads(1)
SR = 24000

CAPTIONS = {  # caption -> aspects; two clips share each of the first two captions
    "a low hum": ["drone", "low pitch"],
    "a high whistle": ["high pitch"],
    "harsh white noise": ["noise", "loud"],
    "a fast ticking click track": ["percussive", "loud"],
    "a slow low drone": ["drone", "low pitch", "slow"],
}


def _keys(held_out: bool, count: int) -> list[str]:
    """Sample keys that the trainer's default split puts on the wanted side."""
    fraction = default_eval_fraction()
    return list(itertools.islice((k for k in (f"k{i:05d}" for i in itertools.count())
                                  if is_held_out(k, fraction) == held_out), count))


def _clips() -> list[Clip]:
    """7 held-out clips (1.5 s, one of 11 s: two windows), 5 distinct captions."""
    rng = np.random.default_rng(0)
    names = [*CAPTIONS, "a low hum", "a high whistle"]
    keys = _keys(True, len(names))
    out = []
    for i, (key, caption) in enumerate(zip(keys, names)):
        seconds = 11.0 if i == 2 else 1.5
        t = np.arange(int(seconds * SR)) / SR
        wav = (0.3 * np.sin(2 * np.pi * (100 + 400 * i) * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
        out.append(Clip(key, wav, caption, CAPTIONS[caption]))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """2 audio shards: the held-out clips, training clips (never evaluated), held-out clips without caption."""
    folder = tmp_path_factory.mktemp("audio")
    held = [{"__key__": c.key, "wav": c.wav, "json": {"caption": c.caption, "aspects": c.aspects}} for c in _clips()]
    held[0]["json"]["aspects"] = str([a.upper() for a in held[0]["json"]["aspects"]])  # MusicCaps' spelling
    train = [{"__key__": k, "wav": np.zeros(SR, np.float32), "json": {"caption": "training only", "aspects": ["x"]}}
             for k in _keys(False, 6)]
    uncaptioned = [{"__key__": k, "wav": np.zeros(SR, np.float32), "json": {"caption": ""}}
                   for k in _keys(True, 9)[-2:]]
    write_shard(folder / "audio-000000.tar", held[:4] + train[:3])
    write_shard(folder / "audio-000001.tar", held[4:] + train[3:] + uncaptioned)
    return folder


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A tokenizer folder with a tiny untrained MuLan (local random BERT text tower) and its RVQ."""
    folder = tmp_path_factory.mktemp("ckpt")
    config = MuLanConfig.preset("tiny")
    config.text_model = str(save_random_text_model(folder / "bert"))
    torch.manual_seed(0)
    model = MuLan(config).eval()
    model.preset = "tiny"
    save_mulan(model, folder / "mulan", "tiny")
    wavs = [torch.from_numpy(c.wav[None, : SR]) for c in _clips()]
    fit_mulan_rvq(model, wavs, folder / "mulan_rvq", iters=3)
    return folder


# ----------------------------------------------------------------------------- the metrics themselves


def test_hit_probability_matches_enumeration():
    """Expected recall@k of a random order of a tied group equals counting over all its orders."""
    for other, match, above, k in [(5, 1, 0, 1), (5, 2, 0, 3), (4, 3, 1, 2), (3, 2, 2, 3), (6, 1, 0, 10), (2, 2, 3, 2)]:
        items = [True] * match + [False] * other
        orders = set(itertools.permutations(items))
        expected = sum(any(order[: max(k - above, 0)]) for order in orders) / len(orders)
        assert hit_probability(above, other, match, k) == pytest.approx(expected)
    assert hit_probability(0, 9, 1, 1) == pytest.approx(0.1) and hit_probability(0, 9, 1, 5) == pytest.approx(0.5)


def test_recall_known_answers_and_ties():
    match = np.eye(4, dtype=bool)
    perfect = recall_at_k(np.eye(4), match, ks=(1, 2))
    assert perfect["r1"] == perfect["r2"] == 1.0
    assert perfect["chance_r1"] == pytest.approx(1 / 4) and perfect["chance_r2"] == pytest.approx(2 / 4)
    wrong = recall_at_k(np.roll(np.eye(4), 1, axis=1), match, ks=(1, 2))
    # one wrong candidate above, the right one tied with two wrong ones: R@2 = 1/3
    assert wrong["r1"] == 0.0 and wrong["r2"] == pytest.approx(1 / 3)
    tied = recall_at_k(np.ones((4, 4)), match, ks=(1, 2))  # a constant model scores exactly chance
    assert tied["r1"] == pytest.approx(tied["chance_r1"]) and tied["r2"] == pytest.approx(tied["chance_r2"])
    # two right answers out of four: chance@1 = 2/4
    two = recall_at_k(np.zeros((1, 4)), np.array([[True, True, False, False]]), ks=(1,))
    assert two["chance_r1"] == pytest.approx(0.5) and two["r1"] == pytest.approx(0.5)


def _strict_ap(labels_in_rank_order) -> float:
    hits = np.cumsum(labels_in_rank_order)
    return float(np.mean([hits[i] / (i + 1) for i in np.nonzero(labels_in_rank_order)[0]]))


def test_average_precision_and_auc_known_values():
    scores, labels = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])
    assert average_precision(scores, labels) == pytest.approx((1 + 2 / 3) / 2)
    assert roc_auc(scores, labels) == pytest.approx(3 / 4)
    assert average_precision(-scores, labels) == pytest.approx((1 / 2 + 2 / 4) / 2)
    labels5 = np.array([1, 0, 0, 1, 0])
    assert average_precision(labels5.astype(float), labels5) == 1.0 and roc_auc(labels5.astype(float), labels5) == 1.0
    assert roc_auc(np.zeros(5), labels5) == pytest.approx(0.5)
    # chance: the mean AP over every order of the items, which is also what tied scores get
    for n, p in [(5, 2), (7, 1), (6, 3), (4, 4)]:
        items = [1] * p + [0] * (n - p)
        orders = set(itertools.permutations(items))
        enumerated = np.mean([_strict_ap(np.array(o)) for o in orders])
        assert chance_average_precision(n, p) == pytest.approx(enumerated)
        assert average_precision(np.zeros(n), np.array(items)) == pytest.approx(enumerated)
    assert chance_average_precision(7, 1) > 1 / 7  # rare aspects: chance AP is well above the prevalence
    # ties inside a group only: [0.9 | 0.5 0.5 0.5] with labels [0 | 1 1 0] = mean over the 3 orders of the group
    tied = np.mean([_strict_ap(np.array([0, *o])) for o in set(itertools.permutations([1, 1, 0]))])
    assert average_precision(np.array([0.9, 0.5, 0.5, 0.5]), np.array([0, 1, 1, 0])) == pytest.approx(tied)


def test_token_consistency_known_values():
    audio = torch.tensor([[1, 2, 3], [1, 5, 3], [4, 2, 3]])
    text = torch.tensor([[1, 2, 0], [1, 2, 3], [0, 2, 3]])
    out = token_consistency(audio, text)
    assert out["levels"] == 3
    assert out["equal_per_level"] == pytest.approx([2 / 3, 2 / 3, 2 / 3])
    assert out["prefix_equal_per_level"] == pytest.approx([2 / 3, 1 / 3, 0.0])
    # level 0: audio {1: 2/3, 4: 1/3}, text {1: 2/3, 0: 1/3} -> 4/9 of random pairs agree
    assert out["chance_equal_per_level"][0] == pytest.approx(4 / 9)


class _OracleTowers:
    """Towers whose audio embedding *is* the text embedding of the clip's own caption (or, ``constant``,
    towers that embed everything alike)."""

    embedding_dim = 16

    def __init__(self, captions_by_audio: dict[bytes, str], constant: bool = False):
        self.captions_by_audio, self.constant = captions_by_audio, constant

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        if self.constant:
            return F.normalize(torch.ones(len(texts), 16), dim=-1)
        rows = [torch.randn(16, generator=torch.Generator().manual_seed(int(hashlib.sha1(t.encode()).hexdigest()[:8], 16)))
                for t in texts]
        return F.normalize(torch.stack(rows), dim=-1)

    def embed_audio(self, wav: torch.Tensor) -> torch.Tensor:
        if self.constant:
            return F.normalize(torch.ones(wav.shape[0], 16), dim=-1)
        return self.embed_text([self.captions_by_audio[row[:64].numpy().tobytes()] for row in wav])


def test_a_model_that_knows_the_answers_scores_one_and_a_constant_one_scores_chance():
    clips = _clips()
    lookup = {c.wav[:64].tobytes(): c.caption for c in clips}
    oracle = mulan_metrics(_OracleTowers(lookup), clips)
    for direction in ("text_to_audio", "audio_to_text"):
        assert oracle[direction]["r1"] == 1.0 and oracle[direction]["r5"] == 1.0, oracle[direction]
    assert oracle["mean_matched_cosine"] == pytest.approx(1.0)
    constant = mulan_metrics(_OracleTowers(lookup, constant=True), clips)
    for direction in ("text_to_audio", "audio_to_text"):
        for k in (1, 5, 10):
            assert constant[direction][f"r{k}"] == pytest.approx(constant[direction][f"chance_r{k}"])
    assert constant["tagging"]["map"] == pytest.approx(constant["tagging"]["chance_map"])
    assert constant["tagging"]["mean_auc"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- the command on shards


def test_evaluate_mulan_on_held_out_shards(tokenizers, shards, tmp_path):
    result = evaluate_mulan(tokenizers, shards, tmp_path / "report")
    clips = _clips()
    assert result["conditioner"] == "mulan" and result["eval_fraction"] == default_eval_fraction()
    assert result["clips"] == len(clips) == 7 and result["distinct_captions"] == 5  # training clips left out
    assert result["shards"] == 2 and result["samples_scanned"] == 7 + 6 + 2 and result["held_out_uncaptioned"] == 2
    assert result["clip_seconds"] == {"min": 1.5, "max": 11.0}

    # chance levels of this layout: 5 captions over 7 clips (two captions have two clips each)
    t2a, a2t = result["text_to_audio"], result["audio_to_text"]
    assert t2a["chance_r1"] == pytest.approx((2 / 7 + 2 / 7 + 1 / 7 + 1 / 7 + 1 / 7) / 5)
    assert t2a["chance_r5"] == pytest.approx(
        np.mean([1 - math.comb(7 - m, 5) / math.comb(7, 5) for m in (2, 2, 1, 1, 1)]))
    assert t2a["chance_r10"] == 1.0
    assert a2t["chance_r1"] == pytest.approx(1 / 5) and a2t["chance_r5"] == 1.0
    for r in (t2a, a2t):
        assert all(0.0 <= r[f"r{k}"] <= 1.0 for k in (1, 5, 10))

    tagging = result["tagging"]
    assert tagging["prompt"] == "{aspect}" and tagging["aspects"] == 7  # the aspects of the evaluated clips
    assert tagging["aspects_evaluated"] == 7 and len(tagging["per_aspect"]) == 7
    prevalence = {"drone": 3, "low pitch": 3, "high pitch": 2, "loud": 2, "noise": 1, "percussive": 1, "slow": 1}
    assert {r["aspect"]: r["positives"] for r in tagging["per_aspect"]} == prevalence
    chance = [chance_average_precision(7, p) for p in prevalence.values()]
    assert tagging["chance_map"] == pytest.approx(np.mean(chance)) and tagging["chance_auc"] == 0.5
    assert 0.0 <= tagging["map"] <= 1.0 and 0.0 <= tagging["mean_auc"] <= 1.0

    tokens = result["tokens"]  # mulan_rvq/ is there
    assert tokens["levels"] == 12 and len(tokens["equal_per_level"]) == 12
    assert all(0.0 <= x <= 1.0 for x in tokens["equal_per_level"] + tokens["chance_equal_per_level"])

    written = json.loads((tmp_path / "report" / EVAL_JSON).read_text())
    assert written["text_to_audio"] == t2a
    md = (tmp_path / "report" / EVAL_MD).read_text()
    assert "7 held-out captioned clips" in md and "R@10" in md and "mAP" in md and "| 12 |" in md


def test_evaluate_mulan_refuses_too_little_held_out_data(tokenizers, tmp_path):
    data = tmp_path / "audio"
    write_shard(data / "audio-000000.tar", [{"__key__": k, "wav": np.zeros(SR, np.float32), "json": {"caption": "c"}}
                                            for k in _keys(False, 3)])
    with pytest.raises(ValueError, match="0 held-out captioned clip"):
        evaluate_mulan(tokenizers, data)
    with pytest.raises(ValueError, match="max_clips"):
        evaluate_mulan(tokenizers, data, max_clips=1)
