"""``init-adapter``: export an initialised PEFT LoRA adapter (PiSSA, MiLoRA, OLoRA, CorDA, EVA, extract) and,
for methods that change the base, the residual model W_res = W − s·B·A.

Flow: plan (open the checkpoint, select the target modules — by default every linear weight but embeddings and
the output head — and decide each one's rank and α: uniform ``rank``, a PEFT-style ``ranks_file``, an
allocation, or the method's own ``plan_ranks``; all checked before any work) → stage the output folder →
factorise (stream the targets in read order, one module's weights in memory at a time, on the compute device;
each residual replaces its weight in ``residual/``, every other tensor copied bit for bit) → write the adapter,
the README (:mod:`spectra_cli.checkpoint.adapter_readme`, with the output layout) and ``spectra_run.json`` →
summarize → rename the staging folder into place. No printing.
"""

from __future__ import annotations

import math
import resource
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spectra_cli.checkpoint.adapter import is_adapter
from spectra_cli.checkpoint.finetune import open_finetune, untracked_changes
from spectra_cli.checkpoint.loader import MatrixLoader, prefetched
from spectra_cli.checkpoint.lora_targets import (
    Target,
    ranks_file_targets,
    read_ranks_file,
    select_targets,
)
from spectra_cli.checkpoint.naming import module_path
from spectra_cli.checkpoint.source import Checkpoint, open_checkpoint
from spectra_cli.checkpoint.tensors import DTYPE_CODES, TensorInfo
from spectra_cli.errors import CheckpointError, SelectionError, SpectraError
from spectra_cli.flows.init_plan import allocate_ranks, explicit_selection, method_options, plan_targets
from spectra_cli.options import ComputeOptions, EngineOptions, SelectionOptions
from spectra_cli.results import OMIT_NONE, RunResult, options_record, summary_dict
from spectra_cli.spectral.engine import check_module_budget, resolve

if TYPE_CHECKING:
    from spectra_cli.checkpoint.writers import ResidualWriter
    from spectra_cli.spectral.init import InitMethod
    from spectra_cli.spectral.linalg import Backend

@dataclass(frozen=True)
class InitOptions(SelectionOptions, ComputeOptions):
    """Options of ``init-adapter`` (the CLI flags of the same names).

    ``alpha`` None means s = 1 (α = r, or √r with rsLoRA). ``method_options`` are passed to the method as
    ``InitInput.options`` together with ``niter`` (``fast``) and ``energy``.
    """

    method: str = "pissa"
    rank: int | None = None
    alpha: float | None = None
    rslora: bool = False
    ranks_file: Path | None = None
    allocate: str | None = None  # an allocation strategy of ``spectra allocate`` (with ``budget_rank``)
    budget_rank: float | None = None
    ranks: Mapping[str, int] | None = None  # module → rank, e.g. from an allocation
    alphas: Mapping[str, float] | None = None  # module → α (with ``ranks``)
    tuned: Path | None = None
    energy: float | None = None
    fast: int | None = None
    activations: Path | None = None
    compressed: Path | None = None  # eora: the compressed checkpoint the adapter compensates
    gradients: Path | None = None  # lora-ga: each target weight's mean gradient, under the weight's name
    method_options: Mapping[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        from spectra_cli.spectral.init import methods  # the registry's metadata: no PyTorch import

        names = sorted(methods())
        if self.method not in names:
            raise SpectraError(f"--method {self.method!r} is not one of {', '.join(names)}")
        if self.dtype is not None and self.dtype not in DTYPE_CODES:
            raise SpectraError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPE_CODES)}")
        if self.rank is not None and self.rank < 1:
            raise SpectraError(f"--rank {self.rank}: must be at least 1")
        if self.alpha is not None and not self.alpha >= 0:
            raise SpectraError(f"--alpha {self.alpha}: must not be negative")
        if self.energy is not None and not 0 <= self.energy <= 1:
            raise SpectraError(f"--energy {self.energy}: the share of ‖ΔW‖² must be in [0, 1]")
        given = [flag for flag, v in (("--rank", self.rank), ("--ranks", self.ranks_file),
                                      ("--allocate", self.allocate if self.allocate is not None else self.ranks))
                 if v is not None]  # fmt: skip
        if len(given) > 1:
            raise SpectraError(f"give only one of --rank, --ranks and --allocate (got {' and '.join(given)})")
        if (self.budget_rank is None) != (self.allocate is None):
            raise SpectraError("--allocate STRATEGY and --budget-rank R go together")


@dataclass(frozen=True)
class InitSummary:
    """The summary of ``init-adapter``: the method and its paper, the modules adapted and those given rank 0,
    how many modules have each rank (keys ``str(rank)``), the adapter's parameter count, whether a residual
    was written (and its dtype: the option, "as stored", or None without residual), files of other weight
    formats left out of it, the tensors a fine-tune changed that the extracted adapter does not carry, the
    compute device, timings and peak memory; the largest relative reconstruction error when the method
    reports one."""

    method: str
    reference: str
    modules: int
    dropped: list[str]
    ranks: dict[str, int]
    adapter_parameters: int
    residual: bool
    residual_dtype: str | None
    skipped_files: list[str]
    untracked_changes: list[str]
    device: str
    seconds: float
    peak_rss_mb: float
    peak_gpu_mb: float | None = field(default=None, metadata=OMIT_NONE)
    max_relative_error: float | None = field(default=None, metadata=OMIT_NONE)


@dataclass
class InitResult(RunResult[InitSummary]):
    """Rows (one per target module), summary, inputs, options; ``out`` is the written folder."""

    out: Path | None = None


@dataclass(frozen=True)
class InitPlan:
    """Everything decided before a weight is read: the options as resolved (ranks and α of ``--allocate``
    filled in), the opened checkpoint, the method, the targets with their ranks and scales (read order), the
    modules planned at rank 0, the activation statistics by module, the tuned checkpoint and its matching
    tensors (extract), the torch device the weights go to and where linalg's routes run (``--backend``)."""

    opts: InitOptions
    ckpt: Checkpoint
    method: InitMethod
    targets: list[Target]
    dropped: list[str]
    activations: Mapping[str, Any] | None
    tuned: Checkpoint | None
    tuned_infos: dict[str, TensorInfo]
    device: str
    backend: Backend

    @property
    def inputs(self) -> list[Path]:
        """The paths the output may not overwrite."""
        return [Path(self.ckpt.path)] + [Path(q) for q in (self.opts.tuned, self.opts.compressed, self.opts.gradients) if q]


@dataclass
class Factorised:
    """What streaming the targets gave: one row per target, the adapter's factors (A r×in, B out×r) and α
    per module with rank > 0, and every module without adapter (planned or given rank 0 by the method)."""

    rows: list[dict[str, Any]]
    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    alphas: dict[str, float]
    dropped: list[str]


# ---- the plan: targets, ranks, inputs ---------------------------------------------------------------------


def plan_init(path: str | Path, opts: InitOptions) -> InitPlan:
    """Check the options against the method, open the checkpoint (and the tuned one, and the activations), choose
    the targets and each one's rank and α; nothing is factorised (``--allocate`` runs the allocation's SVDs)."""
    from spectra_cli.spectral.init import methods

    method = methods()[opts.method]  # a registered name: InitOptions checks it
    if is_adapter(path):
        raise CheckpointError(f"{path}: a PEFT adapter folder; init-adapter needs a full model checkpoint")
    if opts.tuned is not None and not method.needs_tuned:
        raise SpectraError(
            f"--tuned is only used by methods that start from a fine-tune (extract), not {method.name}"
        )
    if opts.energy is not None and not method.needs_tuned:
        raise SpectraError(f"--energy is only used by extract, not {method.name}")
    if method.needs_tuned and opts.tuned is None:
        raise SpectraError(f"{method.name} needs the fine-tuned checkpoint: add --tuned TUNED")
    if (opts.compressed is not None) != method.needs_compressed:
        raise SpectraError(
            f"{method.name} needs the compressed checkpoint: add --compressed CKPT" if method.needs_compressed
            else f"--compressed is only used by eora, not {method.name}"
        )
    if (opts.gradients is not None) != method.needs_gradients:
        raise SpectraError(
            f"{method.name} needs the weights' gradients: add --gradients FILE" if method.needs_gradients
            else f"--gradients is only used by lora-ga, not {method.name}"
        )
    if opts.activations is not None and not method.needs_activations and opts.allocate is None:
        raise SpectraError(
            f"--activations is not used by {method.name} (only by methods that need them, and --allocate eva)"
        )
    if method.needs_activations and opts.activations is None:
        raise SpectraError(
            f"{method.name} needs the inputs' statistics: capture them with `spectra capture` and pass "
            "--activations FILE"
        )
    for key, flag, users in (("bits", "--bits", ("loftq",)), ("loftq_iter", "--loftq-iter", ("loftq",)),
                             ("seed", "--seed", ("orthogonal", "lora-ga"))):  # fmt: skip
        if key in opts.method_options and method.name not in users:
            raise SpectraError(f"{flag} is only used by {' and '.join(users)}, not {method.name}")
    if opts.dtype is not None and not method.changes_base:
        raise SpectraError(f"--dtype sets the residual's dtype; {method.name} leaves the base unchanged")
    ckpt = open_checkpoint(path)
    specs = select_targets(ckpt, opts.selection(split_fused=False))
    if opts.ranks_file is not None:  # the file's target_modules narrow the selection before anything is read
        paths = {sp.name: module_path(sp.tensor.name) for sp in specs}
        cfg = read_ranks_file(opts.ranks_file)
        specs = ranks_file_targets(cfg, specs, paths, opts.ranks_file, explicit_selection(opts))
    acts = None
    if opts.activations is not None and method.needs_activations:
        from spectra_cli.checkpoint.activations import read_activations

        acts_file = read_activations(opts.activations)
        all_modules = [module_path(t.name) for t in ckpt.tensors if len(t.shape) >= 2]
        acts_file.check_modules(all_modules, {module_path(s.tensor.name): s.shape[1] for s in specs})
        acts_file.require(module_path(s.tensor.name) for s in specs)
        acts = acts_file.modules
    tuned_ckpt: Checkpoint | None = None
    tuned_infos: dict[str, TensorInfo] = {}
    second = opts.tuned or opts.compressed or opts.gradients  # the second tensor of each module (same shapes)
    if second is not None:
        role = "fine-tune" if opts.tuned else "compressed copy" if opts.compressed else "gradient file"
        tuned_ckpt, tuned_infos = open_finetune(second, specs, role)
    if opts.allocate is not None:
        opts = allocate_ranks(path, opts)
    targets, dropped = plan_targets(specs, opts, method, acts)
    eng = resolve(EngineOptions(opts.device, opts.precision, opts.backend, opts.max_memory, method="svd"))
    # W, the residual, s·B·A, the Gram route's float64 copy (2 more with a tuned weight and ΔW): one at a time
    check_module_budget([t.spec for t in targets], eng.budget, 5 + 2 * (opts.tuned is not None), 8 if opts.precision == "float64" else 4)  # fmt: skip
    return InitPlan(opts, ckpt, method, targets, dropped, acts, tuned_ckpt, tuned_infos, eng.device, eng.compute)


# ---- the run ----------------------------------------------------------------------------------------------


def run_init(
    path: str | Path,
    out: str | Path,
    options: InitOptions | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    argv: Sequence[str] = (),
) -> InitResult:
    """Initialise an adapter for the checkpoint at ``path`` and write it (with the residual) to ``out``."""
    from spectra_cli.checkpoint.adapter_readme import write_init_readme
    from spectra_cli.checkpoint.provenance import write_run_record
    from spectra_cli.checkpoint.writers import (
        LoraFactors,
        ResidualWriter,
        commit_output,
        prepare_output,
        write_lora_adapter,
    )

    t0 = time.perf_counter()
    out = Path(out)
    p = plan_init(path, options or InitOptions())
    stage = prepare_output(out, p.opts.force, p.inputs)
    writer: ResidualWriter | None = None
    try:
        (stage / "adapter").mkdir()
        if p.method.changes_base:
            (stage / "residual").mkdir()
            writer = ResidualWriter(p.ckpt, stage / "residual", p.opts.dtype)
        got = factorise(p, writer, progress)
        if writer is not None:
            writer.finish()
        base_for_adapter = str(
            (out / "residual").resolve() if writer is not None else Path(p.opts.compressed or p.ckpt.path).resolve()
        )
        write_lora_adapter(
            stage / "adapter",
            {m: LoraFactors(a, b, got.alphas[m]) for m, (a, b) in got.factors.items()},
            base=base_for_adapter, rslora=p.opts.rslora, fan_in_fan_out=bool(p.targets[0].spec.transposed),
            init_lora_weights=p.method.peft_init,
        )  # fmt: skip
        summary = summarize(p, got, writer, round(time.perf_counter() - t0, 3))
        inputs = {
            "checkpoint": str(p.ckpt.path),
            "format": p.ckpt.format,
            "bytes": p.ckpt.total_bytes,
            "tuned": str(Path(p.opts.tuned).resolve()) if p.opts.tuned else None,
            **{k: str(Path(v).resolve()) for k, v in (("compressed", p.opts.compressed),
                                                      ("gradients", p.opts.gradients)) if v},
            "activations": str(Path(p.opts.activations).resolve()) if p.opts.activations else None,
            "ranks_file": str(Path(p.opts.ranks_file).resolve()) if p.opts.ranks_file else None,
        }
        opts_dict = options_record(p.opts)
        opts_dict["resolved"] = {"device": p.device, "precision": p.opts.precision}
        rank_counts = Counter(int(a.shape[0]) for a, _ in got.factors.values())
        write_init_readme(
            stage, out, p.method.name, argv, rank_counts, writer is not None, base_for_adapter, p.method.peft_init
        )
        artifacts = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "README.md"]
        if writer is not None:
            artifacts.append("residual/")
        write_run_record(stage, "init-adapter", list(argv), inputs, opts_dict, {"seconds": summary.seconds},
                         artifacts, {"modules": got.rows, "summary": summary_dict(summary)})  # fmt: skip
        commit_output(stage, out)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return InitResult(got.rows, summary, inputs, opts_dict, out=out)


def factorise(p: InitPlan, writer: ResidualWriter | None,
              progress: Callable[[int, int, str], None] | None = None) -> Factorised:  # fmt: skip
    """Stream the targets in read order, one module's weights in memory at a time: factorise each on the
    compute device with the method, hand its residual to ``writer`` (methods that change the base)."""
    from spectra_cli.checkpoint.torch_tensors import from_device, stage, torch_dtype, upload
    from spectra_cli.checkpoint.writers import json_number
    from spectra_cli.spectral.init import InitInput
    from spectra_cli.spectral.threads import torch_threads

    opts, method, device, acts, targets = p.opts, p.method, p.device, p.activations, p.targets
    cdtype, got, loader = torch_dtype(opts.precision), Factorised([], {}, {}, list(p.dropped)), MatrixLoader(p.ckpt)
    tuned_loader = MatrixLoader(p.tuned) if p.tuned is not None else None
    m_opts = method_options(opts)
    # the next target is read (stored dtype, pinned for CUDA) on a background thread while this one computes
    read = lambda tg: (stage(loader.load(tg.spec), device), None if tuned_loader is None else  # noqa: E731
                       stage(tuned_loader.load(replace(tg.spec, tensor=p.tuned_infos[tg.spec.name])), device))
    for i, (tg, (host_w, host_t)) in enumerate(prefetched(targets, read)):
        t1 = time.perf_counter()
        spec = tg.spec
        w = upload(host_w, device, cdtype)  # moved in the stored dtype, upcast on the device
        w = w.T if spec.transposed else w
        tw = upload(host_t, device, cdtype) if host_t is not None else None
        tuned_w = tw.T if tw is not None and spec.transposed else tw
        for where, t in ((p.ckpt.path, w), (opts.tuned or opts.compressed or opts.gradients, tuned_w)):
            if t is not None and not bool(t.isfinite().all()):
                raise CheckpointError(
                    f"{where}: {spec.tensor.name} holds NaN or infinite values; an adapter cannot be "
                    "initialised from it (exclude it with --exclude or repair the checkpoint)"
                )
        inp = InitInput(
            name=tg.path, weight=w, rank=tg.rank, scale=tg.scale,
            activations=acts[tg.path] if acts is not None else None, tuned=tuned_w, options=m_opts,
            backend=p.backend,
        )  # fmt: skip
        with torch_threads(spec.shape, device):
            res = method.factorize(inp)
        r = int(res.A.shape[0])
        if tuple(res.A.shape) != (r, spec.shape[1]) or tuple(res.B.shape) != (spec.shape[0], r):
            raise RuntimeError(
                f"{method.name} returned A {tuple(res.A.shape)} and B {tuple(res.B.shape)} for {tg.path} "
                f"({spec.shape[0]}×{spec.shape[1]})"
            )
        if writer is not None:
            if res.residual is None:
                raise RuntimeError(f"{method.name} changes the base but returned no residual for {tg.path}")
            resid = res.residual.T if spec.transposed else res.residual
            writer.put(spec.tensor, from_device(resid, writer.code_for(spec.tensor)))
        alpha = tg.alpha
        if r != tg.rank and r > 0:  # the method chose the rank (extract --energy): keep s as planned
            alpha = tg.scale * (math.sqrt(r) if opts.rslora else r)
        m, n = spec.shape
        row: dict[str, Any] = {
            "name": tg.path, "kind": spec.kind, "depth": spec.depth, "shape": f"{m}x{n}",
            "dtype": spec.dtype_name, "rank": r, "alpha": json_number(alpha) if r else None,
            "scale": (tg.scale if r else None),
        }  # fmt: skip
        row.update({k: (float(v) if isinstance(v, float | int | np.floating) else v) for k, v in res.info.items()})
        row["seconds"] = round(time.perf_counter() - t1, 4)
        got.rows.append(row)
        if r == 0:
            got.dropped.append(tg.path)
        else:
            adt = np.float64 if opts.precision == "float64" else np.float32
            got.factors[tg.path] = (
                res.A.detach().to("cpu").numpy().astype(adt, copy=False),
                res.B.detach().to("cpu").numpy().astype(adt, copy=False),
            )
            got.alphas[tg.path] = alpha
        del w, tuned_w, res, inp, host_w, host_t
        if progress:
            progress(i + 1, len(targets), tg.path)
    if not got.factors:
        raise SelectionError("every target module got rank 0 (ΔW is zero); nothing to write")
    return got


def summarize(p: InitPlan, got: Factorised, writer: ResidualWriter | None, seconds: float) -> InitSummary:
    """Ranks, parameters, what the residual holds and what the adapter does not carry; peak memory."""
    import torch

    untracked = (
        untracked_changes(p.ckpt, p.tuned, {t.spec.tensor.name for t in p.targets}) if p.tuned and p.opts.tuned else []
    )
    rank_counts = Counter(int(a.shape[0]) for a, _ in got.factors.values())
    errs = [r["relative_error"] for r in got.rows if isinstance(r.get("relative_error"), float)]
    return InitSummary(
        method=p.method.name,
        reference=p.method.reference,
        modules=len(got.factors),
        dropped=sorted(got.dropped),
        ranks={str(k): v for k, v in sorted(rank_counts.items())},
        adapter_parameters=int(sum(a.size + b.size for a, b in got.factors.values())),
        residual=writer is not None,
        residual_dtype=(p.opts.dtype or "as stored") if writer is not None else None,
        skipped_files=writer.skipped_files if writer is not None else [],
        untracked_changes=untracked,
        device=p.device,
        seconds=seconds,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        peak_gpu_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1) if p.device.startswith("cuda") else None,
        max_relative_error=max(errs) if errs else None,
    )
