"""Benchmark of ``spectra track``: 8 checkpoints of the LLaMA-like model, the first run and the rerun from
``--cache`` (target: the rerun under 5 % of the first run), and optionally the same run on Ray (``--ray``).

Run by hand (not in CI), from the repository root, with the project's venv::

    . .venv/bin/activate
    python benchmarks/bench_track.py                          # 8 × the 1 GB LLaMA-like checkpoint
    python benchmarks/bench_track.py --preset tiny            # a few MB: checks the script in seconds
    python benchmarks/bench_track.py --kinds v_proj --base    # fewer matrices, with intruders vs the base
    python benchmarks/bench_track.py --ray local              # also the same run as Ray tasks
    python benchmarks/bench_track.py --ray local --only-ray --repeats 2   # only in-process vs Ray, alternated

Inputs (generated once into benchmarks/data/, git-ignored): the base ``llama_like[_PRESET]`` from
``python -m fixtures.llama_like``, and ``track_run[_PRESET]/checkpoint-{500…4000}/``: copies of it whose 2-D
weights of the decoder layers get a rank-1 update c·σ·a·bᵀ growing with the step (c = step/2000, σ the
weights' typical spectral norm 0.04·√n, a and b unit vectors seeded by the tensor name), written shard by
shard in the base's dtype (bf16), with the base's ``config.json`` and index.

Each run is its own subprocess (``python -m spectra_cli track …``), one after the other, timed as a whole:
- ``first``: with a fresh ``--cache`` (what a first run costs, cache writes included);
- ``rerun``: the same command again (everything read back from the cache);
- with ``--ray``: ``inprocess`` (the command without the cache) and ``ray`` (the same as Ray tasks); the Ray
  overhead is ray / inprocess − 1 (the issue's target: ≤ 10 %). ``--ray local`` starts a cluster of one
  worker per CPU (2 on the 2-core machine of docs/scale.md), its start and stop included in the time.
  ``--repeats N`` alternates the two N times (in-process, Ray, in-process, …: on a shared machine a change of
  load then hits both) and compares the medians; ``--only-ray`` skips the cache runs.
The rows of every run must be equal (up to float noise); the script says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "benchmarks" / "data"
RESULTS = ROOT / "benchmarks" / "results"
STEPS = (500, 1000, 1500, 2000, 2500, 3000, 3500, 4000)


def base_model(preset: str) -> Path:
    out = DATA / ("llama_like" if preset == "tinyllama" else f"llama_like_{preset}")
    if not (out / "model.safetensors.index.json").exists():
        subprocess.run([sys.executable, "-m", "fixtures.llama_like", str(out), "--preset", preset], check=True,
                       cwd=ROOT)  # fmt: skip
    return out


def _unit(n: int, seed: int) -> Any:
    import numpy as np

    v = np.random.default_rng(seed).standard_normal(n)
    return v / np.linalg.norm(v)


def perturbed(base: Path, step: int, out: Path) -> None:
    """``base`` with a rank-1 update of size step/2000 × the typical spectral norm on every layer matrix."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    if (out / "model.safetensors.index.json").exists():
        return
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in base.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, tmp / f.name)
    for shard in sorted(base.glob("*.safetensors")):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if t.ndim != 2 or ".layers." not in name:
                continue
            seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
            m, n = t.shape
            c = step / 2000 * 0.04 * math.sqrt(max(m, n))
            a = torch.from_numpy(_unit(m, seed)).float()
            b = torch.from_numpy(_unit(n, seed + 1)).float()
            tensors[name] = (t.float() + c * torch.outer(a, b)).to(t.dtype)
        save_file(tensors, tmp / shard.name, metadata={"format": "pt"})
        del tensors
    tmp.rename(out)


def make_run(preset: str, n: int) -> tuple[Path, Path]:
    base = base_model(preset)
    run = DATA / ("track_run" if preset == "tinyllama" else f"track_run_{preset}")
    run.mkdir(parents=True, exist_ok=True)
    for step in STEPS[:n]:
        perturbed(base, step, run / f"checkpoint-{step}")
    return base, run


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return dt


def rows_equal(a: Path, b: Path) -> bool:
    ra, rb = json.loads(a.read_text())["rows"], json.loads(b.read_text())["rows"]
    if len(ra) != len(rb):
        return False
    for x, y in zip(ra, rb, strict=True):
        for k, v in x.items():
            w = y.get(k)
            if isinstance(v, float) and isinstance(w, float):
                if not (math.isclose(v, w, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(v) and math.isnan(w))):
                    return False
            elif v != w:
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tinyllama", help="fixtures.llama_like preset (tinyllama: the 1 GB model)")
    ap.add_argument("--checkpoints", type=int, default=8)
    ap.add_argument("--kinds", default=None, help="--kinds for spectra track (default: every matrix)")
    ap.add_argument("--base", action="store_true", help="also compare with the base (--base)")
    ap.add_argument("--against-previous", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ray", default=None, metavar="ADDRESS|auto|local", help="also run with --ray (passed through)")
    ap.add_argument("--repeats", type=int, default=1, help="in-process/Ray pairs, alternated (medians compared)")
    ap.add_argument("--only-ray", action="store_true", help="skip the --cache runs (with --ray)")
    args = ap.parse_args()
    base, run = make_run(args.preset, args.checkpoints)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = f"track_{args.preset}"
    cache = RESULTS / f"{tag}_cache"
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, "-m", "spectra_cli", "track", str(run), "--device", args.device, "--format", "json",
           "--quiet", "--steps", ",".join(map(str, STEPS[: args.checkpoints]))]  # fmt: skip
    if args.kinds:
        cmd += ["--kinds", args.kinds]
    if args.base:
        cmd += ["--base", str(base)]
    if args.against_previous:
        cmd += ["--against", "previous"]
    out: dict[str, Any] = {"preset": args.preset, "checkpoints": args.checkpoints, "kinds": args.kinds,
                           "base": args.base, "against_previous": args.against_previous,
                           "machine": f"{platform.machine()} {os.cpu_count()} cores", "load": os.getloadavg()}  # fmt: skip
    first, rerun = RESULTS / f"{tag}_first.json", RESULTS / f"{tag}_rerun.json"
    if not (args.ray and args.only_ray):
        out["first_s"] = timed([*cmd, "--cache", str(cache), "-o", str(first)])
        out["rerun_s"] = timed([*cmd, "--cache", str(cache), "-o", str(rerun)])
        out["rerun_fraction"] = out["rerun_s"] / out["first_s"]
        out["rerun_rows_equal"] = rows_equal(first, rerun)
        out["rows"] = len(json.loads(first.read_text())["rows"])
    if args.ray:  # the same work without the cache, in this process and on Ray, alternated
        plain, ray = RESULTS / f"{tag}_inprocess.json", RESULTS / f"{tag}_ray.json"
        times: dict[str, list[float]] = {"inprocess": [], "ray": []}
        for _ in range(args.repeats):
            times["inprocess"].append(timed([*cmd, "-o", str(plain)]))
            times["ray"].append(timed([*cmd, "--ray", args.ray, "-o", str(ray)]))
        out["inprocess_runs_s"], out["ray_runs_s"] = times["inprocess"], times["ray"]
        out["inprocess_s"], out["ray_s"] = statistics.median(times["inprocess"]), statistics.median(times["ray"])
        out["ray_overhead"] = out["ray_s"] / out["inprocess_s"] - 1
        out["ray_rows_equal"] = rows_equal(plain, ray)
        if args.ray == "local":
            out["ray_workers"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    (RESULTS / f"{tag}.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
