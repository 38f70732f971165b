"""Elementwise merges: task arithmetic (Ilharco et al. 2023) and TIES (Yadav et al. 2023, as mergekit).

- ``task-arithmetic``: ΔW = λ·Σ wᵢΔWᵢ (factored inputs stay factored, compressed exactly).
- ``ties``: per task keep the top ``density`` fraction of entries by magnitude, elect each entry's sign by the
  summed (weighted) mass, average the agreeing entries, times λ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spectra_cli.spectral.linalg import NUMPY, Backend
from spectra_cli.spectral.merge import xp
from spectra_cli.spectral.merge.updates import (
    CHUNK,
    MergeOutcome,
    Update,
    as_factored,
    f64,
    out_dtype,
    param_float,
    stack_factors,
    weighted_dense,
)


def merge_task_arithmetic(
    updates: Sequence[Update], weights: Sequence[float], params: Mapping[str, Any], backend: Backend = NUMPY
) -> MergeOutcome:
    lam = param_float(params, "scale")
    dtype = out_dtype(updates)
    w = [lam * x for x in weights]
    if all(u.is_factored for u in updates):
        b, a = stack_factors(updates, w)
        return MergeOutcome(as_factored(b, a, dtype, backend), {"energy_kept": 1.0})
    return MergeOutcome(Update(dense=xp.astype(weighted_dense(updates, w), dtype)), {"energy_kept": 1.0})


def _keep_count(d: int, density: float) -> int:
    """Entries kept per task by TIES trimming: ⌊density·d⌋ (mergekit, the TIES paper's top-k%), at least one
    when density > 0."""
    return min(d, max(1, int(density * d))) if density > 0 else 0


def _threshold(values: np.ndarray, keep: int) -> tuple[float, int]:
    """(t, q) such that the top ``keep`` magnitudes of ``values`` are those > t plus the first q (in storage
    order) equal to t. t = -1 keeps everything, t = inf nothing. (A tensor: ``torch.kthvalue`` where it is.)"""
    if xp.is_torch(values):
        return _threshold_torch(values, keep)
    mag = np.abs(values).reshape(-1)
    if keep >= mag.size:
        return -1.0, 0
    if keep <= 0:
        return math.inf, 0
    t = float(np.partition(mag, mag.size - keep)[mag.size - keep])
    return t, keep - int(np.count_nonzero(mag > t))


class _Ties:
    """TIES over the entries of n same-shaped task vectors, fed in consecutive chunks (columns of an n×c
    array), so a module never has to be held n times in float64. See :func:`ties_combine`."""

    def __init__(self, weights: Sequence[float], thresholds: Sequence[tuple[float, int]]) -> None:
        self.w = np.asarray(weights, dtype=np.float64)[:, None]
        self.t = np.array([t for t, _ in thresholds])[:, None]
        self.quota = [q for _, q in thresholds]
        self.kept = 0.0
        self.total = 0.0
        self.sign_sum = 0.0
        self.offset = 0
        # entries whose elected sign is an exact zero: (index, mean if +, mean if −), resolved at the end by
        # the majority sign over all entries (as the TIES authors' code)
        self.pending: list[tuple[int, float, float]] = []

    def chunk(self, x: np.ndarray) -> np.ndarray:
        x = f64(x)
        mag = np.abs(x)
        mask = mag > self.t
        for i, q in enumerate(self.quota):
            if q > 0:
                eq = np.flatnonzero(mag[i] == self.t[i, 0])[:q]
                mask[i, eq] = True
                self.quota[i] -= eq.size
        trimmed = np.where(mask, x, 0.0)
        self.total += float(np.sum(x * x))
        self.kept += float(np.sum(trimmed * trimmed))
        weighted = self.w * trimmed
        sign = np.sign(weighted.sum(axis=0))
        self.sign_sum += float(sign.sum())
        wsign = np.sign(weighted)
        wmat = np.broadcast_to(self.w, x.shape)

        def mean_for(sg: np.ndarray | float) -> np.ndarray:
            agree = (wsign == sg) & (wsign != 0)
            num = np.sum(np.where(agree, weighted, 0.0), axis=0)
            den = np.sum(np.where(agree, wmat, 0.0), axis=0)
            return np.divide(num, den, out=np.zeros_like(num), where=den != 0)

        merged = mean_for(sign[None, :])
        for j in np.flatnonzero((sign == 0) & np.any(wsign != 0, axis=0)):
            col = weighted[:, j : j + 1], wsign[:, j : j + 1], wmat[:, j : j + 1]
            vals = []
            for sg in (1.0, -1.0):
                agree = col[1] == sg
                den = float(np.sum(np.where(agree, col[2], 0.0)))
                vals.append(float(np.sum(np.where(agree, col[0], 0.0))) / den if den != 0 else 0.0)
            self.pending.append((self.offset + int(j), vals[0], vals[1]))
        self.offset += x.shape[1]
        return merged

    def finish(self, merged_flat: np.ndarray) -> float:
        """Resolve the zero-sign entries in ``merged_flat`` (all chunks, concatenated); return energy kept."""
        majority = 1.0 if self.sign_sum >= 0 else -1.0
        for j, pos, neg in self.pending:
            merged_flat[j] = pos if majority > 0 else neg
        return self.kept / self.total if self.total > 0 else 1.0


def _threshold_torch(values: Any, keep: int) -> tuple[float, int]:
    mag = values.abs().reshape(-1)
    size = int(mag.numel())
    if keep >= size:
        return -1.0, 0
    if keep <= 0:
        return math.inf, 0
    t = float(mag.kthvalue(size - keep + 1).values)  # the (size − keep)-th smallest, from 0: np.partition's
    return t, keep - int((mag > t).sum())


class _TorchTies:
    """:class:`_Ties` on torch tensors, where they are (the merge's torch route): the same trimming, election
    and disjoint mean; the entries whose elected sign is an exact zero are resolved at the end the same way."""

    def __init__(self, weights: Sequence[float], thresholds: Sequence[tuple[float, int]], ref: Any) -> None:
        self.w = xp.values(weights, ref)[:, None]
        self.t = xp.values([t for t, _ in thresholds], ref)[:, None]
        self.quota = [q for _, q in thresholds]
        self.kept = self.total = self.sign_sum = 0.0
        self.offset = 0
        self.pending: list[tuple[Any, Any, Any]] = []  # (indices, means if +, means if −)

    def chunk(self, x: Any) -> Any:
        import torch

        x = xp.as_f64(x)
        mag = x.abs()
        mask = mag > self.t
        for i, q in enumerate(self.quota):
            if q > 0:
                eq = torch.nonzero(mag[i] == self.t[i, 0]).reshape(-1)[:q]
                mask[i, eq] = True
                self.quota[i] -= int(eq.numel())
        trimmed = torch.where(mask, x, torch.zeros_like(x))
        self.total += float((x * x).sum())
        self.kept += float((trimmed * trimmed).sum())
        weighted = self.w * trimmed
        sign = torch.sign(weighted.sum(dim=0))
        self.sign_sum += float(sign.sum())
        wsign = torch.sign(weighted)
        wmat = self.w.expand_as(x)

        def mean_for(sg: Any) -> Any:
            agree = (wsign == sg) & (wsign != 0)
            num = torch.where(agree, weighted, 0.0).sum(dim=0)
            den = torch.where(agree, wmat, 0.0).sum(dim=0)
            return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)

        merged = mean_for(sign[None, :])
        zero = torch.nonzero((sign == 0) & (wsign != 0).any(dim=0)).reshape(-1)
        if zero.numel():
            self.pending.append((zero + self.offset, mean_for(1.0)[zero], mean_for(-1.0)[zero]))
        self.offset += x.shape[1]
        return merged

    def finish(self, merged_flat: Any) -> float:
        majority = 1.0 if self.sign_sum >= 0 else -1.0
        for idx, pos, neg in self.pending:
            merged_flat[idx] = pos if majority > 0 else neg
        return self.kept / self.total if self.total > 0 else 1.0


def _ties_for(weights: Sequence[float], thresholds: Sequence[tuple[float, int]], ref: Any) -> Any:
    return _TorchTies(weights, thresholds, ref) if xp.is_torch(ref) else _Ties(weights, thresholds)


def ties_combine(x: np.ndarray, weights: Sequence[float], density: float) -> tuple[np.ndarray, float]:
    """TIES on the rows of x (n×d, one task a row): trim each row to its top ⌊density·d⌋ magnitudes (ties at
    the threshold broken by position), elect a sign per entry from the summed weighted mass Σ wᵢxᵢ (an exact
    zero takes the majority of the elected signs, as the TIES authors' code), and take the weighted mean of
    the agreeing entries: Σ wᵢxᵢ·[sign(wᵢxᵢ) = elected] / Σ wᵢ·[…] (mergekit's normalisation; the plain mean
    when all wᵢ = 1).

    Returns (merged d-vector, fraction of the rows' squared mass kept by the trimming)."""
    keep = _keep_count(x.shape[1], density)
    ties = _ties_for(weights, [_threshold(row, keep) for row in x], x)
    merged = ties.chunk(x)
    return merged, ties.finish(merged)


def _rows(u: Update, r0: int, r1: int) -> np.ndarray:
    """Rows r0:r1 of ΔW (from the factors without forming the rest)."""
    if u.dense is not None:
        return u.dense[r0:r1]
    assert u.B is not None and u.A is not None
    return u.B[r0:r1] @ u.A


def merge_ties(
    updates: Sequence[Update], weights: Sequence[float], params: Mapping[str, Any], backend: Backend = NUMPY
) -> MergeOutcome:
    """TIES on the entries of the dense updates, row block by row block, where the updates are (no
    decomposition: ``backend`` unused)."""
    lam = param_float(params, "scale")
    density = param_float(params, "density", 0.0, 1.0)
    out, inn = updates[0].shape
    keep = _keep_count(out * inn, density)
    step = max(1, CHUNK // max(inn, 1))
    # thresholds from the very same row blocks as the merge below (a factored B[r0:r1]·A may round
    # differently from the whole B·A), one task's dense update at a time
    thresholds = [
        _threshold(xp.concat([_rows(u, r0, min(out, r0 + step)) for r0 in range(0, out, step)]), keep)
        for u in updates
    ]
    first = updates[0].dense if updates[0].dense is not None else updates[0].B
    ties = _ties_for(weights, thresholds, first)
    result = xp.zeros((out * inn,), first)
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        block = xp.stack([_rows(u, r0, r1).reshape(-1) for u in updates])
        result[r0 * inn : r1 * inn] = ties.chunk(block)
    kept = ties.finish(result)
    return MergeOutcome(
        Update(dense=xp.astype((lam * result).reshape(out, inn), out_dtype(updates))),
        {"energy_kept": kept, "density": density},
    )
