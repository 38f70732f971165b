"""One prepared device check: spectra on CUDA against spectra on the CPU, and whole-process timings on a 7B model.

Run it through ``benchmarks/gpu_check.sh`` (see benchmarks/README.md, section ``gpu_check``)::

    bash benchmarks/gpu_check.sh                  # one CUDA GPU: LLaMA-2-7B shapes, ≈8 min on an H100
    bash benchmarks/gpu_check.sh --cpu --small    # no GPU: a tiny checkpoint, torch on the CPU (seconds; CI)

Nothing is downloaded. Steps:

1. **Data** (in ``--work``, reused when present): a bf16 LLaMA-like checkpoint with random weights in sharded
   safetensors (``fixtures.llama_like``; preset ``llama2-7b``: hidden 4096, intermediate 11008, 32 layers,
   vocab 32000, ≈13.5 GB; ``--small``: preset ``tiny``); four rank-16 LoRA adapters on every linear module
   (q, k, v, o, gate, up, down); an N×K float32 embedding file (100 000 × 4096; small: 2 000 × 64). The checks
   use a one-layer checkpoint of the same shapes (with its own adapters and a 20 000 × 1024 embedding file),
   so that the CPU reference stays short.
2. **Checks**: each command's numbers from the device run (``--device cuda``; with ``--cpu``: the PyTorch
   backend on the CPU) against the CPU's NumPy/LAPACK run, with the tolerances in :data:`TOLERANCES`:
   analyze's singular values (both methods), allocate's ranks, compare's intruder counts and drift,
   init-adapter pissa's B·A and residual, merge tsv's and ties's merged tensors, rankme's scores. compare and
   merge also check that the device route ran: every cosine matrix |U₀ᵀU_t| formed from device tensors, every
   merge method given task updates built on the device and giving its result there.
3. **Timings** (whole process, ``python -m spectra_cli …`` as a subprocess, page cache warm): analyze of the
   whole checkpoint; compare against one adapter; init-adapter pissa r=16 on every linear module; merge tsv of
   the four adapters; rankme of the embedding file. Each against the issue's target on the 7B.

Prints one table and writes JSON (``--json``, default ``benchmarks/results/gpu_check*.json``); exits 1 when a
check fails or a command fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.llama_like import PRESETS, make_llama_like  # noqa: E402

#: the issue's targets on one H100, whole process, page cache warm (seconds; None: no target)
TARGETS: dict[str, float | None] = {"analyze": 30.0, "compare": 45.0, "init-adapter": 60.0, "merge": 60.0,
                                    "rankme": None}  # fmt: skip
#: tolerances of the device-against-CPU checks (what each one measures is in its row's "what")
TOLERANCES = {
    "values_gram": 1e-9,  # max |σ_dev − σ_cpu| / σ₁, both float64 Gram routes
    "values_svd": 1e-5,  # max |σ_dev(float32 svd) − σ_cpu(float64 Gram)| / σ₁
    "allocate": 1,  # max |rank_dev − rank_cpu| per module, total equal (ties between equal spectra)
    "compare_drift": 1e-6,  # max relative difference of relative_delta, subspace_overlap, effective_rank_change
    "init_factors": 1e-5,  # ‖s·B·A_dev − s·B·A_cpu‖_F / ‖s·B·A_cpu‖_F per module (float32 compute)
    "init_residual": 1e-3,  # ‖R_dev − R_cpu‖_F / ‖R_cpu‖_F per module (bf16 stored: rounding flips are ≤ 1 ulp)
    "merge": 1e-3,  # ‖M_dev − M_cpu‖_F / ‖M_cpu − W₀‖_F per changed tensor (bf16 stored)
    "rankme": 1e-9,  # relative difference of RankMe, effective and numerical rank
}
RANK = 16
ADAPTERS = 4


@dataclass(frozen=True)
class Shape:
    preset: str
    layers: int
    rows: int  # embedding file N × K
    cols: int
    shard_bytes: int


def shapes(small: bool) -> tuple[Shape, Shape]:
    """(timed data, check data)."""
    if small:
        s = Shape("tiny", 2, 2000, 64, 100_000)
        return s, s
    return Shape("llama2-7b", 32, 100_000, 4096, 5 * 1000**3), Shape("llama2-7b", 1, 20_000, 1024, 5 * 1000**3)


# ---- data ------------------------------------------------------------------------------------------------


def linear_modules(ckpt_dir: Path) -> list[tuple[str, tuple[int, int]]]:
    """(module path, (out, in)) of every linear weight but embeddings and the head."""
    from spectra_cli.checkpoint.naming import module_path
    from spectra_cli.checkpoint.source import open_checkpoint

    out = []
    for t in open_checkpoint(ckpt_dir).tensors:
        if len(t.shape) == 2 and ".layers." in t.name:
            out.append((module_path(t.name), (int(t.shape[0]), int(t.shape[1]))))
    return out


def write_adapters(ckpt_dir: Path, root: Path, n: int, rank: int) -> list[Path]:
    """``n`` PEFT LoRA adapters of rank ``rank`` on every linear module, α = r (s = 1), A's entries N(0, 0.02²)
    and B's N(0, c²) with c = 1.2·(√out + √in)/√(out·in): ΔW's σ are then ≈ 1.2× the base's largest
    (0.02·(√out + √in) for N(0, 0.02²) entries), so compare finds intruders among the top 10."""
    from spectra_cli.checkpoint.writers import LoraFactors, write_lora_adapter

    mods = linear_modules(ckpt_dir)
    paths = []
    for k in range(1, n + 1):
        rng = np.random.default_rng(1000 + k)
        factors = {
            m: LoraFactors((0.02 * rng.standard_normal((rank, i))).astype(np.float32),
                           (1.2 * (o**0.5 + i**0.5) / (o * i) ** 0.5 * rng.standard_normal((o, rank))
                            ).astype(np.float32), float(rank))
            for m, (o, i) in mods
        }  # fmt: skip
        path = root / f"adapter{k}"
        path.mkdir(parents=True, exist_ok=True)
        write_lora_adapter(path, factors, base=str(ckpt_dir))
        paths.append(path)
    return paths


def write_embeddings(path: Path, rows: int, cols: int, seed: int = 7) -> None:
    """An N×K float32 ``.npy`` with a decaying spectrum (Z = G·diag(d), d_j = 1/√(1+j)), written in blocks."""
    rng = np.random.default_rng(seed)
    decay = (1.0 / np.sqrt(1.0 + np.arange(cols))).astype(np.float32)
    out = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.float32, shape=(rows, cols))
    step = max(1, (64 << 20) // (4 * cols))
    for a in range(0, rows, step):
        b = min(rows, a + step)
        out[a:b] = rng.standard_normal((b - a, cols), dtype=np.float32) * decay
    out.flush()
    del out
    os.replace(path.with_suffix(".tmp.npy"), path)


def dataset(root: Path, s: Shape, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Generate (or reuse) the checkpoint, the adapters and the embedding file under ``root``."""
    stamp = root / "dataset.json"
    want = {"preset": s.preset, "layers": s.layers, "rows": s.rows, "cols": s.cols, "rank": RANK,
            "adapters": ADAPTERS, "version": 2}  # fmt: skip
    ckpt, emb = root / "model", root / "embeddings.npy"
    adapters = [root / f"adapter{k}" for k in range(1, ADAPTERS + 1)]
    if stamp.is_file() and json.loads(stamp.read_text()).get("spec") == want:
        return {"checkpoint": ckpt, "adapters": adapters, "embeddings": emb, "generated_s": 0.0}
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    dims, _ = PRESETS[s.preset]
    log(f"writing {s.preset} × {s.layers} layers to {ckpt} (random bf16) …")
    make_llama_like(ckpt, s.layers, 0, s.shard_bytes, dims, device)
    log(f"writing {ADAPTERS} rank-{RANK} adapters and a {s.rows}×{s.cols} embedding file …")
    write_adapters(ckpt, root, ADAPTERS, RANK)
    write_embeddings(emb, s.rows, s.cols)
    gen = time.perf_counter() - t0
    stamp.write_text(json.dumps({"spec": want, "seconds": gen}))
    return {"checkpoint": ckpt, "adapters": adapters, "embeddings": emb, "generated_s": gen}


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def warm(paths: list[Path]) -> None:
    """Read every file once (page cache warm, as the targets assume)."""
    for p in paths:
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


# ---- checks ----------------------------------------------------------------------------------------------


@dataclass
class Check:
    command: str
    what: str
    measured: float
    tolerance: float
    passed: bool


def _rel(a: np.ndarray, b: np.ndarray, ref: np.ndarray | None = None) -> float:
    den = float(np.linalg.norm(b if ref is None else ref))
    return float(np.linalg.norm(a - b)) / den if den > 0 else float(np.linalg.norm(a - b))


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from spectra_cli.checkpoint.source import open_checkpoint
    from spectra_cli.checkpoint.tensors import to_float

    ck = open_checkpoint(path)
    return {t.name: to_float(ck.read(t), np.float64).reshape(t.shape) for t in ck.tensors}


def check_values(ckpt: Path, dev: dict[str, Any]) -> list[Check]:
    from spectra_cli.checkpoint.loader import MatrixLoader
    from spectra_cli.checkpoint.matrices import Selection, select_matrices
    from spectra_cli.checkpoint.source import open_checkpoint
    from spectra_cli.options import EngineOptions
    from spectra_cli.spectral.engine import resolve, singular_values

    ck = open_checkpoint(ckpt)
    specs, _ = select_matrices(ck, Selection())

    def run(**o: Any) -> dict[str, np.ndarray]:
        eng = resolve(EngineOptions(**o))
        loader = MatrixLoader(ck)
        return {v.spec.name: v.values for v in singular_values(specs, eng, loader.load, loader.chunks)}

    ref = run(device="cpu", backend="numpy", method="gram")
    out = []
    for method, key in (("gram", "values_gram"), ("svd", "values_svd")):
        got = run(method=method, **dev)
        err = max(float(np.max(np.abs(got[n] - ref[n]))) / float(ref[n][0]) for n in ref)
        out.append(Check("analyze", f"σ, --method {method}, {len(ref)} matrices: max |Δσ|/σ₁", err,
                         TOLERANCES[key], err <= TOLERANCES[key]))  # fmt: skip
    return out


def check_allocate(ckpt: Path, dev: dict[str, Any]) -> Check:
    from spectra_cli.flows.allocate import AllocateOptions, run_allocate

    ref = run_allocate(ckpt, AllocateOptions(budget_rank=8, device="cpu", backend="numpy")).ranks
    got = run_allocate(ckpt, AllocateOptions(budget_rank=8, **dev)).ranks
    diff = max(abs(got.get(m, 0) - r) for m, r in ref.items())
    ok = diff <= TOLERANCES["allocate"] and sum(got.values()) == sum(ref.values()) and set(got) == set(ref)
    return Check("allocate", f"ranks (energy, budget 8), {len(ref)} modules: max |Δrank|", diff,
                 TOLERANCES["allocate"], ok)  # fmt: skip


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


@contextlib.contextmanager
def watching(owner: Any, name: str, on_device: Callable[..., bool]) -> Iterator[list[bool]]:
    """Records, for each call of ``owner.name`` while the block runs, whether ``on_device(*args)`` held (its
    arrays were torch tensors: the device route ran)."""
    seen: list[bool] = []
    real = getattr(owner, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        seen.append(bool(on_device(*args, out)))
        return out

    setattr(owner, name, spy)
    try:
        yield seen
    finally:
        setattr(owner, name, real)


def _route(command: str, seen: list[bool], what: str) -> Check:
    off = sum(1 for x in seen if not x) + (0 if seen else 1)
    return Check(command, f"device route: {what} ({len(seen)} in all) not on the device", off, 0, off == 0)


def check_compare(ckpt: Path, adapter: Path, dev: dict[str, Any]) -> list[Check]:
    import spectra_cli.flows.compare_sides as sides
    from spectra_cli.flows.compare import CompareOptions, run_compare

    kinds = ("q_proj", "gate_proj", "down_proj")  # square, tall and wide: the CPU reference stays short

    def rows(**o: Any) -> dict[str, dict[str, Any]]:
        return {r["name"]: r for r in run_compare(ckpt, [("a", adapter)], CompareOptions(kinds=kinds, **o)).rows}

    ref = rows(device="cpu", backend="numpy")
    with watching(sides, "max_abs_cosines", lambda u0, ut, out: _is_tensor(u0) and _is_tensor(ut)) as seen:
        got = rows(**dev)
    # an intruder count may differ only where a max |cos| is within 1e-6 of ε (none expected)
    bad = sum(1 for n in ref if ref[n]["intruders"] != got[n]["intruders"]
              and min(abs(c - 0.5) for c in ref[n]["max_cos"]) > 1e-6)  # fmt: skip
    total = sum(r["intruders"] for r in ref.values())
    drift = 0.0
    for n in ref:
        for key in ("relative_delta", "subspace_overlap", "effective_rank_change"):
            a, b = float(got[n][key]), float(ref[n][key])
            drift = max(drift, abs(a - b) / max(abs(b), 1e-12))
    return [
        Check("compare", f"intruder counts (ε 0.5, {total} in all), {len(ref)} modules: modules that differ",
              bad, 0, bad == 0),
        Check("compare", "drift (relative_delta, subspace_overlap, erank change): max relative difference", drift,
              TOLERANCES["compare_drift"], drift <= TOLERANCES["compare_drift"]),
        _route("compare", seen, "cosine matrices |U₀ᵀU_t|"),
    ]  # fmt: skip


def check_init(ckpt: Path, tmp: Path, dev: dict[str, Any]) -> list[Check]:
    from spectra_cli.flows.init_adapter import InitOptions, run_init

    outs = {}
    for tag, o in (("cpu", {"device": "cpu", "backend": "numpy"}), ("dev", dev)):
        outs[tag] = tmp / f"init-{tag}"
        run_init(ckpt, outs[tag], InitOptions(method="pissa", rank=RANK, force=True, **o))
    ad = {k: _tensors(v / "adapter" / "adapter_model.safetensors") for k, v in outs.items()}
    mods = sorted(n[: -len(".lora_A.weight")] for n in ad["cpu"] if n.endswith(".lora_A.weight"))
    f_err = max(_rel(ad["dev"][m + ".lora_B.weight"] @ ad["dev"][m + ".lora_A.weight"],
                     ad["cpu"][m + ".lora_B.weight"] @ ad["cpu"][m + ".lora_A.weight"]) for m in mods)  # fmt: skip
    rc, rd = _tensors(outs["cpu"] / "residual"), _tensors(outs["dev"] / "residual")
    changed = [n for n in rc if any(n.startswith(m.removeprefix("base_model.model.")) for m in mods)]
    r_err = max(_rel(rd[n], rc[n]) for n in changed)
    return [
        Check("init-adapter", f"pissa r={RANK}, {len(mods)} modules: max ‖ΔBA‖_F/‖BA‖_F", f_err,
              TOLERANCES["init_factors"], f_err <= TOLERANCES["init_factors"]),
        Check("init-adapter", f"residual (bf16), {len(changed)} tensors: max ‖ΔR‖_F/‖R‖_F", r_err,
              TOLERANCES["init_residual"], r_err <= TOLERANCES["init_residual"]),
    ]  # fmt: skip


def _method_on_device(method: Any, updates: Any, *rest: Any) -> bool:
    if updates[0].shape[0] == 1:  # a bias or norm, merged on the host by design
        return True
    out = rest[-1].update
    arrays = [x for u in [*updates, out] for x in (u.dense, u.B, u.A) if x is not None]
    return all(_is_tensor(x) for x in arrays)


def check_merge(ckpt: Path, adapters: list[Path], tmp: Path, dev: dict[str, Any]) -> list[Check]:
    from spectra_cli.flows.merge import MergeOptions, run_merge
    from spectra_cli.spectral.merge import MergeMethod

    checks = []
    seen: list[bool] = []
    # tsv on every module (SVDs, Procrustes); ties on q_proj only (elementwise on the dense updates: the
    # CPU reference of a whole 7B layer would take minutes)
    for method, kinds in (("tsv", ()), ("ties", ("q_proj",))):
        outs = {}
        for tag, o in (("cpu", {"device": "cpu", "backend": "numpy"}), ("dev", dev)):
            outs[tag] = tmp / f"merge-{method}-{tag}"
            opts = MergeOptions(method=method, kinds=kinds, **o)
            with watching(MergeMethod, "__call__", _method_on_device) as calls:
                run_merge(ckpt, [(p.name, p) for p in adapters], outs[tag], opts, force=True)
            if tag == "dev":
                seen += calls
        base, mc, md = _tensors(ckpt), _tensors(outs["cpu"]), _tensors(outs["dev"])
        changed = [n for n in base if not np.array_equal(mc[n], base[n])]
        err = max(_rel(md[n], mc[n], mc[n] - base[n]) for n in changed)
        checks.append(Check("merge", f"{method} of {len(adapters)} adapters, {len(changed)} tensors: max "
                                     "‖ΔM‖_F/‖M−W₀‖_F", err, TOLERANCES["merge"], err <= TOLERANCES["merge"]))  # fmt: skip
        for tag in ("cpu", "dev"):
            shutil.rmtree(outs[tag], ignore_errors=True)
    return [*checks, _route("merge", seen, "merge calls given and giving device tensors")]


def check_rankme(emb: Path, dev: dict[str, Any]) -> Check:
    from spectra_cli.flows.rankme import RankmeOptions, run_rankme

    ref = run_rankme([("e", emb)], RankmeOptions(device="cpu", backend="numpy")).rows[0]
    got = run_rankme([("e", emb)], RankmeOptions(**dev)).rows[0]
    keys = [k for k in ("rankme", "effective_rank", "numerical_rank") if k in ref]
    err = max(abs(float(got[k]) - float(ref[k])) / max(abs(float(ref[k])), 1e-12) for k in keys)
    return Check("rankme", f"{', '.join(keys)}: max relative difference", err, TOLERANCES["rankme"],
                 err <= TOLERANCES["rankme"])  # fmt: skip


# ---- timings ---------------------------------------------------------------------------------------------


def timed(argv: list[str], log_path: Path) -> dict[str, Any]:
    """Run ``python -m spectra_cli ARGV`` as its own process: wall seconds, peak RSS, exit code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "spectra_cli", *argv], stdout=log, stderr=log, env=env,
                                cwd=ROOT)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "rc": proc.returncode,
            "log": str(log_path)}  # fmt: skip


def timings(data: dict[str, Any], tmp: Path, device_args: list[str]) -> dict[str, dict[str, Any]]:
    ck, ads, emb = str(data["checkpoint"]), [str(a) for a in data["adapters"]], str(data["embeddings"])
    json_out = ["--format", "json", "--output"]
    steps = {
        "analyze": ["analyze", ck, *json_out, str(tmp / "analyze.json")],
        "compare": ["compare", ck, ads[0], *json_out, str(tmp / "compare.json")],
        "init-adapter": ["init-adapter", ck, "--method", "pissa", "--rank", str(RANK), "--out", str(tmp / "init"),
                         "--force", *json_out, str(tmp / "init.json")],
        "merge": ["merge", ck, *ads, "--method", "tsv", "--out", str(tmp / "merge"), "--force", *json_out,
                  str(tmp / "merge.json")],
        "rankme": ["rankme", emb, *json_out, str(tmp / "rankme.json")],
    }  # fmt: skip
    out = {}
    for name, argv in steps.items():
        full = [*argv, *device_args]
        res = timed(full, tmp / f"{name}.log")
        target = TARGETS[name]
        out[name] = {"argv": ["spectra", *full], **res, "target_s": target}
        for p in (tmp / "init", tmp / "merge"):  # free the disk before the next step
            shutil.rmtree(p, ignore_errors=True)
    return out


# ---- main ------------------------------------------------------------------------------------------------


def machine(cuda: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "numpy": np.__version__, "cpus": os.cpu_count(), "platform": platform.platform()}  # fmt: skip
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1024**3, 1), cuda=torch.version.cuda)
    return info


def table(checks: list[Check], times: dict[str, dict[str, Any]], small: bool) -> str:
    lines = [f"{'command':<13} {'check':<74} {'measured':>10} {'tol':>8} {'ok':>3} {'seconds':>8} "
             f"{'target':>7} {'RSS MB':>8}"]  # fmt: skip
    commands = list(dict.fromkeys([c.command for c in checks] + list(times)))
    for cmd in commands:
        cs = [c for c in checks if c.command == cmd] or [None]
        t = times.get(cmd)
        for i, c in enumerate(cs):
            first = i == 0 and t is not None
            sec = f"{t['seconds']:.1f}" + ("" if t["rc"] == 0 else f" rc={t['rc']}") if first and t else ""
            tgt = (f"{t['target_s']:.0f}" if t and t["target_s"] and not small else "–") if first else ""
            rss = f"{t['peak_rss_mb']:.0f}" if first and t else ""
            what = c.what[:74] if c else ""
            meas = f"{c.measured:.2e}" if c else ""
            tol = f"{c.tolerance:g}" if c else ""
            ok = ("yes" if c.passed else "NO") if c else ""
            lines.append(f"{cmd if i == 0 else '':<13} {what:<74} {meas:>10} {tol:>8} {ok:>3} {sec:>8} {tgt:>7} {rss:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="no GPU: the device side is PyTorch on the CPU")
    ap.add_argument("--small", action="store_true", help="a tiny checkpoint instead of LLaMA-2-7B shapes")
    ap.add_argument("--work", type=Path, default=None, help="data folder (default benchmarks/data/gpu_check-*)")
    ap.add_argument("--json", type=Path, default=None, help="results (default benchmarks/results/gpu_check*.json)")
    ap.add_argument("--skip-checks", action="store_true", help="timings only")
    ap.add_argument("--skip-timings", action="store_true", help="checks only")
    a = ap.parse_args(argv)
    tag = ("-small" if a.small else "-7b") + ("-cpu" if a.cpu else "")
    work = a.work or ROOT / "benchmarks" / "data" / f"gpu_check{tag}"
    json_path = a.json or ROOT / "benchmarks" / "results" / f"gpu_check{tag}.json"

    def log(msg: str) -> None:
        print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    import torch

    cuda = not a.cpu
    if cuda and not torch.cuda.is_available():
        log("no CUDA device here (or a CPU-only PyTorch); run with --cpu [--small] to check the code paths on the CPU")
        return 2
    dev = {"device": "cuda", "backend": "torch"} if cuda else {"device": "cpu", "backend": "torch"}
    device_args = ["--device", dev["device"], "--backend", "torch"]
    timed_shape, check_shape = shapes(a.small)
    t_start = time.perf_counter()
    data = dataset(work / "timed", timed_shape, "cuda" if cuda else "cpu", log)
    check_data = data if check_shape == timed_shape else dataset(work / "check", check_shape, "cuda" if cuda else "cpu", log)
    checks: list[Check] = []
    times: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check-", dir=work) as tmpname:
        tmp = Path(tmpname)
        if not a.skip_checks:
            ck, ads = check_data["checkpoint"], check_data["adapters"]
            steps: list[tuple[str, Callable[[], Any]]] = [
                ("analyze", lambda: check_values(ck, dev)),
                ("allocate", lambda: check_allocate(ck, dev)),
                ("compare", lambda: check_compare(ck, ads[0], dev)),
                ("init-adapter", lambda: check_init(ck, tmp, dev)),
                ("merge", lambda: check_merge(ck, ads, tmp, dev)),
                ("rankme", lambda: check_rankme(check_data["embeddings"], dev)),
            ]
            for name, fn in steps:
                log(f"check {name} …")
                t0 = time.perf_counter()
                try:
                    got = fn()
                except Exception as e:  # a crash on the device is a failed check, reported with the others
                    got = Check(name, f"raised {type(e).__name__}: {e}"[:200], float("nan"), 0, False)
                checks.extend(got if isinstance(got, list) else [got])
                log(f"check {name}: {time.perf_counter() - t0:.1f} s")
            shutil.rmtree(tmp / "init-cpu", ignore_errors=True)
        if not a.skip_timings:
            log("warming the page cache …")
            warm([data["checkpoint"], *data["adapters"], data["embeddings"]])
            log("timings …")
            times = timings(data, tmp, device_args)
            for t in times.values():
                t.pop("log", None)
    ok_checks = all(c.passed for c in checks)
    ok_runs = all(t["rc"] == 0 for t in times.values())
    result = {
        "mode": {"device": dev["device"], "backend": "torch", "small": a.small},
        "machine": machine(cuda),
        "data": {"checkpoint": {"preset": timed_shape.preset, "layers": timed_shape.layers,
                                "bytes": size_of(data["checkpoint"])},
                 "adapters": {"count": ADAPTERS, "rank": RANK, "bytes": size_of(data["adapters"][0])},
                 "embeddings": {"rows": timed_shape.rows, "cols": timed_shape.cols, "dtype": "float32"},
                 "check_checkpoint": {"preset": check_shape.preset, "layers": check_shape.layers},
                 "generated_s": round(data["generated_s"] + (check_data["generated_s"] if check_data is not data
                                                             else 0.0), 1)},
        "tolerances": TOLERANCES,
        "checks": [c.__dict__ for c in checks],
        "timings": times,
        "targets_met": {n: (t["rc"] == 0 and t["seconds"] <= t["target_s"]) if t["target_s"] and not a.small else None
                        for n, t in times.items()},
        "passed": ok_checks and ok_runs,
        "seconds": round(time.perf_counter() - t_start, 1),
    }  # fmt: skip
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(table(checks, times, a.small))
    print(f"\n{'PASSED' if result['passed'] else 'FAILED'} in {result['seconds']} s; JSON: {json_path}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
