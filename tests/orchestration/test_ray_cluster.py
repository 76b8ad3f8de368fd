"""Joining a Ray cluster by address: a wrong address fails in seconds with what to check."""

import socket
import time

import pytest

from musiclm.orchestration.ray_cluster import ClusterConnectionError, _join_hint, check_reachable


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free again once closed: nothing listens there


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_nothing_listening_fails_fast_and_says_what_to_do(scheme):
    address = f"{scheme}127.0.0.1:{_closed_port()}"
    start = time.perf_counter()
    with pytest.raises(ClusterConnectionError, match="no Ray cluster answers at .*ray start --head"):
        check_reachable(address, timeout_s=2.0)
    assert time.perf_counter() - start < 3.0  # Ray alone retries an unreachable GCS for minutes


def test_a_listening_port_and_auto_pass():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}")
        check_reachable(f"ray://127.0.0.1:{server.getsockname()[1]}")
    check_reachable("auto")  # Ray finds the local cluster itself


def test_join_hint_names_token_authentication(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    hint = _join_hint("10.0.0.5:6379", RuntimeError("Failed to connect to GCS\nTraceback ..."))
    assert "10.0.0.5:6379" in hint and "Failed to connect to GCS" in hint and "Traceback" not in hint
    assert "RAY_AUTH_MODE=token" in hint
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # already on: the hint does not repeat it
    assert "RAY_AUTH_MODE" not in _join_hint("10.0.0.5:6379", RuntimeError("x"))
