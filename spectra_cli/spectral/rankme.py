"""RankMe and the other representation ranks of an embedding matrix Z (N samples × K features).

Everything is computed from eigenvalues of K×K matrices that can be accumulated chunk by chunk, so N can be
far larger than memory: :class:`GramAccumulator` keeps, in float64, the Gram matrix of the *shifted* rows
(Z − c)ᵀ(Z − c), their column sums and N, where c is the mean of the first chunk. From these three it rebuilds
both the uncentred Gram ZᵀZ (RankMe, effective rank, stable rank, numerical rank: Garrido et al. use Z as it
is, no centering) and the centred scatter (Z − μ)ᵀ(Z − μ) (participation ratio, α-ReQ). The shift only
serves accuracy: centring by subtracting N·μμᵀ from ZᵀZ would cancel catastrophically when the mean is
large against the spread, which is common for embeddings.

Conventions (σ = singular values of Z, descending; λ = eigenvalues of the covariance of Z, descending):

* σ = √eig(ZᵀZ), negatives from rounding clamped to 0. **SVD numerics**: the eigen-route in float64 resolves
  σ only down to about 1e-8·σ₁ (λ to ~1e-16·λ₁); smaller singular values come out as rounding noise. This
  barely moves RankMe (their weight p is below ~1e-8) but is why the numerical rank has a floor (below).
* RankMe (Garrido et al. 2022) = exp(−Σₖ pₖ log pₖ), pₖ = σₖ/‖σ‖₁ + ε, ε = 1e-7, over the min(N, K) largest σ.
* effective rank (Roy & Vetterli 2007) = exp(−Σ pₖ log pₖ), pₖ = σₖ/Σσ, 0·log 0 = 0 (RankMe without ε).
* stable rank = Σσ²/σ₁² = trace(ZᵀZ)/λ_max(ZᵀZ).
* numerical rank = #{σₖ > τ}, τ = max(ε_in·‖Z‖_F, ρ·σ₁). ε_in is the machine epsilon of the
  dtype the embeddings were *stored* in (float32: 1.19e-7; float16: 9.8e-4; bfloat16: 7.8e-3; float64 and
  integers: ε₆₄): rounding the stored values perturbs Z by at most ε_in/2·‖Z‖_F in spectral norm (Weyl), so
  singular values below that are indistinguishable from 0. ρ = √(max(K, 64)·ε₆₄) (≥ 1.2e-7) is the
  resolution of the float64 Gram route: the "zero" singular values of rank-deficient matrices came out at
  1–2e-8·σ₁ (measured for N up to 1e5, K up to 384, offsets up to 1e4, chunks from 7 rows), so ρ keeps a
  margin of 6× or more.
  NumPy's ``matrix_rank`` rule max(N, K)·ε_in·σ₁ (used by ``analyze`` on weights) is not used here: for tall
  embedding matrices it grows with N (N = 25,600 in float16 gives τ > σ₁) and says nothing about the data.
* covariance C = (Z − μ)ᵀ(Z − μ)/N (population normalisation; every centred score is scale-free).
* participation ratio = (Σλ)²/Σλ².
* α-ReQ (Agrawal et al. 2022) = −slope of the least-squares line through (log i, log λᵢ), fitted over the
  leading covariance eigenvalues λ₁..λᵣ whose singular values √(N·λᵢ) (those of Z − μ) exceed
  τ_c = max(ε_in·‖Z‖_F, ρ·√(N·λ₁)): the numerical-rank rule applied to Z − μ, keeping the
  uncentred ‖Z‖_F because the rounding happened to the stored Z. The exact zeros of a rank-deficient or
  N ≤ K matrix are rounding noise here and would bend the fit. Needs r ≥ 2 (NaN otherwise).
* singular values below the Gram route's resolution ρ·σ₁ are set to 0 before any score:
  they are rounding noise, and leaving them in would move RankMe of a collapsed (rank-deficient) Z by ~1e-6
  relative to an exact SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spectra_cli.spectral import metrics
from spectra_cli.spectral.linalg import Backend, sym_eigenvalues

#: RankMe's ε (Garrido et al. 2022, and their reference code)
RANKME_EPS = 1e-7

_EPS64 = float(np.finfo(np.float64).eps)

#: machine epsilon of the stored dtypes, by NumPy / torch name
DTYPE_EPS: dict[str, float] = {
    "float64": _EPS64,
    "float32": float(np.finfo(np.float32).eps),
    "float16": float(np.finfo(np.float16).eps),
    "bfloat16": 2.0**-7,
}


def dtype_eps(dtype: str) -> float:
    """Machine epsilon of a stored dtype name ('float32', 'bfloat16', 'int64', …); integers count as exact
    (ε₆₄)."""
    return DTYPE_EPS.get(dtype.replace("torch.", ""), _EPS64)


@dataclass
class GramAccumulator:
    """Accumulates, over row chunks of an N×K matrix Z, everything the scores need, in float64.

    ``update`` takes chunks of shape (rows, K); memory is O(K²) whatever N is. ``shift`` (c) is the mean of the
    first chunk; ``gram_shifted`` = Σ (z − c)(z − c)ᵀ, ``sum_shifted`` = Σ (z − c), ``n`` = N.
    ``device``: None accumulates with NumPy; a torch device name ("cpu", "cuda:0") runs the float64 GEMMs
    with PyTorch on that device (the totals are copied back to NumPy when read).
    """

    k: int
    device: str | None = None
    n: int = 0
    shift: np.ndarray | None = None
    gram_shifted: np.ndarray = field(init=False)
    sum_shifted: np.ndarray = field(init=False)
    _dev: Any = field(init=False, default=None, repr=False)  # (gram, sum, shift) torch tensors on device

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("K must be at least 1")
        self.gram_shifted = np.zeros((self.k, self.k), dtype=np.float64)
        self.sum_shifted = np.zeros(self.k, dtype=np.float64)

    def update(self, chunk: np.ndarray) -> None:
        """Add the rows of ``chunk`` (rows × K, any real dtype; upcast to float64)."""
        x = np.asarray(chunk)
        if x.ndim != 2 or x.shape[1] != self.k:
            raise ValueError(f"expected a chunk of shape (rows, {self.k}), got {x.shape}")
        if x.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = x.mean(axis=0, dtype=np.float64)
        if self.device is not None:  # moved in its own dtype (float16/float32), upcast on the device
            self._update_torch(x)
        else:
            x = x.astype(np.float64, copy=False)
            y = x - self.shift
            self.gram_shifted += y.T @ y
            self.sum_shifted += y.sum(axis=0)
        self.n += x.shape[0]

    def _update_torch(self, x: np.ndarray) -> None:
        import torch

        if self._dev is None:
            assert self.device is not None
            dev = torch.device(self.device)
            z = torch.zeros((self.k, self.k), dtype=torch.float64, device=dev)
            self._dev = (z, torch.zeros(self.k, dtype=torch.float64, device=dev),
                         torch.from_numpy(self.shift).to(dev))  # fmt: skip
        g, s, c = self._dev
        y = torch.from_numpy(np.ascontiguousarray(x)).to(g.device).to(torch.float64) - c
        g.addmm_(y.T, y)
        s.add_(y.sum(dim=0))

    def _sync(self) -> None:
        if self._dev is not None:
            g, s, _ = self._dev
            self.gram_shifted += g.cpu().numpy()
            self.sum_shifted += s.cpu().numpy()
            g.zero_()
            s.zero_()

    @property
    def mean(self) -> np.ndarray:
        """μ = column means of Z (K,)."""
        if self.n == 0 or self.shift is None:
            raise ValueError("no rows accumulated")
        self._sync()
        return self.shift + self.sum_shifted / self.n

    def gram(self) -> np.ndarray:
        """ZᵀZ (K×K, uncentred) = Yᵀ Y + c sᵀ + s cᵀ + N c cᵀ with Y = Z − c, s = Σ y."""
        if self.n == 0 or self.shift is None:
            raise ValueError("no rows accumulated")
        self._sync()
        c, s = self.shift, self.sum_shifted
        return self.gram_shifted + np.outer(c, s) + np.outer(s, c) + self.n * np.outer(c, c)

    def scatter(self) -> np.ndarray:
        """(Z − μ)ᵀ(Z − μ) (K×K, centred) = YᵀY − s sᵀ/N."""
        if self.n == 0:
            raise ValueError("no rows accumulated")
        self._sync()
        s = self.sum_shifted
        return self.gram_shifted - np.outer(s, s) / self.n


def rankme(s: np.ndarray, eps: float = RANKME_EPS) -> float:
    """RankMe of singular values ``s`` (all of them: min(N, K) values): exp(−Σ p log p), p = s/‖s‖₁ + ε."""
    s = np.asarray(s, dtype=np.float64)
    total = s.sum()
    if s.size == 0 or total <= 0:
        return float("nan")
    p = s / total + eps
    return float(math.exp(-np.sum(p * np.log(p))))


def participation_ratio(lam: np.ndarray) -> float:
    """(Σλ)²/Σλ² of (covariance) eigenvalues ``lam``."""
    lam = np.asarray(lam, dtype=np.float64)
    sq = np.sum(lam**2)
    if sq <= 0:
        return float("nan")
    return float(np.sum(lam) ** 2 / sq)


def alpha_req(lam: np.ndarray) -> float:
    """α-ReQ: −slope of least squares of log λᵢ against log i (i = 1..len(lam), lam descending, all > 0).
    NaN for fewer than 2 values."""
    lam = np.asarray(lam, dtype=np.float64)
    if lam.size < 2 or np.any(lam <= 0):
        return float("nan")
    x = np.log(np.arange(1, lam.size + 1, dtype=np.float64))
    y = np.log(lam)
    slope = np.polyfit(x, y, 1)[0]
    return float(-slope)


def gram_resolution(k: int) -> float:
    """ρ = √(max(K, 64)·ε₆₄): singular values below ρ·σ₁ are rounding noise of the float64 Gram route."""
    return math.sqrt(max(k, 64) * _EPS64)


def rank_threshold(s: np.ndarray, n: int, k: int, stored_eps: float) -> float:
    """τ of the numerical rank for singular values ``s`` of an N×K matrix stored with machine epsilon
    ``stored_eps``: max(ε_in·‖Z‖_F, ρ·σ₁) (see the module docstring)."""
    s = np.asarray(s, dtype=np.float64)
    if s.size == 0:
        return 0.0
    fro = float(np.sqrt(np.sum(s**2)))
    return max(stored_eps * fro, gram_resolution(k) * float(s.max()))


def numerical_rank(s: np.ndarray, n: int, k: int, stored_eps: float = _EPS64) -> int:
    """#{σ > τ} with τ from :func:`rank_threshold`."""
    s = np.asarray(s, dtype=np.float64)
    if s.size == 0 or s.max() <= 0:
        return 0
    return int(np.sum(s > rank_threshold(s, n, k, stored_eps)))


@dataclass(frozen=True)
class RankScores:
    """Scores of one N×K embedding matrix. ``singular_values``: σ of Z (min(N, K), descending);
    ``covariance_eigenvalues``: λ of C = (Z − μ)ᵀ(Z − μ)/N (K, descending); ``alpha_req_points``: how many λ
    the α-ReQ line was fitted to."""

    n: int
    k: int
    rankme: float
    effective_rank: float
    stable_rank: float
    numerical_rank: int
    participation_ratio: float
    alpha_req: float
    alpha_req_points: int
    singular_values: np.ndarray
    covariance_eigenvalues: np.ndarray

    @property
    def max_rank(self) -> int:
        return min(self.n, self.k)

    @property
    def rankme_fraction(self) -> float:
        """RankMe / min(N, K)."""
        return self.rankme / self.max_rank if self.max_rank else float("nan")


def _backend(device: str | None) -> Backend | None:
    """None (NumPy) or PyTorch on ``device``: where the eigensolves run, as the accumulation does."""
    return None if device is None else Backend("torch", device)


def scores_from_accumulator(acc: GramAccumulator, stored_eps: float = _EPS64) -> RankScores:
    """Every score of the accumulated Z; ``stored_eps``: machine epsilon of the stored input dtype. The
    eigensolves run where the accumulator did (NumPy, or PyTorch on ``acc.device``)."""
    n, k = acc.n, acc.k
    if n == 0:
        raise ValueError("no rows accumulated")
    be = _backend(acc.device)
    return _scores_from_eigenvalues(
        sym_eigenvalues(acc.gram(), be), sym_eigenvalues(acc.scatter(), be), n, k, stored_eps
    )


def scores_wide(z: np.ndarray, stored_eps: float = _EPS64, device: str | None = None) -> RankScores:
    """Every score of an in-memory N×K matrix through the N×N Gram matrices Z Zᵀ and (Z − μ)(Z − μ)ᵀ, which have
    the non-zero eigenvalues of ZᵀZ and of the K×K scatter: O(N²K) instead of the K×K route's O(K³), for N < K
    (few samples of wide embeddings). Same thresholds as :func:`scores_from_accumulator` (ρ from K), so the two
    routes agree to rounding. ``device``: None for NumPy, else the torch device of the eigensolves."""
    x = np.asarray(z, dtype=np.float64)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"expected a non-empty N×K matrix, got shape {x.shape}")
    n, k = x.shape
    xc = x - x.mean(axis=0)
    ev_scatter = np.zeros(k)
    be = _backend(device)
    ev = sym_eigenvalues(xc @ xc.T, be)[:k]
    ev_scatter[: ev.size] = ev
    return _scores_from_eigenvalues(sym_eigenvalues(x @ x.T, be), ev_scatter, n, k, stored_eps)


def _scores_from_eigenvalues(
    ev_gram: np.ndarray, ev_scatter: np.ndarray, n: int, k: int, stored_eps: float
) -> RankScores:
    """The scores from the eigenvalues (descending) of ZᵀZ (at least min(N, K) of them) and of the centred
    scatter (K of them, zeros included)."""
    m = min(n, k)
    floor = gram_resolution(k)
    s = np.sqrt(ev_gram[:m])
    s[s <= floor * s[0]] = 0.0
    lam = np.asarray(ev_scatter, dtype=np.float64) / n
    # centred threshold: the numerical-rank rule on the singular values √(N·λ) of Z − μ, with the rounding
    # term ε_in·‖Z‖_F of the stored (uncentred) values
    sc = np.sqrt(lam * n)
    fro = float(np.sqrt(np.sum(s**2)))
    tau_c = max(stored_eps * fro, floor * float(sc[0])) if sc.size else 0.0
    lam[sc <= floor * (sc[0] if sc.size else 0.0)] = 0.0
    fit = lam[sc > tau_c] if sc.size and sc[0] > 0 else lam[:0]
    zero = not s[0] > 0  # Z = 0: NaN scores (metrics.py reports 0 for a zero weight matrix)
    return RankScores(
        n=n, k=k, rankme=rankme(s),
        effective_rank=math.nan if zero else metrics.effective_rank(s),
        stable_rank=math.nan if zero else metrics.stable_rank(s),
        numerical_rank=numerical_rank(s, n, k, stored_eps), participation_ratio=participation_ratio(lam),
        alpha_req=alpha_req(fit), alpha_req_points=int(fit.size), singular_values=s, covariance_eigenvalues=lam,
    )  # fmt: skip


def scores(
    z: np.ndarray, stored_eps: float | None = None, chunk_rows: int | None = None, device: str | None = None
) -> RankScores:
    """Every score of an in-memory N×K matrix ``z`` (convenience wrapper around :class:`GramAccumulator`;
    ``device`` as there). ``stored_eps`` defaults to the epsilon of ``z``'s dtype."""
    z = np.asarray(z)
    if z.ndim != 2 or 0 in z.shape:
        raise ValueError(f"expected a non-empty N×K matrix, got shape {z.shape}")
    acc = GramAccumulator(z.shape[1], device)
    step = chunk_rows or z.shape[0]
    for i in range(0, z.shape[0], step):
        acc.update(z[i : i + step])
    eps = dtype_eps(str(z.dtype)) if stored_eps is None else stored_eps
    return scores_from_accumulator(acc, eps)
