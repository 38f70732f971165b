"""The updates ΔWᵢ of fine-tunes against their base, read module by module (``merge``): a full fine-tune is
checked to have the base's architecture, each task's update of a matrix is W_t − W₀ (dense) or an adapter's
factors with its scale folded in (never densified here), and the other float tensors (biases, norms, unselected
matrices) are read with their differences. NaN/Inf weights are refused, naming where."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from spectra_cli.checkpoint.loader import MatrixLoader
from spectra_cli.checkpoint.matrices import MatrixSpec
from spectra_cli.checkpoint.source import Checkpoint
from spectra_cli.checkpoint.tensors import RawTensor, TensorInfo, to_float
from spectra_cli.checkpoint.tuned import Tuned
from spectra_cli.errors import CheckpointError, ShapeMismatch
from spectra_cli.spectral.engine import nonfinite_counts
from spectra_cli.spectral.merge import Update


def check_full(t: Tuned, base: Checkpoint) -> None:
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
            return Update(B=(mod.scale * a.T).astype(dtype), A=np.ascontiguousarray(b.T, dtype), lora_scale=mod.scale)
        return Update(B=(mod.scale * b).astype(dtype), A=a.astype(dtype), lora_scale=mod.scale)
    assert w0 is not None and loader is not None
    info = t.tensors.get(spec.name)
    if info is None:
        return Update(dense=np.zeros((out, inp), dtype))
    wt = loader.dense(replace(spec, tensor=info), dtype)
    return Update(dense=(wt.astype(np.float64) - w0.astype(np.float64)).astype(dtype))


def check_finite(x: np.ndarray, who: str, tensor: str, path: str | Path) -> None:
    """A NaN/Inf weight makes every merge statistic and every SVD meaningless: refuse it, naming where."""
    nan, inf = nonfinite_counts(x)
    if nan or inf:
        raise CheckpointError(
            f"{who}: {tensor} in {path} has {nan} NaN and {inf} Inf values; merging non-finite weights is "
            "meaningless, repair or leave out this input"
        )


def check_update(u: Update, t: Tuned, spec: MatrixSpec) -> Update:
    for x in (u.dense, u.B, u.A):
        if x is not None:
            check_finite(x, t.name, spec.tensor.name, t.path)
    return u


class RestTensors:
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
        check_finite(w0, "base", info.name, self.base.path)
        ds, raws = [], []
        for t in self.full:
            assert t.checkpoint is not None
            raw = t.checkpoint.read(t.checkpoint.info(info.name))
            wt = to_float(raw, np.float64)
            check_finite(wt, t.name, info.name, t.path)
            ds.append(wt - w0)
            raws.append(raw)
        if not any(np.any(d != 0) for d in ds):
            return None
        return w0, ds, raws
