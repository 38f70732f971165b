"""Random-matrix diagnostics of one weight matrix, with WeightWatcher's definitions (Martin & Mahoney 2021,
"Implicit self-regularization in deep neural networks"; the public ``weightwatcher`` package, v0.7.x).

Notation: W is m×n, N = max(m, n), M = min(m, n), Q = N/M; the ESD is the M eigenvalues λ = σ² of WᵀW (no 1/N),
sorted ascending, tiny ones included, as WeightWatcher's ``combined_eigenvalues``.

- :func:`mp_fit` — Marchenko–Pastur fit of the bulk (WeightWatcher's ``mp_fit``): the ESD is rescaled to mean 1
  (λ·M/Σλ, ``W_scale`` = √(M/Σλ)); a linear-kernel density estimate (bandwidth 0.1) on 1000 points of
  [0, max+0.5] is compared with the MP density; σ_MP minimises the squared residual by a grid search over
  [0.05, 2)·σ₀ in steps of 0.01·σ₀ (σ₀ = √(λmax/(1+1/√Q)²)) finished by Nelder–Mead (``scipy.optimize.brute``).
  Where the density estimate is below 0.01 the residual is 0; an MP edge outside the data or a lower edge
  above the density's peak costs 1000 per point. For Q = 1 the singular values are fitted to the quarter
  circle instead. bulk edges λ± = σ²_MP(1 ± 1/√Q)² (reported in the ESD's own units), spikes are the rescaled
  λ above λ₊ + √TW with TW = Q^(-1/2)·λ₊^(2/3)·M^(-2/3) (a Tracy–Widom margin), mp_softrank = λ₊/λmax.
- :func:`randomized` — the ESD of W with its entries permuted: its largest value, its own MP fit (its spikes
  are the correlation traps), rand_distance = the Jensen–Shannon distance between the two sorted ESDs read as
  probability vectors (WeightWatcher's ``jensen_shannon_distance``; natural log), ww_softrank = max λ_rand / λmax,
  ww_maxdist = λmax − max λ_rand.
- :func:`detx` — the detX tail (WeightWatcher's ``detX_constraint``): on the ESD rescaled to mean 1, the smallest
  tail {λ ≥ λ_k} whose product is still ≥ 1 plus the next one (WeightWatcher's loop, exactly).

Deviations from WeightWatcher (docs/analyze-rmt.md): WeightWatcher shuffles with NumPy's global, unseeded
generator, draws a second independent shuffle for rand_distance and ww_softrank, and uses five shuffles when M <
100; spectra draws one seeded permutation per matrix so every randomised column describes the same matrix and
runs repeat.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

#: WeightWatcher's KDE bandwidth, density floor and evaluation grid
BANDWIDTH = 0.1
DENSITY_FLOOR = 0.01
GRID_POINTS = 1000
PENALTY = 1000.0


@dataclass(frozen=True)
class MPFit:
    """A Marchenko–Pastur fit; ``sigma_mp`` is in the rescaled units (ESD of mean 1), the edges in the ESD's."""

    sigma_mp: float
    bulk_min: float
    bulk_max: float
    num_spikes: int
    mp_softrank: float
    w_scale: float


NO_MP = MPFit(float("nan"), float("nan"), float("nan"), 0, float("nan"), float("nan"))


def rescale(evals: np.ndarray) -> tuple[np.ndarray, float]:
    """λ·M/Σλ (mean 1) and WeightWatcher's W_scale = √M/√Σλ."""
    scale = math.sqrt(evals.size) / math.sqrt(float(np.sum(evals)))
    return (scale * scale) * evals, scale


def linear_kde(data: np.ndarray, x: np.ndarray, bandwidth: float = BANDWIDTH) -> np.ndarray:
    """Density estimate with the linear kernel: (1/(n·h))·Σ max(0, 1 − |x − xᵢ|/h) (scikit-learn's
    ``KernelDensity(kernel="linear")``, exact)."""
    out = np.zeros(x.size)
    for s in range(0, x.size, 256):
        d = np.abs(x[s : s + 256, None] - data[None, :]) / bandwidth
        out[s : s + 256] = np.where(d < 1.0, 1.0 - d, 0.0).sum(axis=1)
    return out / (data.size * bandwidth)


def mp_density(x: np.ndarray, q: float, sigma: float) -> tuple[np.ndarray, float, float]:
    """The MP density of ratio Q and scale σ (zero outside [λ−, λ+]), and its edges."""
    b = (sigma * (1 + math.sqrt(1 / q))) ** 2
    a = (sigma * (1 - math.sqrt(1 / q))) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        y = (1 / (2 * np.pi * sigma * sigma * x * (1 / q))) * np.sqrt((b - x) * (x - a))
    return np.nan_to_num(y), a, b


def quarter_circle(x: np.ndarray, sigma: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.nan_to_num((1 / (np.pi * sigma * sigma)) * np.sqrt(4 - x**2))


def _objective(to_fit: np.ndarray, q: float) -> tuple[object, float]:
    """The squared residual as a function of σ (the density estimate computed once), and σ₀'s data max."""
    xde = np.linspace(0, float(np.max(to_fit)) + 0.5, GRID_POINTS)
    with np.errstate(divide="ignore"):
        yde = np.exp(np.log(linear_kde(to_fit, xde)))  # as score_samples → exp (0 stays 0)
    good = yde > DENSITY_FLOOR
    xg, yg = xde[good], yde[good]
    peak = float(xg[np.argmax(yg)]) if yg.size else 0.0
    xmax = float(np.max(xg)) if xg.size else 0.0

    def f(p: np.ndarray | float) -> float:
        sigma = float(np.asarray(p).reshape(-1)[0])
        if q == 1:
            resid = quarter_circle(xg, sigma) - yg
        else:
            ymp, a, b = mp_density(xg, q, sigma)
            if b < peak or b > xmax or a > peak:
                return PENALTY * PENALTY * xg.size
            resid = ymp - yg
        return float(np.sum(resid**2))

    return f, peak


def mp_fit(evals: np.ndarray, shape: tuple[int, int]) -> MPFit:
    """WeightWatcher's Marchenko–Pastur fit of the ESD ``evals`` (σ², all M of them) of an m×n matrix."""
    from scipy import optimize  # only here: a default analyze run does not import SciPy

    ev = np.sort(np.asarray(evals, dtype=np.float64))
    big, small = max(shape), min(shape)
    if ev.size < 2 or not np.all(np.isfinite(ev)) or float(np.sum(ev)) <= 0:
        return NO_MP
    q = big / small
    to_plot, scale = rescale(ev)
    lam_max = float(np.max(to_plot))
    s0 = math.sqrt(lam_max / (1 + 1 / math.sqrt(q)) ** 2)
    to_fit = np.sqrt(to_plot) if q == 1 else to_plot
    f, _ = _objective(to_fit, q)
    res = optimize.brute(f, (slice(0.05 * s0, 2.0 * s0, 0.01 * s0),), full_output=True, finish=optimize.fmin)
    sigma = float(np.asarray(res[0]).reshape(-1)[0])
    bulk_max = (sigma * (1 + 1 / math.sqrt(q))) ** 2
    bulk_min = (sigma * (1 - 1 / math.sqrt(q))) ** 2
    tw = 1 / math.sqrt(q) * bulk_max ** (2 / 3) * small ** (-2 / 3)
    spikes = int(np.count_nonzero(to_plot > bulk_max + math.sqrt(tw)))
    s2 = scale * scale
    return MPFit(sigma, bulk_min / s2, bulk_max / s2, spikes, bulk_max / lam_max, scale)


@dataclass(frozen=True)
class Randomized:
    """What the permuted matrix's ESD says (``fit`` is its own MP fit; its spikes are correlation traps)."""

    max_rand_eval: float
    fit: MPFit
    rand_distance: float
    ww_softrank: float
    ww_maxdist: float


def jensen_shannon_distance(p: np.ndarray, q: np.ndarray) -> float:
    """√((KL(p‖m) + KL(q‖m))/2), m = (p+q)/2, p and q normalised to sum 1 (natural log; 0·log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64) / float(np.sum(p))
    q = np.asarray(q, dtype=np.float64) / float(np.sum(q))
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return math.sqrt((kl(p) + kl(q)) / 2)


def randomized(evals: np.ndarray, rand_evals: np.ndarray, shape: tuple[int, int]) -> Randomized:
    """The randomised-ESD columns from the real ESD ``evals`` and the permuted matrix's ``rand_evals``."""
    ev = np.sort(np.asarray(evals, dtype=np.float64))
    rv = np.sort(np.asarray(rand_evals, dtype=np.float64))
    rmax, emax = float(rv[-1]), float(ev[-1])
    return Randomized(
        max_rand_eval=rmax,
        fit=mp_fit(rv, shape),
        rand_distance=jensen_shannon_distance(ev, rv) if ev.size == rv.size else float("nan"),
        ww_softrank=rmax / emax if emax > 0 else float("nan"),
        ww_maxdist=emax - rmax,
    )


def permutation_seed(seed: int, name: str) -> int:
    """The seed of one matrix's permutation: the run's seed and the matrix name (so it does not depend on the
    order or the selection of the matrices)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def permute(data: np.ndarray, seed: int, name: str) -> np.ndarray:
    """The entries of ``data`` in a seeded random order, same shape (any dtype; bf16 bit patterns included)."""
    perm = np.random.default_rng(permutation_seed(seed, name)).permutation(data.size)
    return np.ascontiguousarray(data).reshape(-1)[perm].reshape(data.shape)


@dataclass(frozen=True)
class DetX:
    num: int  # eigenvalues in the detX tail
    value: float  # its smallest eigenvalue, in the ESD's units


def detx(evals: np.ndarray) -> DetX:
    """WeightWatcher's ``detX_constraint`` on the ESD rescaled to mean 1: going down from the top, the first index
    k ≥ 1 with Πλ[k:] < 1 gives num = M − k (num = M and k = 1 when there is none)."""
    ev = np.sort(np.asarray(evals, dtype=np.float64))
    if ev.size < 2 or not ev[0] < ev[-1]:
        return DetX(0, float(ev[0]) if ev.size else float("nan"))
    r, _ = rescale(ev)
    num, idx = ev.size, 1
    prod = 1.0
    for k in range(ev.size - 1, 0, -1):
        prod = float(np.prod(r[k:]))
        if prod < 1.0:
            num, idx = ev.size - k, k
            break
    return DetX(num, float(ev[idx]))


@dataclass(frozen=True)
class RMTOptions:
    """Which diagnostics a run computes (``seed`` seeds the permutations)."""

    mp_fit: bool = False
    randomize: bool = False
    detx: bool = False
    seed: int = 0
    vectors: bool = False

    @property
    def any(self) -> bool:
        return self.mp_fit or self.randomize or self.detx or self.vectors


def rmt_columns(
    values: np.ndarray, rand_values: np.ndarray | None, shape: tuple[int, int], opts: RMTOptions
) -> dict[str, float | int | bool]:
    """The opt-in columns of one matrix from its singular values (and the permuted matrix's), WeightWatcher's
    names."""
    ev = np.sort(np.asarray(values, dtype=np.float64)) ** 2
    out: dict[str, float | int | bool] = {}
    if opts.mp_fit:
        f = mp_fit(ev, shape)
        out.update(sigma_mp=f.sigma_mp, bulk_min=f.bulk_min, bulk_max=f.bulk_max, num_spikes=f.num_spikes,
                   spikes_ratio=f.num_spikes / min(shape), mp_softrank=f.mp_softrank, W_scale=f.w_scale)  # fmt: skip
    if opts.randomize and rand_values is not None:
        r = randomized(ev, np.asarray(rand_values, dtype=np.float64) ** 2, shape)
        out.update(max_rand_eval=r.max_rand_eval, rand_sigma_mp=r.fit.sigma_mp, rand_bulk_min=r.fit.bulk_min,
                   rand_bulk_max=r.fit.bulk_max, num_traps=r.fit.num_spikes, correlation_trap=r.fit.num_spikes > 0,
                   rand_mp_softrank=r.fit.mp_softrank, rand_distance=r.rand_distance, ww_softrank=r.ww_softrank,
                   ww_maxdist=r.ww_maxdist)  # fmt: skip
    if opts.detx:
        d = detx(ev)
        out.update(detX_num=d.num, detX_val=d.value)
    return out
