"""Reading metrics.jsonl back: smoothing known answers, curves, summary, and the PNG plot."""

from __future__ import annotations

import json

import pytest

from musiclm.training import metrics


@pytest.fixture
def run_dir(tmp_path):
    rows = [{"step": s, "loss": 10.0 / s, "loss_commit": 0.5, "lr": 1e-3, "samples_per_s": 100.0 + s}
            for s in (10, 20, 30, 40)]
    rows.insert(1, {"step": 5, "loss": 3.0})  # out of order on purpose (a resumed run appends)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_smooth_known_answers():
    assert metrics.smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected: no ramp-up
    assert metrics.smooth([0.0, 2.0], 0.5) == pytest.approx([0.0, (0.5 * 0.5 * 0 + 0.5 * 2.0) / 0.75])
    assert metrics.smooth([4.0, 1.0], 0.0) == [4.0, 1.0]
    with pytest.raises(ValueError):
        metrics.smooth([1.0], 1.0)


def test_curves_and_summary(run_dir):
    rows = metrics.read_metrics(run_dir)
    assert [r["step"] for r in rows] == [5, 10, 20, 30, 40]
    assert metrics.loss_keys(rows) == ["loss", "loss_commit"]
    curves = metrics.loss_curves(run_dir, weight=0.0)
    assert curves["loss"] == ([5, 10, 20, 30, 40], [3.0, 1.0, 0.5, 10 / 30, 0.25])
    assert curves["loss_commit"][0] == [10, 20, 30, 40]
    summary = metrics.summary(run_dir)
    assert summary["steps"] == 40 and summary["loss_first"] == 3.0 and summary["loss_last"] == 0.25
    assert summary["samples_per_s"] == pytest.approx(125.0)


def test_plot_losses_writes_a_png(run_dir, tmp_path):
    png = metrics.plot_losses(run_dir, tmp_path / "plots" / "loss.png", title="toy")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_missing_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not logged any metrics"):
        metrics.read_metrics(tmp_path)
