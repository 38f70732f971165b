"""``analyze``: the flow of one run — open, select, plan, stream, measure, summarise. No printing, no CLI."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.loader import MatrixLoader
from spectra_cli.checkpoint.matrices import MatrixSpec, Skipped, select_matrices
from spectra_cli.checkpoint.source import Checkpoint, checkpoint_inputs, open_checkpoint
from spectra_cli.checkpoint.spectra_file import (
    SPECTRA_FORMAT,
    saved_matrices,
    saved_values,
    write_spectra_file,
)
from spectra_cli.errors import SelectionError
from spectra_cli.options import EngineOptions, SelectionOptions
from spectra_cli.results import RunResult
from spectra_cli.spectral.engine import ResolvedEngine, engine_info, resolve, singular_values
from spectra_cli.spectral.metrics import compute_metrics


@dataclass(frozen=True)
class AnalyzeOptions(SelectionOptions, EngineOptions):
    """Options of ``analyze`` (the CLI flags of the same names; ``.engine`` gives the compute ones)."""

    split_fused: bool = False


@dataclass
class AnalysisResult(RunResult):
    """Rows (one dict per matrix), a model-level summary, and the singular values of every matrix."""

    skipped: list[Skipped] = field(default_factory=list)
    spectra: dict[str, np.ndarray] = field(default_factory=dict)
    matrices: list[dict[str, Any]] = field(default_factory=list)

    def save_spectra(self, path: str | Path) -> None:
        """Write every matrix's singular values (float64) to a safetensors file that ``analyze`` can read back."""
        write_spectra_file(path, self.spectra, self.matrices, str(self.inputs.get("checkpoint", "")),
                           self.options, int(self.summary.get("skipped_tensors", 0)))  # fmt: skip


def _spec_meta(spec: MatrixSpec) -> dict[str, Any]:
    return {
        "name": spec.name, "tensor": spec.tensor.name, "shape": list(spec.shape), "dtype": spec.dtype_name,
        "depth": spec.depth, "kind": spec.kind, "role": spec.role, "note": spec.note,
    }  # fmt: skip


def _row(
    meta: dict[str, Any], values: np.ndarray | None, nan: int, inf: int, precision: str
) -> dict[str, Any]:
    m, n = meta["shape"]
    row: dict[str, Any] = {
        "name": meta["name"], "depth": meta["depth"], "kind": meta["kind"], "role": meta["role"],
        "shape": f"{m}x{n}", "rows": m, "cols": n, "params": m * n, "dtype": meta["dtype"],
    }  # fmt: skip
    if values is None:
        row.update(status="nonfinite", nan_count=nan, inf_count=inf)
    else:
        row.update(status="ok", nan_count=0, inf_count=0)
        row.update(compute_metrics(values, (m, n), precision).as_dict())
        row["effective_rank_ratio"] = row["effective_rank"] / min(m, n)
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
    specs, skipped = select_matrices(ckpt, opts.selection(opts.split_fused))
    eng = resolve(opts.engine)
    loader = MatrixLoader(ckpt)
    rows: list[dict[str, Any]] = []
    spectra: dict[str, np.ndarray] = {}
    metas: list[dict[str, Any]] = []
    total = len(specs)
    compute_s = 0.0
    for i, mv in enumerate(singular_values(specs, eng, loader.load, loader.chunks)):
        meta = _spec_meta(mv.spec)
        meta.update(nan_count=mv.nan_count, inf_count=mv.inf_count)
        metas.append(meta)
        rows.append(_row(meta, mv.values, mv.nan_count, mv.inf_count, eng.precision))
        compute_s += mv.seconds
        if mv.values is not None:
            spectra[mv.spec.name] = mv.values
        if progress:
            progress(i + 1, total, mv.spec.name)
    order = {s.name: k for k, s in enumerate(specs)}
    rows.sort(key=lambda r: order[r["name"]])
    metas.sort(key=lambda r: order[r["name"]])
    inputs = checkpoint_inputs(ckpt)
    summary = summarize(rows, skipped)
    summary["engine"] = engine_info(eng)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["decompose_seconds"] = round(compute_s, 3)
    return AnalysisResult(rows, summary, inputs, _options_dict(opts, eng), skipped, spectra, metas)






def _options_dict(opts: AnalyzeOptions, eng: ResolvedEngine | None) -> dict[str, Any]:
    d = asdict(opts)
    for k in ("include", "exclude", "kinds"):
        d[k] = list(d[k])
    if eng is not None:
        d["resolved"] = engine_info(eng)
    return d






def _from_saved(
    ckpt: Checkpoint, opts: AnalyzeOptions, t0: float, progress: Callable[[int, int, str], None] | None
) -> AnalysisResult:
    chosen, saved_opts = saved_matrices(ckpt, opts.selection())
    if not chosen:
        raise SelectionError(f"{ckpt.path}: no saved spectra selected after filters")
    precision = saved_opts.get("precision", "float32")
    loader_rows, spectra = [], {}
    for i, m in enumerate(chosen):
        values = saved_values(ckpt, m["name"])
        if values is not None:
            spectra[m["name"]] = values
        loader_rows.append(_row(m, values, int(m.get("nan_count", 0)), int(m.get("inf_count", 0)), precision))
        if progress:
            progress(i + 1, len(chosen), m["name"])
    summary = summarize(loader_rows, [])
    summary["skipped_tensors"] = int(ckpt.metadata.get("skipped_tensors", "0") or 0)
    summary["engine"] = {"source": "saved spectra", **saved_opts.get("resolved", {})}
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    inputs = checkpoint_inputs(ckpt)
    inputs["spectra_of"] = ckpt.metadata.get("source")
    # the options the spectra were computed with, and this call's selection
    options = {
        **saved_opts,
        **{
            k: v
            for k, v in _options_dict(opts, None).items()
            if k in {"include", "exclude", "kinds", "min_dim"}
        },
    }
    return AnalysisResult(loader_rows, summary, inputs, options, [], spectra, chosen)


# ---- the model-level summary ---------------------------------------------------------------------------------


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else None


def summarize(rows: list[dict[str, Any]], skipped: list[Skipped]) -> dict[str, Any]:
    """Totals, means by kind, the most extreme layers, and the NaN/Inf report."""
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] != "ok"]
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in ok:
        by_kind[r["kind"]].append(r)
    kinds = {
        k: {
            "count": len(rs),
            "effective_rank": _mean([r["effective_rank"] for r in rs]),
            "effective_rank_ratio": _mean([r["effective_rank_ratio"] for r in rs]),
            "stable_rank": _mean([r["stable_rank"] for r in rs]),
            "alpha": _mean([r["alpha"] for r in rs]),
            "spectral_norm": _mean([r["spectral_norm"] for r in rs]),
        }
        for k, rs in sorted(by_kind.items())
    }
    fitted = [r for r in ok if math.isfinite(r["alpha"])]

    def pick(rs: list[dict[str, Any]], key: str, reverse: bool, n: int = 5) -> list[dict[str, Any]]:
        return [
            {"name": r["name"], key: r[key]} for r in sorted(rs, key=lambda r: r[key], reverse=reverse)[:n]
        ]

    return {
        "matrices": len(rows),
        "analysed": len(ok),
        "params": int(sum(r["params"] for r in rows)),
        "skipped_tensors": len(skipped),
        "nonfinite": [
            {"name": r["name"], "nan_count": r["nan_count"], "inf_count": r["inf_count"]} for r in bad
        ],
        "over_trained": sum(1 for r in ok if r["alpha_flag"] == "over-trained"),
        "under_trained": sum(1 for r in ok if r["alpha_flag"] == "under-trained"),
        "mean_alpha": _mean([r["alpha"] for r in fitted]),
        "mean_alpha_weighted": _mean([r["alpha_weighted"] for r in fitted]),
        "mean_log_norm": _mean([r["log_norm"] for r in ok]),
        "mean_effective_rank_ratio": _mean([r["effective_rank_ratio"] for r in ok]),
        "lowest_alpha": pick(fitted, "alpha", False),
        "highest_alpha": pick(fitted, "alpha", True),
        "lowest_effective_rank_ratio": pick(ok, "effective_rank_ratio", False),
        "by_kind": kinds,
    }


__all__ = ["AnalysisResult", "AnalyzeOptions", "run_analyze", "summarize"]
