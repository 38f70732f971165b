"""Measures of one module's merge, on top of :mod:`spectra_cli.spectral.merge`: how far the merged update is
from each task's (:func:`merge_errors`), the tasks' interference (:func:`module_interference`), an rmm fit on
the tasks that changed the module (:func:`rmm_live`), and the error/storage curve of an rmm bundle for every
basis size p = 1..n (:class:`Sweep`). Pure functions of arrays."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TypedDict

import numpy as np

from spectra_cli.spectral.linalg import NUMPY, Backend
from spectra_cli.spectral.merge import GRAM_RTOL, RMMModule, Update, inner, interference, rmm_fit


class SweepCurve(TypedDict):
    """Per basis size p = 1..n: the overall relative error and the storage (of the inputs' numbers, None
    when they hold none); per module, its relative error at each p."""

    p: list[int]
    error: list[float]
    storage: list[float | None]
    modules: dict[str, list[float]]


def merge_errors(merged: Update, updates: list[Update], norms: np.ndarray) -> tuple[list[float], list[float]]:
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


def module_interference(updates: list[Update], k: int, be: Backend = NUMPY) -> dict[str, np.ndarray]:
    """:func:`~spectra_cli.spectral.merge.interference` of the updates (top-k subspaces, k capped by the shape),
    as float64 arrays."""
    m, n = updates[0].shape
    return {
        key: np.asarray(v, dtype=np.float64) for key, v in interference(updates, min(k, m, n), be).items()
    }


def rmm_live(updates: list[Update], live: np.ndarray, raw: int, basis: int | None, energy: float | None,
              center: bool, g: np.ndarray, be: Backend = NUMPY) -> RMMModule:  # fmt: skip
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
        fit = rmm_fit(updates, basis=basis, energy=energy, center=center, gram_matrix=g, backend=be)
        return replace(fit, raw=raw)
    fit = rmm_fit([updates[i] for i in idx], basis=None if basis is None else min(basis, int(idx.size)),
                  energy=energy, center=center, gram_matrix=g[np.ix_(idx, idx)], backend=be)  # fmt: skip
    coeff = np.zeros((n, fit.coefficients.shape[1]))
    coeff[idx] = fit.coefficients
    errors = np.zeros(n)
    errors[idx] = fit.errors
    storage = fit.storage + (n - int(idx.size)) * int(fit.coefficients.shape[1])
    return replace(fit, coefficients=coeff, errors=errors, storage=storage, raw=raw)


def sweep_module(
    sv: np.ndarray, n: int, mean_size: int, basis_size: float
) -> tuple[list[float], list[float]]:
    """For p = 1..n: the residual energy Σ_{k>p} σ_k² of the best rank-p basis (Eckart–Young, from the stack's
    singular values) and the numbers a rank-p bundle stores (mean + p basis elements + n·p coefficients), with
    p capped at the stack's numerical rank as :func:`~spectra_cli.spectral.merge.rmm_fit` caps it (a centred stack of n tasks has rank ≤ n − 1,
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


class Sweep:
    """The sweep of ``merge --sweep``: :func:`sweep_module` of every module accumulated over the model."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.resid = np.zeros(n)
        self.stored = np.zeros(n)
        self.energy = 0.0
        self.modules: dict[str, list[float]] = {}

    def add(self, name: str, fit: RMMModule, updates: list[Update], norms: np.ndarray) -> None:
        """One module: its fit (for the stack's singular values and the sizes of its mean and basis elements),
        its updates and their norms ‖ΔWᵢ‖_F."""
        energy = float(np.sum(norms**2))
        mean_size = fit.mean.size if fit.mean is not None else 0
        bsize = (float(np.mean([b.size for b in fit.basis])) if fit.basis
                 else float(sum(u.size for u in updates) if updates[0].is_factored else updates[0].size))  # fmt: skip
        resid, stored = sweep_module(fit.singular_values, self.n, mean_size, bsize)
        self.resid += np.asarray(resid)
        self.stored += np.asarray(stored)
        self.energy += energy
        self.modules[name] = [math.sqrt(r / energy) if energy > 0 else 0.0 for r in resid]

    def curve(self, raw_total: int) -> SweepCurve:
        """The model's curve; ``raw_total``: the numbers the inputs hold over the merged matrices."""
        energy = self.energy
        return SweepCurve(
            p=list(range(1, self.n + 1)),
            error=[math.sqrt(r / energy) if energy > 0 else 0.0 for r in self.resid],
            storage=[s / raw_total if raw_total else None for s in self.stored],
            modules=self.modules,
        )
