"""Micro-benchmark of the CPU kernels behind ``spectra analyze`` on LLaMA-like shapes (run by hand).

    python benchmarks/bench_kernels.py [--repeats 5]

Times (best of ``--repeats``, seconds) the pieces of the Gram route — the float64 Gram product and the
symmetric eigensolver by NumPy, SciPy (drivers evd / evr) and PyTorch — and ``torch.linalg.svdvals`` in fp32
on tall and wide layouts. Random Gaussian matrices, fixed seed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any


def best(f: Callable[[], Any], repeats: int) -> float:
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        out = min(out, time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()

    import numpy as np
    import scipy.linalg as sl
    import torch

    rng = np.random.default_rng(0)
    rows = []
    for m, n in ((5632, 2048), (2048, 2048), (32000, 2048)):
        x = rng.standard_normal((m, n))
        g = x.T @ x
        tx, tg = torch.from_numpy(x), torch.from_numpy(g)
        rows += [
            (f"gram {m}x{n} f64, numpy x.T@x", best(lambda x=x: x.T @ x, a.repeats)),
            (f"gram {m}x{n} f64, torch x.T@x", best(lambda tx=tx: tx.T @ tx, a.repeats)),
            (f"eig {n}x{n} f64, numpy.linalg.eigvalsh", best(lambda g=g: np.linalg.eigvalsh(g), a.repeats)),
            (f"eig {n}x{n} f64, scipy eigh evd", best(lambda g=g: sl.eigh(g, eigvals_only=True, driver="evd"), a.repeats)),
            (f"eig {n}x{n} f64, scipy eigh evr", best(lambda g=g: sl.eigh(g, eigvals_only=True, driver="evr"), a.repeats)),
            (f"eig {n}x{n} f64, torch.linalg.eigvalsh", best(lambda tg=tg: torch.linalg.eigvalsh(tg), a.repeats)),
        ]  # fmt: skip
    for m, n in ((5632, 2048), (2048, 5632), (2048, 2048)):
        x32 = torch.from_numpy(rng.standard_normal((m, n)).astype(np.float32))
        rows.append((f"svdvals {m}x{n} f32, torch", best(lambda x32=x32: torch.linalg.svdvals(x32), 1)))
    print(f"threads: torch {torch.get_num_threads()}")
    print("| kernel | best s |\n| --- | ---: |")
    for name, s in rows:
        print(f"| {name} | {s:.3f} |")


if __name__ == "__main__":
    main()
