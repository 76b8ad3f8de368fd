"""A live progress line for local Beam runs: files/s and audio-hours/s.

Beam's in-process runner reports metrics only when the pipeline has finished, so the DoFns
append one short line per event to a *progress file* and a driver thread tails it into a tqdm
bar. Appends of a few bytes with ``O_APPEND`` are atomic, so several worker threads or
processes may share the file. On remote runners (Dataflow, Flink, Spark) workers cannot see the
driver's disk: no progress file is used there and the runner's own UI shows progress.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from types import TracebackType


def record_progress(path: str | None, *, files: int = 0, dead: int = 0, seconds: float = 0.0) -> None:
    """Append one event: ``files`` inputs read, ``dead`` of them dead-lettered, ``seconds`` of audio done."""
    if not path:
        return
    line = f"{files} {dead} {seconds:.3f}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@dataclass
class ProgressTotals:
    files: int = 0
    dead: int = 0
    seconds: float = 0.0


def read_progress(path: str) -> ProgressTotals:
    """Sum every complete line of a progress file."""
    totals = ProgressTotals()
    if not os.path.exists(path):
        return totals
    with open(path, "rb") as f:
        for line in f.read().decode().splitlines():
            parts = line.split()
            if len(parts) == 3:
                totals.files += int(parts[0])
                totals.dead += int(parts[1])
                totals.seconds += float(parts[2])
    return totals


class ProgressMonitor:
    """Context manager: a thread that turns a progress file into a tqdm line until the job ends.

        with ProgressMonitor(path, total_files=n, desc="tokenize"):
            pipeline.run().wait_until_finish()
    """

    def __init__(self, path: str, total_files: int, desc: str = "files", interval: float = 0.5, enabled: bool = True):
        self.path = path
        self.total_files = total_files
        self.desc = desc
        self.interval = interval
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        self._start = 0.0

    def __enter__(self) -> ProgressMonitor:
        self._start = time.monotonic()
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_files, desc=self.desc, unit="file", file=sys.stderr, dynamic_ncols=True)
            self._thread = threading.Thread(target=self._loop, name="musiclm-progress", daemon=True)
            self._thread.start()
        return self

    def _update(self) -> None:
        totals = read_progress(self.path)
        elapsed = max(time.monotonic() - self._start, 1e-6)
        self._bar.n = totals.files
        self._bar.set_postfix_str(
            f"dead={totals.dead} audio={totals.seconds / 3600:.3f}h "
            f"{totals.files / elapsed:.2f} files/s {totals.seconds / 3600 / elapsed:.4f} audio-h/s",
            refresh=True,
        )

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._update()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._update()
            self._bar.close()
