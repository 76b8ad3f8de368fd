"""Rows: how concurrent requests share a model's forward passes.

A stage call of the plan for N samples is split by the ingress into N single-row calls
(:func:`split_rows`); a model deployment collects the rows of concurrent calls into batches, groups
them by compatible shapes and settings (:func:`group_rows`) and runs each group as one call
(:func:`stack_rows`). :func:`batch_handler` builds that batching for one method: ``serve.batch`` over a
:class:`Coalescer` inside a Serve replica, a :class:`MicroBatcher` (the same behaviour) in process.

Every row carries its own seed, so a request's result does not depend on which rows shared its batch.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
from ray import serve
from ray.serve.exceptions import RayServeException

from musiclm.orchestration.serve_config import BATCHES_IN_FLIGHT

ROW_KEYS = ("mulan", "melody", "contour", "prefix", "semantic", "coarse")  # per-row arrays of a stage call


def split_rows(kwargs: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """A stage call for N rows -> N single-row calls (arrays sliced on the row axis, one seed each)."""
    rows = []
    for i in range(n):
        row = {}
        for name, value in kwargs.items():
            if name in ROW_KEYS and value is not None:
                row[name] = np.ascontiguousarray(np.asarray(value)[i : i + 1])
            elif name == "seeds":
                row[name] = [tuple(int(v) for v in value[i])]
            else:
                row[name] = value
        rows.append(row)
    return rows


def _group_key(row: dict[str, Any]) -> tuple:
    """Rows that can share one forward pass: same keys, same array shapes, same other values."""
    key = []
    for name in sorted(row):
        value = row[name]
        if name == "seeds":
            continue
        if isinstance(value, np.ndarray):
            key.append((name, "array", value.shape[1:]))
        else:
            key.append((name, "value", value if _hashable(value) else repr(value)))
    return tuple(key)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def group_rows(rows: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Indices of ``rows`` grouped by :func:`_group_key`, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(_group_key(row), []).append(i)
    return list(groups.values())


def stack_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One call's kwargs from rows of one group: arrays concatenated on the row axis, seeds joined."""
    first = rows[0]
    out: dict[str, Any] = {}
    for name, value in first.items():
        if isinstance(value, np.ndarray):
            out[name] = np.concatenate([row[name] for row in rows], axis=0)
        elif name == "seeds":
            out[name] = [seed for row in rows for seed in row[name]]
        else:
            out[name] = value
    return out


class Coalescer:
    """One model computation at a time, over every row waiting when the model frees up (at most ``max_rows``).

    ``serve.batch`` closes a batch ``batch_wait_timeout_s`` after its first call *even while the model is
    busy*; those batches would then wait in line one by one, each small. Here the batches Serve hands over
    (up to ``BATCHES_IN_FLIGHT`` at once) wait for the model together and are computed as one.
    """

    def __init__(self, run: Callable[[list[Any]], list[Any]], max_rows: int) -> None:
        self.run, self.max_rows = run, max_rows
        self.pending: list[tuple[list[Any], asyncio.Future]] = []
        self.lock: asyncio.Lock | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, rows: list[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # a new event loop (the in-process app under a new test client)
            self.loop, self.lock, self.pending = loop, asyncio.Lock(), []
        future = loop.create_future()
        self.pending.append((rows, future))
        while not future.done():
            async with self.lock:
                if future.done():
                    break
                taken, size = [], 0
                while self.pending and (not taken or size + len(self.pending[0][0]) <= self.max_rows):
                    taken.append(self.pending.pop(0))
                    size += len(taken[-1][0])
                try:
                    results = await asyncio.to_thread(self.run, [row for part, _ in taken for row in part])
                except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
                    for _, waiting in taken:
                        if not waiting.done():
                            waiting.set_exception(exc)
                    continue
                start = 0
                for part, waiting in taken:
                    if not waiting.done():
                        waiting.set_result(results[start : start + len(part)])
                    start += len(part)
        return await future


class MicroBatcher:
    """``serve.batch``'s behaviour outside a Serve replica (which it refuses): calls that arrive within
    ``wait_s`` of the first, up to ``max_batch_size``, run as one batch; one batch at a time."""

    def __init__(self, handle: Callable[[list[Any]], Any], max_batch_size: int, wait_s: float) -> None:
        self.handle, self.max_batch_size, self.wait_s = handle, max_batch_size, wait_s
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.worker: asyncio.Task | None = None

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self.worker is not None and self.worker.get_loop() is not loop:  # a new event loop (a new test client)
            self.worker, self.pending = None, []
        future = loop.create_future()
        self.pending.append((item, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._work())
        return await future

    async def _work(self) -> None:
        while self.pending:
            deadline = time.perf_counter() + self.wait_s
            while len(self.pending) < self.max_batch_size and time.perf_counter() < deadline:
                await asyncio.sleep(min(0.001, self.wait_s))
            batch, self.pending = self.pending[: self.max_batch_size], self.pending[self.max_batch_size :]
            try:
                results = await self.handle([item for item, _ in batch])
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)


def batch_handler(
    run: Callable[[list[Any]], list[Any]], max_batch_size: int, wait_s: float
) -> Callable[[Any], Awaitable[Any]]:
    """``run(rows) -> results`` (blocking; it runs in a worker thread) as an async handler taking one row
    per call: ``serve.batch`` over a :class:`Coalescer` in a Serve replica, a :class:`MicroBatcher` outside
    one (``serve.batch`` refuses to run there)."""
    coalescer = Coalescer(run, max_batch_size)

    async def handle(rows: list[Any]) -> list[Any]:
        return await coalescer(rows)

    try:
        serve.get_replica_context()
    except RayServeException:  # in process (build_local_app): serve.batch needs a replica
        return MicroBatcher(handle, max_batch_size, wait_s)
    return serve.batch(
        max_batch_size=max_batch_size, batch_wait_timeout_s=wait_s, max_concurrent_batches=BATCHES_IN_FLIGHT
    )(handle)
