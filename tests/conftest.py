"""Session-wide fixtures.

``ray_session`` is the one local Ray that every Ray-backed test in the suite shares (starting
Ray costs ~5 s on the 2-core machine, so it is started once, lazily, by the first test that
asks for it). The environment below keeps Ray offline and quiet before anything imports it.
"""

from __future__ import annotations

import os

import pytest

from musiclm.orchestration.ray_cluster import quiet_ray_env

# offline and quiet: no usage stats, no per-run structured log files (set before anything imports Ray)
quiet_ray_env()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs and no dashboard, shared by the whole test session; shut down at the end."""
    from musiclm.orchestration import ray_cluster

    resources = ray_cluster.connect(num_cpus=2)
    yield resources
    ray_cluster.shutdown()
