"""Speed / memory benchmark of ``spectra compare``: base + 3 tuned (a dense fine-tune and two LoRA adapters).

Run by hand (not in CI), from the repository root, with the project's venv::

    . .venv/bin/activate
    python benchmarks/bench_compare.py                    # MiniLM + the 1 GB LLaMA-like checkpoint
    python benchmarks/bench_compare.py --only minilm

Inputs (generated once into benchmarks/data/compare_<name>/, git-ignored): ``full`` — a copy of the base
whose target matrices get small dense noise plus a rank-4 update; ``lora8`` and ``lora64`` — PEFT LoRA
adapters (r = 8 and 64, α = 2r) on the same target modules. Targets: every linear weight of MiniLM's
encoder; ``q_proj,v_proj`` of the LLaMA-like checkpoint (the usual LoRA targets; all 65 matrices would take
~10 min a tool on 2 cores).

Each tool runs as its own subprocess, one after the other; wall time covers the whole process and peak RSS
is the child's ``ru_maxrss``:
- ``spectra_3``: ``spectra compare BASE full lora8 lora64`` (the base decomposed once for all three);
- ``spectra_full`` / ``spectra_lora8``: one tuned input at a time (does an adapter cost more than a dense
  checkpoint?);
- ``loop_3``: a plain PyTorch script doing what one would write by hand: for each tuned input and matrix,
  build W_t (W₀ + s·B·A for adapters), ``torch.linalg.svd`` of W₀ and of W_t (float32), intruders at ε = 0.5.
The intruder totals of ``spectra_3`` and ``loop_3`` are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "benchmarks" / "data"
RESULTS = ROOT / "benchmarks" / "results"
CASES = {
    "minilm": ("minilm", ("query", "key", "value", "dense")),
    "llama": (DATA / "llama_like", ("q_proj", "v_proj")),
}

LOOP = r"""
import json, math, re, sys, time
from pathlib import Path
import torch
from safetensors import safe_open
base, kinds, tuned = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
torch.set_grad_enabled(False)
def tensors(folder):
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = (f, k)
    return out
def get(ref):
    with safe_open(str(ref[0]), "pt") as h:
        return h.get_tensor(ref[1]).float()
bt = tensors(base)
names = [n for n in bt if n.endswith(".weight") and any(n[:-7].endswith("." + k) for k in kinds)
         and ".layer" in n]
svd_s = 0.0
totals = {}
for t in tuned:
    t = Path(t)
    total = 0
    if (t / "adapter_config.json").exists():
        cfg = json.loads((t / "adapter_config.json").read_text())
        ad = tensors(t)
        for n in names:
            mod = n[:-7]
            a = ad.get(f"base_model.model.{mod}.lora_A.weight")
            if a is None:
                continue
            A, B = get(a), get(ad[f"base_model.model.{mod}.lora_B.weight"])
            s = cfg["lora_alpha"] / cfg["r"]
            w0 = get(bt[n]); wt = w0 + s * (B @ A)
            t0 = time.perf_counter()
            u0 = torch.linalg.svd(w0, full_matrices=False)[0]; ut = torch.linalg.svd(wt, full_matrices=False)[0]
            svd_s += time.perf_counter() - t0
            total += int(((u0.T @ ut[:, :10]).abs().max(0).values < 0.5).sum())
    else:
        tt = tensors(t)
        for n in names:
            w0, wt = get(bt[n]), get(tt[n])
            t0 = time.perf_counter()
            u0 = torch.linalg.svd(w0, full_matrices=False)[0]; ut = torch.linalg.svd(wt, full_matrices=False)[0]
            svd_s += time.perf_counter() - t0
            total += int(((u0.T @ ut[:, :10]).abs().max(0).values < 0.5).sum())
    totals[t.name] = total
print(json.dumps({"totals": totals, "svd_s": svd_s, "matrices": len(names)}))
"""


def _minilm() -> Path:
    from spectra_cli.checkpoint.demo import demo_checkpoint

    return demo_checkpoint()


def prepare(name: str, base: Path, kinds: tuple[str, ...]) -> dict[str, Path]:
    """Generate the three tuned inputs (once)."""
    from spectra_cli.checkpoint.loader import MatrixLoader
    from spectra_cli.checkpoint.matrices import Selection, select_matrices
    from spectra_cli.checkpoint.source import open_checkpoint
    from spectra_cli.checkpoint.tensors import to_float
    from spectra_cli.checkpoint.writers import PatchedCopy

    out = DATA / f"compare_{name}"
    paths = {"full": out / "full", "lora8": out / "lora8", "lora64": out / "lora64"}
    if all(p.exists() for p in paths.values()):
        return paths
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ckpt = open_checkpoint(base)
    specs, _ = select_matrices(ckpt, Selection(kinds=kinds, min_dim=8))
    specs = [s for s in specs if s.depth is not None]
    rng = np.random.default_rng(0)
    paths["full"].mkdir()
    copy = PatchedCopy(ckpt, paths["full"])
    loader = MatrixLoader(ckpt)
    for s in specs:
        w = to_float(loader.load(s), np.float64).reshape(s.stored_2d)
        m, n = w.shape
        scale = float(np.linalg.norm(w) / np.sqrt(w.size))
        upd = (
            0.05 * scale * (rng.standard_normal((m, 4)) @ rng.standard_normal((4, n)))
        )  # rank 4, RMS 0.1·scale
        copy.patch(s.tensor, w + 0.01 * scale * rng.standard_normal((m, n)) + upd)
    for key, r in (("lora8", 8), ("lora64", 64)):
        folder = paths[key]
        folder.mkdir()
        tensors: dict[str, np.ndarray] = {}
        for s in specs:
            mod = s.tensor.name[: -len(".weight")]
            m, n = s.shape
            tensors[f"base_model.model.{mod}.lora_A.weight"] = (
                rng.standard_normal((r, n)) / np.sqrt(n)
            ).astype(np.float32)
            tensors[f"base_model.model.{mod}.lora_B.weight"] = (rng.standard_normal((m, r)) * 0.02).astype(
                np.float32
            )
        from safetensors.numpy import save_file

        save_file(tensors, str(folder / "adapter_model.safetensors"), {"format": "pt"})
        cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(kinds), "bias": "none",
               "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "task_type": None,
               "base_model_name_or_path": str(base), "lora_dropout": 0.0, "inference_mode": True,
               "rank_pattern": {}, "alpha_pattern": {}}  # fmt: skip
        (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return paths


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of a child process; output goes to files, so a large JSON on
    stdout cannot fill a pipe while we wait for the child."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n{errors[-2000:]}")
    return wall, usage.ru_maxrss / 1024, text


def run_case(name: str) -> dict[str, Any]:
    base, kinds = CASES[name]
    base = _minilm() if base == "minilm" else Path(base)
    paths = prepare(name, base, kinds)
    spectra = [sys.executable, "-m", "spectra_cli", "compare", str(base)]
    sel = ["--kinds", ",".join(kinds), "--min-dim", "8", "-f", "json", "-q"]
    res: dict[str, Any] = {"checkpoint": str(base), "kinds": list(kinds)}
    wall, rss, out = timed([*spectra, *(str(p) for p in paths.values()), *sel])
    env = json.loads(out)
    res["spectra_3"] = {"wall_s": wall, "rss_mb": rss, "rows": len(env["rows"]),
                        "totals": {k: v["total_intruders"]["0.5"] for k, v in env["summary"]["tuned"].items()}}  # fmt: skip
    for key in ("full", "lora8"):
        wall, rss, _ = timed([*spectra, str(paths[key]), *sel])
        res[f"spectra_{key}"] = {"wall_s": wall, "rss_mb": rss}
    wall, rss, out = timed(
        [sys.executable, "-c", LOOP, str(base), ",".join(kinds), *(str(p) for p in paths.values())]
    )
    res["loop_3"] = {"wall_s": wall, "rss_mb": rss, **json.loads(out)}
    res["ratio_loop_over_spectra"] = res["loop_3"]["wall_s"] / res["spectra_3"]["wall_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(CASES))
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}}
    for name in [args.only] if args.only else list(CASES):
        results[name] = run_case(name)
        (RESULTS / "compare.json").write_text(json.dumps(results, indent=2))
    print(
        "| checkpoint | matrices | spectra, 3 tuned | spectra, dense only | spectra, LoRA r=8 only | PyTorch loop, 3 tuned | loop / spectra | intruders spectra / loop |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in CASES:
        if name not in results:
            continue
        r = results[name]
        s3, lp = r["spectra_3"], r["loop_3"]
        print(
            f"| {name} | {lp['matrices']} | {s3['wall_s']:.1f} s, {s3['rss_mb']:.0f} MB | {r['spectra_full']['wall_s']:.1f} s "
            f"| {r['spectra_lora8']['wall_s']:.1f} s | {lp['wall_s']:.1f} s, {lp['rss_mb']:.0f} MB "
            f"| {r['ratio_loop_over_spectra']:.1f}× | {s3['totals']} / {lp['totals']} |"
        )


if __name__ == "__main__":
    main()
