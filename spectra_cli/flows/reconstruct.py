"""``reconstruct``: get one task's model (or its LoRA adapter) back from an rmm bundle written by
``merge --method rmm``. No printing."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.bundle import module_fit, read_bundle
from spectra_cli.checkpoint.loader import MatrixLoader
from spectra_cli.checkpoint.matrices import select_matrices
from spectra_cli.checkpoint.source import Checkpoint, open_checkpoint
from spectra_cli.checkpoint.tensors import to_float
from spectra_cli.errors import CheckpointError, SelectionError, ShapeMismatch
from spectra_cli.options import SelectionOptions
from spectra_cli.results import RunResult
from spectra_cli.spectral.merge import (
    compress,
    rmm_reconstruct,
)

#: a reconstructed adapter keeps the singular values of its update above this fraction of σ₁ (float32
#: resolution): the basis combination leaves round-off directions at ~1e-9·σ₁ that would only inflate the rank
ADAPTER_RTOL = 1e-6


@dataclass(frozen=True)
class ReconstructSummary:
    """The summary of ``reconstruct``: the task, how it came in (full / adapter), modules rebuilt, the output,
    the mean and largest relative reconstruction error over the modules, the bundle's storage."""

    task: str
    kind: str
    modules: int
    output: str
    mean_rel_error: float | None
    max_rel_error: float | None
    storage: float | None
    seconds: float


@dataclass
class ReconstructResult(RunResult[ReconstructSummary]):
    out: Path | None = None
    kind: str = ""


def run_reconstruct(
    bundle: str | Path,
    task: str,
    out: str | Path,
    base_path: str | Path | None = None,
    force: bool = False,
    argv: Sequence[str] = (),
    progress: Callable[[int, int, str], None] | None = None,
) -> ReconstructResult:
    """Rebuild task ``task`` of an rmm bundle into ``out``: a full checkpoint in the base's layout (W₀ + the
    reconstructed ΔW per module, other changed tensors restored exactly) when the task came in as a
    checkpoint, a PEFT LoRA adapter (per module rank = numerical rank of the reconstruction, scale 1) when
    it came in as an adapter."""
    from spectra_cli.checkpoint.provenance import write_run_record
    from spectra_cli.checkpoint.writers import PatchedCopy, commit_output, prepare_output

    t0 = time.perf_counter()
    doc, ck = read_bundle(bundle)
    tasks = {t["name"]: (i, t) for i, t in enumerate(doc["tasks"])}
    if task not in tasks:
        raise SelectionError(f"{bundle}: no task named {task!r}; the bundle holds {', '.join(tasks)}")
    idx, entry = tasks[task]
    out = Path(out)
    base: Checkpoint | None = None
    if entry["kind"] == "full":
        bp = Path(base_path) if base_path is not None else Path(doc["base"]["path"])
        if not bp.exists():
            raise CheckpointError(
                f"{bp}: the bundle's base checkpoint is not there; pass its location with --base PATH"
            )
        base = open_checkpoint(bp)
        shapes = {x.name: list(x.shape) for x in base.tensors}
        for name, shape in doc["base"]["tensors"].items():
            if shapes.get(name) != shape:
                raise ShapeMismatch(
                    f"{bp}: tensor {name} is {shapes.get(name)} but the bundle was made on a base where it is "
                    f"{shape}; pass the bundle's base with --base PATH"
                )
    inputs_list = [Path(bundle)] + ([Path(base.path)] if base is not None else [])
    stage = prepare_output(out, force, inputs_list)
    rows: list[dict[str, Any]] = []
    try:
        names = list(doc["modules"])
        if base is not None:
            copy = PatchedCopy(base, stage)
            specs = {s.tensor.name: s for s in select_matrices(base, SelectionOptions().selection())[0]}
            loader = MatrixLoader(base)
            for done, name in enumerate(names, 1):
                meta = doc["modules"][name]
                spec = specs.get(meta["tensor"])
                if spec is None:
                    raise CheckpointError(f"{base.path}: no matrix {meta['tensor']} for module {name}")
                if idx not in meta.get("zero_tasks", []):  # else: the task left it alone, the base's stays
                    delta = rmm_reconstruct(module_fit(doc, ck, name), idx).to_dense()
                    w_new = loader.dense(spec, np.float64) + delta
                    copy.patch(spec.tensor, w_new.T if spec.transposed else w_new)
                rows.append(_rec_row(name, meta, idx, task, "full", None))
                if progress:
                    progress(done, len(names), name)
            for tname in entry["extra_tensors"]:
                data = ck.read(ck.info(f"task.{task}.{tname}"))
                copy.patch(base.info(tname), to_float(data, np.float64))
        else:
            _write_task_adapter(doc, ck, idx, entry, stage, rows, progress)
        opts = {"task": task, "base": str(base.path) if base is not None else None}
        inputs = {"bundle": str(bundle), "task": task, "kind": entry["kind"]}
        summary = ReconstructSummary(
            task=task, kind=entry["kind"], modules=len(rows), output=str(out),
            mean_rel_error=float(np.mean([r["rel_error"] for r in rows])) if rows else None,
            max_rel_error=float(np.max([r["rel_error"] for r in rows])) if rows else None,
            storage=doc.get("storage"), seconds=round(time.perf_counter() - t0, 3),
        )  # fmt: skip
        artifacts = sorted(p.name for p in stage.iterdir())
        write_run_record(stage, "reconstruct", list(argv), inputs, opts, {"seconds": summary.seconds}, artifacts)
        commit_output(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return ReconstructResult(rows, summary, inputs, opts, out, entry["kind"])


def _rec_row(
    name: str, meta: dict[str, Any], idx: int, task: str, kind: str, rank: int | None
) -> dict[str, Any]:
    m, n = meta["shape"]
    return {"module": name, "task": task, "shape": f"{m}x{n}", "p": meta["p"], "rel_error": meta["errors"][idx],
            "storage": meta["storage"] / meta["raw"] if meta["raw"] else None, "output": kind,
            "lora_rank": rank}  # fmt: skip


def _write_task_adapter(doc: dict[str, Any], ck: Checkpoint, idx: int, entry: dict[str, Any], stage: Path,
                        rows: list[dict[str, Any]],
                        progress: Callable[[int, int, str], None] | None) -> None:  # fmt: skip
    """A PEFT LoRA adapter for one task: its original config with per-module rank_pattern / alpha_pattern
    (scale 1, or α = √r with rsLoRA), factors from the reconstruction re-factored at their numerical rank,
    written by :func:`~spectra_cli.checkpoint.writers.write_lora_adapter`."""
    from spectra_cli.checkpoint.writers import LoraFactors, write_lora_adapter

    cfg = {**entry["adapter_config"], "inference_mode": True, "init_lora_weights": True}
    rslora = bool(cfg.get("use_rslora", False))
    factors: dict[str, LoraFactors] = {}
    mods = entry["modules"]
    for done, (name, info) in enumerate(mods.items(), 1):
        meta = doc["modules"][name]
        rec = rmm_reconstruct(module_fit(doc, ck, name), idx)
        if idx in meta.get("zero_tasks", []):  # a zero update (e.g. lora_B still at its zero init)
            b, a = np.zeros((rec.shape[0], 0)), np.zeros((0, rec.shape[1]))
        elif rec.is_factored:  # at float32's resolution: reconstruction round-off must not inflate the rank
            u, sv, vt = compress(np.asarray(rec.B), np.asarray(rec.A), ADAPTER_RTOL)
            b, a = u * sv, vt
        else:  # a dense reconstruction: factor it at its numerical rank
            u, sv, vt = compress(np.asarray(rec.dense), np.eye(rec.shape[1]), ADAPTER_RTOL)
            b, a = u * sv, vt
        if b.shape[1] == 0:  # a zero update: PEFT needs rank ≥ 1
            b, a = np.zeros((b.shape[0], 1)), np.zeros((1, a.shape[1]))
        if info["transposed"] != meta["transposed"]:
            # an embedding: its stored factors hold (B·A)ᵀ of the logical update
            b, a = a.T, b.T
        r = a.shape[0]
        factors[info["path"]] = LoraFactors(
            a.astype(np.float32),
            b.astype(np.float32),
            math.sqrt(r) if rslora else float(r),
            (info["a"], info["b"]),
        )
        rows.append(_rec_row(name, meta, idx, entry["name"], "adapter", r))
        if progress:
            progress(done, len(mods), name)
    extra = {tname: ck.read(ck.info(f"task.{entry['name']}.{tname}")) for tname in entry["extra_tensors"]}
    write_lora_adapter(stage, factors, config=cfg, tensors=extra)

