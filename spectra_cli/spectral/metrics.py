"""Spectral metrics of one matrix, computed from its singular values (each definition, with its source, in the
function's docstring)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from spectra_cli.spectral.powerlaw import fit_power_law

EPS = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}


@dataclass(frozen=True)
class SpectralMetrics:
    """Metrics of an m×n matrix W with singular values σ₁ ≥ σ₂ ≥ … (λ = σ²).

    ``alpha`` is the power-law exponent of the tail of the eigenvalues λ (Clauset MLE, KS-chosen xmin) fitted
    on the ``alpha_tail`` eigenvalues λ ≥ ``alpha_xmin`` (``alpha_flag`` is ``small-tail`` below 50 of them);
    ``entropy`` is WeightWatcher's spectral entropy of p = λ/Σλ divided by log(numerical rank).
    """

    spectral_norm: float
    frobenius_norm: float
    nuclear_norm: float
    condition_number: float
    stable_rank: float
    effective_rank: float
    numerical_rank: int
    energy_rank_90: int
    energy_rank_99: int
    alpha: float
    alpha_xmin: float
    alpha_ks: float
    alpha_tail: int
    alpha_flag: str
    alpha_weighted: float
    log_norm: float
    log_spectral_norm: float
    entropy: float

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def effective_rank(s: np.ndarray) -> float:
    """Roy & Vetterli (2007): exp of the Shannon entropy of p = σ/Σσ (0·log 0 = 0)."""
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(math.exp(-float(np.sum(p * np.log(p)))))


def stable_rank(s: np.ndarray) -> float:
    """Σσ²/σ₁²."""
    return float(np.sum(s**2) / s[0] ** 2) if s.size and s[0] > 0 else 0.0


def numerical_rank(s: np.ndarray, shape: tuple[int, int], precision: str = "float32") -> int:
    """#{σ > max(m,n)·ε·σ₁} (the NumPy/PyTorch matrix_rank convention) with ε of the compute precision."""
    if not s.size:
        return 0
    tol = max(shape) * EPS[precision] * float(s[0])
    return int(np.count_nonzero(s > tol))


def energy_rank(s: np.ndarray, tau: float) -> int:
    """Smallest k with Σ_{i≤k}σᵢ² ≥ τ·Σσ²."""
    e = np.cumsum(s.astype(np.float64) ** 2)
    if not e.size or e[-1] <= 0:
        return 0
    return int(np.searchsorted(e, tau * e[-1] * (1 - 1e-12)) + 1)


def compute_metrics(s: np.ndarray, shape: tuple[int, int], precision: str = "float32") -> SpectralMetrics:
    """All metrics of one matrix from its singular values ``s`` (any order; sorted here, descending)."""
    s = np.sort(np.clip(np.asarray(s, dtype=np.float64), 0.0, None))[::-1]
    lam = s**2
    sigma1 = float(s[0]) if s.size else 0.0
    smin = float(s[-1]) if s.size else 0.0
    nrank = numerical_rank(s, shape, precision)
    sum_lam = float(lam.sum())
    if nrank > 1 and sum_lam > 0:
        p = lam[:nrank] / float(lam[:nrank].sum())
        p = p[p > 0]
        entropy = float(-np.sum(p * np.log(p)) / math.log(nrank))
    else:
        entropy = 0.0
    fit = fit_power_law(lam[:nrank] if nrank else lam)
    log_spec = math.log10(sigma1**2) if sigma1 > 0 else float("-inf")
    return SpectralMetrics(
        spectral_norm=sigma1,
        frobenius_norm=math.sqrt(sum_lam),
        nuclear_norm=float(s.sum()),
        condition_number=(sigma1 / smin) if smin > 0 else float("inf"),
        stable_rank=stable_rank(s),
        effective_rank=effective_rank(s),
        numerical_rank=nrank,
        energy_rank_90=energy_rank(s, 0.90),
        energy_rank_99=energy_rank(s, 0.99),
        alpha=fit.alpha,
        alpha_xmin=fit.xmin,
        alpha_ks=fit.ks_distance,
        alpha_tail=fit.n_tail,
        alpha_flag=fit.flag,
        alpha_weighted=fit.alpha * log_spec if np.isfinite(fit.alpha) else float("nan"),
        log_norm=math.log10(sum_lam) if sum_lam > 0 else float("-inf"),
        log_spectral_norm=log_spec,
        entropy=entropy,
    )
