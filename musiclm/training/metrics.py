"""Reading a training run's ``metrics.jsonl`` back: loss curves, smoothing, a PNG for reports.

The runner writes one JSON row per ``log_every`` steps: ``step``, the learner's averaged outputs
(``loss``, ``loss_*``, ``*_loss``, ...), ``lr``, ``samples_per_s`` and, when the learner reports
token counts, ``tokens_per_s``. Rows are appended, so a resumed run continues the same curve.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def metrics_path(out_dir_or_file: str | os.PathLike) -> Path:
    """``out_dir/metrics.jsonl`` for a run folder, the path itself for a file."""
    path = Path(out_dir_or_file)
    return path / METRICS_FILE if path.is_dir() else path


def read_metrics(out_dir_or_file: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl, sorted by step (a FileNotFoundError names the run when absent)."""
    path = metrics_path(out_dir_or_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run has not logged any metrics yet")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda row: row.get("step", 0))


def loss_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The loss terms present in the rows (every key with "loss" in its name), ``loss`` first."""
    keys = sorted({k for row in rows for k in row if "loss" in k})
    return sorted(keys, key=lambda k: (k != "loss", k))


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing); ``weight=0`` is the raw curve."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def loss_curves(out_dir_or_file: str | os.PathLike, weight: float = 0.8) -> dict[str, tuple[list[int], list[float]]]:
    """Per loss term: (steps, smoothed values), skipping rows where the term is missing."""
    rows = read_metrics(out_dir_or_file)
    curves = {}
    for key in loss_keys(rows):
        points = [(int(row["step"]), float(row[key])) for row in rows if key in row]
        curves[key] = ([s for s, _ in points], smooth([v for _, v in points], weight))
    return curves


def summary(out_dir_or_file: str | os.PathLike) -> dict[str, Any]:
    """First and last value of each loss term and the mean throughput: one line of a report table."""
    rows = read_metrics(out_dir_or_file)
    result: dict[str, Any] = {"steps": int(rows[-1]["step"]) if rows else 0}
    for key in loss_keys(rows):
        values = [row[key] for row in rows if key in row]
        result[f"{key}_first"], result[f"{key}_last"] = values[0], values[-1]
    for key in ("samples_per_s", "tokens_per_s"):
        values = [row[key] for row in rows if key in row]
        if values:
            result[key] = sum(values) / len(values)
    return result


def plot_losses(
    out_dir_or_file: str | os.PathLike, png_path: str | os.PathLike, *, title: str | None = None, weight: float = 0.8
) -> Path:
    """Draw every loss term of a run against the step (raw faint, smoothed solid) into a PNG; return its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = read_metrics(out_dir_or_file)
    keys = loss_keys(rows)
    if not keys:
        raise ValueError(f"{metrics_path(out_dir_or_file)} holds no loss terms to plot")
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for i, key in enumerate(keys):
        color = f"C{i % 10}"
        steps = [int(row["step"]) for row in rows if key in row]
        raw = [float(row[key]) for row in rows if key in row]
        ax.plot(steps, raw, color=color, alpha=0.25, linewidth=1)
        ax.plot(steps, smooth(raw, weight), color=color, linewidth=2, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(float(row[k]) > 0 for k in keys for row in rows if k in row):
        ax.set_yscale("log")
    ax.set_title(title or metrics_path(out_dir_or_file).parent.name)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
