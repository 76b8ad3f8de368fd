"""Throughput and latency of the Ray Serve endpoint on loopback, with and without batching, and the time
to first audio when streaming.

    python benchmarks/bench_serve.py                          # untrained tiny models in a temporary folder
    python benchmarks/bench_serve.py --checkpoints musiclm-demo/checkpoints --seconds 2 --clients 1 4 16

For each setting (stage batching on: ``max_batch_size`` 16; off: 1) and each number of concurrent
clients, every client thread sends ``--requests`` requests one after the other (distinct seeds), so the
load is bounded; the table gives requests/s, audio seconds per wall second, p50/p99 latency and the
rows per batched call the stages saw. Then one streamed request (``stream: true``) against the same
request whole: the time to first audio (client side: first body bytes; server side: its
``X-Time-To-First-Audio``) against the whole generation.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from musiclm.orchestration import ray_cluster
from musiclm.orchestration.serve import ServeConfig, build_app, save_random_system
from musiclm.orchestration.serve_config import MODEL_DEPLOYMENTS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load(url: str, clients: int, requests: int, body: dict, timeout: float) -> dict:
    """``clients`` threads, each sending ``requests`` requests in a row; latencies and throughput."""
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            for i in range(requests):
                start = time.perf_counter()
                response = http.post("/generate", json={**body, "seed": 1000 * index + i})
                elapsed = time.perf_counter() - start
                with lock:
                    (latencies if response.status_code == 200 else failures).append(
                        elapsed if response.status_code == 200 else response.status_code)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    done = len(latencies)
    return {
        "clients": clients,
        "requests": done,
        "failed": failures,
        "wall_s": wall,
        "requests_per_s": done / wall,
        "audio_s_per_s": done * body["seconds"] / wall,
        "p50_s": float(np.percentile(latencies, 50)) if latencies else float("nan"),
        "p99_s": float(np.percentile(latencies, 99)) if latencies else float("nan"),
    }


def batching(url: str) -> dict[str, dict[str, int]]:
    return httpx.get(f"{url}/health", timeout=60).json()["batching"]


def rows_per_call(before: dict, after: dict) -> float:
    rows = sum(after[s]["rows"] - before[s]["rows"] for s in ("semantic", "coarse", "fine"))
    calls = sum(after[s]["batches"] - before[s]["batches"] for s in ("semantic", "coarse", "fine"))
    return rows / max(calls, 1)


def time_to_first_audio(url: str, body: dict, timeout: float) -> dict:
    """One request whole, the same streamed: total times and the time to the first audio bytes."""
    with httpx.Client(base_url=url, timeout=timeout) as http:
        start = time.perf_counter()
        whole = http.post("/generate", json=body)
        whole_s = time.perf_counter() - start
        start = time.perf_counter()
        first = None
        size = 0
        with http.stream("POST", "/generate", json={**body, "stream": True}) as response:
            server_ttfa = float(response.headers["x-time-to-first-audio"])
            for chunk in response.iter_raw():
                if chunk and first is None and size + len(chunk) > 44:  # past the WAV header
                    first = time.perf_counter() - start
                size += len(chunk)
        stream_s = time.perf_counter() - start
    assert whole.status_code == 200 and size == len(whole.content), "the stream differs from the whole answer"
    return {"seconds": body["seconds"], "whole_s": whole_s, "stream_total_s": stream_s, "client_ttfa_s": first,
            "server_ttfa_s": server_ttfa}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", help="a system checkpoint folder (default: untrained tiny models)")
    parser.add_argument("--seconds", type=float, default=0.4, help="audio per request in the load test")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests per client (a bounded loop)")
    parser.add_argument("--batch-size", type=int, default=16, help="max_batch_size with batching on")
    parser.add_argument("--batch-wait", type=float, default=0.02,
                        help="batch_wait_timeout_s with batching on (seconds a stage call waits for others)")
    parser.add_argument("--stream-seconds", type=float, default=4.2, help="audio of the streamed request")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from ray import serve

    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = args.checkpoints or str(save_random_system(Path(tmp) / "system", "tiny"))
        ray_cluster.connect(num_cpus=os.cpu_count())
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        results: dict = {"load": [], "cpus": os.cpu_count(), "seconds": args.seconds}
        timeout = 1800.0
        try:
            for label, size, wait in (("batched", args.batch_size, args.batch_wait), ("unbatched", 1, 0.0)):
                config = ServeConfig(
                    checkpoints=checkpoints, port=port, torch_threads=args.threads, max_seconds=300.0,
                    max_queued_requests=max(64, max(args.clients) * 2), request_timeout_s=timeout,
                    max_batch_size={name: size for name in MODEL_DEPLOYMENTS},
                    batch_wait_timeout_s={name: wait for name in MODEL_DEPLOYMENTS},
                )
                serve.run(build_app(config), name="musiclm", route_prefix="/")
                httpx.post(f"{url}/generate", json={"prompt": "warm up", "seconds": args.seconds}, timeout=timeout)
                for clients in args.clients:
                    before = batching(url)
                    row = load(url, clients, args.requests, {"prompt": "an upbeat techno track", "seconds": args.seconds},
                               timeout)
                    row.update(setting=label, rows_per_call=rows_per_call(before, batching(url)))
                    results["load"].append(row)
                    print(f"{label:>9} {clients:>3} clients: {row['requests_per_s']:.3f} req/s, "
                          f"p50 {row['p50_s']:.2f} s, p99 {row['p99_s']:.2f} s, {row['rows_per_call']:.2f} rows/call",
                          flush=True)
                if label == "batched":
                    results["ttfa"] = time_to_first_audio(
                        url, {"prompt": "ambient pads", "seconds": args.stream_seconds, "seed": 3}, timeout)
        finally:
            serve.shutdown()
            ray_cluster.shutdown()

    print(f"\nRay Serve on loopback, {results['cpus']} CPUs, {args.seconds:g} s of audio per request, "
          f"{args.requests} requests per client")
    print(f"{'setting':<10}{'clients':>8}{'req/s':>9}{'audio s/s':>11}{'p50 s':>8}{'p99 s':>8}{'rows/call':>11}"
          f"{'failed':>8}")
    for row in results["load"]:
        print(f"{row['setting']:<10}{row['clients']:>8}{row['requests_per_s']:>9.3f}{row['audio_s_per_s']:>11.3f}"
              f"{row['p50_s']:>8.2f}{row['p99_s']:>8.2f}{row['rows_per_call']:>11.2f}{len(row['failed']):>8}")
    by = {(r["setting"], r["clients"]): r for r in results["load"]}
    for clients in args.clients:
        gain = by[("batched", clients)]["requests_per_s"] / by[("unbatched", clients)]["requests_per_s"]
        print(f"batching gain at {clients:>2} clients: x{gain:.2f} throughput")
    t = results["ttfa"]
    print(f"streaming {t['seconds']:g} s: first audio after {t['client_ttfa_s']:.2f} s (server {t['server_ttfa_s']:.2f} s), "
          f"stream done after {t['stream_total_s']:.2f} s; the whole answer took {t['whole_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
