"""Connecting to Ray: a quiet local Ray by default, or an existing cluster by address.

Training and serving both go through :func:`connect`, so a laptop run and a cluster run differ
only in ``--address``. Connecting is idempotent: when this process is already connected (a
test session, or training followed by serving in the demo) the existing connection is reused.
Usage statistics are off (the machine may be offline and nothing should phone home).
"""

from __future__ import annotations

import logging
import os
from typing import Any

QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage reporting (offline machines)
    "RAY_DEDUP_LOGS": "1",
    "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "0",  # no json log files per training run
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # notice a finished run sooner (default 2 s)
    # on a busy 2-core machine Serve's HTTP proxy can take longer than Serve's 5 s to report ready (10 s to
    # answer a health check); after 3 misses Serve kills it and every request fails to connect (seen in CI
    # with a benchmark running beside the suite)
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
}


class ClusterConnectionError(ConnectionError):
    """The Ray cluster at ``--address`` could not be joined (the message says what to check)."""


_SET_ADDRESS: list[bool] = []  # whether connect() set RAY_ADDRESS (shutdown() then unsets it)


def quiet_ray_env() -> None:
    """Set the environment that keeps Ray quiet, offline and patient on a busy machine (only variables the user
    has not set)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def connect(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    num_gpus: int | None = None,
    log_to_driver: bool = True,
) -> dict[str, Any]:
    """Connect to Ray and return the cluster's resources (``{"CPU": 2.0, ...}``).

    ``address=None`` starts a local Ray with ``num_cpus`` (default: every core), no dashboard and
    warnings-only logging; an address (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``)
    joins that cluster, whose code must have ``musiclm`` installed. Already connected: reused.
    """
    quiet_ray_env()
    import ray

    if not ray.is_initialized():
        common = {
            "logging_level": logging.WARNING,
            "log_to_driver": log_to_driver,
            "ignore_reinit_error": True,
            # the job's Python loggers at ERROR: without a dashboard, Ray Train's placement-group
            # cleaner warns every second that the state API is unavailable; prints still reach the driver
            "logging_config": ray.LoggingConfig(log_level="ERROR"),
        }
        # Ray applies its LoggingConfig to this (driver) process's root logger too, which would silence
        # every library warning after connecting; the driver keeps its own level
        root = logging.getLogger()
        level = root.level
        if address:
            check_reachable(address)
            try:
                ray.init(address=address, **common)
            except (ConnectionError, RuntimeError) as exc:
                raise ClusterConnectionError(_join_hint(address, exc)) from exc
        else:
            ray.init(
                num_cpus=num_cpus or os.cpu_count() or 1,
                num_gpus=num_gpus,
                include_dashboard=False,
                **common,
            )
        root.setLevel(level)
        # Ray Train's placement-group cleaner asks the state API for "the" cluster without an address:
        # with a second Ray on the machine (another user's, another job's) it raises "Found multiple
        # active Ray instances" on every run. Name ours for this process (children inherit it).
        if "RAY_ADDRESS" not in os.environ and not str(address or "").startswith("ray://"):
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
            _SET_ADDRESS.append(True)
    return dict(ray.cluster_resources())


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at a ``host:port`` (or ``ray://host:port``) address: Ray itself
    retries an unreachable GCS for many minutes before it gives up. ``auto`` is left to Ray."""
    import socket

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterConnectionError(
            f"no Ray cluster answers at {address!r}: {exc.strerror or exc} (start one with "
            "`ray start --head`, or check the head's address and that its port is open to this machine)"
        ) from exc


def _join_hint(address: str, exc: BaseException) -> str:
    """Why joining ``address`` may have failed. ``ray start`` enables token authentication by default
    (Ray >= 2.5x), and Ray sends the token to an explicitly named address only when told to."""
    hint = f"could not join the Ray cluster at {address!r} ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        hint += ("; if the cluster uses token authentication (the default of `ray start`), export "
                 "RAY_AUTH_MODE=token with the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
    return hint + "; check that the head is running (`ray status --address ADDRESS`)"


def is_connected() -> bool:
    """Whether this process holds a Ray connection."""
    import ray

    return ray.is_initialized()


def shutdown() -> None:
    """Disconnect (and stop the local Ray this process started); a no-op when not connected."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if _SET_ADDRESS:
        os.environ.pop("RAY_ADDRESS", None)
        _SET_ADDRESS.clear()
