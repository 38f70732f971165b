"""The reversible merge (RMM) and the interference statistics of task updates.

:func:`rmm_fit` stores, per module, a basis of p elements and an n×p coefficient matrix from which every
task's ΔWᵢ is recovered (:func:`rmm_reconstruct`); the basis is the Eckart–Young optimum of the stacked
(optionally centred) updates, computed through their n×n Gram matrix. :func:`interference`: cosines and
top-k subspace overlaps between the tasks of one module. Decompositions run through
:mod:`spectra_cli.spectral.linalg` on the ``backend`` given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spectra_cli.errors import BudgetError, ShapeMismatch, SpectraError
from spectra_cli.spectral import linalg
from spectra_cli.spectral.linalg import NUMPY, Backend
from spectra_cli.spectral.merge import xp
from spectra_cli.spectral.merge.updates import (
    GRAM_RTOL,
    RANK_RTOL,
    Update,
    as_factored,
    check_shapes,
    f64,
    factored_svd,
    gram,
    out_dtype,
    stack_factors,
    weighted_dense,
)


@dataclass(frozen=True)
class RMMModule:
    """The reversible merge of one module: ΔŴᵢ = mean + Σⱼ coefficients[i, j]·basis[j].

    ``basis`` holds p elements, orthonormal in the Frobenius inner product (dense, or factored and compressed
    to their numerical rank); ``coefficients`` is n×p; ``errors`` the n relative reconstruction errors
    ‖ΔWᵢ − ΔŴᵢ‖_F/‖ΔWᵢ‖_F (0 for a zero update reconstructed exactly); ``singular_values`` all n singular
    values of the stacked (centred) n×(out·in) matrix, for energy and sweeps; ``storage`` the numbers stored
    (basis, coefficients and mean), ``raw`` the numbers in the n inputs.
    """

    mean: Update | None
    basis: list[Update]
    coefficients: np.ndarray
    errors: np.ndarray
    singular_values: np.ndarray
    storage: int
    raw: int

    @property
    def p(self) -> int:
        return len(self.basis)

    @property
    def n(self) -> int:
        return int(self.coefficients.shape[0])

    @property
    def energy_kept(self) -> float:
        """Σ_{j≤p} σⱼ² / Σ σⱼ² of the stacked (centred) updates (1 when they are all zero)."""
        total = float(np.sum(self.singular_values**2))
        return float(np.sum(self.singular_values[: self.p] ** 2)) / total if total > 0 else 1.0

    @property
    def storage_ratio(self) -> float:
        return self.storage / self.raw if self.raw else 0.0


def basis_for_energy(singular_values: np.ndarray, energy: float) -> int:
    """The smallest p with Σ_{i≤p}σᵢ²/Σσ² ≥ energy (τ in (0, 1]); 1 for an all-zero stack."""
    lam = np.asarray(singular_values, dtype=np.float64) ** 2
    total = float(lam.sum())
    if total <= 0:
        return 1
    frac = np.cumsum(lam) / total
    return min(int(np.searchsorted(frac, energy * (1 - 1e-12), side="left")) + 1, lam.size)


def _stack_svd(g: np.ndarray, center: bool, backend: Backend) -> tuple[np.ndarray, np.ndarray]:
    """(σ descending, Q n×n) of the stacked n×d matrix M (centred: H·M, H = I − 11ᵀ/n) from its Gram G:
    eig(H·G·H) = Q·diag(σ²)·Qᵀ."""
    n = g.shape[0]
    if center:
        h = np.eye(n) - 1.0 / n
        g = h @ g @ h
    lam, q = linalg.eigh((g + g.T) / 2, backend=backend)
    return np.sqrt(np.clip(lam, 0.0, None)), np.ascontiguousarray(q)


def rmm_fit(
    updates: Sequence[Update],
    *,
    basis: int | None = None,
    energy: float | None = None,
    center: bool = False,
    gram_matrix: np.ndarray | None = None,
    backend: Backend = NUMPY,
) -> RMMModule:
    """Reversible merge of one module: the best rank-p approximation M ≈ C·Bᵀ of the n×(out·in) stack M of the
    vectorised task updates (rows; minus the mean row when ``center``), by Eckart–Young its truncated SVD.

    Computed through the n×n Gram matrix G (from the factors for factored updates): eig(G) = Q·Σ²·Qᵀ gives
    C = Q_p·Σ_p (n×p) and the orthonormal basis Bⱼ = Σᵢ Qᵢⱼ·ΔWᵢ/σⱼ, each a known combination of the updates:
    dense inputs give dense basis elements; factored inputs give Bⱼ = [Q₁ⱼB₁ … Q_nⱼB_n]·[A₁; …; A_n]/σⱼ,
    compressed exactly by QR + SVD to its numerical rank (≤ Σrᵢ), so a factored basis costs ≈ p·Σrᵢ·(out+in)
    numbers. Give ``basis`` = p (1 ≤ p ≤ n) or ``energy`` = τ ∈ (0, 1] (smallest p keeping that fraction of
    Σσ²; default τ = 1). p is capped at the numerical rank of the stack (σ > 1e-7·σ₁; centring removes one),
    so ``len(result.basis)`` may be less than p when tasks are linearly dependent; the error stays exact.
    Per-task errors are √(Σ_{j>p} σⱼ²Qᵢⱼ²)/‖ΔWᵢ‖_F, the rows of the Eckart–Young residual.
    ``gram_matrix``: the n×n :func:`gram` of ``updates`` when the caller already has it (e.g. from
    :func:`interference`), so it is not computed again.
    """
    check_shapes(updates)
    n = len(updates)
    if basis is not None and energy is not None:
        raise BudgetError("give either a basis size (--basis) or an energy fraction (--energy), not both")
    if basis is not None and not 1 <= basis <= n:
        raise BudgetError(
            f"basis size {basis} is out of range for {n} tasks; choose --basis between 1 and {n} "
            "(a basis of n elements already reconstructs every task exactly)"
        )
    if energy is not None and not (0.0 < energy <= 1.0):
        raise BudgetError(f"energy fraction {energy} is out of range; choose --energy in (0, 1], e.g. 0.9")

    if gram_matrix is not None and gram_matrix.shape != (n, n):
        raise ShapeMismatch(f"a Gram matrix of shape {gram_matrix.shape} for {n} updates; it must be {n}×{n}")
    g = gram(updates) if gram_matrix is None else f64(gram_matrix)
    sigma, q = _stack_svd(g, center, backend)
    p = basis if basis is not None else basis_for_energy(sigma, 1.0 if energy is None else energy)
    numerical = int(np.sum(sigma > GRAM_RTOL * sigma[0])) if sigma[0] > 0 else 0
    p = min(p, numerical)

    coeff = q[:, :p] * sigma[:p]  # n×p
    a = q[:, :p] / sigma[:p] if p else np.zeros((n, 0))  # basis j = Σᵢ a[i, j]·ΔWᵢ
    if center:
        a = a - a.mean(axis=0, keepdims=True)  # exact in theory (Q's columns ⊥ 1); removes rounding
    dtype = out_dtype(updates)
    factored = all(u.is_factored for u in updates)

    mean: Update | None = None
    elements: list[Update] = []
    if factored:
        # every element is [c₁B₁ … c_nB_n]·[A₁; …; A_n] for some cᵢ: one QR of each stacked factor serves all
        b_cat, a_cat = stack_factors(updates, [1.0] * n)
        owner = np.repeat(np.arange(n), [u.rank for u in updates])
        qb, rb = linalg.qr(b_cat, backend)
        qa, ra = linalg.qr(a_cat.T, backend)

        def element(c: np.ndarray) -> Update:
            svd = linalg.thin_svd((rb * xp.values(c[owner], rb)) @ ra.T, backend)
            u, s, vt = svd.u, svd.s, svd.vt
            keep = max(1, int((s > RANK_RTOL * s[0]).sum())) if xp.nelem(s) and s[0] > 0 else 1
            return Update(B=xp.astype((qb @ u[:, :keep]) * s[:keep], dtype), A=xp.astype(vt[:keep] @ qa.T, dtype))

        if center:
            mean = element(np.full(n, 1.0 / n))
        elements = [element(a[:, j]) for j in range(p)]
    else:
        if center:
            mean = Update(dense=xp.astype(weighted_dense(updates, [1.0 / n] * n), dtype))
        for j in range(p):
            elements.append(Update(dense=xp.astype(weighted_dense(updates, a[:, j]), dtype)))
    if p == 0 and mean is None:
        # every update is zero: keep one zero element (rank 1) so the module still knows its shape
        out, inn = updates[0].shape
        ref = updates[0].dense if updates[0].dense is not None else updates[0].B
        elements = [Update(B=xp.zeros((out, 1), ref, dtype), A=xp.zeros((1, inn), ref, dtype))]
        coeff = np.zeros((n, 1))

    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    resid = np.sqrt(np.clip(np.sum((q[:, p:] * sigma[p:]) ** 2, axis=1), 0.0, None))
    errors = np.divide(resid, norms, out=np.zeros(n), where=norms > 0)
    storage = sum(e.size for e in elements) + int(coeff.size) + (mean.size if mean is not None else 0)
    return RMMModule(
        mean=mean,
        basis=elements,
        coefficients=coeff,
        errors=errors,
        singular_values=sigma,
        storage=storage,
        raw=sum(u.size for u in updates),
    )


def rmm_reconstruct(m: RMMModule, task: int, backend: Backend = NUMPY) -> Update:
    """Task ``task``'s (0-based) reconstructed update ΔŴ = mean + Σⱼ C[task, j]·basisⱼ: dense when the basis
    is dense, else factored and compressed to its numerical rank."""
    if not 0 <= task < m.n:
        raise SpectraError(f"task index {task} is out of range; this merge holds tasks 0..{m.n - 1}")
    parts: list[tuple[Update, float]] = [
        (e, float(c)) for e, c in zip(m.basis, m.coefficients[task], strict=True)
    ]
    if m.mean is not None:
        parts.insert(0, (m.mean, 1.0))
    if not parts:
        raise SpectraError("this module's basis is empty (all task updates are zero); nothing to reconstruct")
    dtype = np.result_type(*(e.dtype for e, _ in parts))
    if all(e.is_factored for e, _ in parts):
        b, a = stack_factors([e for e, _ in parts], [c for _, c in parts])
        return as_factored(b, a, dtype, backend)
    return Update(dense=xp.astype(weighted_dense([e for e, _ in parts], [c for _, c in parts]), dtype))


# --------------------------------------------------------------------------------------------------------
# Interference


def _top_left(u: Update, k: int, backend: Backend) -> np.ndarray:
    """The top-k left singular vectors of ΔW (out×k', k' ≤ k, only σ above round-off). Factored: exact from the
    factors. Dense: :func:`~spectra_cli.spectral.linalg.gram_svd` with ``top=k`` (the k largest eigenpairs of
    the float64 Gram matrix of the smaller side; for a tall ΔW the vectors are ΔW·V orthonormalised by QR),
    instead of a full SVD: the overlap statistic needs only the leading subspace, and a full SVD of e.g. a
    30522×384 embedding update cost seconds per task."""
    if u.is_factored:
        uu, s, _ = factored_svd([u], None, min(k, u.rank), backend)
        keep = int((s > RANK_RTOL * s[0]).sum()) if xp.nelem(s) and s[0] > 0 else 0
        return uu[:, :keep]
    svd = linalg.gram_svd(f64(u.to_dense()), top=k, backend=backend)
    keep = int((svd.s > GRAM_RTOL * svd.s[0]).sum()) if xp.nelem(svd.s) and svd.s[0] > 0 else 0
    return xp.contiguous(svd.u[:, :keep])


def interference(updates: Sequence[Update], k: int = 8, backend: Backend = NUMPY) -> dict[str, np.ndarray]:
    """How much the task updates of one module overlap. ``cosine`` n×n: ⟨ΔWᵢ, ΔWⱼ⟩/(‖ΔWᵢ‖‖ΔWⱼ‖) (0 where an
    update is zero); ``overlap`` n×n: mean cos² of the principal angles between the top-k left singular
    subspaces, ‖UᵢᵀUⱼ‖_F²/min(kᵢ, kⱼ) ∈ [0, 1] (kᵢ = min(k, rank of ΔWᵢ)); ``norms``: ‖ΔWᵢ‖_F; ``gram``: the
    n×n :func:`gram` they come from (for :func:`rmm_fit`)."""
    check_shapes(updates)
    if k < 1:
        raise SpectraError(f"the subspace size k={k} must be at least 1")
    g = gram(updates)
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    denom = np.outer(norms, norms)
    cosine = np.divide(g, denom, out=np.zeros_like(g), where=denom > 0)
    subspaces = [
        _top_left(u, k, backend) if nrm > 0 else xp.zeros((u.shape[0], 0), u.dense if u.dense is not None else u.B)
        for u, nrm in zip(updates, norms, strict=True)
    ]
    n = len(updates)
    overlap = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            kk = min(subspaces[i].shape[1], subspaces[j].shape[1])
            if kk:
                m = subspaces[i].T @ subspaces[j]
                overlap[i, j] = overlap[j, i] = min(1.0, xp.total(m * m) / kk)
    return {"cosine": np.clip(cosine, -1.0, 1.0), "overlap": overlap, "norms": norms, "gram": g}
