"""Power-law fit of the tail of an empirical spectral density, as WeightWatcher does it (Clauset et al.).

For each candidate xmin — every sorted eigenvalue but the largest, as WeightWatcher's ``WWFit`` — the
continuous MLE is α = 1 + n / Σ ln(λᵢ/xmin) over the tail λ ≥ xmin, and the Kolmogorov–Smirnov distance is
D = maxⱼ |P(λⱼ) − j/n| between the fitted CDF P(λ) = 1 − (λ/xmin)^(1−α) and the tail's empirical CDF
(j = 0…n−1, WeightWatcher's and the ``powerlaw`` package's convention); the xmin with the smallest D wins
(D = 1 when α ≤ 1). Vectorised: O(n²) work in blocks, no Python loop per candidate.

Deviations from WeightWatcher, documented in the README: spectra fits the eigenvalues above the
numerical-rank threshold (WeightWatcher: λ > 1e-5), and returns NaN below 10 of them (WeightWatcher switches
to a different small-sample estimator below 20).

The tail size n_tail (the eigenvalues λ ≥ xmin the MLE used) is reported with every fit. Below
:data:`MIN_TAIL` = 50 of them the reading says ``small-tail`` instead of over-/under-trained: Clauset, Shalizi &
Newman (2009, "Power-law distributions in empirical data", §3) find the MLE of α biased and its KS-chosen
xmin unstable for tails of fewer than about 50 observations, and WeightWatcher's constants set the same 50 as
its default minimum (``DEFAULT_MIN_EVALS = 50``; its ``MIN_NUM_EVALS = 10`` carries the comment
"really 50"). α is still reported: the flag says it cannot be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: below this many positive eigenvalues no fit is attempted (α is reported as NaN)
MIN_EVALS = 10
OVER_TRAINED = 2.0
UNDER_TRAINED = 6.0
#: below this many tail eigenvalues (λ ≥ xmin) α is flagged ``small-tail`` (Clauset et al. 2009; WeightWatcher)
MIN_TAIL = 50


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float
    xmin: float
    ks_distance: float
    n_tail: int

    @property
    def flag(self) -> str:
        """WeightWatcher's reading of α: < 2 over-trained, > 6 under-trained; ``small-tail`` when the fit used
        fewer than :data:`MIN_TAIL` eigenvalues (too few to read α either way)."""
        if not np.isfinite(self.alpha):
            return "n/a"
        if self.n_tail < MIN_TAIL:
            return "small-tail"
        if self.alpha < OVER_TRAINED:
            return "over-trained"
        if self.alpha > UNDER_TRAINED:
            return "under-trained"
        return "ok"


NO_FIT = PowerLawFit(float("nan"), float("nan"), float("nan"), 0)


def fit_power_law(evals: np.ndarray, block: int = 256, candidates: np.ndarray | None = None) -> PowerLawFit:
    """Fit α to the tail of the eigenvalues ``evals`` (any order; non-positive values are ignored).

    ``candidates``: indices (into the sorted positive values) of the xmin to try; default every one but the
    largest."""
    x = np.sort(np.asarray(evals, dtype=np.float64))
    x = x[x > 0]
    n = x.size
    if n < MIN_EVALS:
        return NO_FIT
    logx = np.log(x)
    # every point but the largest (duplicates included, as WWFit)
    cand = np.arange(n - 1) if candidates is None else np.asarray(candidates, dtype=np.int64)
    suffix = np.cumsum(logx[::-1])[::-1]  # suffix[i] = Σ_{j≥i} ln x_j
    n_tail = n - cand
    denom = suffix[cand] - n_tail * logx[cand]
    # a tail of (numerically) equal values has no exponent: suffix sums cancel to ~±1e-14, not 0
    degenerate = denom <= 1e-12 * n_tail * (1.0 + np.abs(logx[cand]))
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = np.where(degenerate, np.nan, 1.0 + n_tail / denom)
    best = (np.inf, 0)
    pos = np.arange(n)
    for s in range(0, cand.size, block):
        c = cand[s : s + block]
        a = alphas[s : s + block]
        nt = (n - c).astype(np.float64)
        # ratio of each point to each candidate xmin; points below xmin masked out
        lr = logx[None, :] - logx[c][:, None]
        mask = pos[None, :] >= c[:, None]
        with np.errstate(over="ignore", invalid="ignore"):
            model = 1.0 - np.exp((1.0 - a)[:, None] * lr)
        empirical = (pos[None, :] - c[:, None]) / nt[:, None]
        d = np.where(mask, np.abs(model - empirical), 0.0)
        dmax = d.max(axis=1)
        dmax = np.where(np.isfinite(a) & (a > 1), dmax, 1.0)
        i = int(np.argmin(dmax))
        if dmax[i] < best[0]:
            best = (float(dmax[i]), s + i)
    if not np.isfinite(best[0]):
        return NO_FIT
    j = best[1]
    return PowerLawFit(
        alpha=float(alphas[j]), xmin=float(x[cand[j]]), ks_distance=best[0], n_tail=int(n - cand[j])
    )
