"""The Ray Train runner, driven by a small real learner defined here.

``LinearLearner`` learns a fixed integer linear map y = x A from token-like shards (x in
``semantic.npy``, y in ``mulan.npy``). It follows the Learner protocol of docs/interfaces.md and
records, per Ray rank, which shard every trained sample came from, so the tests can check how
the runner splits the shards between workers. Ray-backed runs cost ~20 s each: there are two.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from musiclm.checkpoint import CheckpointError, load_artifact, save_artifact
from musiclm.data.shards import ShardError, write_shard
from musiclm.training import registry, runner

LEARNER = "tests.training.test_runner:LinearLearner"
DIM_IN, DIM_OUT = 8, 4
MAP = np.arange(DIM_IN * DIM_OUT).reshape(DIM_IN, DIM_OUT) % 5 - 2  # the fixed mapping to learn


class LinearLearner:
    """Learns ``y = x @ MAP`` with one ``nn.Linear``; reports ``tokens`` so tokens/s gets logged."""

    kind = "toy_linear"
    shard_kind = registry.TOKENS
    batch_size = 8

    def __init__(self, preset: str, device: torch.device, wrap_model=lambda m: m, trace_dir: str | None = None):
        if preset not in ("tiny", "paper"):
            raise ValueError(f"unknown preset '{preset}': choose 'tiny' or 'paper'")
        self.preset, self.device, self.trace_dir = preset, device, trace_dir
        self.model = wrap_model(torch.nn.Linear(DIM_IN, DIM_OUT).to(device))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.05)
        self.step = 0

    def collate(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        x = torch.from_numpy(np.stack([s["semantic"] for s in samples]).astype(np.float32))  # [B, 8]
        y = torch.from_numpy(np.stack([s["mulan"] for s in samples]).astype(np.float32))  # [B, 4]
        return x, y, [s["__key__"] for s in samples]

    def train_step(self, batch) -> dict[str, float]:
        x, y, keys = batch
        if self.trace_dir:  # which samples this rank trained on
            with open(Path(self.trace_dir) / f"rank{os.environ.get('RANK', '0')}.txt", "a") as f:
                f.write("".join(k + "\n" for k in keys))
        loss = torch.nn.functional.mse_loss(self.model(x.to(self.device)), y.to(self.device))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.item(), "tokens": float(y.numel())}

    @torch.no_grad()
    def eval_step(self, batch) -> dict[str, float]:
        x, y, _ = batch
        return {"loss": torch.nn.functional.mse_loss(self.model(x.to(self.device)), y.to(self.device)).item()}

    def _module(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)

    def state_dict(self) -> dict:
        return {"model": self._module().state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self._module().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def export(self, out_dir: str) -> None:
        save_artifact(out_dir, kind=self.kind, preset=self.preset, config={"dim_in": DIM_IN, "dim_out": DIM_OUT},
                      state_dict=self._module().state_dict())


@pytest.fixture(scope="module")
def toy_shards(tmp_path_factory) -> Path:
    """4 shards x 24 samples of (x, y = x @ MAP)."""
    folder = tmp_path_factory.mktemp("toy_shards")
    rng = np.random.default_rng(0)
    for shard in range(4):
        samples = []
        for i in range(24):
            x = rng.integers(-3, 4, size=DIM_IN)
            samples.append({"__key__": f"s{shard}_{i:03d}", "json": {"i": i},
                            "semantic": x.astype(np.int16), "mulan": (x @ MAP).astype(np.int16)})
        write_shard(folder / f"tokens-{shard:06d}.tar", samples)
    return folder


def _traced_keys(trace_dir: Path) -> dict[str, set[str]]:
    """rank name -> keys of the samples it trained on."""
    return {p.stem: set(p.read_text().split()) for p in sorted(trace_dir.glob("rank*.txt"))}


def _shards_of(keys: set[str]) -> set[str]:
    return {k.split("_")[0] for k in keys}  # keys are s<shard>_<i>


# ----------------------------------------------------------------------------- no Ray needed


def test_refuses_a_folder_without_shards(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(ShardError, match="holds no"):
        runner.train(LEARNER, tmp_path / "data", tmp_path / "out", max_steps=2)


def test_refuses_audio_shards_for_a_stage_and_token_shards_for_a_tokenizer(tmp_path, toy_shards):
    write_shard(tmp_path / "audio-000000.tar", [{"__key__": "a0", "json": {}, "flac": b"fLaC-not-decoded-here"}])
    with pytest.raises(ShardError, match="trains on token shards"):
        runner.train("semantic", tmp_path, tmp_path / "out", max_steps=2)
    with pytest.raises(ShardError, match="trains on audio shards"):
        runner.train("soundstream", toy_shards, tmp_path / "out", max_steps=2)


def test_refuses_more_workers_than_shards(tmp_path, toy_shards):
    with pytest.raises(ShardError, match="at least one shard per worker"):
        runner.train(LEARNER, toy_shards, tmp_path / "out", workers=5, max_steps=2)


def test_refuses_a_checkpoint_of_another_preset(tmp_path, toy_shards):
    out = tmp_path / "out"
    save_artifact(out, kind=LinearLearner.kind, preset="paper", config={}, state_dict={"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="preset 'paper'.*preset 'tiny'"):
        runner.train(LEARNER, toy_shards, out, preset="tiny", max_steps=2)
    save_artifact(out, kind="soundstream", preset="tiny", config={}, state_dict={"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="'soundstream' checkpoint"):
        runner.train(LEARNER, toy_shards, out, preset="tiny", max_steps=2)


def test_registry_names_every_component():
    assert set(registry.LEARNERS) == {"soundstream", "w2vbert", "mulan", "melody", "semantic", "coarse", "fine",
                                      "pitch_probe"}
    assert registry.required_shard_kind("coarse") == "tokens"
    assert registry.required_shard_kind("mulan") == "audio"
    with pytest.raises(ValueError, match="unknown component"):
        registry.learner_path("vocoder")
    for name, kind in registry.SHARD_KINDS.items():  # the registry agrees with the learners it names
        assert getattr(registry.learner_class(name), "shard_kind", kind) == kind
        assert registry.default_max_steps(name, "tiny") > 0
    learner = registry.make_learner(LEARNER, "tiny", "cpu")
    assert isinstance(learner, LinearLearner)


def test_run_settings_reach_learners_that_take_them():
    config = {"name": "semantic", "learner_options": {"lr": 1e-3}, "max_steps": 7, "batch_size": None, "seed": 3}
    assert runner.learner_options(config) == {"lr": 1e-3, "max_steps": 7, "seed": 3}
    assert runner.learner_options({**config, "name": LEARNER}) == {"lr": 1e-3}  # LinearLearner takes none


def test_holdout_is_stable_and_disjoint_worker_shards():
    keys = [f"k{i}" for i in range(2000)]
    held = [k for k in keys if runner.is_held_out(k, 0.1)]
    assert 150 < len(held) < 250  # ~10 %
    assert held == [k for k in keys if runner.is_held_out(k, 0.1)]
    shards = [f"s{i}" for i in range(5)]
    parts = [runner.worker_shards(shards, r, 2) for r in range(2)]
    assert parts == [["s0", "s2", "s4"], ["s1", "s3"]]


def test_local_mode_trains_exports_and_evaluates(tmp_path, toy_shards):
    """workers=0: Ray Train's in-process mode, the same loop without a cluster."""
    out = tmp_path / "out"
    result = runner.train(LEARNER, toy_shards, out, workers=0, max_steps=60, log_every=10, checkpoint_every=25,
                          eval_fraction=0.2, learner_options={"trace_dir": str(tmp_path)})
    rows = runner.read_metrics_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert rows[-1]["loss"] < 0.2 * rows[0]["loss"]  # it learns
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["samples_per_s"] > 0 and rows[0]["lr"] == 0.05
    document, weights = load_artifact(out, kind="toy_linear", preset="tiny")
    assert weights["weight"].shape == (DIM_OUT, DIM_IN)
    assert json.loads((out / "training_state" / "state.json").read_text())["step"] == 60
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["held_out"] is True and evaluation["samples"] > 0
    assert result["eval"]["loss"] == evaluation["loss"] < rows[0]["loss"]
    assert result["step"] == 60
    trained = _traced_keys(tmp_path)["rank0"]
    assert _shards_of(trained) == {"s0", "s1", "s2", "s3"}  # one worker reads every shard
    assert not any(runner.is_held_out(k, 0.2) for k in trained)  # ... but never a held-out sample


# ----------------------------------------------------------------------------- through Ray (the shared session)


@pytest.mark.slow
def test_ray_one_worker_resumes_and_a_finished_run_does_nothing(tmp_path, toy_shards, ray_session):
    out = tmp_path / "out"
    runner.train(LEARNER, toy_shards, out, workers=0, max_steps=20, log_every=10)
    first = torch.load(out / "training_state" / "state.pt", weights_only=True)
    assert first["step"] == 20

    result = runner.train(LEARNER, toy_shards, out, workers=1, max_steps=40, log_every=10)
    rows = runner.read_metrics_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20, 30, 40]  # continued, not restarted
    state = torch.load(out / "training_state" / "state.pt", weights_only=True)
    assert state["step"] == 40 and state["learner"]["step"] == 40  # the learner's own counter resumed too
    assert result["step"] == 40 and result["workers"] == 1
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()

    again = runner.train(LEARNER, toy_shards, out, workers=1, max_steps=40)
    assert again["already_done"] is True and again["step"] == 40
    assert len(runner.read_metrics_rows(out / "metrics.jsonl")) == 4


@pytest.mark.slow
def test_ray_two_workers_read_disjoint_shards(tmp_path, toy_shards, ray_session):
    out = tmp_path / "out"
    result = runner.train(LEARNER, toy_shards, out, workers=2, max_steps=12, log_every=6,
                          learner_options={"trace_dir": str(tmp_path)})
    traces = _traced_keys(tmp_path)
    assert set(traces) == {"rank0", "rank1"}
    assert _shards_of(traces["rank0"]) == {"s0", "s2"}  # shards[rank::2]: disjoint, covering all
    assert _shards_of(traces["rank1"]) == {"s1", "s3"}
    assert json.loads((out / "training_state" / "state.json").read_text())["world_size"] == 2
    assert result["step"] == 12 and (out / "eval.json").is_file()


# ----------------------------------------------------------------------------- stages and the tokenizers of their shards

ENCODEC_RATES = {"acoustic_frame_rate": 75, "acoustic_codebooks": 8, "acoustic_codebook_size": 1024, "coarse_levels": 4,
                 "semantic_frame_rate": 25, "semantic_codebook_size": 1024, "conditioning_codebooks": 12,
                 "conditioning_codebook_size": 1024}


def _token_info(backend: str, rates: dict) -> dict:
    return {"acoustic": {"backend": backend, "version": "5.24.0", "id": f"{backend}:0123456789ab", "ids": {}},
            "semantic": {"backend": "w2vbert", "version": "0.1.0", "ids": {"w2vbert": "w2vbert:tiny:aaa"}},
            "conditioner": {"backend": "mulan", "version": "0.1.0", "ids": {"mulan": "mulan:tiny:bbb"}},
            "rates": rates}


def _stage_shards(folder: Path, token_info: dict | None, frame_rate: int, codebooks: int, shards: int = 2) -> Path:
    """Token shards of 0.4-s windows (short sequences: fast steps) whose acoustic tokens repeat a short cycle."""
    rng = np.random.default_rng(frame_rate)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        samples = []
        for i in range(6):
            key = f"w{shard}_{i:03d}"
            start = rng.integers(0, 4)
            frames = frame_rate * 2 // 5
            acoustic = (np.arange(start, start + frames)[:, None] % 4 * 100 + np.arange(codebooks)[None, :]) % 1024
            document = {"key": key, "schema": 2, "tokenizers": {"w2vbert": "w2vbert:tiny:aaa"}}
            if token_info is not None:
                document["token_info"] = token_info
            samples.append({"__key__": key, "json": document, "acoustic": acoustic.astype(np.int16),
                            "semantic": rng.integers(0, 1024, 10).astype(np.int16),
                            "mulan": rng.integers(0, 1024, 12).astype(np.int16)})
        write_shard(folder / f"tokens-{shard:06d}.tar", samples)
    return folder


def test_a_stage_trains_on_encodec_shaped_shards_and_keeps_their_rates(tmp_path):
    info = _token_info("encodec", ENCODEC_RATES)
    data = _stage_shards(tmp_path / "encodec", info, frame_rate=75, codebooks=8)
    out = tmp_path / "coarse"
    result = runner.train("coarse", data, out, workers=0, max_steps=4, log_every=2, batch_size=2, eval_batches=1)
    assert result["step"] == 4 and np.isfinite(result["train"]["loss"]) and result["eval"]["ce"] > 0
    from musiclm.training.stage_learner import load_stage

    model, config = load_stage(out)
    assert config.rates.to_dict() == ENCODEC_RATES and model.config.num_outputs == 4 * 1024
    assert json.loads((out / "config.json").read_text())["meta"]["token_info"] == info
    state = json.loads((out / "training_state" / "state.json").read_text())
    assert state["rates"] == ENCODEC_RATES and state["token_info"] == info

    # resuming this folder on shards of other tokenizers is refused before Ray starts
    paper = _stage_shards(tmp_path / "paper", None, frame_rate=50, codebooks=12)
    with pytest.raises(CheckpointError, match="config.json models tokens at acoustic 75 Hz x 8.*50 Hz x 12.*another --out"):
        runner.train("coarse", paper, out, workers=0, max_steps=8)
    other = _stage_shards(tmp_path / "other", _token_info("encodec", ENCODEC_RATES) | {"semantic": {"backend": "hubert"}},
                          frame_rate=75, codebooks=8)
    with pytest.raises(CheckpointError, match="other tokenizers \\(semantic.backend 'w2vbert' vs 'hubert'"):
        runner.train("coarse", other, out, workers=0, max_steps=8)
    with pytest.raises(ValueError, match="shards in .* hold tokens at acoustic 75 Hz"):
        runner.train("coarse", data, tmp_path / "fresh", workers=0, max_steps=1, learner_options={"rates": {}})


def test_stage_training_refuses_shards_of_different_tokenizers(tmp_path):
    data = _stage_shards(tmp_path / "mixed", _token_info("soundstream", {**ENCODEC_RATES, "acoustic_frame_rate": 50,
                                                                          "acoustic_codebooks": 12}), 50, 12, shards=1)
    _stage_shards(tmp_path / "enc", _token_info("encodec", ENCODEC_RATES), 75, 8, shards=1)
    (tmp_path / "enc" / "tokens-000000.tar").rename(data / "tokens-000001.tar")
    with pytest.raises(ShardError) as err:
        runner.train("fine", data, tmp_path / "out", workers=0, max_steps=2)
    message = str(err.value)
    assert "tokens-000000.tar and " in message and "tokens-000001.tar were made by different tokenizers" in message
    assert "rates.acoustic_codebooks 12 vs 8" in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # refused before anything ran
