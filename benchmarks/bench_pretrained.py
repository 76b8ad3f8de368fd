"""Pretrained backends: parameters, save / load times and CPU throughput of tiny and full (released
architecture, random weights) EnCodec, HuBERT, w2v-BERT 2.0 and CLAP, loaded through backends.json.

    .venv/bin/python benchmarks/bench_pretrained.py [--sizes tiny full] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from musiclm.tokenizers import backends, pretrained
from musiclm.tokenizers.backends import BackendSpec

ROLE = {"encodec": "acoustic", "hubert": "semantic", "w2v-bert-2.0": "semantic", "clap": "conditioner"}
LOADER = {"acoustic": backends.load_acoustic, "semantic": backends.load_semantic_features,
          "conditioner": backends.load_conditioner_towers}


def run(backend: str, size: str, root: Path, seconds: float) -> dict[str, float]:
    folder = root / f"{backend}-{size}"
    t = time.perf_counter()
    pretrained.save_random_backend(backend, folder, size)
    save_s = time.perf_counter() - t
    disk = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    role = ROLE[backend]
    ckpt = root / f"ckpt-{backend}-{size}"
    backends.write_backends(ckpt, {role: BackendSpec(role, backend, str(folder))})
    t = time.perf_counter()
    model = LOADER[role](ckpt)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    info = pretrained.backend_info(backends.read_backends(ckpt)[role])  # what token_info records
    info_s = time.perf_counter() - t
    wav = 0.1 * torch.randn(1, int(seconds * 24000), generator=torch.Generator().manual_seed(0))
    run_once = getattr(model, {"acoustic": "encode", "semantic": "features", "conditioner": "embed_audio"}[role])
    run_once(wav[:, :24000])  # warm-up
    t, cpu = time.perf_counter(), time.process_time()
    out = run_once(wav)
    run_s, run_cpu = time.perf_counter() - t, time.process_time() - cpu
    shutil.rmtree(folder)
    return {
        "params_M": pretrained.count_parameters(backend, size) / 1e6,
        "disk_MiB": disk,
        "save_s": save_s,
        "load_s": load_s,
        "token_info_s": info_s,
        "run_s": run_s,
        "run_cpu_s": run_cpu,
        "x_realtime": seconds / run_cpu,
        "out": tuple(out.shape),
        "id": info["id"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=pretrained.SIZES)
    parser.add_argument("--backends", nargs="+", default=list(ROLE), choices=list(ROLE))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: CPU seconds are comparable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, "
          f"{args.seconds:g} s of audio, batch 1, CPU")
    header = f"{'backend':14}{'size':6}{'params M':>10}{'disk MiB':>10}{'save s':>8}{'load s':>8}" \
             f"{'info s':>8}{'run s':>8}{'run cpu s':>10}{'× real-time/cpu':>17}  output"
    print(header)
    with tempfile.TemporaryDirectory(prefix="bench-pretrained-") as tmp:
        for backend in args.backends:
            for size in args.sizes:
                r = run(backend, size, Path(tmp), args.seconds)
                print(f"{backend:14}{size:6}{r['params_M']:10.2f}{r['disk_MiB']:10.1f}{r['save_s']:8.2f}"
                      f"{r['load_s']:8.2f}{r['token_info_s']:8.2f}{r['run_s']:8.2f}{r['run_cpu_s']:10.2f}"
                      f"{r['x_realtime']:17.1f}  "
                      f"{r['out']}", flush=True)


if __name__ == "__main__":
    main()
