"""The numeric core of ``spectra merge``: task updates, merge methods and the reversible basis merge (RMM).

Conventions: a task update ΔW is out×in (``nn.Linear`` layout). An :class:`Update` is either dense or
factored, ΔW = B·A with B out×r and A r×in (a PEFT LoRA update with its scale s = α/r folded into B).
Factored updates stay factored: every quantity here (norms, inner products, SVDs, the RMM basis) is computed
from the factors by QR of the stacked B's and A's and small r×r problems, never by forming out×in.

Methods (the registry :data:`METHODS`; ``spectra merge --help`` and docs/cli.md list them with their papers):

- ``task-arithmetic`` (Ilharco et al. 2023): ΔW = λ·Σ wᵢΔWᵢ.
- ``ties`` (Yadav et al. 2023, as mergekit): per task keep the top ``density`` fraction of entries by magnitude,
  elect each entry's sign by the summed (weighted) mass, average the agreeing entries, times λ.
- ``tsv`` (TSV-Merge, Gargiulo et al. CVPR 2025): per task keep the top ⌊min(out, in)/T⌋ singular triplets,
  concatenate the U's and V's, orthogonalise each by Procrustes (X⊥ = PQᵀ from X = PSQᵀ),
  ΔW = α·U⊥·diag(σ)·V⊥ᵀ.
- ``knots`` (KnOTS, Stoica et al. ICLR 2025): SVD of [ΔW₁ … ΔW_T] (column concatenation) → shared U; task i
  is its block diag(s)·Vᵢᵀ; the blocks are merged (linear sum, or TIES with a disjoint mean) and mapped back
  with U.

The reversible merge (:func:`rmm_fit`, :func:`rmm_reconstruct`) stores, per module, a basis of p elements and
an n×p coefficient matrix from which every task's ΔWᵢ is recovered; the basis is the Eckart–Young optimum of
the stacked (optionally centred) updates, computed through their n×n Gram matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from spectra_cli.errors import BudgetError, ShapeMismatch, SpectraError
from spectra_cli.spectral.compare import gram_svd

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
# (compare.gram_svd): singular values and the vectors of every σ ≳ 1e-7·σ₁ as accurate as LAPACK's.
GRAM_SVD_MIN_SIDE = 512

# Rows of a dense update handled at once when stacking (float64 working set ≈ n·CHUNK·8 bytes).
_CHUNK = 1 << 20


class MergeError(SpectraError):
    """A merge option is invalid (unknown method, bad parameter value)."""


# --------------------------------------------------------------------------------------------------------
# Updates


@dataclass(frozen=True)
class Update:
    """One task's update ΔW of one module (out×in): dense, or factored as ΔW = B·A (B out×r, A r×in).

    Exactly one of ``dense`` or the pair ``B``/``A`` is given. Arrays are float32 or float64; nothing is
    copied or modified.
    """

    dense: np.ndarray | None = None
    B: np.ndarray | None = None
    A: np.ndarray | None = None

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
        return arr.dtype

    @property
    def size(self) -> int:
        """Numbers stored: out·in dense, r·(out + in) factored."""
        if self.dense is not None:
            return int(self.dense.size)
        assert self.B is not None and self.A is not None
        return int(self.B.size + self.A.size)

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
        return replace(self, B=self.B * w)


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def inner(u: Update, v: Update) -> float:
    """Frobenius inner product ⟨ΔWu, ΔWv⟩_F = tr(ΔWuᵀΔWv), in float64. Both factored: Σ (BuᵀBv)∘(AuAvᵀ)
    (r×r work); one factored: Σ B∘(D·Aᵀ) (no out×in product formed besides the dense one given)."""
    if u.shape != v.shape:
        raise ShapeMismatch(
            f"updates of shapes {u.shape} and {v.shape} cannot be compared; match modules first"
        )
    if u.is_factored and v.is_factored:
        assert u.B is not None and u.A is not None and v.B is not None and v.A is not None
        return float(np.sum((_f64(u.B).T @ _f64(v.B)) * (_f64(u.A) @ _f64(v.A).T)))
    if u.is_factored or v.is_factored:
        f, d = (u, v) if u.is_factored else (v, u)
        assert f.B is not None and f.A is not None and d.dense is not None
        return float(np.sum(_f64(f.B) * (_f64(d.dense) @ _f64(f.A).T)))
    assert u.dense is not None and v.dense is not None
    a, b = u.dense.reshape(-1), v.dense.reshape(-1)
    total = 0.0
    for i in range(0, a.size, _CHUNK):
        total += float(np.dot(_f64(a[i : i + _CHUNK]), _f64(b[i : i + _CHUNK])))
    return total


def gram(updates: Sequence[Update]) -> np.ndarray:
    """The n×n float64 Gram matrix Gᵢⱼ = ⟨ΔWᵢ, ΔWⱼ⟩_F (from the factors where factored)."""
    _check_shapes(updates)
    n = len(updates)
    if all(not u.is_factored for u in updates):
        flats = [u.to_dense().reshape(-1) for u in updates]
        g = np.zeros((n, n))
        for i in range(0, flats[0].size, _CHUNK):
            block = np.stack([_f64(f[i : i + _CHUNK]) for f in flats])
            g += block @ block.T
        return g
    g = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            g[i, j] = g[j, i] = inner(updates[i], updates[j])
    return g


def _check_shapes(updates: Sequence[Update]) -> tuple[int, int]:
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


def _out_dtype(updates: Sequence[Update]) -> np.dtype:
    return np.result_type(*(u.dtype for u in updates), np.float32)


def _stack_factors(updates: Sequence[Update], weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """[w₁B₁ … w_nB_n] (out×R) and [A₁; …; A_n] (R×in) in float64, so that Σ wᵢBᵢAᵢ = B·A."""
    bs, as_ = [], []
    for u, w in zip(updates, weights, strict=True):
        assert u.B is not None and u.A is not None
        bs.append(_f64(u.B) * float(w))
        as_.append(_f64(u.A))
    return np.concatenate(bs, axis=1), np.concatenate(as_, axis=0)


def _weighted_dense(updates: Sequence[Update], weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Σ wᵢΔWᵢ as a dense float64 out×in array, accumulated one update at a time."""
    out = np.zeros(updates[0].shape)
    for u, w in zip(updates, weights, strict=True):
        if w != 0.0:
            out += float(w) * _f64(u.to_dense())
    return out


def compress(
    B: np.ndarray, A: np.ndarray, rtol: float = RANK_RTOL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact compression of B·A (B out×K, A K×in) to its numerical rank: QR of B and Aᵀ, SVD of the K×K core.

    Returns (U out×k, s k, Vt k×in) with B·A = U·diag(s)·Vt up to singular values ≤ rtol·σ₁ (dropped)."""
    qb, rb = np.linalg.qr(_f64(B))
    qa, ra = np.linalg.qr(_f64(A).T)
    u, s, vt = np.linalg.svd(rb @ ra.T, full_matrices=False)
    keep = int(np.sum(s > rtol * s[0])) if s.size and s[0] > 0 else 0
    return qb @ u[:, :keep], s[:keep], vt[:keep] @ qa.T


def _as_factored(B: np.ndarray, A: np.ndarray, dtype: np.dtype) -> Update:
    """B·A compressed to its numerical rank (at least 1: a zero product stays a zero rank-1 pair), the
    singular values folded into B."""
    u, s, vt = compress(B, A)
    if s.size == 0:
        return Update(B=np.zeros((B.shape[0], 1), dtype), A=np.zeros((1, A.shape[1]), dtype))
    return Update(B=(u * s).astype(dtype, copy=False), A=vt.astype(dtype, copy=False))


def _randomized_svd(x: np.ndarray, k: int, power_iters: int = 4, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Top-k SVD of a dense float64 matrix by a randomized range finder (Halko, Martinsson & Tropp 2011)
    with oversampling and subspace (power) iterations; deterministic seed."""
    m, n = x.shape
    ell = min(min(m, n), k + max(10, k // 2))
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(x @ rng.standard_normal((n, ell)))
    for _ in range(power_iters):
        q, _ = np.linalg.qr(x.T @ q)
        q, _ = np.linalg.qr(x @ q)
    u, s, vt = np.linalg.svd(q.T @ x, full_matrices=False)
    return (q @ u)[:, :k], s[:k], vt[:k]


def _dense_svd(x: np.ndarray, k: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    side = min(x.shape)
    if k is not None and side >= RANDOMIZED_MIN_SIDE and k * RANDOMIZED_FRACTION <= side:
        u, s, vt = _randomized_svd(x, k)
        return u, s, vt
    if side >= GRAM_SVD_MIN_SIDE:
        svd = gram_svd(x)  # float64 Gram + eigh: several times faster than LAPACK's SVD on CPU here
        u, s, vt = svd.u, svd.s, svd.vt
    else:
        u, s, vt = np.linalg.svd(x, full_matrices=False)
    if k is not None:
        u, s, vt = u[:, :k], s[:k], vt[:k]
    return u, s, vt


def factored_svd(
    updates: Sequence[Update], weights: Sequence[float] | None = None, k: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of Σ wᵢΔWᵢ (weights default to 1), float64: U (out×k), S (k, descending), Vt (k×in).

    All factored: QR of the stacked [w₁B₁ … w_nB_n] and [A₁; …; A_n]ᵀ and an R×R SVD (R = Σrᵢ), exact, no
    out×in matrix formed; k is capped at R. Any dense: the dense sum's exact SVD (LAPACK below 512 on the
    smaller side, the float64 Gram route above), or a randomized top-k SVD when k ≤ min(out, in)/8 on a
    matrix at least 512 on its smaller side. ``k=None`` keeps all.
    """
    _check_shapes(updates)
    w = [1.0] * len(updates) if weights is None else [float(x) for x in weights]
    if len(w) != len(updates):
        raise ShapeMismatch(f"{len(w)} weights for {len(updates)} updates; give one weight per task")
    if k is not None and k < 0:
        raise BudgetError(f"cannot keep {k} singular triplets; ask for a non-negative number")
    if all(u.is_factored for u in updates):
        b, a = _stack_factors(updates, w)
        qb, rb = np.linalg.qr(b)
        qa, ra = np.linalg.qr(a.T)
        u, s, vt = np.linalg.svd(rb @ ra.T, full_matrices=False)
        if k is not None:
            u, s, vt = u[:, :k], s[:k], vt[:k]
        return qb @ u, s, vt @ qa.T
    return _dense_svd(_weighted_dense(updates, w), k)


# --------------------------------------------------------------------------------------------------------
# Merge methods


@dataclass(frozen=True)
class MergeOutcome:
    """The merged update of one module (λ/α applied; W = W₀ + update) and per-module figures."""

    update: Update
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: ``params`` maps a parameter name to (default, help); ``merge`` gets the task updates
    of one module, one weight per task, and the parameters (defaults filled in by :func:`resolve_params`)."""

    name: str
    summary: str
    reference: str
    params: dict[str, tuple[Any, str]]
    merge: Callable[[Sequence[Update], Sequence[float], Mapping[str, Any]], MergeOutcome]

    def resolve_params(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults overridden by ``given``; unknown names are an error."""
        out = {name: default for name, (default, _) in self.params.items()}
        for key, value in (given or {}).items():
            if key not in out:
                known = ", ".join(sorted(out)) or "none"
                raise MergeError(f"method {self.name!r} has no parameter {key!r}; its parameters: {known}")
            out[key] = value
        return out

    def __call__(
        self,
        updates: Sequence[Update],
        weights: Sequence[float] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> MergeOutcome:
        _check_shapes(updates)
        w = [1.0] * len(updates) if weights is None else [float(x) for x in weights]
        if len(w) != len(updates):
            raise ShapeMismatch(f"{len(w)} weights for {len(updates)} updates; give one weight per task")
        return self.merge(updates, w, self.resolve_params(params))


def _param_float(
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


def _dense_or_factored(B: np.ndarray, A: np.ndarray, dtype: np.dtype) -> Update:
    """B·A kept factored when that is smaller than out×in, else dense."""
    out, inn = B.shape[0], A.shape[1]
    if B.shape[1] * (out + inn) < out * inn:
        return Update(B=B.astype(dtype, copy=False), A=A.astype(dtype, copy=False))
    return Update(dense=(B @ A).astype(dtype, copy=False))


def _merge_task_arithmetic(
    updates: Sequence[Update], weights: Sequence[float], params: Mapping[str, Any]
) -> MergeOutcome:
    lam = _param_float(params, "scale")
    dtype = _out_dtype(updates)
    w = [lam * x for x in weights]
    if all(u.is_factored for u in updates):
        b, a = _stack_factors(updates, w)
        return MergeOutcome(_as_factored(b, a, dtype), {"energy_kept": 1.0})
    return MergeOutcome(Update(dense=_weighted_dense(updates, w).astype(dtype)), {"energy_kept": 1.0})


def _keep_count(d: int, density: float) -> int:
    """Entries kept per task by TIES trimming: ⌊density·d⌋ (mergekit, the TIES paper's top-k%), at least one
    when density > 0."""
    return min(d, max(1, int(density * d))) if density > 0 else 0


def _threshold(values: np.ndarray, keep: int) -> tuple[float, int]:
    """(t, q) such that the top ``keep`` magnitudes of ``values`` are those > t plus the first q (in storage
    order) equal to t. t = -1 keeps everything, t = inf nothing."""
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
        x = _f64(x)
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


def ties_combine(x: np.ndarray, weights: Sequence[float], density: float) -> tuple[np.ndarray, float]:
    """TIES on the rows of x (n×d, one task a row): trim each row to its top ⌊density·d⌋ magnitudes (ties at
    the threshold broken by position), elect a sign per entry from the summed weighted mass Σ wᵢxᵢ (an exact
    zero takes the majority of the elected signs, as the TIES authors' code), and take the weighted mean of
    the agreeing entries: Σ wᵢxᵢ·[sign(wᵢxᵢ) = elected] / Σ wᵢ·[…] (mergekit's normalisation; the plain mean
    when all wᵢ = 1).

    Returns (merged d-vector, fraction of the rows' squared mass kept by the trimming)."""
    keep = _keep_count(x.shape[1], density)
    ties = _Ties(weights, [_threshold(row, keep) for row in x])
    merged = ties.chunk(x)
    return merged, ties.finish(merged)


def _rows(u: Update, r0: int, r1: int) -> np.ndarray:
    """Rows r0:r1 of ΔW (from the factors without forming the rest)."""
    if u.dense is not None:
        return u.dense[r0:r1]
    assert u.B is not None and u.A is not None
    return u.B[r0:r1] @ u.A


def _merge_ties(
    updates: Sequence[Update], weights: Sequence[float], params: Mapping[str, Any]
) -> MergeOutcome:
    lam = _param_float(params, "scale")
    density = _param_float(params, "density", 0.0, 1.0)
    out, inn = updates[0].shape
    keep = _keep_count(out * inn, density)
    step = max(1, _CHUNK // max(inn, 1))
    # thresholds from the very same row blocks as the merge below (a factored B[r0:r1]·A may round
    # differently from the whole B·A), one task's dense update at a time
    thresholds = [
        _threshold(np.concatenate([_rows(u, r0, min(out, r0 + step)) for r0 in range(0, out, step)]), keep)
        for u in updates
    ]
    ties = _Ties(weights, thresholds)
    result = np.empty(out * inn)
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        block = np.stack([_rows(u, r0, r1).reshape(-1) for u in updates])
        result[r0 * inn : r1 * inn] = ties.chunk(block)
    kept = ties.finish(result)
    return MergeOutcome(
        Update(dense=(lam * result).reshape(out, inn).astype(_out_dtype(updates))),
        {"energy_kept": kept, "density": density},
    )


def _procrustes(x: np.ndarray) -> np.ndarray:
    """The orthogonal (orthonormal-column or -row) matrix nearest to x: P·Qᵀ from x = P·S·Qᵀ."""
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


def tsv_rank(shape: tuple[int, int], n_tasks: int, rank: int) -> int:
    """Triplets asked of each task by TSV-Merge: ⌊min(out, in)/T⌋ (the authors' rule, by integer division),
    at most the update's r for a factored update, at least 1. Of those, only triplets with σ > 1e-7·σ₁ are
    used (see :func:`_merge_tsv`)."""
    return max(1, min(min(shape) // n_tasks, rank))


def _merge_tsv(
    updates: Sequence[Update], weights: Sequence[float], params: Mapping[str, Any]
) -> MergeOutcome:
    # Deviation from the published code, only for rank-deficient updates: triplets with σ ≤ 1e-7·σ₁ are
    # dropped. They carry no energy, but their singular vectors are arbitrary (LAPACK's choice of a null
    # basis) and would still move the Procrustes factors; dropping them makes dense and factored inputs agree.
    alpha = _param_float(params, "scale")
    n = len(updates)
    us, ss, vts, kept = [], [], [], []
    for u, w in zip(updates, weights, strict=True):
        total = inner(u, u)  # ‖ΔW‖_F², one pass
        if total <= 0:  # a task that left the module alone contributes no triplet (skip its SVD)
            kept.append(1.0)
            us.append(np.zeros((u.shape[0], 0)))
            ss.append(np.zeros(0))
            vts.append(np.zeros((0, u.shape[1])))
            continue
        uu, s, vt = factored_svd([u], None, tsv_rank(u.shape, n, u.rank))
        keep = int(np.sum(s > GRAM_RTOL * s[0])) if s.size and s[0] > 0 else 0
        kept.append(float(np.sum(s[:keep] ** 2)) / total)
        us.append(uu[:, :keep])
        ss.append(s[:keep] * w)
        vts.append(vt[:keep])
    u_cat = np.concatenate(us, axis=1)
    vt_cat = np.concatenate(vts, axis=0)
    s_cat = np.concatenate(ss)
    dtype = _out_dtype(updates)
    stats = {"energy_kept": float(np.mean(kept)), "rank": float(s_cat.size)}
    if s_cat.size == 0:  # every update is zero
        out, inn = updates[0].shape
        return MergeOutcome(Update(B=np.zeros((out, 1), dtype), A=np.zeros((1, inn), dtype)), stats)
    u_orth = _procrustes(u_cat)
    vt_orth = _procrustes(vt_cat)
    return MergeOutcome(_dense_or_factored(alpha * u_orth * s_cat, vt_orth, dtype), stats)


def knots_svd(updates: Sequence[Update]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """KnOTS alignment: thin SVD of the column concatenation [ΔW₁ … ΔW_T] (out × T·in) = U·diag(s)·Vᵀ,
    keeping σ > 1e-5·σ₁; returns (U out×k, s, [diag(s)·Vᵢᵀ (k×in) per task]).

    Factored updates: [B₁A₁ … B_TA_T] = [B₁ … B_T]·blockdiag(A₁ … A_T); QR of the stacked B's and of each Aᵢᵀ
    give an R×R core, so nothing out×T·in is formed."""
    _check_shapes(updates)
    if all(u.is_factored for u in updates):
        b, _ = _stack_factors(updates, [1.0] * len(updates))
        qb, rb = np.linalg.qr(b)
        qas, ras = [], []
        for u in updates:
            assert u.A is not None
            qa, ra = np.linalg.qr(_f64(u.A).T)
            qas.append(qa)
            ras.append(ra)
        core = rb @ _block_diag(ras).T
        uc, s, vtc = np.linalg.svd(core, full_matrices=False)
        keep = _knots_keep(s)
        u = qb @ uc[:, :keep]
        reps, start = [], 0
        for qa, ra in zip(qas, ras, strict=True):
            width = ra.shape[0]
            reps.append(s[:keep, None] * (vtc[:keep, start : start + width] @ qa.T))
            start += width
        return u, s[:keep], reps
    out, inn = updates[0].shape
    if out <= len(updates) * inn:
        # U from the out×out Gram Σ ΔWᵢΔWᵢᵀ (float64), and diag(s)·Vᵢᵀ = Uᵀ·ΔWᵢ: no out×T·in matrix and no
        # division by small σ; σ is resolved to ~1e-8·σ₁, far inside the 1e-5·σ₁ cut-off
        g = np.zeros((out, out))
        for u in updates:
            d = _f64(u.to_dense())
            g += d @ d.T
        lam, vec = np.linalg.eigh(g)
        s = np.sqrt(np.clip(lam[::-1], 0.0, None))
        keep = _knots_keep(s)
        uu = np.ascontiguousarray(vec[:, ::-1][:, :keep])
        return uu, s[:keep], [uu.T @ _f64(u.to_dense()) for u in updates]
    cat = np.concatenate([_f64(u.to_dense()) for u in updates], axis=1)
    uu, s, vt = np.linalg.svd(cat, full_matrices=False)
    keep = _knots_keep(s)
    reps = [s[:keep, None] * vt[:keep, i * inn : (i + 1) * inn] for i in range(len(updates))]
    return uu[:, :keep], s[:keep], reps


def _knots_keep(s: np.ndarray) -> int:
    return int(np.sum(s > 1e-5 * s[0])) if s.size and s[0] > 0 else 0


def _block_diag(blocks: Sequence[np.ndarray]) -> np.ndarray:
    rows = sum(b.shape[0] for b in blocks)
    cols = sum(b.shape[1] for b in blocks)
    out = np.zeros((rows, cols))
    r = c = 0
    for b in blocks:
        out[r : r + b.shape[0], c : c + b.shape[1]] = b
        r += b.shape[0]
        c += b.shape[1]
    return out


def _merge_knots(
    updates: Sequence[Update], weights: Sequence[float], params: Mapping[str, Any]
) -> MergeOutcome:
    lam = _param_float(params, "scale")
    combine = str(params["combine"])
    u, s, reps = knots_svd(updates)
    x = np.stack([r.reshape(-1) for r in reps])
    if combine == "linear":
        merged = np.asarray(weights, dtype=np.float64) @ x
        kept = 1.0
    elif combine == "ties":
        merged, kept = ties_combine(x, weights, _param_float(params, "density", 0.0, 1.0))
    else:
        raise MergeError(f"knots combine={combine!r} is unknown; use 'linear' or 'ties'")
    if s.size == 0:  # every update is zero
        out, inn = updates[0].shape
        dtype = _out_dtype(updates)
        return MergeOutcome(
            Update(B=np.zeros((out, 1), dtype), A=np.zeros((1, inn), dtype)), {"energy_kept": 1.0}
        )
    rep = merged.reshape(s.size, -1)
    update = _dense_or_factored(lam * u, rep, _out_dtype(updates))
    return MergeOutcome(update, {"energy_kept": kept, "rank": float(s.size)})


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            name="task-arithmetic",
            summary="ΔW = λ·Σ wᵢΔWᵢ: the sum of the task updates (factored inputs stay factored).",
            reference="Ilharco et al. 2023, Editing Models with Task Arithmetic (ICLR)",
            params={"scale": (1.0, "λ, multiplies the summed update")},
            merge=_merge_task_arithmetic,
        ),
        MergeMethod(
            name="ties",
            summary="Trim each update to its top-density entries, elect signs by summed mass, average agreeing entries.",
            reference="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models (NeurIPS); as mergekit",
            params={
                "density": (0.2, "fraction of each update's entries kept by magnitude"),
                "scale": (1.0, "λ, multiplies the merged update"),
            },
            merge=_merge_ties,
        ),
        MergeMethod(
            name="tsv",
            summary="Top ⌊min(out,in)/T⌋ singular triplets per task, U's and V's orthogonalised by Procrustes.",
            reference="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging (CVPR)",
            params={"scale": (1.0, "α, multiplies the merged update (chosen on validation in the paper)")},
            merge=_merge_tsv,
        ),
        MergeMethod(
            name="knots",
            summary="SVD of the concatenated updates gives a shared U; the tasks' diag(s)·Vᵢᵀ blocks are merged there.",
            reference="Stoica et al. 2025, Model Merging with SVD to Tie the KnOTS (ICLR)",
            params={
                "combine": (
                    "ties",
                    "how the aligned blocks are merged: 'ties' (disjoint mean) or 'linear' (sum)",
                ),
                "density": (
                    0.2,
                    "TIES: fraction of each block's entries kept by magnitude (authors: topK=20%)",
                ),
                "scale": (1.0, "λ, multiplies the merged update (the authors tune it; 0.6 in their configs)"),
            },
            merge=_merge_knots,
        ),
    )
}


# --------------------------------------------------------------------------------------------------------
# Reversible merge (RMM)


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


def _stack_svd(g: np.ndarray, center: bool) -> tuple[np.ndarray, np.ndarray]:
    """(σ descending, Q n×n) of the stacked n×d matrix M (centred: H·M, H = I − 11ᵀ/n) from its Gram G:
    eig(H·G·H) = Q·diag(σ²)·Qᵀ."""
    n = g.shape[0]
    if center:
        h = np.eye(n) - 1.0 / n
        g = h @ g @ h
    lam, q = np.linalg.eigh((g + g.T) / 2)
    lam, q = lam[::-1], q[:, ::-1]
    return np.sqrt(np.clip(lam, 0.0, None)), np.ascontiguousarray(q)


def rmm_fit(
    updates: Sequence[Update],
    *,
    basis: int | None = None,
    energy: float | None = None,
    center: bool = False,
    gram_matrix: np.ndarray | None = None,
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
    _check_shapes(updates)
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
    g = gram(updates) if gram_matrix is None else _f64(gram_matrix)
    sigma, q = _stack_svd(g, center)
    p = basis if basis is not None else basis_for_energy(sigma, 1.0 if energy is None else energy)
    numerical = int(np.sum(sigma > GRAM_RTOL * sigma[0])) if sigma[0] > 0 else 0
    p = min(p, numerical)

    coeff = q[:, :p] * sigma[:p]  # n×p
    a = q[:, :p] / sigma[:p] if p else np.zeros((n, 0))  # basis j = Σᵢ a[i, j]·ΔWᵢ
    if center:
        a = a - a.mean(axis=0, keepdims=True)  # exact in theory (Q's columns ⊥ 1); removes rounding
    dtype = _out_dtype(updates)
    factored = all(u.is_factored for u in updates)

    mean: Update | None = None
    elements: list[Update] = []
    if factored:
        # every element is [c₁B₁ … c_nB_n]·[A₁; …; A_n] for some cᵢ: one QR of each stacked factor serves all
        b_cat, a_cat = _stack_factors(updates, [1.0] * n)
        owner = np.repeat(np.arange(n), [u.rank for u in updates])
        qb, rb = np.linalg.qr(b_cat)
        qa, ra = np.linalg.qr(a_cat.T)

        def element(c: np.ndarray) -> Update:
            u, s, vt = np.linalg.svd((rb * c[owner]) @ ra.T, full_matrices=False)
            keep = max(1, int(np.sum(s > RANK_RTOL * s[0]))) if s.size and s[0] > 0 else 1
            return Update(B=((qb @ u[:, :keep]) * s[:keep]).astype(dtype), A=(vt[:keep] @ qa.T).astype(dtype))

        if center:
            mean = element(np.full(n, 1.0 / n))
        elements = [element(a[:, j]) for j in range(p)]
    else:
        if center:
            mean = Update(dense=_weighted_dense(updates, [1.0 / n] * n).astype(dtype))
        for j in range(p):
            elements.append(Update(dense=_weighted_dense(updates, a[:, j]).astype(dtype)))
    if p == 0 and mean is None:
        # every update is zero: keep one zero element (rank 1) so the module still knows its shape
        out, inn = updates[0].shape
        elements = [Update(B=np.zeros((out, 1), dtype), A=np.zeros((1, inn), dtype))]
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


def rmm_reconstruct(m: RMMModule, task: int) -> Update:
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
        b, a = _stack_factors([e for e, _ in parts], [c for _, c in parts])
        return _as_factored(b, a, dtype)
    return Update(dense=_weighted_dense([e for e, _ in parts], [c for _, c in parts]).astype(dtype))


# --------------------------------------------------------------------------------------------------------
# Interference


def _top_left(u: Update, k: int) -> np.ndarray:
    """The top-k left singular vectors of ΔW (out×k', k' ≤ k, only σ above round-off). Factored: exact from the
    factors. Dense: :func:`~spectra_cli.spectral.compare.gram_svd` with ``top=k`` (the k largest eigenpairs of
    the float64 Gram matrix of the smaller side; for a tall ΔW the vectors are ΔW·V orthonormalised by QR),
    instead of a full SVD: the overlap statistic needs only the leading subspace, and a full SVD of e.g. a
    30522×384 embedding update cost seconds per task."""
    if u.is_factored:
        uu, s, _ = factored_svd([u], None, min(k, u.rank))
        keep = int(np.sum(s > RANK_RTOL * s[0])) if s.size and s[0] > 0 else 0
        return uu[:, :keep]
    svd = gram_svd(_f64(u.to_dense()), top=k)
    keep = int(np.sum(svd.s > GRAM_RTOL * svd.s[0])) if svd.s.size and svd.s[0] > 0 else 0
    return np.ascontiguousarray(svd.u[:, :keep])


def interference(updates: Sequence[Update], k: int = 8) -> dict[str, np.ndarray]:
    """How much the task updates of one module overlap. ``cosine`` n×n: ⟨ΔWᵢ, ΔWⱼ⟩/(‖ΔWᵢ‖‖ΔWⱼ‖) (0 where an
    update is zero); ``overlap`` n×n: mean cos² of the principal angles between the top-k left singular
    subspaces, ‖UᵢᵀUⱼ‖_F²/min(kᵢ, kⱼ) ∈ [0, 1] (kᵢ = min(k, rank of ΔWᵢ)); ``norms``: ‖ΔWᵢ‖_F; ``gram``: the
    n×n :func:`gram` they come from (for :func:`rmm_fit`)."""
    _check_shapes(updates)
    if k < 1:
        raise SpectraError(f"the subspace size k={k} must be at least 1")
    g = gram(updates)
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    denom = np.outer(norms, norms)
    cosine = np.divide(g, denom, out=np.zeros_like(g), where=denom > 0)
    subspaces = [
        _top_left(u, k) if nrm > 0 else np.zeros((u.shape[0], 0))
        for u, nrm in zip(updates, norms, strict=True)
    ]
    n = len(updates)
    overlap = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            kk = min(subspaces[i].shape[1], subspaces[j].shape[1])
            if kk:
                m = subspaces[i].T @ subspaces[j]
                overlap[i, j] = overlap[j, i] = min(1.0, float(np.sum(m * m)) / kk)
    return {"cosine": np.clip(cosine, -1.0, 1.0), "overlap": overlap, "norms": norms, "gram": g}
