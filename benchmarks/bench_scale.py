"""Time per matrix of LLaMA-2-7B's shapes on this machine's CPU, for docs/scale.md's cost of a large run.

For each shape — 4096×4096 (q, k, v, o), 4096×11008 (gate, up, down), 32000×4096 (embeddings, lm_head) — a
random float32 matrix is decomposed the two ways `spectra track` does: its singular values through
spectral.linalg's Gram route (analyze's metrics; `track` without --base) and its thin SVD (compare's intruders
and drift; `track --base`). The best of ``--repeats`` runs is kept, as wall time and as this process's CPU
time (the machine may be shared: the load average before and after is recorded; with ``--threads 1`` the CPU
seconds are core-seconds of work). Then the arithmetic: one 7B checkpoint = 32 layers × (4 + 3) matrices
+ 2 vocabulary matrices, and 200 of them.

    python benchmarks/bench_scale.py [--repeats 2] [--threads N] [--out results.json]
    python benchmarks/bench_scale.py --ray-tasks 400     # only Ray's own cost: start, and per task

``--ray-tasks N``: a local Ray cluster of 2 workers (the executor ``--ray local`` uses): the seconds to start
it, and the seconds per task of N tasks that do nothing but return a 7B matrix's worth of singular values
(4096 float64, 32 KB) — the overhead Ray adds to each task of ``spectra track``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import numpy as np

from spectra_cli.spectral import linalg

#: LLaMA-2-7B: shape → matrices of that shape in one checkpoint (32 layers; gate/up are 11008×4096 and down
#: 4096×11008: the same work)
LLAMA2_7B = {(4096, 4096): 32 * 4, (4096, 11008): 32 * 3, (32000, 4096): 2}


def best_of(fn: Any, x: np.ndarray, repeats: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of the fastest of ``repeats`` calls. On a shared machine the
    CPU seconds are the steadier figure: they count the work, not the wait for a core."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(x)
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best


def values_of_a_7b_matrix(seed: int) -> np.ndarray:
    """A task that returns what a real one returns for a LLaMA-2-7B matrix, and computes nothing."""
    return np.full(4096, float(seed))


def ray_overhead(tasks: int) -> dict[str, float]:
    from spectra_cli.flows.ray_executor import RayExecutor

    t0 = time.perf_counter()
    ex = RayExecutor("local", num_cpus=2)
    start = time.perf_counter() - t0
    try:
        ex.map(values_of_a_7b_matrix, list(range(4)), ["warm"] * 4)  # the workers' first import
        t0 = time.perf_counter()
        out = ex.map(values_of_a_7b_matrix, list(range(tasks)), [str(i) for i in range(tasks)])
        per_task = (time.perf_counter() - t0) / tasks
        assert [float(v[0]) for v in out] == [float(i) for i in range(tasks)]
    finally:
        t0 = time.perf_counter()
        ex.close()
        stop = time.perf_counter() - t0
    return {"start_s": round(start, 2), "per_task_ms": round(1000 * per_task, 2), "stop_s": round(stop, 2),
            "tasks": tasks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="BLAS threads (default: the library's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-vocab", action="store_true", help="leave out the 32000×4096 shape (≈0.5 GB)")
    ap.add_argument("--ray-tasks", type=int, default=0, help="measure only Ray's overhead, with this many tasks")
    args = ap.parse_args()
    if args.ray_tasks:
        r = {"ray_local_2_workers": ray_overhead(args.ray_tasks), "load": os.getloadavg()}
        print(json.dumps(r, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(r, f, indent=2)
        return
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    rng = np.random.default_rng(0)
    load0 = os.getloadavg()
    per: dict[str, dict[str, float]] = {}
    for shape in LLAMA2_7B:
        if args.skip_vocab and shape[0] == 32000:
            continue
        x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        values = best_of(lambda a: linalg.singular_values(a, method="gram"), x, args.repeats)
        svd = best_of(linalg.thin_svd, x, args.repeats)
        per[f"{shape[0]}x{shape[1]}"] = {"values_s": round(values[0], 3), "values_cpu_s": round(values[1], 3),
                                         "thin_svd_s": round(svd[0], 3), "thin_svd_cpu_s": round(svd[1], 3)}
        print(f"{shape[0]}×{shape[1]}: values {values[0]:.2f} s ({values[1]:.2f} CPU s), "
              f"thin SVD {svd[0]:.2f} s ({svd[1]:.2f} CPU s)", flush=True)
        del x
    load1 = os.getloadavg()
    ckpt = {"values_s": 0.0, "values_cpu_s": 0.0, "thin_svd_s": 0.0, "thin_svd_cpu_s": 0.0}
    for shape, count in LLAMA2_7B.items():
        key = f"{shape[0]}x{shape[1]}"
        if key in per:
            for k in ckpt:
                ckpt[k] += count * per[key][k]
    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "load_before": load0, "load_after": load1},
        "per_matrix": per,
        "one_7b_checkpoint_hours": {k: round(v / 3600, 3) for k, v in ckpt.items()},
        "two_hundred_checkpoints_hours": {k: round(200 * v / 3600, 1) for k, v in ckpt.items()},
    }  # fmt: skip
    print(json.dumps(out, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
