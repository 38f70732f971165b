"""``compare``: what fine-tuning did to the weights — per module, for one or more tuned models.

Flow: open the base and every tuned input (full checkpoints matched by tensor name and shape, or PEFT LoRA
adapters applied per module on the fly) → for each selected base matrix, read it and take its SVD once →
for each tuned model build W_t (W₀ + s·B·A for adapters), take its SVD, and measure intruder dimensions
and drift → rows (one per tuned × matrix) and a summary per tuned model. One module of all inputs is in
memory at a time. No printing.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from spectra_cli.checkpoint import torch_tensors as tt
from spectra_cli.checkpoint.loader import MatrixLoader, prefetched
from spectra_cli.checkpoint.matrices import MatrixSpec, select_matrices
from spectra_cli.checkpoint.source import Checkpoint, open_checkpoint
from spectra_cli.checkpoint.tensors import to_float
from spectra_cli.checkpoint.tuned import Tuned, open_tuned
from spectra_cli.errors import BudgetError, SelectionError, SpectraError
from spectra_cli.options import ComputeOptions, EngineOptions, SelectionOptions
from spectra_cli.results import RunResult
from spectra_cli.spectral.compare import (
    SVD,
    Intruders,
    drift,
    factored_values,
    intruder_dimensions,
    svd_function,
)
from spectra_cli.spectral.engine import (
    ResolvedEngine,
    blas_threads,
    nonfinite_counts,
    resolve,
)
from spectra_cli.spectral.linalg import NUMPY, Backend, singular_values


@dataclass(frozen=True)
class CompareOptions(SelectionOptions, ComputeOptions):
    """Options of ``compare`` (the CLI flags of the same names)."""

    top_k: int = 10
    epsilons: tuple[float, ...] = (0.5,)
    allow_missing: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        eps = self.epsilons
        object.__setattr__(self, "epsilons", (eps,) if isinstance(eps, float | int) else tuple(eps))
        if self.top_k < 1:
            raise SpectraError(f"--top-k {self.top_k}: must be at least 1")
        if not self.epsilons:
            raise SpectraError("--epsilon: give at least one threshold in (0, 1]")
        for e in self.epsilons:
            if not 0 < e <= 1:
                raise SpectraError(f"--epsilon {e:g}: every epsilon must be in (0, 1]")




@dataclass
class ModuleResult:
    """Everything computed for one (tuned, base matrix): kept for plots and for intruder removal."""

    tuned: str
    spec: MatrixSpec
    intruders: Intruders
    svd_tuned: SVD
    s_base: np.ndarray


class DriftGroup(TypedDict):
    """Means over the compared matrices of one kind or one depth."""

    matrices: int
    intruders: int
    relative_delta: float | None
    subspace_overlap: float | None
    effective_rank_change: float | None


class WorstModule(TypedDict):
    name: str
    intruders: int
    min_max_cos: float


class TunedSummary(TypedDict):
    """One tuned input's part of the summary: ``total_intruders`` per ε (keys ``f"{ε:g}"``), the five modules
    with most intruders, drift by kind and by depth (keys ``str(depth)``), the tensors skipped as missing."""

    source: str
    matrices: int
    nonfinite: int
    total_intruders: dict[str, int]
    matrices_with_intruders: int
    mean_relative_delta: float | None
    mean_subspace_overlap: float | None
    worst_modules: list[WorstModule]
    by_kind: dict[str, DriftGroup]
    by_depth: dict[str, DriftGroup]
    missing: list[str]


@dataclass(frozen=True)
class CompareSummary:
    """The summary of ``compare``: the ε values and one :class:`TunedSummary` per tuned input (by name)."""

    epsilons: list[float]
    tuned: dict[str, TunedSummary]
    seconds: float


@dataclass
class CompareResult(RunResult[CompareSummary]):
    """Rows (one per tuned × matrix), a summary per tuned model, and what plots and writers need."""

    modules: list[ModuleResult] = field(default_factory=list)
    tuned: list[Tuned] = field(default_factory=list)
    base: Checkpoint | None = None


@dataclass(frozen=True)
class ComparePlan:
    """The opened inputs and what will be compared: the base, the tuned inputs (matched to it), the selected
    base matrices some input changes (read order), the resolved engine and the compute dtype."""

    base: Checkpoint
    tuned: list[Tuned]
    work: list[MatrixSpec]
    engine: ResolvedEngine
    dtype: type[np.floating]

    @property
    def pairs(self) -> int:
        """How many (tuned, matrix) comparisons the run makes."""
        return sum(1 for s in self.work for t in self.tuned if t.covers(s.name))


def _tuned_matrix(t: Tuned, spec: MatrixSpec, w0: np.ndarray, loaders: dict[str, MatrixLoader],
                  dtype: type[np.floating], be: Backend = NUMPY) -> tuple[np.ndarray, Callable[[], np.ndarray], int]:  # fmt: skip
    """(W_t in the logical orientation, a function giving σ(ΔW), NaN/Inf count of the tuned side).
    ΔW's values come from the factors for adapters; nothing is decomposed before the finiteness check."""
    if t.adapter is not None:
        mod = t.modules[spec.name]
        b, a = t.adapter.factors(mod)
        bad = _nonfinite(b) + _nonfinite(a)
        delta = mod.scale * (b @ a)
        if mod.transposed != spec.transposed:
            delta = delta.T
        return (w0 + delta).astype(dtype, copy=False), lambda: factored_values(b, a, mod.scale, be), bad
    info = t.tensors[spec.name]
    wt = loaders[t.name].dense(dataclasses.replace(spec, tensor=info), dtype)
    return wt, lambda: singular_values(wt.astype(np.float64) - w0.astype(np.float64), backend=be), _nonfinite(wt)


def _check_budget(work: Sequence[MatrixSpec], n_tuned: int, budget: int) -> None:
    """One module of every input is in memory at once, plus two thin SVDs' workspace."""
    for spec in work:
        m, n = spec.shape
        need = 8 * m * n * (4 + n_tuned) + 16 * min(m, n) ** 2
        if need > budget:
            raise BudgetError(
                f"{spec.name} ({m}×{n}) needs about {need / 2**20:.0f} MB with {n_tuned} tuned input(s), over the "
                f"memory budget of {budget / 2**20:.0f} MB; raise --max-memory or compare fewer models at once"
            )


def _nonfinite(x: np.ndarray) -> int:
    return sum(nonfinite_counts(x))


OnModule = Callable[[Tuned, MatrixSpec, np.ndarray, SVD, Intruders], None]


def run_compare(
    base_path: str | Path,
    tuned_inputs: Sequence[tuple[str, str | Path]],
    options: CompareOptions | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    keep_modules: bool = False,
    on_module: OnModule | None = None,
    on_open: Callable[[list[Tuned], Checkpoint], None] | None = None,
) -> CompareResult:
    """Compare every tuned input against the base. ``tuned_inputs`` are (name, path) pairs.

    ``on_open(tuned, base)`` is called once the inputs are opened and matched; ``on_module(tuned, spec, W_t,
    svd_t, intruders)`` after each (tuned, matrix) with the tuned matrix still in memory (used to write
    mitigated weights without reading anything twice)."""
    opts = options or CompareOptions()
    t0 = time.perf_counter()
    p = plan_compare(base_path, tuned_inputs, opts)
    if on_open:
        on_open(p.tuned, p.base)
    rows, kept = measure(p, opts, progress, keep_modules, on_module)
    summary = summarize(rows, p.tuned, opts.epsilons, round(time.perf_counter() - t0, 3))
    inputs = {
        "base": str(p.base.path),
        "tuned": [
            {
                "name": t.name,
                "path": str(t.path),
                "kind": t.kind,
                "matrices": sum(1 for r in rows if r["tuned"] == t.name),
                "missing": t.missing,
            }
            for t in p.tuned
        ],
    }
    opts_dict = asdict(opts)
    opts_dict["epsilons"] = list(opts.epsilons)
    opts_dict["resolved"] = {"device": p.engine.device, "backend": p.engine.backend, "precision": p.engine.precision}
    return CompareResult(rows, summary, inputs, opts_dict, kept, p.tuned, p.base)


def plan_compare(
    base_path: str | Path, tuned_inputs: Sequence[tuple[str, str | Path]], opts: CompareOptions
) -> ComparePlan:
    """Open the base and the tuned inputs, match them, choose the matrices some input changes, resolve the
    engine and check the memory budget; nothing is decomposed."""
    if not tuned_inputs:
        raise SelectionError("compare needs at least one tuned checkpoint or adapter")
    names = [n for n, _ in tuned_inputs]
    if len(set(names)) != len(names):
        raise SelectionError(
            f"tuned inputs need distinct names (got {', '.join(names)}); name them NAME=PATH"
        )
    base = open_checkpoint(base_path)
    specs, _ = select_matrices(base, opts.selection())
    tuned = [open_tuned(n, Path(p), base, specs, opts.allow_missing) for n, p in tuned_inputs]
    work = [s for s in specs if any(t.covers(s.name) for t in tuned)]
    if not work:
        raise SelectionError(
            "no selected base matrix is changed by any tuned input (check --kinds / --include)"
        )
    dtype: type[np.floating] = np.float64 if opts.precision == "float64" else np.float32
    eng = resolve(EngineOptions(device=opts.device, precision=opts.precision, method="svd", backend=opts.backend,
                               max_memory=opts.max_memory))  # fmt: skip
    _check_budget(work, len(tuned), eng.budget)
    return ComparePlan(base, tuned, work, eng, dtype)


def measure(
    p: ComparePlan,
    opts: CompareOptions,
    progress: Callable[[int, int, str], None] | None = None,
    keep_modules: bool = False,
    on_module: OnModule | None = None,
) -> tuple[list[dict[str, Any]], list[ModuleResult]]:
    """Stream the planned matrices: each base matrix read and decomposed once, then every tuned input's version
    of it; returns the rows (one per tuned × matrix) and the per-module results."""
    svd = svd_function(p.engine.compute, p.engine.precision)
    base_loader = MatrixLoader(p.base)
    loaders = {t.name: MatrixLoader(t.checkpoint) for t in p.tuned if t.checkpoint is not None}
    rows: list[dict[str, Any]] = []
    kept: list[ModuleResult] = []
    total = p.pairs
    done = 0
    on_torch = p.engine.backend == "torch"

    def read(s: MatrixSpec) -> tuple[np.ndarray, Any]:  # the base, and on torch its stored bytes (pinned for CUDA)
        raw = base_loader.load(s)
        w = to_float(raw, p.dtype).reshape(s.stored_2d)
        return (w.T if s.transposed else w), (tt.stage(raw, p.engine.device) if on_torch else None)

    # the next base matrix is read on a background thread while this one is decomposed
    for spec, (w0, host) in prefetched(p.work, read):
        with blas_threads(spec.shape):  # see engine.SMALL_WORK
            bad0 = _nonfinite(w0)
            if host is not None and not bad0:  # moved in its stored dtype, upcast on the device
                x = tt.upload(host, p.engine.device, tt.torch_dtype(p.engine.precision)).reshape(spec.stored_2d)
                host = x.T if spec.transposed else x
            base_svd = svd(w0 if host is None else host) if not bad0 else None
            for t in p.tuned:
                if not t.covers(spec.name):
                    continue
                row = _meta(t, spec)
                wt, delta_values, bad_t = _tuned_matrix(t, spec, w0, loaders, p.dtype, p.engine.compute)
                if base_svd is None or bad_t:
                    row.update(status="nonfinite", nonfinite_base=bad0, nonfinite_tuned=bad_t)
                else:
                    k = min(opts.top_k, base_svd.s.size)
                    svd_t = svd(wt)
                    intr = intruder_dimensions(base_svd.u, svd_t.u[:, :k], svd_t.s[:k], opts.epsilons)
                    d = drift(base_svd.s, svd_t.s, delta_values(), base_svd.u[:, :k], svd_t.u[:, :k])
                    row.update(intruder_fields(intr, opts.epsilons))
                    row.update(asdict(d))
                    if math.isinf(d.relative_delta):
                        row["note"] = "the base matrix is all zeros: ‖ΔW‖/‖W₀‖ is infinite"
                    row["status"] = "ok"
                    if on_module:
                        on_module(t, spec, wt, svd_t, intr)
                    top = (
                        SVD(svd_t.u[:, :k], svd_t.s, svd_t.vt[:k])
                        if keep_modules
                        else SVD(np.empty((0, 0)), svd_t.s, np.empty((0, 0)))
                    )
                    kept.append(ModuleResult(t.name, spec, intr, top, base_svd.s))
                rows.append(row)
                done += 1
                if progress:
                    progress(done, total, f"{t.name}: {spec.name}")
    return rows, kept


def _meta(t: Tuned, spec: MatrixSpec) -> dict[str, Any]:
    m, n = spec.shape
    row: dict[str, Any] = {
        "tuned": t.name, "name": spec.name, "depth": spec.depth, "kind": spec.kind, "role": spec.role,
        "shape": f"{m}x{n}", "source": t.kind,
    }  # fmt: skip
    if t.adapter is not None:
        mod = t.modules[spec.name]
        row.update(lora_rank=mod.rank, lora_scale=mod.scale)
    return row


def _eps_key(e: float) -> str:
    return f"intruders@{e:g}"


def intruder_fields(intr: Intruders, epsilons: Sequence[float]) -> dict[str, Any]:
    primary = float(epsilons[0])
    out: dict[str, Any] = {"intruders": intr.count(primary)}
    for e in epsilons:
        out[_eps_key(e)] = intr.count(float(e))
    out["intruder_ranks"] = intr.ranks[primary]
    out["intruder_sigmas"] = [float(intr.sigma[r - 1]) for r in intr.ranks[primary]]
    out["min_max_cos"] = float(intr.max_cos.min()) if intr.max_cos.size else 1.0
    out["max_cos"] = [round(float(c), 6) for c in intr.max_cos]
    return out


def _mean(xs: Sequence[float]) -> float | None:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def summarize(
    rows: list[dict[str, Any]], tuned: Sequence[Tuned], epsilons: Sequence[float], seconds: float
) -> CompareSummary:
    """Per tuned model: the paper's total intruder count (per ε), matrices with any intruder, the worst
    modules, and mean drift by kind and by depth."""
    per: dict[str, TunedSummary] = {}
    for t in tuned:
        rs = [r for r in rows if r["tuned"] == t.name and r["status"] == "ok"]
        by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
        by_depth: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for r in rs:
            by_kind[r["kind"]].append(r)
            by_depth[r["depth"]].append(r)

        def agg(group: list[dict[str, Any]]) -> DriftGroup:
            return DriftGroup(
                matrices=len(group),
                intruders=int(sum(r["intruders"] for r in group)),
                relative_delta=_mean([r["relative_delta"] for r in group]),
                subspace_overlap=_mean([r["subspace_overlap"] for r in group]),
                effective_rank_change=_mean([r["effective_rank_change"] for r in group]),
            )

        worst = sorted(rs, key=lambda r: (-r["intruders"], r["min_max_cos"]))[:5]
        per[t.name] = TunedSummary(
            source=t.kind,
            matrices=len(rs),
            nonfinite=sum(1 for r in rows if r["tuned"] == t.name and r["status"] != "ok"),
            total_intruders={f"{e:g}": int(sum(r[_eps_key(e)] for r in rs)) for e in epsilons},
            matrices_with_intruders=sum(1 for r in rs if r["intruders"] > 0),
            mean_relative_delta=_mean([r["relative_delta"] for r in rs]),
            mean_subspace_overlap=_mean([r["subspace_overlap"] for r in rs]),
            worst_modules=[
                WorstModule(name=r["name"], intruders=r["intruders"], min_max_cos=r["min_max_cos"])
                for r in worst
            ],
            by_kind={k: agg(v) for k, v in sorted(by_kind.items())},
            by_depth={
                str(k): agg(v)
                for k, v in sorted(by_depth.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
            },
            missing=t.missing,
        )
    return CompareSummary([float(e) for e in epsilons], per, seconds)


class IntruderRemover:
    """Writes W′ = W_t + (λ−1)·Σ_{j∈I} σⱼuⱼvⱼᵀ over each module's intruders (at the first ε).

    A full tuned checkpoint becomes a patched copy in the same layout (shards, index, config and tokenizer
    files copied; untouched tensors bit for bit); an adapter becomes an adapter whose changed modules have rank
    r + |I| (exact). With one tuned input the output is ``out``; with several, ``out/<name>``.
    """

    def __init__(self, out: Path, lam: float, epsilon: float, force: bool) -> None:
        self.out, self.lam, self.epsilon, self.force = Path(out), lam, epsilon, force
        self.stages: dict[str, tuple[Path, Path]] = {}
        self.copies: dict[str, Any] = {}
        self.extra: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self.changed: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.tuned: dict[str, Tuned] = {}
        self.root: Path | None = None  # one staging folder for everything, renamed at the end

    def open(self, tuned: list[Tuned], base: Checkpoint) -> None:
        from spectra_cli.checkpoint.writers import PatchedCopy, prepare_output

        inputs = [Path(base.path), *(Path(x.path) for x in tuned)]
        self.root = root = prepare_output(self.out, self.force, inputs)
        for t in tuned:
            stage = root if len(tuned) == 1 else root / t.name
            stage.mkdir(exist_ok=True)
            dest = self.out if len(tuned) == 1 else self.out / t.name
            self.stages[t.name] = (stage, dest)
            self.tuned[t.name] = t
            if t.checkpoint is not None:
                self.copies[t.name] = PatchedCopy(t.checkpoint, stage)
            else:
                self.extra[t.name] = {}

    def __call__(self, t: Tuned, spec: MatrixSpec, wt: np.ndarray, svd_t: SVD, intr: Intruders) -> None:
        from spectra_cli.spectral.compare import intruder_update

        ranks = intr.ranks[self.epsilon]
        if not ranks:
            return
        b, a = intruder_update(svd_t, ranks, self.lam)
        self.changed[t.name].append({"name": spec.name, "intruders": ranks})
        if t.adapter is not None:
            self.extra[t.name][t.modules[spec.name].path] = (b, a)
            return
        w_new = wt.astype(np.float64) + b @ a
        self.copies[t.name].patch(t.tensors[spec.name], w_new.T if spec.transposed else w_new)

    def commit(self, argv: list[str], inputs: dict[str, Any], options: dict[str, Any]) -> dict[str, str]:
        from spectra_cli.checkpoint.provenance import write_run_record
        from spectra_cli.checkpoint.writers import commit_output, write_adapter

        written: dict[str, str] = {}
        for name, (stage, dest) in self.stages.items():
            t = self.tuned[name]
            if t.adapter is not None:
                write_adapter(t.adapter, self.extra[name], stage)
            opts = {**options, "remove_intruders": self.lam, "epsilon": self.epsilon}
            extra = {"changed_modules": self.changed.get(name, [])}
            write_run_record(stage, "compare --remove-intruders", argv, inputs, opts, {}, [], extra)
            written[name] = str(dest)
        assert self.root is not None
        commit_output(self.root, self.out)
        return written

    def abort(self) -> None:
        import shutil

        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
