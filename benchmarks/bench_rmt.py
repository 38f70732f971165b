"""``spectra analyze --randomize --mp-fit`` against WeightWatcher's ``analyze(randomize=True, mp_fit=True)``.

Run by hand (not in CI), from the repository root, with the project's venv and WeightWatcher in its own venv::

    . .venv/bin/activate
    python benchmarks/bench_rmt.py --ww-python /work/venvs/ww/bin/python            # MiniLM
    python benchmarks/bench_rmt.py --ww-python /work/venvs/ww/bin/python --llama    # + the LLaMA-like one
    python benchmarks/bench_rmt.py --tpl 6 --powerlaw15 /work/venvs/pl15              # + one E_TPL comparison

``--tpl N``: WeightWatcher's own ``fit_powerlaw(fit_type="truncated_power_law", fix_fingers="xmin_peak",
pl_package="powerlaw")`` (its E_TPL) on spectra's eigenvalues of the first N matrices, against spectra's
``fit_*`` columns on the same eigenvalues, per layer, and the seconds each side spent fitting. WeightWatcher 0.7
needs powerlaw 1.x for it (powerlaw 2.0 refuses the ``distribution=`` argument and every TPL fit "fails"):
``--powerlaw15 DIR`` puts a ``pip install --target DIR powerlaw==1.5`` first on its path.

Timing: each tool as its own subprocess, one after the other, whole process (imports included), same
checkpoint, warm page cache (``bench_analyze.measure``: wall, peak RSS, CPU taken by other processes).

Columns: (1) exact — WeightWatcher's own functions (``WeightWatcher.mp_fit``, ``RMT_Util.jensen_shannon_distance``,
``RMT_Util.detX_constraint``) run on spectra's eigenvalues and spectra's permuted-matrix eigenvalues, against
spectra's columns (max relative difference); (2) end to end — WeightWatcher's own run against spectra's, per
layer: the MP columns (same matrices, eigenvalues equal to SVD accuracy) and, for the randomised ones, which
depend on the shuffle, the medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_analyze import LLAMA, MIN_DIM, contended, measure, warm_cache

MP_COLS = ("sigma_mp", "bulk_max", "bulk_min", "num_spikes", "mp_softrank")
RAND_COLS = ("max_rand_eval", "rand_sigma_mp", "rand_bulk_max", "num_traps", "rand_distance", "ww_softrank")


def worker_ww(ckpt: str, out: str) -> None:
    """WeightWatcher with randomize and mp_fit on the checkpoint folder; writes its rows."""
    import weightwatcher as ww

    folder = ckpt if os.path.isdir(ckpt) else os.path.dirname(ckpt)
    t0 = time.perf_counter()
    df = ww.WeightWatcher(model=folder).analyze(randomize=True, mp_fit=True, plot=False)
    dt = time.perf_counter() - t0
    cols = [c for c in ("name", "longname", "N", "M", *MP_COLS, *RAND_COLS) if c in df.columns]
    Path(out).write_text(json.dumps({"seconds": dt, "version": ww.__version__,
                                     "rows": json.loads(df[cols].to_json(orient="records"))}))  # fmt: skip


def worker_spectra_values(ckpt: str, out: str) -> None:
    """spectra's eigenvalues and permuted-matrix eigenvalues (same options as the timed run), for the exact check."""
    import numpy as np

    from spectra_cli.flows.analyze import AnalyzeOptions, run_analyze
    from spectra_cli.spectral.rmt import RMTOptions

    res = run_analyze(ckpt, AnalyzeOptions(min_dim=MIN_DIM, rmt=RMTOptions(True, True, True)))
    np.savez(out + ".npz", **{f"v/{k}": v for k, v in res.spectra.items()},
             **{f"r/{k}": v for k, v in res.rand_spectra.items()})  # fmt: skip
    Path(out).write_text(json.dumps({r["name"]: r for r in res.rows}, default=str))


def worker_ww_on_spectra(values: str, out: str) -> None:
    """WeightWatcher's functions on spectra's eigenvalues."""
    import logging

    import numpy as np
    from weightwatcher.RMT_Util import detX_constraint, jensen_shannon_distance
    from weightwatcher.weightwatcher import WeightWatcher

    logging.disable(logging.WARNING)
    meta = json.loads(Path(values).read_text())
    z = np.load(values + ".npz")
    w = WeightWatcher()
    res: dict[str, Any] = {}
    for name, row in meta.items():
        if f"v/{name}" not in z or f"r/{name}" not in z:
            continue
        n, m = max(row["rows"], row["cols"]), min(row["rows"], row["cols"])
        ev = np.sort(z[f"v/{name}"].astype(np.float64) ** 2)
        rv = np.sort(z[f"r/{name}"].astype(np.float64) ** 2)
        spikes, sigma, soft, bmin, bmax, _ = w.mp_fit(ev, n, m, 1, name, 0, 0, False, False, "", "b", 0.5, True, ev)
        rsp, rsig, _, _, rbmax, _ = w.mp_fit(rv, n, m, 1, name, 0, 0, False, False, "", "b", 0.5, True, rv)
        dnum, didx = detX_constraint(ev, rescale=True)
        res[name] = {"sigma_mp": sigma, "bulk_max": bmax, "bulk_min": bmin, "num_spikes": spikes,
                     "mp_softrank": soft, "max_rand_eval": rv[-1], "rand_sigma_mp": rsig, "rand_bulk_max": rbmax,
                     "num_traps": rsp, "rand_distance": jensen_shannon_distance(ev, rv),
                     "ww_softrank": rv[-1] / ev[-1], "detX_num": dnum, "detX_val": ev[didx]}  # fmt: skip
    Path(out).write_text(json.dumps(res, default=float))


TPL_COLS = {"fit_alpha": 0, "fit_Lambda": 1, "fit_xmin": 2, "fit_ks": 4, "fit_tail": 6}  # index in WW's tuple


def worker_ww_tpl(values: str, out: str) -> None:
    """WeightWatcher's fit_powerlaw (E_TPL, powerlaw package) on spectra's eigenvalues of the listed matrices."""
    import logging

    import numpy as np
    from weightwatcher.weightwatcher import WeightWatcher

    logging.disable(logging.WARNING)
    names = json.loads(Path(values).read_text())
    z = np.load(values + ".npz")
    w = WeightWatcher()
    res: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name in names:
        ev = np.sort(z[f"v/{name}"].astype(np.float64) ** 2)
        r = w.fit_powerlaw(ev, plot=False, fit_type="truncated_power_law", fix_fingers="xmin_peak",
                           pl_package="powerlaw")  # fmt: skip
        res[name] = [*r[:7], r[9]]
    Path(out).write_text(json.dumps({"seconds": time.perf_counter() - t0, "rows": res}, default=float))


def worker_spectra_tpl(values: str, out: str) -> None:
    """spectra's fit_* columns (e_tpl) on the same eigenvalues, timed."""
    import numpy as np

    from spectra_cli.spectral.fits import FitOptions, fit_columns

    names = json.loads(Path(values).read_text())
    z = np.load(values + ".npz")
    t0 = time.perf_counter()
    res = {n: fit_columns(np.sort(z[f"v/{n}"].astype(np.float64) ** 2), FitOptions("e_tpl")) for n in names}
    Path(out).write_text(json.dumps({"seconds": time.perf_counter() - t0, "rows": res}, default=float))


def bench_tpl(work: Path, ww_python: Path, n: int, powerlaw15: Path | None) -> dict[str, Any]:
    """E_TPL: WeightWatcher's fit_powerlaw against spectra's on the eigenvalues of ``work/values.json``."""
    import numpy as np

    me = str(Path(__file__).resolve())
    z = np.load(str(work / "values.json") + ".npz")
    names = [k[2:] for k in z.files if k.startswith("v/")][:n]
    lst = work / "tpl.json"
    lst.write_text(json.dumps(names))
    np.savez(str(lst) + ".npz", **{f"v/{k}": z[f"v/{k}"] for k in names})
    old = os.environ.get("PYTHONPATH")
    if powerlaw15:  # the WeightWatcher child finds powerlaw 1.5 first
        os.environ["PYTHONPATH"] = os.pathsep.join([str(powerlaw15), *([old] if old else [])])
    try:
        ww_run = measure([str(ww_python), me, "_wwtpl", str(lst), str(work / "wwtpl.json")], work / "wwtpl.log")
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    sp_run = measure([sys.executable, me, "_sptpl", str(lst), str(work / "sptpl.json")], work / "sptpl.log")
    ww = json.loads((work / "wwtpl.json").read_text())
    sp = json.loads((work / "sptpl.json").read_text())
    per_layer = {}
    for name in names:
        w, s = ww["rows"][name], sp["rows"][name]
        per_layer[name] = {"ww_status": w[7], **{c: rel(s[c], w[i]) for c, i in TPL_COLS.items()}}
    return {"layers": len(names), "ww_fit_seconds": ww["seconds"], "spectra_fit_seconds": sp["seconds"],
            "ww_process": ww_run, "spectra_process": sp_run, "max_rel": {c: max(v[c] for v in per_layer.values())
            for c in TPL_COLS}, "per_layer": per_layer}  # fmt: skip


def rel(a: Any, b: Any) -> float:
    a, b = float(a), float(b)
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def bench(ckpt: Path, ww_python: Path, work: Path, repeats: int, tpl: int = 0,
          powerlaw15: Path | None = None) -> dict[str, Any]:  # fmt: skip
    me = str(Path(__file__).resolve())
    warm_cache(ckpt)
    sp_json = work / "spectra.json"
    cmds = {
        "ww": [str(ww_python), me, "_ww", str(ckpt), str(work / "ww.json")],
        "spectra": [sys.executable, "-m", "spectra_cli", "analyze", str(ckpt), "--min-dim", str(MIN_DIM),
                    "--randomize", "--mp-fit", "--max-memory", "512MB", "-f", "json", "-o", str(sp_json), "-q"],
    }  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in cmds}
    for _ in range(repeats):
        for k, c in cmds.items():
            runs[k].append(measure(c, work / f"{k}.log"))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "rss_mb", "cpu_s")} for k, v in runs.items()}
    busy = any(contended(r) for v in runs.values() for r in v)
    # exact: WeightWatcher's functions on spectra's eigenvalues
    vals = work / "values.json"
    measure([sys.executable, me, "_values", str(ckpt), str(vals)], work / "values.log")
    measure([str(ww_python), me, "_wwcols", str(vals), str(work / "wwcols.json")], work / "wwcols.log")
    ours = json.loads(vals.read_text())
    theirs = json.loads((work / "wwcols.json").read_text())
    exact = {c: max(rel(ours[n][c], t[c]) for n, t in theirs.items()) for c in next(iter(theirs.values()))}
    # end to end: WeightWatcher's own run
    env = json.loads(sp_json.read_text())
    sp_rows = {r["name"]: r for r in env["rows"] if r["status"] == "ok"}
    ww_rows = {(r.get("longname") or r["name"]) + ".weight": r for r in json.loads((work / "ww.json").read_text())["rows"]}
    common = sorted(set(sp_rows) & set(ww_rows))
    e2e: dict[str, Any] = {"layers": len(common), "ww_only": len(set(ww_rows) - set(sp_rows)),
                           "spectra_only": len(set(sp_rows) - set(ww_rows))}  # fmt: skip
    for c in MP_COLS:
        d = [rel(sp_rows[n][c], ww_rows[n][c]) for n in common if ww_rows[n].get(c) is not None]
        e2e[f"{c}_max_rel"] = max(d) if d else None
        e2e[f"{c}_median_rel"] = statistics.median(d) if d else None
    for c in RAND_COLS:
        a = [float(sp_rows[n][c]) for n in common if c in sp_rows[n]]
        b = [float(ww_rows[n][c]) for n in common if ww_rows[n].get(c) is not None]
        e2e[f"{c}_median"] = {"spectra": statistics.median(a) if a else None,
                              "ww": statistics.median(b) if b else None}  # fmt: skip
    tpl_res = bench_tpl(work, ww_python, tpl, powerlaw15) if tpl else None
    return {"checkpoint": str(ckpt), "median": med, "tpl": tpl_res, "ww_over_spectra": med["ww"]["wall_s"] / med["spectra"]["wall_s"],
            "machine_busy": busy, "runs": runs, "exact_max_rel": exact, "end_to_end": e2e,
            "spectra_seconds_in_run": env["summary"]["seconds"]}  # fmt: skip


def main() -> None:
    workers = {"_ww": worker_ww, "_values": worker_spectra_values, "_wwcols": worker_ww_on_spectra,
               "_wwtpl": worker_ww_tpl, "_sptpl": worker_spectra_tpl}  # fmt: skip
    if len(sys.argv) > 1 and sys.argv[1] in workers:
        workers[sys.argv[1]](
            sys.argv[2], sys.argv[3]
        )
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ww-python", type=Path, default=Path("/work/venvs/ww/bin/python"))
    ap.add_argument("--llama", action="store_true", help="also the LLaMA-like checkpoint")
    ap.add_argument("--llama-only", action="store_true", help="the LLaMA-like checkpoint alone")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tpl", type=int, default=0, metavar="N", help="also E_TPL on the first N matrices")
    ap.add_argument("--powerlaw15", type=Path, default=None, help="a folder holding powerlaw 1.5 (pip --target)")
    args = ap.parse_args()
    from spectra_cli.checkpoint.demo import demo_checkpoint

    ckpts = {} if args.llama_only else {"minilm": Path(demo_checkpoint())}
    ckpts |= {"llama_like": LLAMA} if args.llama or args.llama_only else {}
    out: dict[str, Any] = {}
    for name, ck in ckpts.items():
        with tempfile.TemporaryDirectory() as d:
            out[name] = bench(ck, args.ww_python, Path(d), args.repeats, args.tpl if name == "minilm" else 0,
                              args.powerlaw15)  # fmt: skip
        r = out[name]
        print(f"## {name}: WeightWatcher {r['median']['ww']['wall_s']:.1f} s, spectra {r['median']['spectra']['wall_s']:.1f} s"
              f" → {r['ww_over_spectra']:.2f}× (peak RSS {r['median']['ww']['rss_mb']:.0f} / "
              f"{r['median']['spectra']['rss_mb']:.0f} MB; machine busy: {r['machine_busy']})")  # fmt: skip
        print("exact (WW's functions on spectra's eigenvalues), max rel. diff:",
              {k: f"{v:.1e}" for k, v in r["exact_max_rel"].items()})  # fmt: skip
        print("end to end:", json.dumps(r["end_to_end"], default=lambda x: round(x, 4) if isinstance(x, float) else x))
        if r["tpl"]:
            t = r["tpl"]
            print(f"E_TPL on {t['layers']} matrices: WeightWatcher {t['ww_fit_seconds']:.1f} s, spectra "
                  f"{t['spectra_fit_seconds']:.1f} s fitting; max rel. diff:",
                  {k: f"{v:.1e}" for k, v in t["max_rel"].items()})  # fmt: skip
    res_dir = Path(__file__).resolve().parent / "results"
    res_dir.mkdir(exist_ok=True)
    (res_dir / ("rmt_llama.json" if args.llama_only else "rmt.json")).write_text(json.dumps(out, indent=1, default=lambda x: None if isinstance(x, float) and
                                                 not math.isfinite(x) else x))  # fmt: skip


if __name__ == "__main__":
    main()
