"""Speed / memory benchmark of ``spectra init-adapter --method pissa`` against PEFT's own PiSSA initialiser.

Run by hand (not in CI), from the repository root, with the project's venv::

    . .venv/bin/activate
    python benchmarks/bench_init.py                     # MiniLM + the 1 GB LLaMA-like checkpoint
    python benchmarks/bench_init.py --only minilm --rank 16
    python benchmarks/bench_init.py --report            # print the last results again

Targets: every linear module but embeddings and the output head (PEFT's ``target_modules="all-linear"``, which
is also spectra's default): 37 for MiniLM (6 layers × 6 + the pooler), 63 for the LLaMA-like checkpoint
(``python -m fixtures.llama_like benchmarks/data/llama_like``, generated when missing: 9 layers × 7, bf16).

Each tool runs as its own subprocess, one after the other; wall time covers the whole process (interpreter
start and imports included), peak RSS is the child's ``ru_maxrss`` (``os.wait4``):

- ``spectra``: ``spectra init-adapter CKPT --method pissa --rank R --out TMP`` (exact SVD, float32);
- ``spectra_fast4``: the same with ``--fast 4`` (``torch.svd_lowrank(niter=4)``);
- ``peft``: transformers loads the model in its stored dtype, ``get_peft_model(model, LoraConfig(r=R,
  lora_alpha=R, target_modules="all-linear", init_lora_weights="pissa"))``, then writes what spectra writes: the
  adapter (``init_lora_weights`` reset to True, as PEFT's docs do) and the residual base (``unload()`` +
  ``save_pretrained``). ``init_s`` is the ``get_peft_model`` call alone;
- ``peft_niter4``: the same with ``init_lora_weights="pissa_niter_4"``.

The module counts of spectra and PEFT are checked to be equal. Results go to
``benchmarks/results/init.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "benchmarks" / "data"
RESULTS = ROOT / "benchmarks" / "results"

PEFT_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
src, out, rank, init = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cfg = AutoConfig.from_pretrained(src)
cls = AutoModelForCausalLM if getattr(cfg, "model_type", "") == "llama" else AutoModel
model = cls.from_pretrained(src, torch_dtype="auto")
t1 = time.perf_counter()
peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear",
                                              init_lora_weights=init))
t2 = time.perf_counter()
n = sum(1 for _, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
peft_model.peft_config["default"].init_lora_weights = True
peft_model.save_pretrained(out + "/adapter")
peft_model.unload().save_pretrained(out + "/residual", safe_serialization=True)
t3 = time.perf_counter()
print(json.dumps({"modules": n, "load_s": t1 - t0, "init_s": t2 - t1, "save_s": t3 - t2}))
"""


def _checkpoint(name: str) -> Path:
    if name == "minilm":
        from spectra_cli.checkpoint.demo import demo_checkpoint

        return demo_checkpoint()
    folder = DATA / "llama_like"
    if not (folder / "model.safetensors.index.json").is_file():
        subprocess.run([sys.executable, "-m", "fixtures.llama_like", str(folder)], check=True, cwd=ROOT)
    return folder


def _run(cmd: list[str]) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, child CPU seconds, peak RSS (MB) and its stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True)
    out_text = proc.stdout.read() if proc.stdout else ""
    err_text = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err_text[-2000:]}")
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "stdout": out_text,
    }


def bench(name: str, rank: int, repeats: int) -> dict[str, Any]:
    ckpt = _checkpoint(name)
    for f in ckpt.glob("*.safetensors"):  # warm the page cache for every tool alike
        f.read_bytes()
    tools: dict[str, list[str]] = {
        "spectra": ["--method", "pissa"],
        "spectra_fast4": ["--method", "pissa", "--fast", "4"],
        "peft": ["pissa"],
        "peft_niter4": ["pissa_niter_4"],
    }
    results: dict[str, Any] = {}
    for tool, extra in tools.items():
        runs = []
        for _ in range(repeats):
            tmp = Path(tempfile.mkdtemp(prefix=f"bench_init_{tool}_", dir=DATA if DATA.is_dir() else None))
            try:
                if tool.startswith("spectra"):
                    cmd = [sys.executable, "-m", "spectra_cli", "init-adapter", str(ckpt), "--out", str(tmp / "o"),
                           "--rank", str(rank), *extra, "-q", "-f", "json"]  # fmt: skip
                    r = _run(cmd)
                    env = json.loads(r.pop("stdout"))
                    r["modules"] = env["summary"]["modules"]
                    r["core_s"] = env["summary"]["seconds"]
                else:
                    r = _run([sys.executable, "-c", PEFT_SCRIPT, str(ckpt), str(tmp), str(rank), extra[0]])
                    r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            runs.append(r)
        best = min(runs, key=lambda x: x["wall_s"])
        results[tool] = {**best, "repeats": len(runs)}
        print(f"{name:7s} {tool:14s} {best['wall_s']:8.2f} s wall  {best['peak_rss_mb']:8.0f} MB  "
              f"{best.get('modules')} modules", flush=True)  # fmt: skip
    mods = {t: r["modules"] for t, r in results.items()}
    if len(set(mods.values())) != 1:
        print(f"WARNING: module counts differ: {mods}", flush=True)
    return {"checkpoint": str(ckpt), "rank": rank, "tools": results}


def report(data: dict[str, Any]) -> None:
    print(f"machine: {data['machine']}")
    for name, case in data["cases"].items():
        print(f"\n{name} (rank {case['rank']}): {case['checkpoint']}")
        print(f"{'tool':14s} {'wall s':>8s} {'cpu s':>8s} {'RSS MB':>8s} {'modules':>8s}  detail")
        for tool, r in case["tools"].items():
            detail = (
                f"init {r['init_s']:.2f} s, save {r['save_s']:.2f} s"
                if "init_s" in r
                else f"core {r['core_s']:.2f} s"
            )
            print(
                f"{tool:14s} {r['wall_s']:8.2f} {r['cpu_s']:8.2f} {r['peak_rss_mb']:8.0f} {r['modules']:>8}  {detail}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("minilm", "llama"), default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="print the last results and exit")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "init.json"
    if args.report:
        report(json.loads(path.read_text()))
        return
    cases = [args.only] if args.only else ["minilm", "llama"]
    data = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cases": {c: bench(c, args.rank, args.repeats) for c in cases},
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    report(data)


if __name__ == "__main__":
    main()
