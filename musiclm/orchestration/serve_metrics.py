"""Metrics of the Serve application, through ``ray.util.metrics``.

Requests by route and status, generation time, time to first audio and seconds of audio (one
:class:`RequestMetrics` per ingress replica), rows per batched call (one histogram per model replica), and
the URL Prometheus scrapes. A metric must never break serving: a failure to create one leaves it off.
"""

from typing import Any


class RequestMetrics:
    """Our counters and histograms through ``ray.util.metrics`` (exported on Ray's Prometheus endpoint with
    Ray Serve's own, names prefixed ``ray_``); without Ray (the in-process app) they only count locally."""

    LATENCY_BOUNDS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self._ray: dict[str, Any] = {}
        try:
            import ray

            if ray.is_initialized():
                from ray.util import metrics

                self._ray = {
                    "requests": metrics.Counter(
                        "musiclm_requests_total", "HTTP requests by route and status", tag_keys=("route", "status")
                    ),
                    "generation": metrics.Histogram(
                        "musiclm_generation_seconds", "Wall time of a whole generation",
                        boundaries=self.LATENCY_BOUNDS, tag_keys=("route",),
                    ),
                    "ttfa": metrics.Histogram(
                        "musiclm_time_to_first_audio_seconds", "Request arrival to the first audio chunk (streaming)",
                        boundaries=self.LATENCY_BOUNDS, tag_keys=("route",),
                    ),
                    "audio": metrics.Counter("musiclm_audio_seconds_total", "Seconds of audio generated"),
                }
        except Exception:  # noqa: BLE001 - metrics must never break serving
            self._ray = {}

    def request(self, route: str, status: int) -> None:
        key = (route, str(status))
        self.counts[key] = self.counts.get(key, 0) + 1
        if "requests" in self._ray:
            self._ray["requests"].inc(1, tags={"route": route, "status": str(status)})

    def observe(self, name: str, value: float, route: str | None = None) -> None:
        metric = self._ray.get(name)
        if metric is None:
            return
        tags = {"route": route} if route is not None else None
        if name == "audio":
            metric.inc(value)
        else:
            metric.observe(value, tags=tags)


def batch_rows_histogram() -> Any | None:
    """The histogram of rows per batched call of a model deployment (tag ``deployment``), or None without Ray."""
    try:
        import ray

        if ray.is_initialized():
            from ray.util import metrics

            return metrics.Histogram(
                "musiclm_batch_rows", "Rows per batched call of a deployment",
                boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("deployment",),
            )
    except Exception:  # noqa: BLE001 - metrics must never break serving
        return None
    return None


def metrics_url() -> str | None:
    """Where Prometheus scrapes this node's Ray metrics (ours and Ray Serve's), or None without Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        here = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == here and node.get("MetricsExportPort"):
                return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    except Exception:  # noqa: BLE001 - best effort, for /health
        return None
    return None
