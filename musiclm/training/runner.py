"""The one training loop: any learner (tokenizer or stage), any number of Ray Train workers.

    train("semantic", "work/tokens", "ckpt/semantic", workers=2)

The driver (:func:`train`) checks everything a user can get wrong *before* Ray starts (the data
folder holds shards of the right kind, made by one set of tokenizers; the output folder is not
another preset's checkpoint, nor a stage modelling other token rates), then runs a Ray
``TorchTrainer``. Token shards record their tokenizers (``token_info``, with the token rates) in
every sample's ``json``; the driver reads the first sample of every shard, refuses a mix, and hands
the rates to learners that take a ``rates`` option (the stages: their vocabulary and sequence lengths
follow the rates, e.g. EnCodec's 75 Hz x 8 codebooks). :func:`train_loop_per_worker` is the only
code that runs on the workers. Each worker

* builds the learner (``wrap_model=ray.train.torch.prepare_model`` when there are several workers,
  so gradients are all-reduced by DDP),
* reads its own slice of the shards (``shards[rank::world_size]``: explicit, so that it does not
  depend on how WebDataset detects ranks) round after round, shuffled with a per-rank seed,
* skips the held-out samples (a stable hash of the sample key decides), collates batches in a
  background thread (decoding overlaps the optimizer step), and calls ``learner.train_step``.

Rank 0 writes ``metrics.jsonl`` and the progress line every ``log_every`` steps, and every
``checkpoint_every`` steps and at the end exports the inference artifact
(``config.json`` + ``model.safetensors``) and ``training_state/`` (``state.pt`` with tensors and
numbers only, read back with ``torch.load(weights_only=True)``, and ``state.json``). A rerun with the
same output folder resumes from ``training_state/``; ``max_steps`` is the total, so rerunning a
finished run does nothing. At the end every rank evaluates the same held-out batches (keeping
DDP's collectives in step) and rank 0 writes ``eval.json``.

On a Ray cluster ``out_dir`` must be a folder that rank 0 and the driver both see (a shared
filesystem); the shards may be any fsspec URL.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from musiclm.checkpoint import CheckpointError, read_artifact_config
from musiclm.training import registry

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
STATE_DIR = "training_state"
STATE_WEIGHTS = "state.pt"
STATE_JSON = "state.json"
TOKENS_KEY = "tokens"  # a learner's train_step may report how many target tokens its batch held
FREE_CPU_WAIT_S = 60.0  # how long a new run waits for the CPUs of one that just ended


# ----------------------------------------------------------------------------- driver


def train(
    name: str,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    preset: str = "tiny",
    workers: int = 1,
    use_gpu: bool = False,
    address: str | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    log_every: int = 10,
    checkpoint_every: int | None = None,
    eval_fraction: float = 0.05,
    eval_batches: int = 4,
    shuffle: int = 256,
    seed: int = 0,
    cpus_per_worker: float | None = None,
    learner_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train component ``name`` on the shards in ``data`` into ``out_dir``; return the final metrics.

    ``workers`` Ray Train workers (``0`` runs the same loop in this process, without a Ray
    cluster: Ray Train's local mode, for tests and debugging). ``batch_size`` is per worker
    (default: the learner's ``batch_size``). ``max_steps`` is the total number of optimizer steps,
    counting steps of the run being resumed (default: the learner's ``default_max_steps`` for the
    preset). ``checkpoint_every`` defaults to a quarter of the run. ``eval_fraction`` of the
    samples (by a stable hash of their key) is held out for ``eval.json``.
    """
    out = Path(out_dir).absolute()
    registry.learner_path(name)  # unknown component: ValueError now, not on a worker
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    shards = _list_shards(data)
    registry.check_shard_kind(name, shards)
    options = dict(learner_options or {})
    token_info = None
    if registry.required_shard_kind(name) == registry.TOKENS:
        from musiclm.data.shards import check_same_tokenizers

        token_info = check_same_tokenizers(shards)
        options = token_options(name, options, token_info, data)
    if len(shards) < max(workers, 1):
        raise _shard_error()(
            f"{data} holds {len(shards)} shard(s) but {workers} workers were asked for: "
            "each worker reads whole shards, so write at least one shard per worker"
        )
    if max_steps is None:
        max_steps = registry.default_max_steps(name, preset)
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    start_step = check_out_dir(out, name, preset)
    if "rates" in options:
        check_out_dir_tokens(out, options["rates"], token_info)
    if start_step >= max_steps:
        print(f"[{_display_name(name)}] {out} is already trained to step {start_step} (>= max_steps {max_steps}): nothing to do")
        return _result(out, name, preset, start_step, max_steps, workers, wall_s=0.0, already_done=True)

    config = {
        "name": name,
        "preset": preset,
        "shards": shards,
        "out_dir": str(out),
        "max_steps": int(max_steps),
        "batch_size": batch_size,
        "log_every": int(log_every),
        "checkpoint_every": int(checkpoint_every or max(1, math.ceil(max_steps / 4))),
        "eval_fraction": float(eval_fraction),
        "eval_batches": int(eval_batches),
        "shuffle": int(shuffle),
        "seed": int(seed),
        "use_gpu": bool(use_gpu),
        "threads": None,
        "learner_options": options,
        "token_info": token_info,
    }
    started = time.perf_counter()
    _run_trainer(config, workers=workers, use_gpu=use_gpu, address=address, cpus_per_worker=cpus_per_worker)
    step = _saved_step(out) or 0
    return _result(out, name, preset, step, max_steps, workers, wall_s=time.perf_counter() - started)


def _run_trainer(
    config: dict[str, Any], *, workers: int, use_gpu: bool, address: str | None, cpus_per_worker: float | None
) -> None:
    """Run ``train_loop_per_worker`` under a Ray ``TorchTrainer`` (local mode when ``workers == 0``)."""
    from musiclm.orchestration import ray_cluster

    ray_cluster.quiet_ray_env()
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources: dict[str, float] | None = None
    if workers > 0:
        ray_cluster.connect(address=address)
        if cpus_per_worker is None:
            cpus_per_worker = _local_cpus_per_worker(workers) if address is None else 1.0
        resources = {"CPU": float(cpus_per_worker)}
        if use_gpu:
            resources["GPU"] = 1.0
        config["threads"] = max(1, int(cpus_per_worker))
    out = Path(config["out_dir"])
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu and workers > 0, resources_per_worker=resources),
        run_config=RunConfig(
            storage_path=str(out / STATE_DIR / "ray"),
            name=f"{_display_name(config['name'])}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            logging_config=LoggingConfig(log_level="WARNING"),  # our progress line says what matters
        ),
    )
    trainer.fit()


def _local_cpus_per_worker(workers: int) -> float:
    """Share the CPUs that are free now (a Serve app may hold some) between the workers: whole
    cores when there are enough, else a fraction, so that the workers never wait for CPUs forever."""
    import ray

    # a run that just ended releases its placement group asynchronously: wait for its CPUs a while
    deadline = time.monotonic() + FREE_CPU_WAIT_S
    while (free := float(ray.available_resources().get("CPU", 0.0))) <= 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    if free <= 0:
        raise RuntimeError(f"the local Ray has had no free CPU for training workers for {FREE_CPU_WAIT_S:g} s "
                           "(is a Serve app holding them all?)")
    share = free / workers
    return float(math.floor(share)) if share >= 1 else round(share, 2)


def _display_name(name: str) -> str:
    """``semantic`` for registered names, the class name for ``module:Class``."""
    return name.rsplit(":", 1)[-1]


def _result(
    out: Path, name: str, preset: str, step: int, max_steps: int, workers: int, *, wall_s: float, already_done: bool = False
) -> dict[str, Any]:
    """What :func:`train` returns: the last logged metrics, the eval metrics and where things are."""
    rows = read_metrics_rows(out / METRICS_FILE)
    eval_path = out / EVAL_FILE
    return {
        "component": name,
        "preset": preset,
        "step": step,
        "max_steps": max_steps,
        "workers": workers,
        "already_done": already_done,
        "wall_s": round(wall_s, 2),
        "train": rows[-1] if rows else {},
        "eval": json.loads(eval_path.read_text()) if eval_path.is_file() else {},
        "out_dir": str(out),
        "metrics_path": str(out / METRICS_FILE),
        "eval_path": str(eval_path),
    }


def _list_shards(data: str | os.PathLike) -> list[str]:
    from musiclm.data.shards import list_shards

    return list_shards(data)


def _shard_error() -> type[Exception]:
    from musiclm.data.shards import ShardError

    return ShardError


def check_out_dir(out: Path, name: str, preset: str) -> int:
    """The step to resume from (0 for a fresh run); refuse a folder of another component or preset."""
    if (out / "config.json").is_file():
        document = read_artifact_config(out)
        kind = _learner_kind(name)
        if kind is not None and document["kind"] != kind:
            raise CheckpointError(f"{out} holds a '{document['kind']}' checkpoint, not '{kind}': choose another --out")
        if document["preset"] != preset:
            raise CheckpointError(
                f"{out} holds a checkpoint trained with preset '{document['preset']}', but preset '{preset}' "
                "was asked for: use the same preset to resume, or another --out"
            )
    state = read_training_state(out)
    if state is None:
        return 0
    if state.get("preset") != preset or state.get("name") != name:
        raise CheckpointError(
            f"{out / STATE_DIR} is the state of '{state.get('name')}' with preset '{state.get('preset')}', "
            f"not '{name}' with preset '{preset}': choose another --out"
        )
    return int(state["step"])


def token_options(
    name: str, options: dict[str, Any], token_info: dict[str, Any] | None, data: str | os.PathLike
) -> dict[str, Any]:
    """The learner options plus the shards' ``rates`` (the paper's for shards that predate ``token_info``)
    and ``token_info``, for learners that take them; refuse ``rates`` that contradict the shards."""
    from musiclm.models.stages import as_rates, describe_rates

    accepted = registry.accepted_options(name)
    options = dict(options)
    if "rates" in accepted:
        shard_rates = as_rates(token_info["rates"] if token_info else None)
        if options.get("rates") is not None and as_rates(options["rates"]) != shard_rates:
            raise ValueError(
                f"rates {describe_rates(options['rates'])} were asked for, but the shards in {data} hold tokens at "
                f"{describe_rates(shard_rates)}"
            )
        options["rates"] = shard_rates.to_dict()
    if "token_info" in accepted and token_info is not None:
        options.setdefault("token_info", token_info)
    return options


def check_out_dir_tokens(out: Path, rates: dict[str, Any], token_info: dict[str, Any] | None) -> None:
    """Refuse an output folder (checkpoint or training state) of a stage that models other token rates,
    or that was trained on shards of other tokenizers: resuming it on these shards would mix them."""
    from musiclm.data.shards import describe_difference
    from musiclm.models.stages import as_rates, describe_rates

    records = []
    if (out / "config.json").is_file():
        document = read_artifact_config(out)
        config = document.get("config") or {}
        records.append((str(out / "config.json"), config.get("rates"), (document.get("meta") or {}).get("token_info")))
    state = read_training_state(out)
    if state is not None:
        records.append((str(out / STATE_DIR / STATE_JSON), state.get("rates"), state.get("token_info")))
    wanted = as_rates(rates)
    for where, saved_rates, saved_info in records:
        saved = as_rates(saved_rates)  # written before rates were recorded: the paper's
        if saved != wanted:
            raise CheckpointError(
                f"{where} models tokens at {describe_rates(saved)}, but the shards hold tokens at "
                f"{describe_rates(wanted)}: choose another --out"
            )
        if saved_info is not None and token_info is not None and saved_info != token_info:
            raise CheckpointError(
                f"{where} was trained on shards of other tokenizers ({describe_difference(saved_info, token_info)}): "
                "choose another --out"
            )


def _learner_kind(name: str) -> str | None:
    if name in registry.LEARNERS:
        return name
    return getattr(registry.learner_class(name), "kind", None)


def read_training_state(out: str | os.PathLike) -> dict[str, Any] | None:
    """``training_state/state.json`` (step, name, preset, ...) or None when there is no complete state."""
    folder = Path(out) / STATE_DIR
    if not (folder / STATE_JSON).is_file() or not (folder / STATE_WEIGHTS).is_file():
        return None
    return json.loads((folder / STATE_JSON).read_text())


def _saved_step(out: Path) -> int | None:
    state = read_training_state(out)
    return None if state is None else int(state["step"])


def read_metrics_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (empty when the file does not exist)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- data on a worker


def is_held_out(key: str, fraction: float) -> bool:
    """Whether a sample belongs to the eval split: a stable hash of its key (same on every worker and run)."""
    if fraction <= 0:
        return False
    digest = hashlib.sha1(f"eval:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1_000_000 < fraction * 1_000_000


def worker_shards(shards: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The shards rank ``rank`` reads: every ``world_size``-th, so the ranks' sets are disjoint and cover all."""
    return list(shards[rank::world_size])


def train_samples(shards: Sequence[str], *, eval_fraction: float, shuffle: int, seed: int) -> Iterator[dict]:
    """Endless training samples from ``shards``: one shuffled pass after another, held-out samples skipped."""
    from musiclm.data.shards import ShardError, iter_samples

    for epoch in itertools.count():
        kept = 0
        for sample in iter_samples(
            list(shards), shuffle=shuffle, split_by_node=False, split_by_worker=False, seed=seed + 1009 * epoch
        ):
            if is_held_out(sample["__key__"], eval_fraction):
                continue
            kept += 1
            yield sample
        if kept == 0:
            raise ShardError(f"no training samples in {list(shards)}: every sample is held out or the shards are empty")


def eval_samples(shards: Sequence[str], *, eval_fraction: float, limit: int) -> tuple[list[dict], bool]:
    """Up to ``limit`` held-out samples in a fixed order (all ranks get the same list).

    Returns (samples, held_out); when the data is too small to hold any sample out, the first
    samples are returned with ``held_out=False`` so that eval.json says it measured training data.
    """
    from musiclm.data.shards import iter_samples

    held, fallback = [], []
    for sample in iter_samples(list(shards), shuffle=0, split_by_node=False, split_by_worker=False):
        if is_held_out(sample["__key__"], eval_fraction):
            held.append(sample)
            if len(held) >= limit:
                break
        elif len(fallback) < limit:
            fallback.append(sample)
    return (held, True) if held else (fallback, False)


def batches(samples: Iterator[dict], batch_size: int) -> Iterator[list[dict]]:
    """Group a sample stream into lists of ``batch_size``."""
    while True:
        group = list(itertools.islice(samples, batch_size))
        if not group:
            return
        yield group


class Prefetcher:
    """Collates batches in a background thread so that reading and decoding shards overlaps training.

    torch and numpy release the GIL in their kernels, so the two threads really overlap. An
    exception in the reader is re-raised in the training thread.
    """

    _END = object()

    def __init__(self, groups: Iterator[list[dict]], collate: Callable[[list[dict]], Any], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(groups, collate), daemon=True)
        self._thread.start()

    def _run(self, groups: Iterator[list[dict]], collate: Callable[[list[dict]], Any]) -> None:
        try:
            for group in groups:
                item = (len(group), collate(group))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._END)
        except BaseException as exc:  # handed to the training thread
            self._queue.put(exc)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[int, Any]:
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()


# ----------------------------------------------------------------------------- state on rank 0


def save_training_state(out: Path, learner: Any, meta: dict[str, Any]) -> None:
    """Export the artifact and write ``training_state/`` (state.pt first, state.json last: a state.json always has its weights)."""
    learner.export(str(out))
    folder = out / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE_WEIGHTS}.tmp"
    torch.save({"learner": learner.state_dict(), "step": int(meta["step"])}, tmp)
    os.replace(tmp, folder / STATE_WEIGHTS)
    tmp_json = folder / f".{STATE_JSON}.tmp"
    tmp_json.write_text(json.dumps({**meta, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
    os.replace(tmp_json, folder / STATE_JSON)


def load_training_state(out: Path) -> dict[str, Any]:
    """``state.pt`` read with ``weights_only=True``: tensors, numbers, strings and containers, never code."""
    path = out / STATE_DIR / STATE_WEIGHTS
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read as plain tensors/numbers ({exc}): delete it to start over") from exc


class MetricsLog:
    """Averages the learner's outputs over ``log_every`` steps and writes one JSON line per window."""

    def __init__(self, path: Path, start_step: int, world_size: int, enabled: bool):
        self.path, self.world_size, self.enabled = path, world_size, enabled
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}  # per key: a learner may skip a batch it cannot use (returns {})
        self.steps = self.samples = 0
        self.tokens = 0.0
        self.window_start = time.perf_counter()
        if enabled:
            # drop rows logged after the state we resume from (a crash between a log and a checkpoint)
            rows = [r for r in read_metrics_rows(path) if r.get("step", 0) <= start_step] if start_step > 0 else []
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def add(self, outputs: dict[str, float], samples: int) -> None:
        self.steps += 1
        self.samples += samples
        for key, value in outputs.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue  # only numbers go into the log
            if key == TOKENS_KEY:
                self.tokens += number
            else:
                self.sums[key] = self.sums.get(key, 0.0) + number
                self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self, step: int, lr: float | None) -> dict[str, float]:
        """The window's row (losses averaged; throughput over all workers, from this rank's timing)."""
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        row: dict[str, float] = {"step": step}
        row.update({k: v / self.counts[k] for k, v in self.sums.items()})
        if lr is not None and "lr" not in row:
            row["lr"] = lr
        row["samples_per_s"] = self.samples * self.world_size / elapsed
        if self.tokens:
            row["tokens_per_s"] = self.tokens * self.world_size / elapsed
        row["step_time_s"] = elapsed / max(self.steps, 1)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.sums, self.counts, self.steps, self.samples, self.tokens = {}, {}, 0, 0, 0.0
        self.window_start = time.perf_counter()
        return row


def _current_lr(learner: Any) -> float | None:
    optimizer = getattr(learner, "optimizer", None)
    groups = getattr(optimizer, "param_groups", None)
    return float(groups[0]["lr"]) if groups else None


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(name: str, row: dict[str, float], max_steps: int, eta_s: float) -> str:
    """``semantic step 120/300 loss 4.512 | 38.2 samples/s 1.9k tokens/s | ETA 0:00:45``"""
    step = int(row["step"])
    losses = " ".join(f"{k} {v:.4g}" for k, v in row.items() if "loss" in k)
    speed = f"{row['samples_per_s']:.1f} samples/s"
    if "tokens_per_s" in row:
        speed += f" {row['tokens_per_s']:.4g} tokens/s"
    return f"[{name}] step {step}/{max_steps} {losses} | {speed} | ETA {_format_eta(eta_s)}"


# ----------------------------------------------------------------------------- the worker loop


def learner_options(config: dict[str, Any]) -> dict[str, Any]:
    """The user's learner options plus the run's ``max_steps`` / ``batch_size`` / ``seed`` where the
    learner's ``__init__`` takes them (a learning-rate schedule wants to know the total steps)."""
    options = dict(config["learner_options"])
    accepted = registry.accepted_options(config["name"])
    for key in ("max_steps", "batch_size", "seed"):
        if config.get(key) is not None and key in accepted:
            options.setdefault(key, config[key])
    return options


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The code every Ray Train worker runs (see the module docstring)."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    out = Path(config["out_dir"])
    name, preset, max_steps = config["name"], config["preset"], config["max_steps"]
    is_chief = rank == 0
    label = _display_name(name)

    torch.manual_seed(config["seed"])  # the same initial weights everywhere (DDP also broadcasts them)
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    wrap = ray.train.torch.prepare_model if world_size > 1 else (lambda model: model)
    learner = registry.make_learner(name, preset, device, wrap, **learner_options(config))

    start_step = 0
    if read_training_state(out) is not None:
        state = load_training_state(out)
        learner.load_state_dict(state["learner"])
        start_step = int(state["step"])
    if is_chief and start_step:
        print(f"[{label}] resuming from step {start_step} of {max_steps}", flush=True)
    batch_size = int(config["batch_size"] or getattr(learner, "batch_size", None) or 8)

    my_shards = worker_shards(config["shards"], rank, world_size)
    # a different data order per rank and per resumption, reproducible for a given seed
    stream = train_samples(
        my_shards, eval_fraction=config["eval_fraction"], shuffle=config["shuffle"],
        seed=config["seed"] * 100_003 + rank * 7919 + start_step,
    )
    feed = Prefetcher(batches(stream, batch_size), learner.collate)
    log = MetricsLog(out / METRICS_FILE, start_step, world_size, enabled=is_chief)
    meta = {"name": name, "preset": preset, "kind": getattr(learner, "kind", name), "world_size": world_size,
            "batch_size": batch_size, "shards": len(config["shards"])}
    if config["learner_options"].get("rates") is not None:  # what a resumed run is checked against
        meta["rates"] = config["learner_options"]["rates"]
    if config.get("token_info") is not None:
        meta["token_info"] = config["token_info"]
    run_start, step = time.perf_counter(), start_step
    try:
        while step < max_steps:
            size, batch = next(feed)
            outputs = learner.train_step(batch)
            step += 1
            log.add(outputs, size)
            if step % config["log_every"] == 0 or step == max_steps:
                row = log.flush(step, _current_lr(learner))
                if is_chief:
                    done = step - start_step
                    eta = (time.perf_counter() - run_start) / done * (max_steps - step)
                    print(progress_line(label, row, max_steps, eta), flush=True)
                ray.train.report(row)  # every rank: report is a barrier in Ray Train
            if is_chief and (step % config["checkpoint_every"] == 0 or step == max_steps):
                save_training_state(out, learner, {**meta, "step": step})
    finally:
        feed.close()

    # every rank evaluates the same batches (a DDP forward may hold a collective); rank 0 writes them
    samples, held_out = eval_samples(
        config["shards"], eval_fraction=config["eval_fraction"], limit=config["eval_batches"] * batch_size
    )
    totals: dict[str, float] = {}
    weights: dict[str, int] = {}  # per key: a learner may skip a batch (return {}) it cannot use
    for group in batches(iter(samples), batch_size):
        for key, value in learner.eval_step(learner.collate(group)).items():
            totals[key] = totals.get(key, 0.0) + float(value) * len(group)
            weights[key] = weights.get(key, 0) + len(group)
    result: dict[str, Any] = {key: value / weights[key] for key, value in totals.items()}
    result.update({"step": step, "samples": len(samples), "held_out": held_out})
    if is_chief:
        (out / EVAL_FILE).write_text(json.dumps(result, indent=2))
        print(f"[{label}] eval at step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in result.items()
                                                          if isinstance(v, float)), flush=True)
    ray.train.report({f"eval_{k}": float(v) for k, v in result.items()})
