"""``merge``: combine n fine-tunes of one base, or store them reversibly by a shared basis (``reconstruct``,
in :mod:`spectra_cli.flows.reconstruct`, gets any one back).

Flow: plan (open the base and every tuned input — full checkpoints matched by tensor name and shape, PEFT LoRA
adapters module by module, as ``compare`` does — and choose the matrices any input changes) → stream the
modules (each task's update ΔWᵢ: full W_t − W₀, dense; adapter B·A with the scale folded into B, never
densified; one module of all n inputs in memory at a time) and either merge them with a registry method
(:data:`spectra_cli.spectral.merge.METHODS`) into a copy of the base in its own layout, or (``rmm``) fit a
per-module basis into a bundle (:mod:`spectra_cli.checkpoint.bundle` has its format) → the other tensors →
summarize → ``spectra_run.json`` → rename the staging folder into place. No printing.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spectra_cli.checkpoint.bundle import BundleWriter
from spectra_cli.checkpoint.loader import MatrixLoader, prefetched
from spectra_cli.checkpoint.matrices import MatrixSpec, select_matrices
from spectra_cli.checkpoint.source import Checkpoint, open_checkpoint
from spectra_cli.checkpoint.task_updates import (
    check_finite,
    check_full,
    check_update,
    task_update,
)
from spectra_cli.checkpoint.tuned import Tuned, open_tuned
from spectra_cli.errors import SelectionError, SpectraError
from spectra_cli.flows.merge_adapter import AdapterSink, check_adapter_targets
from spectra_cli.flows.merge_device import DeviceUpdates, check_budget, host_fit
from spectra_cli.flows.merge_rest import ELEMENTWISE, merge_rest
from spectra_cli.flows.merge_rows import rows_for_module, task_means
from spectra_cli.options import ComputeOptions, SelectionOptions
from spectra_cli.results import OMIT_NONE, RunResult, flatten, jsonable, options_record, summary_dict
from spectra_cli.spectral.arrays import as_f64, to_numpy
from spectra_cli.spectral.engine import ResolvedEngine, blas_threads, resolve
from spectra_cli.spectral.linalg import Backend
from spectra_cli.spectral.merge import METHODS, MergeMethod, MergeOutcome, RMMModule, Update
from spectra_cli.spectral.merge.peft_types import module_seed
from spectra_cli.spectral.merge.updates import to_host
from spectra_cli.spectral.merge.xp import zeros
from spectra_cli.spectral.merge_stats import Sweep, SweepCurve, merge_errors, module_interference, rmm_live

if TYPE_CHECKING:
    from spectra_cli.checkpoint.writers import PatchedCopy

RMM = "rmm"
RMM_REFERENCE = "Reversible Model Merging (RMM), 2025: a shared per-module basis with per-task coefficients"


def method_names() -> list[str]:
    """The ``--method`` choices: the registry's methods and ``rmm``."""
    return [*METHODS, RMM]




@dataclass(frozen=True)
class MergeOptions(SelectionOptions, ComputeOptions):
    """Options of ``merge`` (the CLI flags of the same names).

    ``weights``: one per task (default 1 each). ``params``: the method's parameters by name (see
    ``METHODS[name].params``). ``basis`` (p) or ``energy`` (τ): the rmm basis size per module; ``center``: fit
    the basis around the tasks' mean. ``sweep``: also compute error and storage for p = 1..n.
    ``interference_k``: the top-k left singular subspaces compared between tasks. ``to_adapter``: write the
    merged update as a PEFT LoRA adapter (:mod:`spectra_cli.flows.merge_adapter`), truncated to ``rank``.
    """

    method: str = "task-arithmetic"
    weights: tuple[float, ...] | None = None
    params: tuple[tuple[str, Any], ...] = ()
    basis: int | None = None
    energy: float | None = None
    center: bool = True
    sweep: bool = False
    interference_k: int = 8
    to_adapter: bool = False
    rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in method_names():
            raise SpectraError(f"--method {self.method!r} is not a merge method; `spectra merge -h` lists all "
                               f"{len(method_names())} (e.g. task-arithmetic, ties, tsv, iso-c, svd, cat, rmm)")
        if self.method != RMM and (self.basis is not None or self.energy is not None):
            raise SpectraError(f"--basis/--energy apply to --method {RMM} only, not {self.method}")
        if self.basis is not None and self.energy is not None:
            raise SpectraError("give either --basis or --energy, not both")
        if self.basis is not None and self.basis < 1:
            raise SpectraError(f"--basis {self.basis}: the basis size must be at least 1")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise SpectraError(f"--energy {self.energy}: the energy fraction must be in (0, 1]")
        if self.to_adapter and self.method == RMM:
            raise SpectraError("--to-adapter writes one merged adapter; rmm writes a bundle: use another --method")
        if self.rank is not None and (not self.to_adapter or self.rank < 1):
            raise SpectraError(f"--rank {self.rank}: a positive adapter rank, with --to-adapter only")
        if self.interference_k < 1:
            raise SpectraError(f"--interference-k {self.interference_k}: must be at least 1")
        shown = ",".join(f"{w:g}" for w in self.weights or ())
        if not all(math.isfinite(w) for w in self.weights or ()):
            raise SpectraError(f"--weights {shown}: every weight must be a finite number (no nan or inf)")
        if self.weights is not None and self.method not in (*ELEMENTWISE, RMM) and sum(self.weights) == 0:
            raise SpectraError(f"--weights {shown}: they sum to 0, and {self.method} gives the tensors outside the "
                               "merged matrices the weighted mean Σwᵢ·Δᵢ / Σwᵢ; use weights with a non-zero sum")
        if self.method != RMM:
            known = METHODS[self.method].params
            bad = [k for k, _ in self.params if k not in known]
            if bad:
                raise SpectraError(
                    f"--method {self.method} has no parameter {', '.join(bad)}; its parameters: {', '.join(known) or 'none'}"
                )

    def method_params(self) -> dict[str, Any]:
        """The method's parameters: registry defaults overridden by ``params``."""
        if self.method == RMM:
            return {}
        return METHODS[self.method].resolve_params(dict(self.params))


@dataclass(frozen=True)
class RmmStorage:
    """What an rmm bundle stores: its size over the inputs' (``storage``; ``stored_numbers`` of
    ``raw_numbers``), over the merged matrices alone (``matrix_storage``) and over n dense updates
    (``storage_vs_dense``); the basis size p per module; the overall relative error (‖ΔWᵢ‖-weighted)."""

    storage: float | None
    stored_numbers: int
    raw_numbers: int
    matrix_storage: float | None
    storage_vs_dense: float | None
    p: dict[str, int]
    overall_error: float


@dataclass(frozen=True, kw_only=True)
class MergeSummary:
    """The summary of ``merge``: method, paper, tasks, modules, the output and its kind (checkpoint or bundle);
    per task the mean relative error and share of its update kept; the n×n mean cosine and top-k overlap of the
    updates; other tensors changed. rmm adds :class:`RmmStorage` (its keys in place); optional: ``method_stats``
    (per-module facts of a method), ``adapter_base_names`` (adapters naming different bases),
    ``adapter_tensors_not_merged``, ``sweep``."""

    method: str
    reference: str
    tasks: list[str]
    modules: int
    output: str
    output_kind: str
    mean_rel_error: dict[str, float | None]
    mean_kept: dict[str, float | None]
    cosine: list[list[float]]
    overlap: list[list[float]]
    other_tensors_changed: int
    rmm: RmmStorage | None = field(default=None, metadata=flatten(RmmStorage))
    method_stats: dict[str, Any] | None = field(default=None, metadata=OMIT_NONE)
    adapter_base_names: list[str] | None = field(default=None, metadata=OMIT_NONE)
    adapter_tensors_not_merged: dict[str, list[str]] | None = field(default=None, metadata=OMIT_NONE)
    sweep: SweepCurve | None = field(default=None, metadata=OMIT_NONE)
    adapter: dict[str, Any] | None = field(default=None, metadata=OMIT_NONE)
    tensors_not_in_adapter: int | None = field(default=None, metadata=OMIT_NONE)
    seconds: float


@dataclass
class MergeResult(RunResult[MergeSummary]):
    """Rows (one per module × task), a summary, and what the plots need."""

    out: Path | None = None
    tasks: list[str] = field(default_factory=list)
    cosine: np.ndarray | None = None  # n×n, mean over modules
    overlap: np.ndarray | None = None  # n×n, mean over modules
    sweep: SweepCurve | None = None


@dataclass(frozen=True)
class MergePlan:
    """The opened inputs and what the run does, decided before a weight is read: the base, the selected base
    matrices some input changes (read order), the tuned inputs, one weight per task, the method (None: rmm)
    and its parameters, the compute dtype and where the decompositions run (``--backend``)."""

    base: Checkpoint
    work: list[MatrixSpec]
    tuned: list[Tuned]
    weights: list[float]
    method: MergeMethod | None
    params: dict[str, Any]
    dtype: type[np.floating]
    backend: Backend
    fan_in_fan_out: bool = False
    engine: ResolvedEngine | None = None

    @property
    def on_device(self) -> bool:
        """Whether the updates are built and merged on the torch device (``--backend torch``; CUDA)."""
        return self.engine is not None and self.engine.backend == "torch"

    @property
    def inputs(self) -> list[Path]:
        """The paths the output may not overwrite."""
        return [Path(self.base.path), *(Path(t.path) for t in self.tuned)]


@dataclass
class Merged:
    """What streaming the modules gave: rows; per task pair the summed cosine and overlap and how many modules
    both changed; numbers held by the inputs (``raw``), by n dense updates (``dense``) and by the bundle's
    matrices (``stored``); the methods' per-module facts; the sweep."""

    rows: list[dict[str, Any]]
    cos_sum: np.ndarray
    ov_sum: np.ndarray
    pairs: np.ndarray
    raw: int = 0
    dense: int = 0
    stored: int = 0
    module_stats: dict[str, Any] = field(default_factory=dict)
    sweep: Sweep | None = None

    def mean(self, what: np.ndarray) -> np.ndarray:
        """A pair sum over the modules both tasks changed, as a mean."""
        n = what.shape[0]
        return np.divide(what, self.pairs, out=np.zeros((n, n)), where=self.pairs > 0)


# ---- opening and matching -------------------------------------------------------------------------------


def plan_merge(
    base_path: str | Path, tuned_inputs: Sequence[tuple[str, str | Path]], opts: MergeOptions
) -> MergePlan:
    """Open the base and the n ≥ 2 tuned inputs, check they belong together, choose the matrices any input
    changes; nothing is merged."""
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
            check_full(t, base)
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
    n = len(tuned)
    weights = list(opts.weights) if opts.weights is not None else [1.0] * n
    dtype: type[np.floating] = np.float64 if opts.precision == "float64" else np.float32
    method = None if opts.method == RMM else METHODS[opts.method]
    fan_in_fan_out = check_adapter_targets(work) if opts.to_adapter else False
    eng = resolve(opts.engine)
    check_budget(work, tuned, np.dtype(dtype).itemsize, eng, opts.max_memory)
    return MergePlan(base, work, tuned, weights, method, opts.method_params(), dtype, eng.compute, fan_in_fan_out,
                     eng)  # fmt: skip


# ---- the run --------------------------------------------------------------------------------------------


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
    p = plan_merge(base_path, tuned_inputs, opts)
    out = Path(out)
    stage = prepare_output(out, force, p.inputs)
    try:
        sink = AdapterSink(opts.rank, p.backend, p.dtype) if opts.to_adapter else None
        copy = PatchedCopy(p.base, stage) if p.method is not None and sink is None else None
        bundle = BundleWriter(stage, p.dtype) if p.method is None else None
        got = merge_modules(p, opts, copy, bundle, progress, sink)
        rest_changed = merge_rest(p, copy, bundle)
        if sink is not None:
            sink.write(stage, str(Path(p.base.path).resolve()), p.fan_in_fan_out)
        inputs = {
            "base": str(p.base.path),
            "tuned": [{"name": t.name, "path": str(t.path), "kind": t.kind, "weight": w,
                       "matrices": sum(1 for s in p.work if t.covers(s.name))}
                      for t, w in zip(p.tuned, p.weights, strict=True)],
        }  # fmt: skip
        opts_dict = options_record(opts)
        opts_dict["params"] = p.params
        summary = summarize(p, got, bundle, rest_changed, out, round(time.perf_counter() - t0, 3), sink)
        artifacts: list[str]
        if bundle is not None:
            settings = {"center": opts.center, "basis": opts.basis, "energy": opts.energy,
                        "precision": opts.precision}  # fmt: skip
            storage = summary.rmm.storage if summary.rmm is not None else None
            bundle.write(p.base, p.tuned, p.weights, RMM_REFERENCE, settings, storage)
            artifacts = ["basis.safetensors", "coefficients.json"]
        else:
            artifacts = sorted(x.name for x in stage.iterdir())
        record = {k: v for k, v in summary_dict(summary).items() if k not in ("cosine", "overlap")}
        write_run_record(stage, "merge", list(argv), inputs, opts_dict, {"seconds": summary.seconds}, artifacts,
                         {"summary": record})  # fmt: skip
        commit_output(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return MergeResult(got.rows, summary, inputs, opts_dict, out, summary.tasks, got.mean(got.cos_sum),
                       got.mean(got.ov_sum), summary.sweep)  # fmt: skip


def merge_modules(p: MergePlan, opts: MergeOptions, copy: PatchedCopy | None, bundle: BundleWriter | None,
                  progress: Callable[[int, int, str], None] | None = None,
                  sink: AdapterSink | None = None) -> Merged:  # fmt: skip
    """Stream the planned matrices, one module of all n inputs in memory at a time: every task's update, their
    interference, then the merge (patched into ``copy``) or the rmm fit (into ``bundle``)."""
    n = len(p.tuned)
    base_loader = MatrixLoader(p.base)
    loaders = {t.name: MatrixLoader(t.checkpoint) for t in p.tuned if t.checkpoint is not None}
    need_w0 = p.method is not None or bool(loaders)
    got = Merged([], np.zeros((n, n)), np.zeros((n, n)), np.zeros((n, n)), sweep=Sweep(n) if opts.sweep else None)
    # the torch route builds the updates on the device from inputs staged by the prefetch thread (merge_device)
    dev = DeviceUpdates(base_loader, loaders, p.tuned, p.engine, p.dtype, p.base.path) if p.engine and p.on_device else None
    base_read: Callable[[MatrixSpec], Any] = dev.read if dev else lambda s: base_loader.dense(s, p.dtype) if need_w0 else None
    for done, (spec, read) in enumerate(prefetched(p.work, base_read), 1):  # the next one read while this computes
        w0: Any = read
        with blas_threads(spec.shape):  # one BLAS thread for small modules (engine.SMALL_WORK)
            if dev is not None:
                w0, updates = dev.updates(spec, read)
            else:
                if w0 is not None:
                    check_finite(w0, "base", spec.tensor.name, p.base.path)
                updates = [check_update(task_update(t, spec, w0, loaders.get(t.name), p.dtype), t, spec)
                           for t in p.tuned]  # fmt: skip
            # numbers the inputs hold: a full checkpoint always holds the matrix, an adapter only its own
            # modules (the zero placeholder of an adapter that leaves the module alone is not an input)
            raw = sum(
                u.size for u, t in zip(updates, p.tuned, strict=True) if t.adapter is None or t.covers(spec.name)
            )
            got.raw += raw
            got.dense += n * spec.shape[0] * spec.shape[1]
            inter = module_interference(updates, opts.interference_k, p.backend)
            live = inter["norms"] > 0
            both = np.outer(live, live)
            got.pairs += both
            got.cos_sum += np.where(both, inter["cosine"], 0.0)
            got.ov_sum += np.where(both, inter["overlap"], 0.0)
            fit: RMMModule | None = None
            if bundle is not None:
                fit = rmm_live(updates, live, raw, opts.basis, opts.energy, opts.center, inter["gram"], p.backend)
            elif got.sweep is not None:  # only the singular values of the stack are needed
                fit = rmm_live(updates, live, raw, 1, None, opts.center, inter["gram"], p.backend)
            if got.sweep is not None:
                assert fit is not None
                got.sweep.add(spec.name, fit, updates, inter["norms"])
            if bundle is not None:
                assert fit is not None
                fit = host_fit(fit)
                errs = [float(e) for e in fit.errors]
                kept = [1.0 - e * e for e in errs]
                covered = [t.name for t in p.tuned if t.covers(spec.name)]
                bundle.add_module(spec.name, spec.tensor.name, spec.shape, spec.transposed, fit,
                                  all(u.is_factored for u in updates), covered, [i for i in range(n) if not live[i]])  # fmt: skip
                got.stored += fit.storage
                extra: dict[str, Any] = {"p": fit.p, "storage": fit.storage_ratio, "energy_kept": fit.energy_kept}
            else:
                assert p.method is not None and w0 is not None
                if not live.any():  # no task changed it (e.g. frozen embeddings): the base's stays
                    outcome = MergeOutcome(Update(B=zeros((spec.shape[0], 1), w0), A=zeros((1, spec.shape[1]), w0)))
                else:
                    # random masks (DARE): module k draws from seed + k
                    outcome = p.method(updates, p.weights, module_seed(p.params, done - 1), p.backend)
                    if copy is not None:  # summed where the update is; the patched matrix comes back in float64
                        w_new = to_numpy(as_f64(w0) + outcome.update.to_dense())
                        copy.patch(spec.tensor, w_new.T if spec.transposed else w_new)
                errs, kept = merge_errors(outcome.update, updates, inter["norms"])
                if outcome.stats:
                    got.module_stats[spec.name] = jsonable(outcome.stats)
                extra = {"energy_kept": outcome.stats.get("energy_kept")}
                if sink is not None:
                    extra.update(sink.add(spec, to_host(outcome.update)))
            got.rows.extend(rows_for_module(spec, p.tuned, updates, p.weights, inter, errs, kept, extra))
            if progress:
                progress(done, len(p.work), spec.name)
    return got


def summarize(p: MergePlan, got: Merged, bundle: BundleWriter | None, rest_changed: int, out: Path,
              seconds: float, sink: AdapterSink | None = None) -> MergeSummary:  # fmt: skip
    """Per-task errors, the mean interference, what the bundle stores, what the output leaves out."""
    tasks = [t.name for t in p.tuned]
    rmm: RmmStorage | None = None
    if bundle is not None:
        extra = bundle.task_numbers()
        stored = got.stored + extra
        num = sum((r["rel_error"] * r["delta_norm"]) ** 2 for r in got.rows)
        den = sum(r["delta_norm"] ** 2 for r in got.rows)
        rmm = RmmStorage(
            storage=stored / (got.raw + extra) if got.raw else None,
            stored_numbers=stored,
            raw_numbers=got.raw + extra,
            matrix_storage=got.stored / got.raw if got.raw else None,
            storage_vs_dense=stored / (got.dense + extra) if got.dense else None,
            p={k: v["p"] for k, v in bundle.modules.items()},
            overall_error=math.sqrt(num / den) if den > 0 else 0.0,
        )
    named_bases = sorted({str(t.adapter.config.get("base_model_name_or_path")) for t in p.tuned
                          if t.adapter is not None and t.adapter.config.get("base_model_name_or_path")})  # fmt: skip
    # non-LoRA tensors of adapters (modules_to_save, …) have no place in a merged base copy
    skipped = {t.name: list(t.adapter.ignored) for t in p.tuned if t.adapter is not None and t.adapter.ignored}
    return MergeSummary(
        method=p.method.name if p.method is not None else RMM,
        reference=p.method.reference if p.method is not None else RMM_REFERENCE,
        tasks=tasks, modules=len(p.work), output=str(out),
        output_kind="bundle" if p.method is None else "adapter" if sink is not None else "checkpoint",
        mean_rel_error=task_means(got.rows, tasks, "rel_error"), mean_kept=task_means(got.rows, tasks, "kept"),
        cosine=got.mean(got.cos_sum).round(6).tolist(), overlap=got.mean(got.ov_sum).round(6).tolist(),
        other_tensors_changed=rest_changed,
        rmm=rmm,
        method_stats=got.module_stats or None,
        # they fit this base's shapes, but say they were trained on different models
        adapter_base_names=named_bases if len(named_bases) > 1 else None,
        adapter_tensors_not_merged=skipped if p.method is not None and skipped else None,
        sweep=got.sweep.curve(got.raw) if got.sweep is not None else None,
        adapter=sink.summary() if sink is not None else None,
        tensors_not_in_adapter=rest_changed if sink is not None and rest_changed else None,
        seconds=seconds,
    )  # fmt: skip
