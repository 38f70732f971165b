"""Two revisions of spectra on the same work, in one run: is a change (a refactor) slower than before?

    python benchmarks/bench_revisions.py OLD_TREE [NEW_TREE] [--repeats N] [--only minilm|llama]

OLD_TREE / NEW_TREE are source trees of spectra (e.g. a `git worktree add /tmp/old <commit>`); NEW_TREE defaults
to this repository. Every command runs as its own process (`python -m spectra_cli …` with PYTHONPATH set to the
tree), alternating old and new so that a change in the machine's load hits both; wall time is the whole
process, peak RSS from `os.wait4`. Outputs go to a temporary folder, never to /dev/null: an old revision may
replace a device it is given as an output (the bug fixed with issue #12). Run it on an idle machine. Needs the demo checkpoint (setup.sh installs it)
and the LLaMA-like checkpoint in benchmarks/data/llama_like (generated when missing, ~1 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "benchmarks" / "data" / "llama_like"


def cases(minilm: Path, work: Path) -> dict[str, tuple[str, list[str]]]:
    """name → (checkpoint group, spectra arguments)."""
    return {
        "analyze minilm": ("minilm", ["analyze", str(minilm), "-f", "json", "-o", str(work / "out.json")]),
        "compare minilm vs itself": ("minilm", ["compare", str(minilm), str(minilm), "-f", "json"]),
        "init-adapter pissa r16 minilm": ("minilm", ["init-adapter", str(minilm), "--method", "pissa", "--rank",
                                                     "16", "--out", str(work / "pissa"), "--force"]),
        "allocate energy minilm": ("minilm", ["allocate", str(minilm), "--budget-rank", "8", "-f", "json"]),
        "analyze llama-like": ("llama", ["analyze", str(LLAMA), "-f", "json", "-o", str(work / "out.json")]),
        "init-adapter pissa r16 llama-like": ("llama", ["init-adapter", str(LLAMA), "--method", "pissa", "--rank",
                                                        "16", "--out", str(work / "pissa-llama"), "--force"]),
    }  # fmt: skip


def run(tree: Path, args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one whole process."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "spectra_cli", *args, "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tree}: spectra {' '.join(args)} failed: {err.strip()[-500:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path, nargs="?", default=ROOT)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--only", choices=("minilm", "llama"))
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from spectra_cli.checkpoint.demo import demo_checkpoint

    if (a.only in (None, "llama")) and not LLAMA.exists():
        subprocess.run([sys.executable, "-m", "fixtures.llama_like", str(LLAMA)], cwd=ROOT, check=True)
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (group, args) in cases(demo_checkpoint(), Path(tmp)).items():
            if a.only and group != a.only:
                continue
            res = results.setdefault(name, {"old": [], "new": []})
            for _ in range(a.repeats):
                for label, tree in (("old", a.old), ("new", a.new)):
                    res[label].append(run(tree, args))
            print(f"{name}: done", file=sys.stderr)
    print("| command | old wall s | new wall s | new/old | old RSS MB | new RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, res in results.items():
        ow = statistics.median(w for w, _ in res["old"])
        nw = statistics.median(w for w, _ in res["new"])
        orss = max(r for _, r in res["old"])
        nrss = max(r for _, r in res["new"])
        print(f"| {name} | {ow:.2f} | {nw:.2f} | {nw / ow:.2f} | {orss:.0f} | {nrss:.0f} |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
