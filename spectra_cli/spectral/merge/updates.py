"""Task updates of one module (dense, or factored ΔW = B·A), their inner products and Gram matrix, the
exact compression and SVD of sums of updates, and what every merge method shares (its outcome, parameter
parsing). Decompositions go through :mod:`spectra_cli.spectral.linalg`, on the backend a caller passes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from spectra_cli.errors import BudgetError, ShapeMismatch, SpectraError
from spectra_cli.spectral import linalg
from spectra_cli.spectral.arrays import Array
from spectra_cli.spectral.linalg import NUMPY, Backend
from spectra_cli.spectral.merge import xp

# Singular values below RANK_RTOL·σ₁ are treated as zero when a factored form is compressed to its numerical
# rank (float64 QR/SVD noise is ~1e-15·σ₁; this keeps a wide margin and changes nothing measurable).
RANK_RTOL = 1e-10

# The stack's singular values come from eig of its Gram matrix (float64): accurate to ~1e-8·σ₁, so components
# below GRAM_RTOL·σ₁ are rounding, not directions (centring always leaves one such).
GRAM_RTOL = 1e-7

# Dense SVDs where only the top k are needed switch to a randomized range finder for matrices at least this
# large on their smaller side, when k ≤ min(shape)/RANDOMIZED_FRACTION.
RANDOMIZED_MIN_SIDE = 512
RANDOMIZED_FRACTION = 8

# Exact dense SVDs at least this large on their smaller side go through the float64 Gram matrix
# (linalg.gram_svd): singular values and the vectors of every σ ≳ 1e-7·σ₁ as accurate as LAPACK's.
GRAM_SVD_MIN_SIDE = 512

# Rows of a dense update handled at once when stacking (float64 working set ≈ n·CHUNK·8 bytes).
CHUNK = 1 << 20


class MergeError(SpectraError):
    """A merge option is invalid (unknown method, bad parameter value)."""


# --------------------------------------------------------------------------------------------------------
# Updates


@dataclass(frozen=True)
class Update:
    """One task's update ΔW of one module (out×in): dense, or factored as ΔW = B·A (B out×r, A r×in).

    Exactly one of ``dense`` or the pair ``B``/``A`` is given. Arrays are float32 or float64, NumPy arrays or
    torch tensors (all of one kind, on one device: the merge's torch route); nothing is copied or modified.
    """

    dense: Array | None = None
    B: Array | None = None
    A: Array | None = None
    #: a LoRA adapter's scale s = α/r already folded into B (B = s·lora_B); None when not an adapter's factors.
    #: PEFT's factor-wise combinations (:mod:`.peft_types`) need the stored factors back.
    lora_scale: float | None = None

    def __post_init__(self) -> None:
        if self.dense is not None:
            if self.B is not None or self.A is not None:
                raise ShapeMismatch("an update is either dense or factored (B, A), not both")
            if self.dense.ndim != 2:
                raise ShapeMismatch(
                    f"a dense update must be a 2-D out×in matrix, got shape {self.dense.shape}"
                )
            return
        if self.B is None or self.A is None:
            raise ShapeMismatch("an update needs a dense matrix or both factors B (out×r) and A (r×in)")
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ShapeMismatch(
                f"factors B {self.B.shape} and A {self.A.shape} do not chain: need B out×r and A r×in"
            )

    @property
    def is_factored(self) -> bool:
        return self.dense is None

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in)."""
        if self.dense is not None:
            return (int(self.dense.shape[0]), int(self.dense.shape[1]))
        assert self.B is not None and self.A is not None
        return (int(self.B.shape[0]), int(self.A.shape[1]))

    @property
    def rank(self) -> int:
        """r for a factored update (an upper bound on its rank), min(out, in) for a dense one."""
        if self.dense is not None:
            return min(self.shape)
        assert self.B is not None
        return int(self.B.shape[1])

    @property
    def dtype(self) -> np.dtype:
        arr = self.dense if self.dense is not None else self.B
        assert arr is not None
        return xp.np_dtype(arr)

    @property
    def size(self) -> int:
        """Numbers stored: out·in dense, r·(out + in) factored."""
        if self.dense is not None:
            return xp.nelem(self.dense)
        assert self.B is not None and self.A is not None
        return xp.nelem(self.B) + xp.nelem(self.A)

    def to_dense(self) -> np.ndarray:
        """ΔW as an out×in array (B·A for a factored update), in the update's dtype."""
        if self.dense is not None:
            return self.dense
        assert self.B is not None and self.A is not None
        return self.B @ self.A

    def frob_norm(self) -> float:
        """‖ΔW‖_F, from the factors (‖B·A‖² = Σ (BᵀB)∘(AAᵀ)) without densifying."""
        return math.sqrt(max(inner(self, self), 0.0))

    def scaled(self, w: float) -> Update:
        """w·ΔW (the weight goes into B for a factored update)."""
        if self.dense is not None:
            return Update(dense=self.dense * w)
        assert self.B is not None
        return replace(self, B=self.B * w, lora_scale=None if self.lora_scale is None else self.lora_scale * w)


def f64(x: np.ndarray) -> np.ndarray:
    """x in float64, of its own kind (NumPy array or tensor on its device)."""
    return xp.as_f64(x)


def to_host(u: Update) -> Update:
    """The update with NumPy arrays (copied back from a device; a NumPy update as it is)."""
    if not any(xp.is_torch(x) for x in (u.dense, u.B, u.A) if x is not None):
        return u
    return replace(u, dense=xp.to_host(u.dense), B=xp.to_host(u.B), A=xp.to_host(u.A))


def inner(u: Update, v: Update) -> float:
    """Frobenius inner product ⟨ΔWu, ΔWv⟩_F = tr(ΔWuᵀΔWv), in float64. Both factored: Σ (BuᵀBv)∘(AuAvᵀ)
    (r×r work); one factored: Σ B∘(D·Aᵀ) (no out×in product formed besides the dense one given)."""
    if u.shape != v.shape:
        raise ShapeMismatch(
            f"updates of shapes {u.shape} and {v.shape} cannot be compared; match modules first"
        )
    if u.is_factored and v.is_factored:
        assert u.B is not None and u.A is not None and v.B is not None and v.A is not None
        return xp.total((f64(u.B).T @ f64(v.B)) * (f64(u.A) @ f64(v.A).T))
    if u.is_factored or v.is_factored:
        f, d = (u, v) if u.is_factored else (v, u)
        assert f.B is not None and f.A is not None and d.dense is not None
        return xp.total(f64(f.B) * (f64(d.dense) @ f64(f.A).T))
    assert u.dense is not None and v.dense is not None
    a, b = u.dense.reshape(-1), v.dense.reshape(-1)
    total = 0.0
    dot = (lambda x, y: x @ y) if xp.is_torch(a) else np.dot
    for i in range(0, xp.nelem(a), CHUNK):
        total += float(dot(f64(a[i : i + CHUNK]), f64(b[i : i + CHUNK])))
    return total


def gram(updates: Sequence[Update]) -> np.ndarray:
    """The n×n float64 Gram matrix Gᵢⱼ = ⟨ΔWᵢ, ΔWⱼ⟩_F (from the factors where factored)."""
    check_shapes(updates)
    n = len(updates)
    if all(not u.is_factored for u in updates):
        flats = [u.to_dense().reshape(-1) for u in updates]
        g = np.zeros((n, n))
        for i in range(0, xp.nelem(flats[0]), CHUNK):
            block = xp.stack([f64(f[i : i + CHUNK]) for f in flats])
            g += xp.to_numpy(block @ block.T)
        return g
    g = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            g[i, j] = g[j, i] = inner(updates[i], updates[j])
    return g


def check_shapes(updates: Sequence[Update]) -> tuple[int, int]:
    if not updates:
        raise SpectraError("no task updates were given; pass at least one fine-tuned model or adapter")
    shape = updates[0].shape
    for i, u in enumerate(updates[1:], start=1):
        if u.shape != shape:
            raise ShapeMismatch(
                f"task {i + 1}'s update is {u.shape[0]}×{u.shape[1]} but task 1's is {shape[0]}×{shape[1]}; "
                "every task must fine-tune the same base model"
            )
    return shape


def out_dtype(updates: Sequence[Update]) -> np.dtype:
    return np.result_type(*(u.dtype for u in updates), np.float32)


def zero_outcome(updates: Sequence[Update]) -> MergeOutcome:
    """A merge that kept nothing: a rank-1 zero update of the tasks' shape and dtype, on their device."""
    out, inn = updates[0].shape
    dtype = out_dtype(updates)
    ref = updates[0].dense if updates[0].dense is not None else updates[0].B
    return MergeOutcome(Update(B=xp.zeros((out, 1), ref, dtype), A=xp.zeros((1, inn), ref, dtype)),
                        {"energy_kept": 1.0})  # fmt: skip


def stack_factors(updates: Sequence[Update], weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """[w₁B₁ … w_nB_n] (out×R) and [A₁; …; A_n] (R×in) in float64, so that Σ wᵢBᵢAᵢ = B·A."""
    bs, as_ = [], []
    for u, w in zip(updates, weights, strict=True):
        assert u.B is not None and u.A is not None
        bs.append(f64(u.B) * float(w))
        as_.append(f64(u.A))
    return xp.concat(bs, 1), xp.concat(as_, 0)


def weighted_dense(updates: Sequence[Update], weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Σ wᵢΔWᵢ as a dense float64 out×in array, accumulated one update at a time."""
    first = updates[0]
    out = xp.zeros(first.shape, first.dense if first.dense is not None else first.B)
    for u, w in zip(updates, weights, strict=True):
        if w != 0.0:
            out += float(w) * f64(u.to_dense())
    return out


def compress(
    B: np.ndarray, A: np.ndarray, rtol: float = RANK_RTOL, backend: Backend = NUMPY
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact compression of B·A (B out×K, A K×in) to its numerical rank: QR of B and Aᵀ, SVD of the K×K core.

    Returns (U out×k, s k, Vt k×in) with B·A = U·diag(s)·Vt up to singular values ≤ rtol·σ₁ (dropped)."""
    svd = linalg.factored_svd(f64(B), f64(A), rtol=rtol, backend=backend)
    return svd.u, svd.s, svd.vt


def as_factored(B: np.ndarray, A: np.ndarray, dtype: np.dtype, backend: Backend = NUMPY) -> Update:
    """B·A compressed to its numerical rank (at least 1: a zero product stays a zero rank-1 pair), the
    singular values folded into B."""
    u, s, vt = compress(B, A, backend=backend)
    if xp.nelem(s) == 0:
        return Update(B=xp.zeros((B.shape[0], 1), B, dtype), A=xp.zeros((1, A.shape[1]), A, dtype))
    return Update(B=xp.astype(u * s, dtype), A=xp.astype(vt, dtype))


def _dense_svd(x: np.ndarray, k: int | None, backend: Backend) -> linalg.SVD:
    side = min(x.shape)
    if k is not None and side >= RANDOMIZED_MIN_SIDE and k * RANDOMIZED_FRACTION <= side:
        return linalg.randomized_top_k(x, k, backend=backend)
    if side >= GRAM_SVD_MIN_SIDE:  # float64 Gram + eigh: several times faster than LAPACK's SVD on CPU here
        svd = linalg.gram_svd(x, backend=backend)
    else:
        svd = linalg.thin_svd(x, backend=backend)
    if k is not None:
        svd = linalg.SVD(svd.u[:, :k], svd.s[:k], svd.vt[:k])
    return svd


def factored_svd(
    updates: Sequence[Update],
    weights: Sequence[float] | None = None,
    k: int | None = None,
    backend: Backend = NUMPY,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of Σ wᵢΔWᵢ (weights default to 1), float64: U (out×k), S (k, descending), Vt (k×in).

    All factored: QR of the stacked [w₁B₁ … w_nB_n] and [A₁; …; A_n]ᵀ and an R×R SVD (R = Σrᵢ), exact, no
    out×in matrix formed (:func:`spectra_cli.spectral.linalg.factored_svd`); k is capped at R. Any dense: the
    dense sum's exact SVD (LAPACK below 512 on the smaller side, the float64 Gram route above), or a
    randomized top-k SVD when k ≤ min(out, in)/8 on a matrix at least 512 on its smaller side. ``k=None``
    keeps all. ``backend``: where the decompositions run.
    """
    check_shapes(updates)
    w = [1.0] * len(updates) if weights is None else [float(x) for x in weights]
    if len(w) != len(updates):
        raise ShapeMismatch(f"{len(w)} weights for {len(updates)} updates; give one weight per task")
    if k is not None and k < 0:
        raise BudgetError(f"cannot keep {k} singular triplets; ask for a non-negative number")
    if all(u.is_factored for u in updates):
        b, a = stack_factors(updates, w)
        svd = linalg.factored_svd(b, a, k=k, backend=backend)
    else:
        svd = _dense_svd(weighted_dense(updates, w), k, backend)
    return svd.u, svd.s, svd.vt


# --------------------------------------------------------------------------------------------------------
# Merge methods


@dataclass(frozen=True)
class MergeOutcome:
    """The merged update of one module (λ/α applied; W = W₀ + update) and per-module figures."""

    update: Update
    stats: dict[str, float] = field(default_factory=dict)


def param_float(
    params: Mapping[str, Any], name: str, lo: float | None = None, hi: float | None = None
) -> float:
    try:
        value = float(params[name])
    except (TypeError, ValueError):
        raise MergeError(f"parameter {name}={params[name]!r} is not a number") from None
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise MergeError(f"parameter {name}={value} is out of range; use a value in {rng}")
    return value


def dense_or_factored(B: np.ndarray, A: np.ndarray, dtype: np.dtype) -> Update:
    """B·A kept factored when that is smaller than out×in, else dense."""
    out, inn = B.shape[0], A.shape[1]
    if B.shape[1] * (out + inn) < out * inn:
        return Update(B=xp.astype(B, dtype), A=xp.astype(A, dtype))
    return Update(dense=xp.astype(B @ A, dtype))
