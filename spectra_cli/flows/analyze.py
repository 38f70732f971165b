"""``analyze``: the flow of one run — open, select, plan, stream, measure, summarise. No printing, no CLI."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from spectra_cli.checkpoint.loader import MatrixLoader
from spectra_cli.checkpoint.matrices import MatrixSpec, Selection, Skipped, count_excluded, select_matrices
from spectra_cli.checkpoint.source import Checkpoint, checkpoint_inputs, open_checkpoint
from spectra_cli.checkpoint.spectra_file import (
    SPECTRA_FORMAT,
    saved_matrices,
    saved_values,
    write_spectra_file,
)
from spectra_cli.errors import SelectionError
from spectra_cli.options import EngineOptions, SelectionOptions
from spectra_cli.results import OMIT_NONE, RunResult, options_record
from spectra_cli.spectral.engine import ResolvedEngine, engine_info, resolve, singular_values
from spectra_cli.spectral.fits import FitOptions
from spectra_cli.spectral.metrics import compute_metrics
from spectra_cli.spectral.rmt import RMTOptions


@dataclass(frozen=True)
class AnalyzeOptions(SelectionOptions, EngineOptions):
    """Options of ``analyze`` (the CLI flags of the same names; ``.engine`` gives the compute ones)."""

    split_fused: bool = False
    #: the opt-in random-matrix diagnostics (``--mp-fit``, ``--randomize``, ``--detx``, ``--seed``); None: none
    rmt: RMTOptions | None = None
    #: ``--fit`` / ``--fix-fingers`` / ``--xmax``: an extra tail fit (``fit_*`` columns); None: the default α only
    fit: FitOptions | None = None

    @property
    def diagnostics(self) -> bool:
        """Whether any opt-in diagnostic (RMT columns or another fit) was asked for."""
        return (self.rmt is not None and self.rmt.any) or self.fit is not None


class KindStats(TypedDict):
    """Means over the analysed matrices of one kind (``by_kind``)."""

    count: int
    effective_rank: float | None
    effective_rank_ratio: float | None
    stable_rank: float | None
    alpha: float | None
    spectral_norm: float | None


class NonfiniteMatrix(TypedDict):
    name: str
    nan_count: int
    inf_count: int


@dataclass(frozen=True)
class AnalyzeSummary:
    """The model-level summary of ``analyze``. ``matrices``: the matrices selected; ``excluded``: the weight
    matrices the selection flags left out, ``excluded_by`` those flags (``["--kinds query,value"]``). ``lowest_alpha`` / ``highest_alpha`` /
    ``lowest_effective_rank_ratio``: up to five ``{"name", <metric>}`` records; ``engine``: the resolved engine
    (or ``{"source": "saved spectra", …}``); ``decompose_seconds`` is absent when the spectra were read back."""

    matrices: int
    analysed: int
    params: int
    skipped_tensors: int
    excluded: int
    excluded_by: list[str]
    nonfinite: list[NonfiniteMatrix]
    over_trained: int
    under_trained: int
    small_tail: int
    mean_alpha: float | None
    mean_alpha_weighted: float | None
    mean_log_norm: float | None
    mean_effective_rank_ratio: float | None
    lowest_alpha: list[dict[str, Any]]
    highest_alpha: list[dict[str, Any]]
    lowest_effective_rank_ratio: list[dict[str, Any]]
    by_kind: dict[str, KindStats]
    engine: dict[str, Any]
    seconds: float
    decompose_seconds: float | None = field(default=None, metadata=OMIT_NONE)
    #: with ``--mp-fit``: matrices with spikes above the MP edge; with ``--randomize``: matrices with correlation
    #: traps and the traps in all
    spiked: int | None = field(default=None, metadata=OMIT_NONE)
    trapped: int | None = field(default=None, metadata=OMIT_NONE)
    correlation_traps: int | None = field(default=None, metadata=OMIT_NONE)
    #: with a diagnostic flag: matrices whose fit reading is not ``ok`` (``fit_reliability`` with ``--fit``…,
    #: else ``alpha_reliability``)
    unreliable_fits: int | None = field(default=None, metadata=OMIT_NONE)


@dataclass
class AnalysisResult(RunResult[AnalyzeSummary]):
    """Rows (one dict per matrix), a model-level summary, and the singular values of every matrix."""

    skipped: list[Skipped] = field(default_factory=list)
    spectra: dict[str, np.ndarray] = field(default_factory=dict)
    matrices: list[dict[str, Any]] = field(default_factory=list)
    #: with ``--randomize``: the singular values of each matrix with its entries permuted
    rand_spectra: dict[str, np.ndarray] = field(default_factory=dict)

    def save_spectra(self, path: str | Path) -> None:
        """Write every matrix's singular values (float64) to a safetensors file that ``analyze`` can read back."""
        write_spectra_file(path, self.spectra, self.matrices, str(self.inputs.get("checkpoint", "")),
                           self.options, self.summary.skipped_tensors)  # fmt: skip


@dataclass(frozen=True)
class AnalyzePlan:
    """What one run will decompose: the opened checkpoint, the selected matrices (read order), the tensors
    left out, and the resolved engine."""

    ckpt: Checkpoint
    specs: list[MatrixSpec]
    skipped: list[Skipped]
    engine: ResolvedEngine
    excluded: int = 0


@dataclass
class Measured:
    """What streaming the matrices gave: rows and metas in plan order, the spectra, the decomposition time."""

    rows: list[dict[str, Any]]
    metas: list[dict[str, Any]]
    spectra: dict[str, np.ndarray]
    decompose_seconds: float


def spec_meta(spec: MatrixSpec) -> dict[str, Any]:
    return {
        "name": spec.name, "tensor": spec.tensor.name, "shape": list(spec.shape), "dtype": spec.dtype_name,
        "depth": spec.depth, "kind": spec.kind, "role": spec.role, "note": spec.note,
    }  # fmt: skip


def value_metrics(values: np.ndarray, shape: tuple[int, int], precision: str) -> dict[str, Any]:
    """The metrics of one matrix from its singular values (the columns of an ``ok`` row)."""
    d: dict[str, Any] = compute_metrics(values, shape, precision).as_dict()
    d["effective_rank_ratio"] = d["effective_rank"] / min(shape)
    return d


def matrix_row(
    meta: dict[str, Any], values: np.ndarray | None, nan: int, inf: int, precision: str,
    metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One analyze row; ``metrics`` (from :func:`value_metrics`, e.g. kept in a cache) saves computing them."""
    m, n = meta["shape"]
    row: dict[str, Any] = {
        "name": meta["name"], "depth": meta["depth"], "kind": meta["kind"], "role": meta["role"],
        "shape": f"{m}x{n}", "rows": m, "cols": n, "params": m * n, "dtype": meta["dtype"],
    }  # fmt: skip
    if values is None:
        row.update(status="nonfinite", nan_count=nan, inf_count=inf)
    else:
        row.update(status="ok", nan_count=0, inf_count=0)
        row.update(metrics if metrics is not None else value_metrics(values, (m, n), precision))
    row["note"] = meta["note"]
    return row


def run_analyze(
    path: str | Path,
    options: AnalyzeOptions | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> AnalysisResult:
    """Analyse every selected weight matrix of the checkpoint at ``path``.

    ``progress(done, total, name)`` is called after each matrix. ``path`` may also be a file written by
    :meth:`AnalysisResult.save_spectra`, in which case nothing is recomputed.
    """
    opts = options or AnalyzeOptions()
    t0 = time.perf_counter()
    ckpt = open_checkpoint(path)
    if ckpt.metadata.get("format") == SPECTRA_FORMAT:
        return _from_saved(ckpt, opts, t0, progress)
    p = plan_analyze(ckpt, opts)
    got = measure(p, progress)
    rand = _rmt(p, got, opts.rmt, progress) if opts.rmt is not None and opts.rmt.any else {}
    if opts.diagnostics:
        _fits(got.rows, got.spectra, opts.fit, progress)
    summary = summarize(got.rows, len(p.skipped), engine_info(p.engine), round(time.perf_counter() - t0, 3),
                        round(got.decompose_seconds, 3), (p.excluded, opts.selection().filters))  # fmt: skip
    return AnalysisResult(got.rows, summary, checkpoint_inputs(ckpt), _options_dict(opts, p.engine), p.skipped,
                          got.spectra, got.metas, rand)  # fmt: skip


def _rmt(p: AnalyzePlan, got: Measured, rmt: RMTOptions, progress: Callable[[int, int, str], None] | None
         ) -> dict[str, np.ndarray]:  # fmt: skip
    from spectra_cli.flows.analyze_rmt import add_rmt_columns, random_spectra

    rand: dict[str, np.ndarray] = {}
    if rmt.randomize:
        rand, seconds = random_spectra(p.specs, p.engine, MatrixLoader(p.ckpt), rmt.seed, progress)
        got.decompose_seconds += seconds
    add_rmt_columns(got.rows, got.spectra, rand, rmt)
    if rmt.vectors:
        from spectra_cli.flows.analyze_rmt import add_vector_columns

        add_vector_columns(got.rows, p.specs, MatrixLoader(p.ckpt), p.engine)
    return rand


def _fits(rows: list[dict[str, Any]], spectra: dict[str, np.ndarray], fit: FitOptions | None,
          progress: Callable[[int, int, str], None] | None) -> None:  # fmt: skip
    from spectra_cli.flows.analyze_rmt import add_fit_columns

    if fit is None:
        add_fit_columns(rows, spectra, None)
        return
    for i, r in enumerate(rows):  # one row at a time: a truncated power law takes a second or more per matrix
        add_fit_columns([r], spectra, fit)
        if progress:
            progress(i + 1, len(rows), f"{fit.fit} fit {r['name']}")


def plan_analyze(ckpt: Checkpoint, opts: AnalyzeOptions) -> AnalyzePlan:
    """Select the matrices and resolve the engine; nothing is read or decomposed."""
    sel = opts.selection(opts.split_fused)
    specs, skipped = select_matrices(ckpt, sel)
    return AnalyzePlan(ckpt, specs, skipped, resolve(opts.engine), count_excluded(ckpt, sel, len(specs)))


def measure(p: AnalyzePlan, progress: Callable[[int, int, str], None] | None = None) -> Measured:
    """Stream the planned matrices through the engine (each read once) and measure each spectrum."""
    loader = MatrixLoader(p.ckpt)
    got = Measured([], [], {}, 0.0)
    for i, mv in enumerate(singular_values(p.specs, p.engine, loader.load, loader.chunks)):
        meta = spec_meta(mv.spec)
        meta.update(nan_count=mv.nan_count, inf_count=mv.inf_count)
        got.metas.append(meta)
        got.rows.append(matrix_row(meta, mv.values, mv.nan_count, mv.inf_count, p.engine.precision))
        got.decompose_seconds += mv.seconds
        if mv.values is not None:
            got.spectra[mv.spec.name] = mv.values
        if progress:
            progress(i + 1, len(p.specs), mv.spec.name)
    order = {s.name: k for k, s in enumerate(p.specs)}
    got.rows.sort(key=lambda r: order[r["name"]])
    got.metas.sort(key=lambda r: order[r["name"]])
    return got


def _options_dict(opts: AnalyzeOptions, eng: ResolvedEngine | None) -> dict[str, Any]:
    d = options_record(opts)
    for key in ("rmt", "fit"):
        if d.get(key) is None:
            d.pop(key, None)
    if eng is not None:
        d["resolved"] = engine_info(eng)
    return d


def _from_saved(
    ckpt: Checkpoint, opts: AnalyzeOptions, t0: float, progress: Callable[[int, int, str], None] | None
) -> AnalysisResult:
    chosen, saved_opts = saved_matrices(ckpt, opts.selection())
    every, _ = saved_matrices(ckpt, Selection())
    if not chosen:
        raise SelectionError(f"{ckpt.path}: no saved spectra selected after filters")
    precision = saved_opts.get("precision", "float32")
    loader_rows, spectra = [], {}
    for i, m in enumerate(chosen):
        values = saved_values(ckpt, m["name"])
        if values is not None:
            spectra[m["name"]] = values
        nan, inf = int(m.get("nan_count", 0)), int(m.get("inf_count", 0))
        loader_rows.append(matrix_row(m, values, nan, inf, precision))
        if progress:
            progress(i + 1, len(chosen), m["name"])
    if opts.rmt is not None and opts.rmt.any:
        if opts.rmt.randomize or opts.rmt.vectors:
            raise SelectionError(f"{ckpt.path}: --randomize and --vectors need the weights, not saved spectra; "
                                 "run it on the checkpoint")  # fmt: skip
        from spectra_cli.flows.analyze_rmt import add_rmt_columns

        add_rmt_columns(loader_rows, spectra, {}, opts.rmt)
    if opts.diagnostics:
        _fits(loader_rows, spectra, opts.fit, progress)
    summary = summarize(
        loader_rows, int(ckpt.metadata.get("skipped_tensors", "0") or 0),
        {"source": "saved spectra", **saved_opts.get("resolved", {})}, round(time.perf_counter() - t0, 3),
        excluded=(len(every) - len(chosen), opts.selection().filters),
    )  # fmt: skip
    inputs = checkpoint_inputs(ckpt)
    inputs["spectra_of"] = ckpt.metadata.get("source")
    # the options the spectra were computed with, and this call's selection
    options = {
        **saved_opts,
        **{
            k: v
            for k, v in _options_dict(opts, None).items()
            if k in {"include", "exclude", "kinds", "roles", "min_dim"}
        },
    }
    return AnalysisResult(loader_rows, summary, inputs, options, [], spectra, chosen)


# ---- the model-level summary ---------------------------------------------------------------------------------


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else None


def summarize(rows: list[dict[str, Any]], skipped_tensors: int, engine: dict[str, Any], seconds: float,
              decompose_seconds: float | None = None, excluded: tuple[int, list[str]] = (0, [])
              ) -> AnalyzeSummary:  # fmt: skip
    """Totals, means by kind, the most extreme layers, and the NaN/Inf report. ``excluded``: how many weight
    matrices the selection left out, and by which flags."""
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] != "ok"]
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in ok:
        by_kind[r["kind"]].append(r)
    kinds = {
        k: KindStats(
            count=len(rs),
            effective_rank=_mean([r["effective_rank"] for r in rs]),
            effective_rank_ratio=_mean([r["effective_rank_ratio"] for r in rs]),
            stable_rank=_mean([r["stable_rank"] for r in rs]),
            alpha=_mean([r["alpha"] for r in rs]),
            spectral_norm=_mean([r["spectral_norm"] for r in rs]),
        )
        for k, rs in sorted(by_kind.items())
    }
    fitted = [r for r in ok if math.isfinite(r["alpha"])]

    def pick(rs: list[dict[str, Any]], key: str, reverse: bool, n: int = 5) -> list[dict[str, Any]]:
        return [
            {"name": r["name"], key: r[key]} for r in sorted(rs, key=lambda r: r[key], reverse=reverse)[:n]
        ]

    return AnalyzeSummary(
        matrices=len(rows),
        analysed=len(ok),
        params=int(sum(r["params"] for r in rows)),
        skipped_tensors=skipped_tensors,
        excluded=excluded[0],
        excluded_by=list(excluded[1]) if excluded[0] else [],
        nonfinite=[
            NonfiniteMatrix(name=r["name"], nan_count=r["nan_count"], inf_count=r["inf_count"]) for r in bad
        ],
        over_trained=sum(1 for r in ok if r["alpha_flag"] == "over-trained"),
        under_trained=sum(1 for r in ok if r["alpha_flag"] == "under-trained"),
        small_tail=sum(1 for r in ok if r["alpha_flag"] == "small-tail"),
        mean_alpha=_mean([r["alpha"] for r in fitted]),
        mean_alpha_weighted=_mean([r["alpha_weighted"] for r in fitted]),
        mean_log_norm=_mean([r["log_norm"] for r in ok]),
        mean_effective_rank_ratio=_mean([r["effective_rank_ratio"] for r in ok]),
        lowest_alpha=pick(fitted, "alpha", False),
        highest_alpha=pick(fitted, "alpha", True),
        lowest_effective_rank_ratio=pick(ok, "effective_rank_ratio", False),
        by_kind=kinds,
        engine=engine,
        seconds=seconds,
        decompose_seconds=decompose_seconds,
        spiked=sum(1 for r in ok if r.get("num_spikes", 0) > 0) if any("num_spikes" in r for r in ok) else None,
        trapped=sum(1 for r in ok if r.get("num_traps", 0) > 0) if any("num_traps" in r for r in ok) else None,
        correlation_traps=sum(int(r.get("num_traps", 0)) for r in ok) if any("num_traps" in r for r in ok) else None,
        unreliable_fits=_unreliable(ok),
    )


def _unreliable(ok: list[dict[str, Any]]) -> int | None:
    key = "fit_reliability" if any("fit_reliability" in r for r in ok) else "alpha_reliability"
    if not any(key in r for r in ok):
        return None
    return sum(1 for r in ok if r.get(key, "ok") != "ok")


__all__ = [
    "AnalysisResult",
    "AnalyzeOptions",
    "AnalyzePlan",
    "AnalyzeSummary",
    "matrix_row",
    "measure",
    "plan_analyze",
    "run_analyze",
    "spec_meta",
    "summarize",
    "value_metrics",
]  # fmt: skip
