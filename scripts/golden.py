"""Behaviour record of every command: run the README's examples with ``--format json`` and keep their rows and
summaries, so that a refactor can show it changed nothing but timings.

    python scripts/golden.py record   # write tests/golden/<case>.json from this tree
    python scripts/golden.py check    # run again and compare with the record (exit 1 on a difference)

The inputs are those of ``scripts/examples.sh`` (built by ``scripts/make_examples.py`` on the real
all-MiniLM-L6-v2 checkpoint; nothing is downloaded). Timings, versions and temporary paths are dropped before
comparing; numbers are compared to a relative 1e-6 (a decomposition route may change the last bits); options
that did not exist when the record was taken are allowed (the record's own options must still match).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
RTOL = 1e-6
ATOL = 1e-9

# name → the command line (after `spectra`); every case writes its JSON envelope to stdout
CASES: dict[str, list[str]] = {
    "analyze": ["analyze", "minilm"],
    "analyze-kinds": ["analyze", "minilm", "--kinds", "query,value", "--precision", "float64"],
    "compare": ["compare", "minilm", "inputs/lora-a", "--kinds", "query,value"],
    "compare-eps": ["compare", "minilm", "inputs/lora-a", "inputs/lora-b", "--kinds", "value", "--epsilon", "0.3,0.5,0.7"],
    "rankme-layers": ["rankme", "inputs/layer0.npy", "inputs/layer2.npy", "inputs/layer4.npy", "inputs/layer6.npy"],
    "allocate": ["allocate", "minilm", "--kinds", "query,value", "--budget-rank", "8", "--multiple-of", "4"],
    "allocate-welore": ["allocate", "minilm", "--kinds", "query,value", "--budget-rank", "8", "--strategy", "welore"],
    "capture": ["capture", "minilm", "--data", "inputs/sentences.txt", "--kinds", "query,key,value", "--stats",
                "both", "--components", "32", "--out", "acts.safetensors"],
    "init-pissa": ["init-adapter", "minilm", "--method", "pissa", "--rank", "8", "--kinds", "query,value",
                   "--out", "pissa-r8"],
    "init-milora": ["init-adapter", "minilm", "--method", "milora", "--rank", "4", "--kinds", "value",
                    "--out", "milora-r4"],
    "init-olora": ["init-adapter", "minilm", "--method", "olora", "--rank", "4", "--kinds", "value",
                   "--out", "olora-r4"],
    "init-eva": ["init-adapter", "minilm", "--method", "eva", "--rank", "8", "--kinds", "query,key,value",
                 "--activations", "acts.safetensors", "--out", "eva-r8"],
    "init-corda": ["init-adapter", "minilm", "--method", "corda", "--rank", "8", "--kinds", "query,value",
                   "--activations", "acts.safetensors", "--out", "corda-r8"],
    "merge-tsv": ["merge", "minilm", "a=inputs/lora-a", "b=inputs/lora-b", "c=inputs/lora-c", "--method", "tsv",
                  "--out", "merged-tsv"],
    "merge-ties": ["merge", "minilm", "a=inputs/lora-a", "b=inputs/lora-b", "--method", "ties", "--out",
                   "merged-ties"],
    "merge-knots": ["merge", "minilm", "a=inputs/lora-a", "b=inputs/lora-b", "--method", "knots", "--out",
                    "merged-knots"],
    "merge-rmm": ["merge", "minilm", "a=inputs/lora-a", "b=inputs/lora-b", "c=inputs/lora-c", "--method", "rmm",
                  "--basis", "2", "--sweep", "--out", "bundle"],
    "reconstruct": ["reconstruct", "bundle", "--task", "b", "--out", "b-rebuilt"],
    "init-extract": ["init-adapter", "minilm", "--method", "extract", "--tuned", "merged-tsv", "--energy", "0.9",
                     "--kinds", "query,value", "--out", "extracted"],
    "check-pass": ["check", "inputs/lora-a", "--base", "minilm", "--kinds", "query,value", "--policy", "gate.toml"],
    "check-fail": ["check", "inputs/lora-broken", "--base", "minilm", "--kinds", "query,value", "--policy",
                   "gate.toml"],
}  # fmt: skip

GATE = """\
[rules]
no_nonfinite = true
max_intruders = 0
max_relative_delta = 0.2
max_spectral_norm = 100.0
"""

# keys whose values are timings, versions or machine facts, not behaviour
_VOLATILE = ("seconds", "time", "timing", "spectra_version", "elapsed", "created", "max_memory", "budget",
             "threads", "hostname", "sha256", "mtime", "rss")  # fmt: skip


def _volatile(key: str) -> bool:
    return any(v in key for v in _VOLATILE)


def normalise(x: Any) -> Any:
    """Drop volatile keys (at any depth)."""
    if isinstance(x, dict):
        return {k: normalise(v) for k, v in x.items() if not _volatile(str(k))}
    if isinstance(x, list):
        return [normalise(v) for v in x]
    return x


def diff(a: Any, b: Any, where: str = "") -> list[str]:
    """Differences between a recorded (a) and a new (b) document; numbers to RTOL/ATOL."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: missing now" for k in a if k not in b]
        # a new option (an echo of the options the run was given) is not a change of behaviour
        if ".options" not in where:
            out += [f"{where}.{k}: new key" for k in b if k not in a]
        for k in a:
            if k in b:
                out += diff(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items recorded, {len(b)} now"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff(x, y, f"{where}[{i}]")]
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        fa, fb = float(a), float(b)
        if math.isnan(fa) and math.isnan(fb):
            return []
        if fa == fb or abs(fa - fb) <= ATOL + RTOL * max(abs(fa), abs(fb)):
            return []
        return [f"{where}: {a!r} recorded, {b!r} now"]
    if a != b:
        return [f"{where}: {a!r} recorded, {b!r} now"]
    return []


def build_inputs(work: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_examples.py"), str(work / "inputs")],
                   check=True, stdout=subprocess.DEVNULL, env=env)  # fmt: skip
    from spectra_cli.checkpoint.demo import demo_checkpoint

    (work / "minilm").symlink_to(demo_checkpoint())
    (work / "gate.toml").write_text(GATE)


def run_case(work: Path, name: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    argv = [sys.executable, "-m", "spectra_cli", *CASES[name], "--format", "json", "--quiet"]
    proc = subprocess.run(argv, cwd=work, capture_output=True, text=True, env=env)
    if not proc.stdout.strip():
        raise SystemExit(f"{name}: no JSON (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    # the temporary folder's name is not behaviour
    doc = json.loads(proc.stdout.replace(str(work.resolve()), "<work>").replace(str(work), "<work>"))
    doc["exit_code"] = proc.returncode
    return normalise(doc)


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "check"
    only = sys.argv[2:] or list(CASES)
    if mode not in ("record", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="spectra-golden-") as tmp:
        work = Path(tmp)
        build_inputs(work)
        failed = 0
        for name in only:
            doc = run_case(work, name)
            path = GOLDEN / f"{name}.json"
            if mode == "record":
                GOLDEN.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
                print(f"recorded {name}")
                continue
            problems = diff(json.loads(path.read_text()), doc, name)
            if problems:
                failed += 1
                print(f"DIFFERS {name}: {len(problems)} differences", *problems[:20], sep="\n  ")
            else:
                print(f"same    {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
