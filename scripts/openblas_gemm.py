#!/usr/bin/env python3
"""Times numpy's sgemm (OpenBLAS in the PyPI wheels) for GEMM shapes given as MxNxK.

The baseline the native cpu backend's f32 GEMM is compared with (issue 4). Prints one JSON line per
shape: {"shape", "ms", "gflops", "lib"}; ms is the median of --reps runs after warm-up.
Usage: python3 scripts/openblas_gemm.py 2048x512x128 2048x2048x2048 [--reps 20] [--trans-a] [--trans-b]
Needs numpy (`pip install numpy`).
"""

import argparse
import json
import statistics
import time

import numpy as np


def lib_name() -> str:
    try:
        cfg = np.show_config(mode="dicts")  # numpy >= 1.25
        return cfg["Build Dependencies"]["blas"]["name"]
    except Exception:  # older numpy: the name is not essential
        return "unknown"


def time_shape(m: int, n: int, k: int, reps: int, trans_a: bool, trans_b: bool) -> dict:
    rng = np.random.default_rng(0)
    # Stored layouts like the native gemm: A [M,K] or [K,M] (trans_a), B [K,N] or [N,K] (trans_b).
    a = rng.standard_normal((k, m) if trans_a else (m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n), dtype=np.float32)
    opa = a.T if trans_a else a
    opb = b.T if trans_b else b
    c = np.empty((m, n), dtype=np.float32)
    # Warm-up: thread pool start-up, page faults on c, caches.
    warm_until = time.perf_counter() + 0.2
    while time.perf_counter() < warm_until:
        np.matmul(opa, opb, out=c)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.matmul(opa, opb, out=c)
        times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    return {"shape": f"{m}x{n}x{k}", "ms": ms, "gflops": 2.0 * m * n * k / (ms * 1e6), "lib": lib_name()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shapes", nargs="*", default=["2048x512x128", "2048x128x512", "2048x256x128", "2048x2048x2048"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--trans-a", action="store_true")
    p.add_argument("--trans-b", action="store_true")
    args = p.parse_args()
    for s in args.shapes:
        m, n, k = (int(v) for v in s.lower().split("x"))
        r = time_shape(m, n, k, args.reps, args.trans_a, args.trans_b)
        r.update({"transA": args.trans_a, "transB": args.trans_b})
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
