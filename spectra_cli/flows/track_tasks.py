"""``spectra track``'s units of work: small picklable task specs and the module-level pure functions that run
them, in this process or on a Ray worker (:mod:`spectra_cli.flows.executor`).

A spec holds paths, matrix names and options, never arrays; its function opens the checkpoints (headers only),
reads each matrix it covers once, and returns small results: singular values (float64) and per-matrix
comparison metrics. With a cache folder the function also writes its results there (one atomic file per
checkpoint it covered), so that an interrupted run keeps every finished task.

Two kinds of task:

- :class:`ValuesTask` (no ``--base``, no ``--against previous``): the singular values of some matrices of one
  checkpoint (one task per checkpoint shard), through the analyze engine (batched, within the memory budget).
- :class:`CompareTask`: some matrices (one task per layer) across a sequence of checkpoints in step order.
  Each base matrix is read and decomposed once per task, each checkpoint's matrix once; the previous
  checkpoint's matrix and SVD are still in memory when the next one is compared with it, so step-to-step
  comparisons read nothing twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.loader import MatrixLoader
from spectra_cli.checkpoint.matrices import MatrixSpec, Selection, select_matrices
from spectra_cli.checkpoint.source import Checkpoint, open_checkpoint
from spectra_cli.checkpoint.spectra_cache import CachedMatrix, SpectraCache
from spectra_cli.checkpoint.tuned import Tuned, open_tuned
from spectra_cli.flows.analyze import spec_meta, value_metrics
from spectra_cli.flows.compare import intruder_fields
from spectra_cli.options import EngineOptions
from spectra_cli.spectral.compare import SVD, drift, intruder_dimensions, svd_function
from spectra_cli.spectral.engine import (
    ResolvedEngine,
    blas_threads,
    nonfinite_counts,
    resolve,
    singular_values,
)
from spectra_cli.spectral.linalg import singular_values as exact_values


@dataclass(frozen=True)
class Source:
    """One checkpoint as a task sees it: the run's name for it, its path, and its identity key (the cache's).
    ``adapter``: a PEFT LoRA adapter checkpoint, whose matrices are the base's plus s·B·A."""

    name: str
    path: str
    key: str
    adapter: bool = False


@dataclass(frozen=True)
class ValuesTask:
    """Singular values of ``matrices`` (names as :func:`select_matrices` gives them) of one checkpoint."""

    source: Source
    matrices: tuple[str, ...]
    selection: Selection
    engine: EngineOptions
    cache: str | None = None
    settings: str = ""


@dataclass(frozen=True)
class CompareTask:
    """``matrices`` across ``sources`` (step order). ``emit[i]`` False: source i is read only as the previous
    checkpoint of source i+1 (its own results are known already). ``base``: compare each with it;
    ``against_previous``: compare each with the source before it."""

    matrices: tuple[str, ...]
    sources: tuple[Source, ...]
    emit: tuple[bool, ...]
    base: Source | None
    against_previous: bool
    selection: Selection
    engine: EngineOptions
    top_k: int = 10
    epsilons: tuple[float, ...] = (0.5,)
    cache: str | None = None
    settings: str = ""


@dataclass(frozen=True)
class TaskOutput:
    """What one task returns: per checkpoint key, its matrices' results."""

    results: dict[str, list[CachedMatrix]]


def pick(ckpt: Checkpoint, selection: Selection, names: tuple[str, ...] | None = None) -> dict[str, MatrixSpec]:
    """The selected matrices of ``ckpt`` by name (those in ``names`` when given), in read order."""
    specs, _ = select_matrices(ckpt, selection)
    wanted = set(names) if names is not None else None
    return {s.name: s for s in specs if wanted is None or s.name in wanted}


def _with_metrics(r: CachedMatrix, precision: str) -> CachedMatrix:
    """``r`` with analyze's metrics of its values, computed here (in the worker) and kept in the cache."""
    if r.values is None:
        return r
    return replace(r, metrics=value_metrics(r.values, tuple(r.record["shape"]), precision))


def _record(spec: MatrixSpec, nan: int, inf: int) -> dict[str, Any]:
    return {**spec_meta(spec), "nan_count": nan, "inf_count": inf}


def _save(cache: str | None, settings: str, out: dict[str, list[CachedMatrix]], sources: dict[str, Source]) -> None:
    if cache is None:
        return
    c = SpectraCache(cache, settings)
    for key, results in out.items():
        if results:
            c.store(key, sources[key].path, results)


def values_task(task: ValuesTask) -> TaskOutput:
    """The singular values of the task's matrices, streamed through the analyze engine (each read once)."""
    ckpt = open_checkpoint(task.source.path)
    specs = list(pick(ckpt, task.selection, task.matrices).values())
    eng = resolve(task.engine)
    loader = MatrixLoader(ckpt)
    results = [
        _with_metrics(CachedMatrix(_record(mv.spec, mv.nan_count, mv.inf_count), mv.values), task.engine.precision)
        for mv in singular_values(specs, eng, loader.load, loader.chunks)
    ]
    out = {task.source.key: results}
    _save(task.cache, task.settings, out, {task.source.key: task.source})
    return TaskOutput(out)


def pair_metrics(ref: SVD, w_ref: np.ndarray, svd_t: SVD, w_t: np.ndarray, top_k: int,
                 epsilons: tuple[float, ...], eng: ResolvedEngine) -> dict[str, Any]:  # fmt: skip
    """compare's intruder and drift fields of W_t against a reference W (the base, or the previous checkpoint);
    the per-vector lists (``max_cos``, ``intruder_sigmas``) are left out of track's rows."""
    k = min(top_k, ref.s.size)
    intr = intruder_dimensions(ref.u, svd_t.u[:, :k], svd_t.s[:k], epsilons)
    delta = exact_values(w_t.astype(np.float64) - w_ref.astype(np.float64), backend=eng.compute)
    d = drift(ref.s, svd_t.s, np.asarray(delta, dtype=np.float64), ref.u[:, :k], svd_t.u[:, :k])
    fields = intruder_fields(intr, epsilons)
    for drop in ("max_cos", "intruder_sigmas"):
        fields.pop(drop, None)
    fields.update(asdict(d))
    return fields


def compare_task(task: CompareTask) -> TaskOutput:
    """Each of the task's matrices across its checkpoints, with the base and/or the previous checkpoint."""
    eng = resolve(task.engine)
    svd = svd_function(eng.compute, eng.precision)
    dtype: type[np.floating] = np.float64 if eng.precision == "float64" else np.float32
    base_specs: dict[str, MatrixSpec] = {}
    base_loader = None
    if task.base is not None:
        base_ck = open_checkpoint(task.base.path)
        base_specs = pick(base_ck, task.selection, task.matrices)
        base_loader = MatrixLoader(base_ck)
    ckpts = {s.key: open_checkpoint(s.path) for s in task.sources if not s.adapter}
    specs = {k: pick(c, task.selection, task.matrices) for k, c in ckpts.items()}
    loaders = {k: MatrixLoader(c) for k, c in ckpts.items()}
    adapters: dict[str, Tuned] = {}
    for s in task.sources:
        if s.adapter:
            adapters[s.key] = open_tuned(s.name, Path(s.path), base_ck, list(base_specs.values()), True)
            specs[s.key] = {n: sp for n, sp in base_specs.items() if adapters[s.key].covers(n)}
    out: dict[str, list[CachedMatrix]] = {s.key: [] for s, e in zip(task.sources, task.emit, strict=True) if e}
    for name in task.matrices:
        ref0: tuple[np.ndarray, SVD] | None = None
        if base_loader is not None and name in base_specs:
            b = base_specs[name]
            with blas_threads(b.shape):
                w0 = base_loader.dense(b, dtype)
                ref0 = (w0, svd(w0)) if not sum(nonfinite_counts(w0)) else None
        prev: tuple[str, np.ndarray, SVD] | None = None
        prev_key: str | None = None
        for src, emit in zip(task.sources, task.emit, strict=True):
            spec = specs[src.key].get(name)
            if spec is None:
                prev, prev_key = None, src.key
                continue
            with blas_threads(spec.shape):
                if src.adapter:
                    if ref0 is None:
                        prev, prev_key = None, src.key
                        continue
                    w = _adapted(adapters[src.key], spec, ref0[0], dtype)
                else:
                    w = loaders[src.key].dense(spec, dtype)
                nan, inf = nonfinite_counts(w)
                s_t = svd(w) if not (nan or inf) else None
                if emit:
                    out[src.key].append(_compared(task, spec, w, s_t, nan, inf, ref0, prev, prev_key, eng))
            prev = (src.key, w, s_t) if s_t is not None else None
            prev_key = src.key
    _save(task.cache, task.settings, out, {s.key: s for s in task.sources})
    return TaskOutput(out)


def _adapted(t: Tuned, spec: MatrixSpec, w0: np.ndarray, dtype: type[np.floating]) -> np.ndarray:
    """W₀ + s·B·A of an adapter's module, in the base matrix's logical orientation (as compare builds it)."""
    mod = t.modules[spec.name]
    assert t.adapter is not None
    b, a = t.adapter.factors(mod)
    delta = mod.scale * (b @ a)
    if mod.transposed != spec.transposed:
        delta = delta.T
    return (w0.astype(np.float64) + delta).astype(dtype, copy=False)


def _compared(task: CompareTask, spec: MatrixSpec, w: np.ndarray, s_t: SVD | None, nan: int, inf: int,
              ref0: tuple[np.ndarray, SVD] | None, prev: tuple[str, np.ndarray, SVD] | None,
              prev_key: str | None, eng: ResolvedEngine) -> CachedMatrix:  # fmt: skip
    record = _record(spec, nan, inf)
    base_key = task.base.key if task.base else None
    previous_key = prev_key if task.against_previous else None
    if s_t is None:
        return CachedMatrix(record, None, base_key, None, previous_key, None)
    vs_base = vs_prev = None
    if ref0 is not None and ref0[0].shape == w.shape:
        vs_base = pair_metrics(ref0[1], ref0[0], s_t, w, task.top_k, task.epsilons, eng)
    if task.against_previous and prev is not None and prev[1].shape == w.shape:
        vs_prev = pair_metrics(prev[2], prev[1], s_t, w, task.top_k, task.epsilons, eng)
    return _with_metrics(CachedMatrix(record, np.asarray(s_t.s, dtype=np.float64), base_key, vs_base, previous_key,
                                      vs_prev), task.engine.precision)  # fmt: skip


__all__ = ["CompareTask", "Source", "TaskOutput", "ValuesTask", "compare_task", "pair_metrics", "pick",
           "values_task"]  # fmt: skip
