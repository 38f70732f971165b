"""The other tail fits of WeightWatcher (``fit=``, ``fix_fingers=``, ``xmax=``), with its definitions.

Sources: the public ``weightwatcher`` package v0.7.x (``WeightWatcher.fit_powerlaw``, ``normalize_params``,
``valid_params``, ``RMT_Util.fit_clipped_powerlaw``) and the ``powerlaw`` package it calls for the truncated
power law, v1.5 (``Fit``, ``Fit.find_xmin``, ``Distribution.fit``, ``Distribution.KS``, ``Truncated_Power_Law``;
Alstott, Bullmore & Plenz 2014). WeightWatcher 0.7 is written against powerlaw 1.x: powerlaw 2.0 no longer takes
the ``distribution=`` argument WeightWatcher passes, and every TPL, E_TPL and xmin_peak fit then ends with
status "failed".

- ``tpl`` (WeightWatcher ``fit="TPL"``): p(x) ∝ x^(−α)·e^(−Λx) on [xmin, ∞). For every candidate xmin (each
  distinct eigenvalue but the largest) (α, Λ) maximise the likelihood — ``scipy.optimize.fmin`` (Nelder–Mead,
  xtol = ftol = 1e-4, unbounded) from α₀ = 1 + n/Σln(x/xmin), Λ₀ = 1/mean(x); a point with α ≤ 1 or Λ ≤ 0
  scores 10^−307 per eigenvalue — and D is the KS distance between the fitted CDF
  F(x) = (Γ(1−α, Λxmin) − Γ(1−α, Λx)) / Γ(1−α, Λxmin) and the empirical CDF of the distinct values
  ((j − i)/(n − i), the ``powerlaw`` convention). The xmin of the smallest D among the fits with α > 1 and
  Λ > 0 wins; when there is none the smallest D overall wins and the fit is ``unstable`` (``noise_flag``).
- ``e_tpl`` (``fit="E_TPL"``): ``tpl`` with ``fix_fingers="xmin_peak"`` (WeightWatcher's ``normalize_params``).
- ``xmin_peak``: xmin is searched only near the peak of the ESD: h = 100-bin histogram of log10 λ, x₂ = 10 to
  the left edge of its fullest bin, candidates λ in [min(r), max(r)] with r = (log10(0.95·x₂), 1.5·x₂) — the
  first bound in log10 units and the second in λ units, exactly as WeightWatcher passes them to
  ``powerlaw.Fit`` (kept as is so the numbers match; documented in docs/analyze-rmt.md).
- ``clip_xmax`` (``fit_clipped_powerlaw``): the power law is refitted with the k = 2 … 9 largest eigenvalues
  removed; the first refit whose α is below the first fit's α − 1 wins (``num_fingers`` = k − 1); the search
  stops early when a refit's α ≤ 2. ``raw_alpha`` is the fit on all eigenvalues.
- ``xmax``: an integer k drops the k largest eigenvalues before the fit (refused above M/2 and with
  fix-fingers); ``force`` ends the truncated power law's support at the largest eigenvalue (its CDF is
  normalised on [xmin, xmax]); WeightWatcher refuses ``force`` with its own power-law estimator, and so does
  spectra for ``pl``.

Γ(s, x) is the (non-regularised) upper incomplete gamma function, for s = 1 − α ≤ 1: SciPy's
Γ(s)·Q(s, x) for s > 0, E₁(x) for s = 0 and Γ(s, x) = (Γ(s+1, x) − xˢe^(−x))/s below (``powerlaw`` uses mpmath).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

import numpy as np

from spectra_cli.errors import SpectraError
from spectra_cli.spectral.powerlaw import MIN_TAIL, fit_power_law

FITS = ("pl", "tpl", "e_tpl")
FIX_FINGERS = ("xmin_peak", "clip_xmax")
#: the ``powerlaw`` package's floor for an out-of-range likelihood or CDF value (10**sys.float_info.min_10_exp)
TINY = 10.0**sys.float_info.min_10_exp
#: WeightWatcher's EVALS_THRESH: eigenvalues at or below it are left out of its fits
EVALS_THRESH = 1e-5
#: WeightWatcher's clip_xmax constants (DEFAULT_MAX_FINGERS, DEFAULT_FINGER_THRESH, min_alpha)
MAX_FINGERS, FINGER_THRESH, MIN_ALPHA = 10, 1.0, 2.0
#: the 5 % critical value of the one-sample KS statistic is KS_CRIT/√n (Massey 1951, asymptotic)
KS_CRIT = 1.36
#: a truncated power law's α this close to its bound 1 reads ``at-bound`` (``powerlaw`` 2.0's near-boundary eps)
BOUND_EPS = 1e-2


@dataclass(frozen=True)
class FitOptions:
    """``--fit``, ``--fix-fingers`` and ``--xmax``: ``xmax`` is None, ``"force"`` or k (drop the k largest)."""

    fit: str = "pl"
    fix_fingers: str | None = None
    xmax: int | str | None = None

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise SpectraError(f"--fit {self.fit}: choose one of {', '.join(FITS)}")
        if self.fix_fingers is not None and self.fix_fingers not in FIX_FINGERS:
            raise SpectraError(f"--fix-fingers {self.fix_fingers}: choose one of {', '.join(FIX_FINGERS)}")
        if self.fit == "e_tpl" and self.fix_fingers == "clip_xmax":
            raise SpectraError("--fix-fingers clip_xmax: e_tpl already fixes the fingers with xmin_peak; "
                               "use --fit tpl or --fit pl with clip_xmax")  # fmt: skip
        if self.fix_fingers == "clip_xmax" and self.fit == "tpl":
            raise SpectraError("--fix-fingers clip_xmax: clips a power-law fit only (as WeightWatcher); use --fit pl")
        if isinstance(self.xmax, str) and self.xmax != "force":
            raise SpectraError(f"--xmax {self.xmax}: give a number of eigenvalues to drop, or force")
        if isinstance(self.xmax, int):
            if self.xmax == 0:
                raise SpectraError("--xmax 0: give k ≥ 1 eigenvalues to drop (or leave --xmax out)")
            if self.fix_fingers is not None:
                raise SpectraError(f"--xmax {self.xmax}: cannot drop eigenvalues and fix fingers at once "
                                   "(WeightWatcher refuses it too)")  # fmt: skip
        if self.xmax == "force" and self.fit == "pl":
            raise SpectraError("--xmax force: needs --fit tpl or e_tpl (the power-law estimator has no xmax, "
                               "as WeightWatcher's)")  # fmt: skip

    @property
    def default(self) -> bool:
        return self.fit == "pl" and self.fix_fingers is None and self.xmax is None

    @property
    def truncated(self) -> bool:
        return self.fit in ("tpl", "e_tpl")

    @property
    def xmin_peak(self) -> bool:
        return self.fix_fingers == "xmin_peak" or self.fit == "e_tpl"


@dataclass(frozen=True)
class TailFit:
    """One fit of the tail. ``Lambda`` is NaN for a power law; ``num_fingers``/``raw_alpha`` only for clip_xmax;
    ``unstable`` is the ``powerlaw`` package's noise flag (no valid candidate)."""

    alpha: float
    xmin: float
    xmax: float
    ks: float
    n_tail: int
    Lambda: float = float("nan")
    num_fingers: int = 0
    raw_alpha: float = float("nan")
    unstable: bool = False

    @property
    def reliability(self) -> str:
        """``n/a`` (no fit), ``small-tail`` (fewer than 50 tail eigenvalues: Clauset et al. 2009 §3),
        ``unstable`` (no fit inside the valid range), ``at-bound`` (a truncated power law whose α ended within
        :data:`BOUND_EPS` of its bound α = 1: α is then not identified and Λ alone carries the tail; ``powerlaw``
        2.0 flags a fit this near a bound as noise), ``poor-fit`` (D above the KS test's 5 % critical value
        1.36/√n_tail: the fitted law is rejected even before accounting for xmin having been chosen to
        minimise D), else ``ok``."""
        at_bound = math.isfinite(self.Lambda) and self.alpha - 1 < BOUND_EPS
        return reliability(self.alpha, self.ks, self.n_tail, self.unstable, at_bound)


def reliability(alpha: float, ks: float, n_tail: int, unstable: bool = False, at_bound: bool = False) -> str:
    """The reading of a fit (see :attr:`TailFit.reliability`)."""
    if not (np.isfinite(alpha) and np.isfinite(ks)) or n_tail <= 0:
        return "n/a"
    if n_tail < MIN_TAIL:
        return "small-tail"
    if unstable:
        return "unstable"
    if at_bound:
        return "at-bound"
    if ks > KS_CRIT / math.sqrt(n_tail):
        return "poor-fit"
    return "ok"


NO_TAIL = TailFit(float("nan"), float("nan"), float("nan"), float("nan"), 0)


def upper_gamma(s: float, x: np.ndarray | float) -> np.ndarray:
    """Γ(s, x) = ∫ₓ^∞ t^(s−1)e^(−t) dt for s ≤ 1 (any sign) and x > 0."""
    from scipy import special

    x = np.asarray(x, dtype=np.float64)
    if s > 0:
        return np.asarray(special.gamma(s) * special.gammaincc(s, x))
    if s == 0:
        return np.asarray(special.exp1(x))
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        return (upper_gamma(s + 1, x) - x**s * np.exp(-x)) / s


def xmin_peak_range(evals: np.ndarray) -> tuple[float, float]:
    """WeightWatcher's xmin range for ``fix_fingers="xmin_peak"`` (units mixed as in its source)."""
    h = np.histogram(np.log10(evals), bins=100)
    x2 = 10 ** h[1][int(np.argmax(h[0]))]
    return float(np.log10(0.95 * x2)), float(1.5 * x2)


def _empirical_cdf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``powerlaw.statistics.cdf``: the distinct sorted values and the share of the data below each."""
    n = float(x.size)
    if not np.any(x[:-1] == x[1:]):
        return x, np.arange(0, x.size) / n
    c = np.searchsorted(x, x, side="left") / n
    u, idx = np.unique(x, return_index=True)
    return u, c[idx]


class _TPL:
    """One candidate xmin of ``powerlaw``'s Truncated_Power_Law (v1.5: continuous, likelihood fit)."""

    def __init__(self, data: np.ndarray, xmin: float, xmax: float | None) -> None:
        self.data, self.xmin, self.xmax = data, xmin, xmax

    @staticmethod
    def in_range(a: float, lam: float) -> bool:
        """``_in_standard_parameter_range``: Λ > 0 and α > 1."""
        return bool(lam > 0 and a > 1)

    def cost(self, p: np.ndarray) -> float:
        """−Σ ln pdf, pdf = x^(−α)e^(−Λx)·Λ^(1−α)/Γ(1−α, Λxmin); 10^−307 per point out of range or at 0."""
        a, lam = float(p[0]), float(p[1])
        if not self.in_range(a, lam):
            return -float(np.sum(np.log(np.full(self.data.size, TINY))))
        with np.errstate(all="ignore"):
            c = lam ** (1 - a) / float(upper_gamma(1 - a, lam * self.xmin))
            lik = self.data ** (-a) * np.exp(-lam * self.data) * c
            lik[lik == 0] = TINY
            return float(-np.sum(np.log(lik)))

    def cdf(self, x: np.ndarray, a: float, lam: float) -> np.ndarray:
        if not self.in_range(a, lam):
            return np.full(x.size, TINY)
        with np.errstate(all="ignore"):
            s = 1 - a

            def base(v: np.ndarray | float) -> np.ndarray:
                return 1 - upper_gamma(s, lam * np.asarray(v)) / lam**s

            b0 = float(base(self.xmin))
            if b0 == 1:
                return np.ones(x.size)
            norm = 1 - b0
            if self.xmax:
                norm = norm - (1 - float(base(self.xmax)))
            return (base(x) - b0) / norm

    def fit(self) -> tuple[float, float]:
        """(α, Λ) as ``Distribution.fit``: ``scipy.optimize.fmin`` (Nelder–Mead, xtol = ftol = 1e-4, no bounds)
        from α₀ = 1 + n/Σln(x/xmin), Λ₀ = 1/mean(x)."""
        from scipy import optimize

        d = self.data
        x0 = (1 + d.size / float(np.sum(np.log(d / self.xmin))), 1 / float(np.mean(d)))
        with np.errstate(all="ignore"):
            p = optimize.fmin(self.cost, x0, full_output=1, disp=False)[0]
        return float(p[0]), float(p[1])


def fit_tpl(evals: np.ndarray, xmin_range: tuple[float, float] | None = None, force_xmax: bool = False) -> TailFit:
    """``powerlaw.Fit(evals, xmin=xmin_range, xmax=…, distribution=xmin_distribution="truncated_power_law")``
    as WeightWatcher calls it, and the fit's α, Λ (``fit.truncated_power_law``), xmin, D and tail size."""
    x = np.sort(np.asarray(evals, dtype=np.float64))
    x = x[x > 0]
    if x.size < 3:
        return NO_TAIL
    xmax = float(x[-1]) if force_xmax else None
    bins, actual = _empirical_cdf(x)
    if xmin_range is None:
        cands = np.unique(x)[:-1]
    else:
        lo, hi = float(np.min(xmin_range)), float(np.max(xmin_range))
        cands = np.unique(x[(x >= lo) & (x <= hi)])[:-1]
    if cands.size < 1:
        return NO_TAIL
    ds = np.empty(cands.size)
    params = np.empty((cands.size, 2))
    good = np.zeros(cands.size, dtype=bool)
    for i, xmin in enumerate(cands):
        t = _TPL(x[x >= xmin], float(xmin), xmax)
        a, lam = t.fit()
        params[i] = a, lam
        good[i] = t.in_range(a, lam)
        ind = bins >= xmin
        emp = actual[ind].copy()
        dropped = emp[0]
        emp = (emp - dropped) / (1 - dropped)
        diff = t.cdf(bins[ind], a, lam) - emp
        ds[i] = max(float(np.max(diff)), -float(np.min(diff)))
    # masked argmin over the valid fits (``find_xmin``); none valid: argmin over all, noise_flag
    i = int(np.argmin(np.where(good, ds, np.inf))) if good.any() else int(np.argmin(ds))
    xmin = float(cands[i])
    return TailFit(alpha=float(params[i, 0]), xmin=xmin, xmax=xmax if xmax is not None else float("nan"),
                   ks=float(ds[i]), n_tail=int(np.count_nonzero(x >= xmin)), Lambda=float(params[i, 1]),
                   unstable=not good.any())  # fmt: skip


def _pl(evals: np.ndarray, xmin_range: tuple[float, float] | None = None) -> TailFit:
    """The power law of :func:`fit_power_law` (WeightWatcher's ``WWFit``), optionally with xmin restricted to a
    range (candidates as ``powerlaw.Fit`` picks them: distinct values in [lo, hi], the last one left out)."""
    cand = None
    if xmin_range is not None:
        x = np.sort(evals[evals > 0])
        lo, hi = float(np.min(xmin_range)), float(np.max(xmin_range))
        u, first = np.unique(x, return_index=True)
        cand = first[(u >= lo) & (u <= hi)][:-1]
        if cand.size < 1:
            return NO_TAIL
    f = fit_power_law(evals, candidates=cand)
    return TailFit(f.alpha, f.xmin, float("nan"), f.ks_distance, f.n_tail)


def fit_tail(evals: np.ndarray, opts: FitOptions) -> TailFit:
    """The fit ``opts`` asks for on the ESD ``evals`` (all M eigenvalues, as WeightWatcher): fitted on the
    λ > :data:`EVALS_THRESH`, the tail size counted on all of them."""
    ev = np.sort(np.asarray(evals, dtype=np.float64))
    if isinstance(opts.xmax, int):
        k = abs(opts.xmax)
        if k > ev.size / 2:
            return NO_TAIL
        ev = ev[:-k]
    x = ev[ev > EVALS_THRESH]
    rng = xmin_peak_range(x) if opts.xmin_peak and x.size else None
    if opts.truncated:
        f = fit_tpl(x, rng, force_xmax=opts.xmax == "force")
    elif opts.fix_fingers == "clip_xmax":
        f = clip_xmax(x)
    else:
        f = _pl(x, rng)
    n_tail = int(np.count_nonzero(ev >= f.xmin)) if np.isfinite(f.xmin) else 0
    return dataclasses.replace(f, n_tail=n_tail)


def clip_xmax(x: np.ndarray) -> TailFit:
    """WeightWatcher's ``fit_clipped_powerlaw`` with its defaults (see the module docstring)."""
    first = fit_power_law(x)
    best, fingers = first, 0
    for idx in range(2, MAX_FINGERS):
        f = fit_power_law(x[:-idx])
        if f.alpha + FINGER_THRESH < first.alpha:
            best, fingers = f, idx - 1
            break
        if f.alpha <= MIN_ALPHA:
            break
    n_tail = int(np.count_nonzero(x >= best.xmin)) if np.isfinite(best.xmin) else 0
    return TailFit(best.alpha, best.xmin, float("nan"), best.ks_distance, n_tail, num_fingers=fingers,
                   raw_alpha=first.alpha)  # fmt: skip


def fit_columns(evals: np.ndarray, opts: FitOptions) -> dict[str, float | int | str]:
    """The ``fit_*`` columns of one matrix (WeightWatcher's alpha, Lambda, xmin, xmax, D, num_pl_spikes,
    num_fingers, raw_alpha, under spectra's names) and the fit's reliability."""
    f = fit_tail(evals, opts)
    out: dict[str, float | int | str] = {
        "fit": opts.fit, "fit_alpha": f.alpha, "fit_xmin": f.xmin, "fit_ks": f.ks, "fit_tail": f.n_tail,
        "fit_reliability": f.reliability,
    }  # fmt: skip
    if opts.truncated:
        out["fit_Lambda"] = f.Lambda
        out["fit_xmax"] = f.xmax
    if opts.fix_fingers == "clip_xmax":
        out["fit_num_fingers"] = f.num_fingers
        out["fit_raw_alpha"] = f.raw_alpha
    return out
