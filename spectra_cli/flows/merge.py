"""``merge``: combine n fine-tunes of one base, or store them reversibly by a shared basis (``reconstruct``,
in :mod:`spectra_cli.flows.reconstruct`, gets any one back).

Flow of ``merge``: open the base and every tuned input (full checkpoints matched by tensor name and shape, PEFT
LoRA adapters matched module by module, as ``compare`` does: :func:`spectra_cli.checkpoint.tuned.open_tuned`) →
for each selected base matrix build every task's update ΔWᵢ (full: W_t − W₀, dense; adapter: the factors
B·A with the scale s folded into B, never densified here) → either merge them with a registry method
(:data:`spectra_cli.spectral.merge.METHODS`) and write W₀ + ΔW_merged into a copy of the base in its own layout,
or (``rmm``) fit a per-module basis and write a *bundle* from which :func:`run_reconstruct` rebuilds any task (:mod:`spectra_cli.checkpoint.bundle` reads it).
One module of all n inputs is in memory at a time. No printing.

Bundle (a folder):
- ``basis.safetensors``: per module ``<tensor>.mean`` / ``<tensor>.basis.<k>`` (dense out×in, logical
  orientation) or, for factored updates, ``<tensor>.mean.B`` / ``.mean.A`` and ``<tensor>.basis.<k>.B`` /
  ``.A`` (B out×r, A r×in); per task the tensors that are not reconstructed from the basis, stored exactly:
  ``task.<name>.<tensor>`` (full inputs: every float tensor outside the merged matrices that differs from
  the base, e.g. biases and norms; adapters: their non-LoRA tensors such as ``modules_to_save``).
- ``coefficients.json``: tasks (name, kind, weight, source path, adapter config and per-module factor keys
  for adapters), per module p, the n×p coefficients, each task's relative reconstruction error, the
  singular values of the (centred) stack and the storage; the base's path and tensor shapes.
- ``spectra_run.json``: provenance.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.bundle import BUNDLE_FORMAT, BUNDLE_VERSION
from spectra_cli.checkpoint.loader import MatrixLoader
from spectra_cli.checkpoint.matrices import MatrixSpec, select_matrices
from spectra_cli.checkpoint.safetensors_io import write_safetensors
from spectra_cli.checkpoint.source import Checkpoint, open_checkpoint
from spectra_cli.checkpoint.tensors import RawTensor, TensorInfo, to_float
from spectra_cli.checkpoint.tuned import Tuned, open_tuned
from spectra_cli.errors import CheckpointError, SelectionError, ShapeMismatch, SpectraError
from spectra_cli.options import SelectionOptions
from spectra_cli.results import RunResult
from spectra_cli.spectral.engine import blas_threads, nonfinite_counts
from spectra_cli.spectral.merge import (
    GRAM_RTOL,
    METHODS,
    MergeMethod,
    MergeOutcome,
    RMMModule,
    Update,
    inner,
    interference,
    rmm_fit,
)

RMM = "rmm"
RMM_REFERENCE = "Reversible Model Merging (RMM), 2025: a shared per-module basis with per-task coefficients"
#: methods whose rule is elementwise, so it applies as such to biases and other non-matrix tensors
ELEMENTWISE = ("task-arithmetic", "ties")



def method_names() -> list[str]:
    """The ``--method`` choices: the registry's methods and ``rmm``."""
    return [*METHODS, RMM]


def method_lines() -> list[str]:
    """One line per method for ``--help`` and the docs: name, summary, parameters (default), reference."""
    lines = []
    for m in METHODS.values():
        params = ", ".join(f"{k}={d!r}" for k, (d, _) in m.params.items())
        lines.append(f"{m.name}: {m.summary} Parameters: {params or 'none'}. [{m.reference}]")
    lines.append(
        f"{RMM}: a per-module basis (--basis P or --energy τ, --center) and per-task coefficients, written as a "
        f"bundle; `spectra reconstruct` rebuilds any task (:mod:`spectra_cli.checkpoint.bundle` reads it). Saves space on full fine-tunes with --basis P < n (or "
        f"--energy τ < 1); on adapters the bundle is larger than the adapters (each basis element has about their "
        f"summed rank): use it there for the shared basis, not to save space. [{RMM_REFERENCE}]"
    )
    return lines


@dataclass(frozen=True)
class MergeOptions(SelectionOptions):
    """Options of ``merge`` (the CLI flags of the same names).

    ``weights``: one per task (default 1 each). ``params``: the method's parameters by name (see
    ``METHODS[name].params``). ``basis`` (p) or ``energy`` (τ): the rmm basis size per module; ``center``: fit
    the basis around the tasks' mean. ``sweep``: also compute error and storage for p = 1..n.
    ``interference_k``: the top-k left singular subspaces compared between tasks.
    """

    method: str = "task-arithmetic"
    weights: tuple[float, ...] | None = None
    params: tuple[tuple[str, Any], ...] = ()
    basis: int | None = None
    energy: float | None = None
    center: bool = True
    sweep: bool = False
    interference_k: int = 8
    precision: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in method_names():
            raise SpectraError(
                f"unknown merge method {self.method!r}; choose one of {', '.join(method_names())}"
            )
        if self.basis is not None and self.energy is not None:
            raise SpectraError("give either --basis or --energy, not both")
        if self.basis is not None and self.basis < 1:
            raise SpectraError(f"--basis {self.basis}: the basis size must be at least 1")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise SpectraError(f"--energy {self.energy}: the energy fraction must be in (0, 1]")
        if self.interference_k < 1:
            raise SpectraError("--interference-k must be at least 1")
        if self.weights is not None and not all(math.isfinite(w) for w in self.weights):
            shown = ",".join(f"{w:g}" for w in self.weights)
            raise SpectraError(f"--weights {shown}: every weight must be a finite number (no nan or inf)")
        if self.weights is not None and self.method not in (*ELEMENTWISE, RMM) and sum(self.weights) == 0:
            shown = ",".join(f"{w:g}" for w in self.weights)
            raise SpectraError(
                f"--weights {shown}: they sum to 0, and {self.method} gives the tensors outside the merged "
                "matrices the weighted mean Σwᵢ·Δᵢ / Σwᵢ; use weights with a non-zero sum"
            )
        if self.method != RMM:
            known = METHODS[self.method].params
            bad = [k for k, _ in self.params if k not in known]
            if bad:
                raise SpectraError(
                    f"{self.method} has no parameter {', '.join(bad)}; its parameters: {', '.join(known) or 'none'}"
                )

    def method_params(self) -> dict[str, Any]:
        """The method's parameters: registry defaults overridden by ``params``."""
        if self.method == RMM:
            return {}
        return METHODS[self.method].resolve_params(dict(self.params))


@dataclass
class MergeResult(RunResult):
    """Rows (one per module × task), a summary, and what the plots need."""

    out: Path | None = None
    tasks: list[str] = field(default_factory=list)
    cosine: np.ndarray | None = None  # n×n, mean over modules
    overlap: np.ndarray | None = None  # n×n, mean over modules
    sweep: dict[str, Any] | None = None


# ---- opening and matching -------------------------------------------------------------------------------


def _check_full(t: Tuned, base: Checkpoint) -> None:
    """A full fine-tune must have the base's tensors with the base's shapes (its architecture)."""
    assert t.checkpoint is not None
    mine = {x.name: x for x in t.checkpoint.tensors}
    for info in base.tensors:
        other = mine.get(info.name)
        if other is None and not info.is_float:
            continue  # an integer buffer (e.g. BERT's position_ids, which newer transformers do not save)
        if other is None:
            raise CheckpointError(
                f"{t.name}: tensor {info.name} of the base is missing from {t.path}; the models are of different "
                "architectures (merge needs fine-tunes of the same base)"
            )
        if other.shape != info.shape:
            raise ShapeMismatch(
                f"{t.name}: tensor {info.name} is {list(other.shape)} in {t.path} but {list(info.shape)} in the "
                "base; the models are of different architectures"
            )
    extra = sorted(set(mine) - {x.name for x in base.tensors})
    if extra:
        raise CheckpointError(
            f"{t.name}: {t.path} has tensors the base does not ({', '.join(extra[:3])}); the models are of "
            "different architectures"
        )


def open_inputs(
    base_path: str | Path, tuned_inputs: Sequence[tuple[str, str | Path]], opts: MergeOptions
) -> tuple[Checkpoint, list[MatrixSpec], list[Tuned]]:
    """Open the base and the n ≥ 2 tuned inputs; check they belong together. Returns the base, the selected
    matrices changed by any input (read order) and the opened inputs."""
    n = len(tuned_inputs)
    if n < 2:
        raise SelectionError(
            f"merge needs at least two tuned models (got {n}); give BASE and two or more NAME=PATH inputs"
        )
    names = [nm for nm, _ in tuned_inputs]
    if len(set(names)) != n:
        raise SelectionError(
            f"tuned inputs need distinct names (got {', '.join(names)}); name them NAME=PATH"
        )
    bad_names = [nm for nm in names if not re.fullmatch(r"[A-Za-z0-9_.+-]+", nm)]
    if bad_names:
        raise SelectionError(
            f"task names may use letters, digits and _.+- only (got {', '.join(bad_names)}); name them NAME=PATH"
        )
    if opts.weights is not None and len(opts.weights) != n:
        raise SelectionError(
            f"--weights has {len(opts.weights)} values for {n} tuned models; give one per model"
        )
    if opts.basis is not None and opts.basis > n:
        raise SelectionError(
            f"--basis {opts.basis} is larger than the number of tasks ({n}); p ≤ n vectors already span every task"
        )
    base = open_checkpoint(base_path)
    specs, _ = select_matrices(base, opts.selection())
    tuned = [open_tuned(nm, Path(p), base, specs, allow_missing=False) for nm, p in tuned_inputs]
    for t in tuned:
        if t.checkpoint is not None:
            _check_full(t, base)
    kinds = {t.kind for t in tuned}
    if opts.method == RMM and len(kinds) > 1:
        raise SelectionError(
            "rmm needs inputs of one kind (all full checkpoints or all adapters) so each task can be rebuilt as "
            "it came in; merge the adapters into their base first (or use another method)"
        )
    work = [s for s in specs if any(t.covers(s.name) for t in tuned)]
    if not work:
        raise SelectionError(
            "no selected base matrix is changed by any tuned input (check --kinds / --include)"
        )
    return base, work, tuned


def task_update(
    t: Tuned, spec: MatrixSpec, w0: np.ndarray | None, loader: MatrixLoader | None, dtype: type[np.floating]
) -> Update:
    """Task t's update of one matrix, logical out×in: full W_t − W₀ (dense), or the adapter's factors with
    the scale folded into B (B out×r, A r×in); a zero rank-1 update when an adapter leaves the module alone."""
    out, inp = spec.shape
    if t.adapter is not None:
        mod = t.modules.get(spec.name)
        if mod is None:
            return Update(B=np.zeros((out, 1), dtype), A=np.zeros((1, inp), dtype))
        b, a = t.adapter.factors(mod)
        if mod.transposed != spec.transposed:  # embedding: B·A is the transpose of the logical update
            return Update(B=(mod.scale * a.T).astype(dtype), A=np.ascontiguousarray(b.T, dtype))
        return Update(B=(mod.scale * b).astype(dtype), A=a.astype(dtype))
    assert w0 is not None and loader is not None
    info = t.tensors.get(spec.name)
    if info is None:
        return Update(dense=np.zeros((out, inp), dtype))
    wt = loader.dense(replace(spec, tensor=info), dtype)
    return Update(dense=(wt.astype(np.float64) - w0.astype(np.float64)).astype(dtype))


def _check_finite(x: np.ndarray, who: str, tensor: str, path: str | Path) -> None:
    """A NaN/Inf weight makes every merge statistic and every SVD meaningless: refuse it, naming where."""
    nan, inf = nonfinite_counts(x)
    if nan or inf:
        raise CheckpointError(
            f"{who}: {tensor} in {path} has {nan} NaN and {inf} Inf values; merging non-finite weights is "
            "meaningless, repair or leave out this input"
        )


def _check_update(u: Update, t: Tuned, spec: MatrixSpec) -> Update:
    for x in (u.dense, u.B, u.A):
        if x is not None:
            _check_finite(x, t.name, spec.tensor.name, t.path)
    return u


# ---- merge ----------------------------------------------------------------------------------------------


def _depth_kind(spec: MatrixSpec) -> dict[str, Any]:
    m, n = spec.shape
    return {"module": spec.name, "kind": spec.kind, "depth": spec.depth, "shape": f"{m}x{n}"}


def _rows_for_module(spec: MatrixSpec, tuned: list[Tuned], updates: list[Update], weights: list[float],
                     inter: dict[str, np.ndarray], errors: Sequence[float], kept: Sequence[float],
                     extra: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    n = len(tuned)
    cos, ov = inter["cosine"], inter["overlap"]
    rows = []
    for i, t in enumerate(tuned):
        others = [j for j in range(n) if j != i and inter["norms"][j] > 0]  # tasks that changed this module
        mod = t.modules.get(spec.name) if t.adapter is not None else None
        rows.append({
            **_depth_kind(spec), "task": t.name, "source": t.kind, "weight": weights[i],
            "lora_rank": mod.rank if mod is not None else None,
            "delta_norm": float(inter["norms"][i]),
            "rel_error": float(errors[i]), "kept": float(kept[i]),
            "max_cos": float(max(abs(cos[i, j]) for j in others)) if others else None,
            "mean_overlap": float(np.mean([ov[i, j] for j in others])) if others else None,
            **extra,
        })  # fmt: skip
    return rows


def _merge_errors(
    merged: Update, updates: list[Update], norms: np.ndarray
) -> tuple[list[float], list[float]]:
    """Per task: ‖M − ΔWᵢ‖_F/‖ΔWᵢ‖_F, and the share of ΔWᵢ the merged update keeps along it,
    ⟨M, ΔWᵢ⟩/‖ΔWᵢ‖² (1 when the merged update contains the task's own update unchanged). ``norms``: the
    ‖ΔWᵢ‖_F already known from :func:`interference` (not another pass over each update)."""
    mm = inner(merged, merged)
    errs, kept = [], []
    for u, nrm in zip(updates, norms, strict=True):
        uu = float(nrm) ** 2
        mu = inner(merged, u)
        if uu <= 0:
            errs.append(float("nan"))
            kept.append(float("nan"))
            continue
        errs.append(math.sqrt(max(mm - 2 * mu + uu, 0.0) / uu))
        kept.append(mu / uu)
    return errs, kept


def _interference(updates: list[Update], k: int) -> dict[str, np.ndarray]:
    m, n = updates[0].shape
    return {key: np.asarray(v, dtype=np.float64) for key, v in interference(updates, min(k, m, n)).items()}


def _rmm_live(updates: list[Update], live: np.ndarray, raw: int, basis: int | None, energy: float | None,
              center: bool, g: np.ndarray) -> RMMModule:  # fmt: skip
    """rmm of one module fitted on the tasks that changed it (``live``: ‖ΔWᵢ‖ > 0), so the basis is not spent
    on tasks that left the module alone; those get zero coefficients and error 0 and are rebuilt exactly as
    an unchanged module (``zero_tasks`` in the bundle). ``raw`` is the numbers of all n inputs; ``g`` the n×n
    Gram matrix of the updates (interference's)."""
    idx = np.flatnonzero(live)
    n = len(updates)
    if (
        idx.size == 0
    ):  # no task changed it: one zero rank-1 element, no (dense zero) mean; all tasks rebuilt as is
        (out, inn), dt = updates[0].shape, updates[0].dtype
        zero = Update(B=np.zeros((out, 1), dt), A=np.zeros((1, inn), dt))
        return RMMModule(mean=None, basis=[zero], coefficients=np.zeros((n, 1)), errors=np.zeros(n),
                         singular_values=np.zeros(n), storage=zero.size + n, raw=raw)  # fmt: skip
    if idx.size == n:
        fit = rmm_fit(updates, basis=basis, energy=energy, center=center, gram_matrix=g)
        return replace(fit, raw=raw)
    fit = rmm_fit([updates[i] for i in idx], basis=None if basis is None else min(basis, int(idx.size)),
                  energy=energy, center=center, gram_matrix=g[np.ix_(idx, idx)])  # fmt: skip
    coeff = np.zeros((n, fit.coefficients.shape[1]))
    coeff[idx] = fit.coefficients
    errors = np.zeros(n)
    errors[idx] = fit.errors
    storage = fit.storage + (n - int(idx.size)) * int(fit.coefficients.shape[1])
    return replace(fit, coefficients=coeff, errors=errors, storage=storage, raw=raw)


def _sweep_module(
    sv: np.ndarray, n: int, mean_size: int, basis_size: float
) -> tuple[list[float], list[float]]:
    """For p = 1..n: the residual energy Σ_{k>p} σ_k² of the best rank-p basis (Eckart–Young, from the stack's
    singular values) and the numbers a rank-p bundle stores (mean + p basis elements + n·p coefficients), with
    p capped at the stack's numerical rank as :func:`rmm_fit` caps it (a centred stack of n tasks has rank ≤ n − 1,
    so ``--basis n`` writes n − 1 elements)."""
    s = np.asarray(sv, dtype=np.float64)
    s2 = s**2
    rank = int(np.sum(s > GRAM_RTOL * s[0])) if s.size and s[0] > 0 else 0
    resid = [float(np.sum(s2[p:])) for p in range(1, n + 1)]
    stored = []
    for p in range(1, n + 1):
        k = min(p, rank)
        if k == 0 and mean_size == 0:  # an all-zero module without a mean: one zero element, n coefficients
            stored.append(float(basis_size + n))
        else:
            stored.append(float(mean_size + k * basis_size + n * k))
    return resid, stored


class _Rest:
    """Float tensors of full checkpoints outside the merged matrices (biases, norms, unselected matrices)."""

    def __init__(self, base: Checkpoint, work: list[MatrixSpec], tuned: list[Tuned]) -> None:
        done = {s.tensor.name for s in work}
        self.base = base
        self.full = [t for t in tuned if t.checkpoint is not None]
        self.infos = [x for x in base.tensors if x.is_float and x.name not in done] if self.full else []

    def deltas(self, info: TensorInfo) -> tuple[np.ndarray, list[np.ndarray], list[RawTensor]] | None:
        """(base value, per full task its value − base, as float64; per full task the tensor as stored, for
        the bundle), or None when no task changed it."""
        w0 = to_float(self.base.read(info), np.float64)
        _check_finite(w0, "base", info.name, self.base.path)
        ds, raws = [], []
        for t in self.full:
            assert t.checkpoint is not None
            raw = t.checkpoint.read(t.checkpoint.info(info.name))
            wt = to_float(raw, np.float64)
            _check_finite(wt, t.name, info.name, t.path)
            ds.append(wt - w0)
            raws.append(raw)
        if not any(np.any(d != 0) for d in ds):
            return None
        return w0, ds, raws


def run_merge(
    base_path: str | Path,
    tuned_inputs: Sequence[tuple[str, str | Path]],
    out: str | Path,
    options: MergeOptions | None = None,
    force: bool = False,
    argv: Sequence[str] = (),
    progress: Callable[[int, int, str], None] | None = None,
) -> MergeResult:
    """Merge the tuned inputs into ``out``: a checkpoint in the base's layout (registry methods) or an rmm
    bundle. ``tuned_inputs`` are (name, path) pairs. The output is staged and renamed when complete."""
    from spectra_cli.checkpoint.provenance import write_run_record
    from spectra_cli.checkpoint.writers import PatchedCopy, commit_output, prepare_output

    opts = options or MergeOptions()
    t0 = time.perf_counter()
    base, work, tuned = open_inputs(base_path, tuned_inputs, opts)
    n = len(tuned)
    weights = list(opts.weights) if opts.weights is not None else [1.0] * n
    params = opts.method_params()
    dtype: type[np.floating] = np.float64 if opts.precision == "float64" else np.float32
    is_rmm = opts.method == RMM
    method: MergeMethod | None = None if is_rmm else METHODS[opts.method]
    out = Path(out)
    stage = prepare_output(out, force, [Path(base.path), *(Path(t.path) for t in tuned)])
    try:
        base_loader = MatrixLoader(base)
        loaders = {t.name: MatrixLoader(t.checkpoint) for t in tuned if t.checkpoint is not None}
        need_w0 = not is_rmm or bool(loaders)
        copy = None if is_rmm else PatchedCopy(base, stage)
        rows: list[dict[str, Any]] = []
        cos_sum, ov_sum, pairs = np.zeros((n, n)), np.zeros((n, n)), np.zeros((n, n))
        bundle_t: dict[str, RawTensor | np.ndarray] = {}
        spill = stage / ".bundle-parts" if is_rmm else None
        if spill is not None:
            spill.mkdir()
        modules_meta: dict[str, Any] = {}
        sweep_acc: dict[str, Any] = {
            "resid": np.zeros(n),
            "stored": np.zeros(n),
            "energy": 0.0,
            "modules": {},
        }
        raw_total = 0
        dense_total = 0  # n dense out×in updates per module: what full fine-tunes would take
        stored_total = 0
        module_stats: dict[str, Any] = {}
        for done, spec in enumerate(work, 1):
            with blas_threads(spec.shape):  # one BLAS thread for small modules (engine.SMALL_WORK)
                w0 = base_loader.dense(spec, dtype) if need_w0 else None
                if w0 is not None:
                    _check_finite(w0, "base", spec.tensor.name, base.path)
                updates = [
                    _check_update(task_update(t, spec, w0, loaders.get(t.name), dtype), t, spec)
                    for t in tuned
                ]
                # numbers the inputs hold: a full checkpoint always holds the matrix, an adapter only its own
                # modules (the zero placeholder of an adapter that leaves the module alone is not an input)
                raw = sum(
                    u.size
                    for u, t in zip(updates, tuned, strict=True)
                    if t.adapter is None or t.covers(spec.name)
                )
                raw_total += raw
                dense_total += n * spec.shape[0] * spec.shape[1]
                inter = _interference(updates, opts.interference_k)
                live = inter["norms"] > 0
                both = np.outer(live, live)
                pairs += both
                cos_sum += np.where(both, inter["cosine"], 0.0)
                ov_sum += np.where(both, inter["overlap"], 0.0)
                fit: RMMModule | None = None
                if is_rmm:
                    fit = _rmm_live(updates, live, raw, opts.basis, opts.energy, opts.center, inter["gram"])
                elif opts.sweep:  # only the singular values of the stack are needed
                    fit = _rmm_live(updates, live, raw, 1, None, opts.center, inter["gram"])
                if opts.sweep:
                    assert fit is not None
                    energy = float(np.sum(inter["norms"] ** 2))
                    mean_size = fit.mean.size if fit.mean is not None else 0
                    bsize = (float(np.mean([b.size for b in fit.basis])) if fit.basis
                             else float(sum(u.size for u in updates) if updates[0].is_factored else updates[0].size))  # fmt: skip
                    resid, stored = _sweep_module(fit.singular_values, n, mean_size, bsize)
                    sweep_acc["resid"] += np.asarray(resid)
                    sweep_acc["stored"] += np.asarray(stored)
                    sweep_acc["energy"] += energy
                    sweep_acc["modules"][spec.name] = [
                        math.sqrt(r / energy) if energy > 0 else 0.0 for r in resid
                    ]
                if is_rmm:
                    assert fit is not None
                    errs = [float(e) for e in fit.errors]
                    kept = [1.0 - e * e for e in errs]
                    _bundle_module(bundle_t, spec.name, fit, dtype, spill)
                    stored_total += fit.storage
                    modules_meta[spec.name] = {
                        "tensor": spec.tensor.name, "shape": list(spec.shape), "transposed": spec.transposed,
                        "factored": all(u.is_factored for u in updates), "p": fit.p,
                        "coefficients": np.asarray(fit.coefficients, dtype=np.float64).tolist(),
                        "errors": errs, "singular_values": [float(x) for x in fit.singular_values],
                        "centered": fit.mean is not None, "storage": fit.storage, "raw": fit.raw,
                        "energy_kept": fit.energy_kept, "covered": [t.name for t in tuned if t.covers(spec.name)],
                        "zero_tasks": [i for i in range(n) if not live[i]],
                    }  # fmt: skip
                    extra: dict[str, Any] = {
                        "p": fit.p,
                        "storage": fit.storage_ratio,
                        "energy_kept": fit.energy_kept,
                    }
                else:
                    assert method is not None and copy is not None and w0 is not None
                    if not live.any():  # no task changed it (e.g. frozen embeddings): the base's stays
                        outcome = MergeOutcome(
                            Update(B=np.zeros((spec.shape[0], 1)), A=np.zeros((1, spec.shape[1])))
                        )
                    else:
                        outcome = method(updates, weights, params)
                        w_new = w0.astype(np.float64) + outcome.update.to_dense()
                        copy.patch(spec.tensor, w_new.T if spec.transposed else w_new)
                    errs, kept = _merge_errors(outcome.update, updates, inter["norms"])
                    if outcome.stats:
                        module_stats[spec.name] = _jsonable(outcome.stats)
                    extra = {"energy_kept": outcome.stats.get("energy_kept")}
                rows.extend(_rows_for_module(spec, tuned, updates, weights, inter, errs, kept, extra))
                if progress:
                    progress(done, len(work), spec.name)
        rest = _Rest(base, work, tuned)
        rest_changed = _merge_rest(rest, tuned, weights, opts, params, copy, bundle_t)
        extra_numbers = sum(int(np.asarray(v.data if isinstance(v, RawTensor) else v).size)
                            for k, v in bundle_t.items() if k.startswith("task."))  # fmt: skip
        matrix_stored = stored_total
        stored_total += extra_numbers
        tasks = [t.name for t in tuned]
        cos_mean = np.divide(cos_sum, pairs, out=np.zeros((n, n)), where=pairs > 0)
        ov_mean = np.divide(ov_sum, pairs, out=np.zeros((n, n)), where=pairs > 0)
        sweep = _sweep_summary(sweep_acc, raw_total, n) if opts.sweep else None
        inputs = {
            "base": str(base.path),
            "tuned": [{"name": t.name, "path": str(t.path), "kind": t.kind, "weight": w,
                       "matrices": sum(1 for s in work if t.covers(s.name))}
                      for t, w in zip(tuned, weights, strict=True)],
        }  # fmt: skip
        opts_dict = asdict(opts)
        opts_dict["params"] = params
        summary: dict[str, Any] = {
            "method": opts.method, "reference": RMM_REFERENCE if is_rmm else METHODS[opts.method].reference,
            "tasks": tasks, "modules": len(work), "output": str(out),
            "output_kind": "bundle" if is_rmm else "checkpoint",
            "mean_rel_error": _task_means(rows, tasks, "rel_error"), "mean_kept": _task_means(rows, tasks, "kept"),
            "cosine": cos_mean.round(6).tolist(), "overlap": ov_mean.round(6).tolist(),
            "other_tensors_changed": rest_changed,
        }  # fmt: skip
        if is_rmm:
            summary["storage"] = stored_total / (raw_total + extra_numbers) if raw_total else None
            summary["stored_numbers"] = stored_total
            summary["raw_numbers"] = raw_total + extra_numbers
            summary["matrix_storage"] = matrix_stored / raw_total if raw_total else None
            summary["storage_vs_dense"] = (
                stored_total / (dense_total + extra_numbers) if dense_total else None
            )
            summary["p"] = {k: v["p"] for k, v in modules_meta.items()}
            num = sum((r["rel_error"] * r["delta_norm"]) ** 2 for r in rows)
            den = sum(r["delta_norm"] ** 2 for r in rows)
            summary["overall_error"] = math.sqrt(num / den) if den > 0 else 0.0
        if module_stats:
            summary["method_stats"] = module_stats
        named_bases = sorted({str(t.adapter.config.get("base_model_name_or_path")) for t in tuned
                              if t.adapter is not None and t.adapter.config.get("base_model_name_or_path")})  # fmt: skip
        if len(named_bases) > 1:  # they fit this base's shapes, but say they were trained on different models
            summary["adapter_base_names"] = named_bases
        if not is_rmm:
            # non-LoRA tensors of adapters (modules_to_save, …) have no place in a merged base copy
            skipped = {
                t.name: list(t.adapter.ignored) for t in tuned if t.adapter is not None and t.adapter.ignored
            }
            if skipped:
                summary["adapter_tensors_not_merged"] = skipped
        if sweep is not None:
            summary["sweep"] = sweep
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        artifacts: list[str]
        if is_rmm:
            _write_bundle(stage, base, tuned, weights, opts, modules_meta, bundle_t, summary)
            if spill is not None:
                bundle_t.clear()  # drop the memory maps before their files
                shutil.rmtree(spill)
            artifacts = ["basis.safetensors", "coefficients.json"]
        else:
            artifacts = sorted(p.name for p in stage.iterdir())
        write_run_record(stage, "merge", list(argv), inputs, opts_dict, {"seconds": summary["seconds"]}, artifacts,
                         {"summary": {k: v for k, v in summary.items() if k not in ("cosine", "overlap")}})  # fmt: skip
        commit_output(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return MergeResult(rows, summary, inputs, opts_dict, out, tasks, cos_mean, ov_mean, sweep)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def _task_means(rows: list[dict[str, Any]], tasks: list[str], key: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for t in tasks:
        v = [r[key] for r in rows if r["task"] == t and r[key] is not None and math.isfinite(r[key])]
        out[t] = float(np.mean(v)) if v else None
    return out


def _sweep_summary(acc: dict[str, Any], raw_total: int, n: int) -> dict[str, Any]:
    energy = acc["energy"]
    return {
        "p": list(range(1, n + 1)),
        "error": [math.sqrt(r / energy) if energy > 0 else 0.0 for r in acc["resid"]],
        "storage": [s / raw_total if raw_total else None for s in acc["stored"]],
        "modules": acc["modules"],
    }


def _merge_rest(rest: _Rest, tuned: list[Tuned], weights: list[float], opts: MergeOptions,
                params: dict[str, Any], copy: Any, bundle_t: dict[str, RawTensor | np.ndarray]) -> int:  # fmt: skip
    """Tensors outside the merged matrices. rmm: every full task's changed tensors are stored exactly in the
    bundle (adapters: their non-LoRA tensors). Other methods: task-arithmetic and TIES apply their elementwise
    rule; the rest take the weighted mean θ₀ + Σwᵢ·Δᵢ / Σwᵢ (as TSV does for 1-D parameters). Returns how many
    tensors were changed/stored."""
    changed = 0
    if opts.method == RMM:
        for t in tuned:
            if t.adapter is not None:
                for name in t.adapter.ignored:
                    bundle_t[f"task.{t.name}.{name}"] = t.adapter.checkpoint.read(
                        t.adapter.checkpoint.info(name)
                    )
                    changed += 1
    for info in rest.infos:
        got = rest.deltas(info)
        if got is None:
            continue
        w0, ds, raws = got
        changed += 1
        if opts.method == RMM:  # stored as read above, not read again
            for t, d, raw in zip(rest.full, ds, raws, strict=True):
                if np.any(d != 0):
                    bundle_t[f"task.{t.name}.{info.name}"] = raw
            continue
        if opts.method in ELEMENTWISE:
            ups = [Update(dense=d.reshape(1, -1)) for d in ds]
            merged: np.ndarray = (
                METHODS[opts.method](ups, weights, params).update.to_dense().reshape(w0.shape)
            )
        else:
            merged = np.sum([w * d for w, d in zip(weights, ds, strict=True)], axis=0) / sum(weights)
        copy.patch(info, w0 + merged)
    return changed


def _bundle_module(tensors: dict[str, RawTensor | np.ndarray], name: str, fit: Any, dtype: type,
                   spill: Path | None = None) -> int:  # fmt: skip
    """Put one module's mean and basis into the bundle's tensors; returns the numbers stored (with the n×p
    coefficients). With ``spill`` (a folder in the staging area) each array is saved there and kept as a read-only
    memory map, so the bundle is not held in memory until it is written (only one module's arrays are)."""
    stored = int(np.asarray(fit.coefficients).size)

    def keep(key: str, arr: np.ndarray | None) -> None:
        x: np.ndarray = np.ascontiguousarray(arr, dtype)
        if spill is not None and x.size:
            f = spill / f"{len(tensors)}.npy"
            np.save(f, x)
            x = np.load(f, mmap_mode="r")
        tensors[key] = x

    def put(key: str, u: Update) -> int:
        if u.is_factored:
            keep(f"{key}.B", u.B)
            keep(f"{key}.A", u.A)
        else:
            keep(key, u.dense)
        return u.size

    if fit.mean is not None:
        stored += put(f"{name}.mean", fit.mean)
    for k, b in enumerate(fit.basis):
        stored += put(f"{name}.basis.{k}", b)
    return stored


def _write_bundle(stage: Path, base: Checkpoint, tuned: list[Tuned], weights: list[float], opts: MergeOptions,
                  modules: dict[str, Any], tensors: dict[str, RawTensor | np.ndarray],
                  summary: dict[str, Any]) -> None:  # fmt: skip
    tasks = []
    for t, w in zip(tuned, weights, strict=True):
        entry: dict[str, Any] = {"name": t.name, "kind": "adapter" if t.adapter else "full", "weight": w,
                                 "path": str(Path(t.path).resolve())}  # fmt: skip
        if t.adapter is not None:
            entry["adapter_config"] = t.adapter.config
            entry["modules"] = {
                base_name: {"path": m.path, "a": m.a.name, "b": m.b.name, "rank": m.rank,
                            "embedding": m.embedding, "transposed": m.transposed}
                for base_name, m in t.modules.items()
            }  # fmt: skip
            entry["extra_tensors"] = list(t.adapter.ignored)
        else:
            entry["extra_tensors"] = sorted(
                k.removeprefix(f"task.{t.name}.") for k in tensors if k.startswith(f"task.{t.name}.")
            )
        tasks.append(entry)
    doc = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "reference": RMM_REFERENCE,
        "base": {"path": str(Path(base.path).resolve()),
                 "tensors": {x.name: list(x.shape) for x in base.tensors}},
        "tasks": tasks,
        "center": opts.center,
        "basis": opts.basis,
        "energy": opts.energy,
        "precision": opts.precision,
        "storage": summary.get("storage"),
        "modules": modules,
    }  # fmt: skip
    write_safetensors(stage / "basis.safetensors", tensors, {"format": "pt"})
    (stage / "coefficients.json").write_text(json.dumps(doc, indent=1) + "\n")


# ---- reconstruct ----------------------------------------------------------------------------------------














