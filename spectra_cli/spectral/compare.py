"""What fine-tuning did to one weight matrix: intruder dimensions, drift, subspace overlap.

Definitions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"): with
W₀ = U₀Σ₀V₀ᵀ and W_t = U_tΣ_tV_tᵀ, the tuned left singular vector U_t[:, j] (j ≤ k) is an *intruder* at threshold ε when max_i |⟨U₀[:, i], U_t[:, j]⟩| < ε, i over all min(m, n) base
vectors. Pure functions on NumPy arrays; W is out×in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from spectra_cli.spectral import linalg
from spectra_cli.spectral.linalg import SVD, Backend, factored_values
from spectra_cli.spectral.metrics import effective_rank, stable_rank

__all__ = ["SVD", "Drift", "Intruders", "drift", "factored_values", "intruder_dimensions", "intruder_update",
           "intruders_from_cosines", "max_abs_cosines", "subspace_overlap", "svd_function"]  # fmt: skip


@dataclass(frozen=True)
class Intruders:
    """For the top-k tuned left singular vectors: their best |cosine| against every base left singular
    vector, their singular values, and per ε the count and 1-based ranks of intruders."""

    max_cos: np.ndarray
    sigma: np.ndarray
    epsilons: tuple[float, ...]
    ranks: dict[float, list[int]]

    def count(self, eps: float) -> int:
        return len(self.ranks[eps])


def max_abs_cosines(u_base: Any, u_tuned_top: Any) -> Any:
    """max_i |⟨U₀[:, i], U_t[:, j]⟩| for each of the k tuned columns: the r₀×k cosine matrix |U₀ᵀU_t| is formed
    where the vectors are (NumPy, or a torch device) and only its k column maxima are returned, of the same
    kind (zeros when the base has no vector)."""
    cos = abs(u_base.T @ u_tuned_top)  # r₀×k
    if linalg.is_torch(cos):
        return cos.amax(dim=0) if cos.numel() else cos.new_zeros(u_tuned_top.shape[1])
    return cos.max(axis=0) if cos.size else np.zeros(u_tuned_top.shape[1])


def intruders_from_cosines(max_cos: np.ndarray, s_tuned_top: np.ndarray, epsilons: Sequence[float]) -> Intruders:
    """:class:`Intruders` from the k best cosines (:func:`max_abs_cosines`) and the tuned top-k σ."""
    eps = tuple(float(e) for e in epsilons)
    max_cos = np.asarray(max_cos)
    ranks = {e: [int(j) + 1 for j in np.flatnonzero(max_cos < e)] for e in eps}
    return Intruders(
        max_cos=max_cos, sigma=np.asarray(s_tuned_top, dtype=np.float64), epsilons=eps, ranks=ranks
    )


def intruder_dimensions(u_base: np.ndarray, u_tuned_top: np.ndarray, s_tuned_top: np.ndarray,
                        epsilons: Sequence[float]) -> Intruders:  # fmt: skip
    """``u_base`` m×r₀ (all base left singular vectors), ``u_tuned_top`` m×k; see the module docstring."""
    return intruders_from_cosines(max_abs_cosines(u_base, u_tuned_top), s_tuned_top, epsilons)


def subspace_overlap(u_base_top: np.ndarray, u_tuned_top: np.ndarray) -> tuple[float, float]:
    """(normalised projection ‖U₀ₖᵀU_tₖ‖_F²/k ∈ [0, 1], largest principal angle in degrees) of the two
    top-k left singular subspaces."""
    k = u_tuned_top.shape[1]
    if k == 0:
        return 1.0, 0.0
    m = u_base_top.T @ u_tuned_top
    proj = float(np.sum(m * m) / k)
    # sin of the largest angle = ‖(I − U₀U₀ᵀ)U_t‖₂: accurate for small angles, where arccos is not
    resid = u_tuned_top - u_base_top @ m
    sin_max = float(linalg.singular_values(resid, "svd").max()) if resid.size else 0.0
    angle = float(np.degrees(np.arcsin(min(1.0, sin_max))))
    return min(proj, 1.0), angle


@dataclass(frozen=True)
class Drift:
    """How far the tuned matrix moved. ``delta_*`` describe ΔW = W_t − W₀."""

    relative_delta: float  # ‖ΔW‖_F / ‖W₀‖_F
    delta_frobenius: float
    delta_spectral_norm: float
    delta_effective_rank: float
    delta_stable_rank: float
    effective_rank_change: float  # erank(W_t) − erank(W₀)
    spectral_norm_change: float  # σ₁(W_t) − σ₁(W₀), relative to σ₁(W₀)
    subspace_overlap: float
    max_principal_angle: float


def relative(part: float, whole: float) -> float:
    """part / whole for norms: 0/0 = 0 (an all-zero matrix that did not change has not moved at all), x/0 = inf
    for x > 0."""
    if whole > 0:
        return part / whole
    return 0.0 if part == 0 else math.inf


def drift(s_base: np.ndarray, s_tuned: np.ndarray, s_delta: np.ndarray, u_base_top: np.ndarray,
          u_tuned_top: np.ndarray) -> Drift:  # fmt: skip
    """Drift metrics from the base, tuned and ΔW singular values and the top-k left subspaces."""
    base_f = math.sqrt(float(np.sum(s_base**2)))
    delta_f = math.sqrt(float(np.sum(s_delta**2)))
    overlap, angle = subspace_overlap(u_base_top, u_tuned_top)
    s1 = float(s_base[0]) if s_base.size else 0.0
    return Drift(
        relative_delta=relative(delta_f, base_f),
        delta_frobenius=delta_f,
        delta_spectral_norm=float(s_delta.max()) if s_delta.size else 0.0,
        delta_effective_rank=effective_rank(np.sort(s_delta)[::-1]) if delta_f > 0 else 0.0,
        delta_stable_rank=stable_rank(np.sort(s_delta)[::-1]) if delta_f > 0 else 0.0,
        effective_rank_change=effective_rank(s_tuned) - effective_rank(s_base),
        spectral_norm_change=(float(s_tuned[0]) - s1) / s1 if s1 > 0 else 0.0,
        subspace_overlap=overlap,
        max_principal_angle=angle,
    )


def intruder_update(svd_t: SVD, ranks: Sequence[int], lam: float) -> tuple[np.ndarray, np.ndarray]:
    """The correction (λ−1)·Σ_{j∈I} σⱼuⱼvⱼᵀ as factors (B_I m×|I|, A_I |I|×n), ranks 1-based; adding
    B_I·A_I to W_t gives the mitigated W′ exactly."""
    idx = np.asarray([r - 1 for r in ranks], dtype=int)
    b = svd_t.u[:, idx] * ((lam - 1.0) * svd_t.s[idx])
    a = svd_t.vt[idx, :]
    return b, a


def svd_function(backend: Backend, precision: str = "float32") -> Callable[[np.ndarray], SVD]:
    """compare's thin SVD, NumPy (or a tensor already on the device) in and float64 NumPy out, run where
    ``backend`` says: the float64 Gram route (:func:`~spectra_cli.spectral.linalg.gram_svd`) for float32
    precision, the exact SVD for float64."""

    def numpy_out(svd: SVD) -> SVD:
        return SVD(linalg.to_numpy(svd.u), linalg.to_numpy(svd.s), linalg.to_numpy(svd.vt))

    if precision == "float32":
        return lambda w: numpy_out(linalg.gram_svd(w, backend=backend))
    return lambda w: numpy_out(linalg.thin_svd(linalg.as_f64(w), backend=backend))
