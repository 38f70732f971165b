"""The numeric core of `spectra merge` (spectra_cli/spectral/merge.py).

Known answers are computed independently here: the explicit stack of vectorised updates and np.linalg.svd for
RMM (Eckart–Young), direct NumPy transcriptions of the published TSV-Merge and KnOTS procedures (written from
the papers and the authors' code, not from the module under test), and a TIES example worked by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectra_cli.errors import BudgetError, ShapeMismatch, SpectraError
from spectra_cli.spectral.merge import (
    METHODS,
    MergeError,
    Update,
    basis_for_energy,
    factored_svd,
    inner,
    interference,
    rmm_fit,
    rmm_reconstruct,
)

# ----------------------------------------------------------------------------------------------------------
# helpers


def _factored(rng: np.random.Generator, n: int, out: int, inn: int, r: int, dtype=np.float64) -> list[Update]:
    return [
        Update(B=rng.standard_normal((out, r)).astype(dtype), A=rng.standard_normal((r, inn)).astype(dtype))
        for _ in range(n)
    ]


def _dense(rng: np.random.Generator, n: int, out: int, inn: int, dtype=np.float64) -> list[Update]:
    return [Update(dense=rng.standard_normal((out, inn)).astype(dtype)) for _ in range(n)]


def _densified(updates: list[Update]) -> list[Update]:
    return [Update(dense=u.to_dense()) for u in updates]


def _stack(updates: list[Update]) -> np.ndarray:
    return np.stack([np.asarray(u.to_dense(), dtype=np.float64).reshape(-1) for u in updates])


def _eckart_young_rows(m: np.ndarray, p: int) -> np.ndarray:
    """Row norms of M − M_p, M_p the rank-p truncated SVD of M (computed by LAPACK on the explicit stack)."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return np.linalg.norm(m - (u[:, :p] * s[:p]) @ vt[:p], axis=1)


# ----------------------------------------------------------------------------------------------------------
# Update, inner products, factored SVD


def test_factored_inner_and_norm_match_dense() -> None:
    rng = np.random.default_rng(1)
    f = _factored(rng, 2, 13, 9, 3)
    d = _densified(f)
    want = float(np.sum(d[0].to_dense() * d[1].to_dense()))
    assert inner(f[0], f[1]) == pytest.approx(want, rel=1e-12)
    assert inner(f[0], d[1]) == pytest.approx(want, rel=1e-12)
    assert inner(d[0], d[1]) == pytest.approx(want, rel=1e-12)
    assert f[0].frob_norm() == pytest.approx(np.linalg.norm(d[0].to_dense()), rel=1e-12)
    assert f[0].scaled(-2.0).frob_norm() == pytest.approx(2 * f[0].frob_norm(), rel=1e-12)
    assert f[0].shape == (13, 9) and f[0].rank == 3 and f[0].is_factored
    assert d[0].rank == 9 and not d[0].is_factored


def test_update_rejects_bad_factors_and_mixed_shapes() -> None:
    rng = np.random.default_rng(2)
    with pytest.raises(ShapeMismatch, match="do not chain"):
        Update(B=rng.standard_normal((4, 3)), A=rng.standard_normal((2, 5)))
    with pytest.raises(ShapeMismatch):
        Update(dense=np.zeros(5))
    with pytest.raises(ShapeMismatch):
        Update()
    a, b = Update(dense=np.zeros((3, 4))), Update(dense=np.zeros((4, 3)))
    with pytest.raises(ShapeMismatch, match="same base model"):
        rmm_fit([a, b], basis=1)
    with pytest.raises(ShapeMismatch):
        inner(a, b)


@pytest.mark.parametrize("factored", [True, False])
def test_factored_svd_matches_numpy(factored: bool) -> None:
    rng = np.random.default_rng(3)
    ups = _factored(rng, 3, 17, 11, 2)
    if not factored:
        ups = _densified(ups)
    w = [0.5, -1.5, 2.0]
    target = sum(wi * u.to_dense() for wi, u in zip(w, ups, strict=True))
    s_ref = np.linalg.svd(target, compute_uv=False)
    u, s, vt = factored_svd(ups, w, None)
    r = 6  # rank of the weighted sum: three rank-2 updates
    np.testing.assert_allclose(s[:r], s_ref[:r], rtol=1e-10)
    np.testing.assert_allclose((u * s) @ vt, target, atol=1e-10)
    np.testing.assert_allclose(u[:, :r].T @ u[:, :r], np.eye(r), atol=1e-10)
    np.testing.assert_allclose(vt[:r] @ vt[:r].T, np.eye(r), atol=1e-10)
    u4, s4, vt4 = factored_svd(ups, w, 4)
    assert u4.shape == (17, 4) and s4.shape == (4,) and vt4.shape == (4, 11)
    np.testing.assert_allclose(s4, s_ref[:4], rtol=1e-10)
    u_ref = np.linalg.svd(target)[0][:, :4]
    np.testing.assert_allclose(np.abs(np.sum(u4 * u_ref, axis=0)), 1.0, atol=1e-8)  # same vectors up to sign


def test_factored_svd_randomized_top_k_on_known_spectrum() -> None:
    """A 600×520 matrix with known singular values: the randomized top-k path (k ≤ min/8) finds them."""
    rng = np.random.default_rng(4)
    m, n, k = 600, 520, 8
    qu, _ = np.linalg.qr(rng.standard_normal((m, n)))
    qv, _ = np.linalg.qr(rng.standard_normal((n, n)))
    sigma = np.concatenate([np.linspace(10.0, 5.0, k), 0.5 * np.exp(-np.arange(n - k) / 50.0)])
    w = (qu * sigma) @ qv.T
    u, s, vt = factored_svd([Update(dense=w)], None, k)
    np.testing.assert_allclose(s, sigma[:k], rtol=1e-8)
    # the exact path at this size (float64 Gram route): every singular value and the matrix itself
    u_all, s_all, vt_all = factored_svd([Update(dense=w)], None, None)
    np.testing.assert_allclose(s_all, sigma, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose((u_all * s_all) @ vt_all, w, atol=1e-9)
    np.testing.assert_allclose(np.abs(np.sum(u * qu[:, :k], axis=0)), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(vt.T * qv[:, :k], axis=0)), 1.0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# RMM


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("kind", ["dense", "factored", "dense32", "factored32"])
def test_rmm_full_basis_reconstructs_every_task(kind: str, center: bool) -> None:
    rng = np.random.default_rng(5)
    dtype = np.float32 if kind.endswith("32") else np.float64
    n = 4
    ups = (
        _factored(rng, n, 24, 18, 3, dtype) if kind.startswith("factored") else _dense(rng, n, 24, 18, dtype)
    )
    m = rmm_fit(ups, basis=n, center=center)
    # float32 tolerance: the Gram route resolves the stack's singular values to ~1e-8·σ₁ (centring leaves one
    # that is rounding only, and it is dropped)
    tol = 1e-5 if dtype == np.float32 else 1e-7
    assert m.errors.max() < tol
    for i, u in enumerate(ups):
        rec = rmm_reconstruct(m, i)
        assert rec.is_factored == u.is_factored
        ref = u.to_dense().astype(np.float64)
        assert np.linalg.norm(rec.to_dense() - ref) / np.linalg.norm(ref) < tol
    # energy τ = 1 is the same as p = n
    m1 = rmm_fit(ups, energy=1.0, center=center)
    assert m1.errors.max() < tol and m1.p == m.p


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("factored", [True, False])
def test_rmm_error_is_the_eckart_young_optimum(factored: bool, center: bool) -> None:
    rng = np.random.default_rng(6)
    n, p = 6, 3
    ups = _factored(rng, n, 20, 14, 2) if factored else _dense(rng, n, 20, 14)
    m_raw = _stack(ups)
    mc = m_raw - m_raw.mean(axis=0) if center else m_raw
    m = rmm_fit(ups, basis=p, center=center)
    norms = np.linalg.norm(m_raw, axis=1)
    np.testing.assert_allclose(m.errors, _eckart_young_rows(mc, p) / norms, atol=1e-10)
    s_ref = np.linalg.svd(mc, compute_uv=False)
    np.testing.assert_allclose(m.singular_values[: n - 1], s_ref[: n - 1], rtol=1e-8)
    # the stored basis + coefficients really give that error (not only the formula)
    for i, u in enumerate(ups):
        got = np.linalg.norm(rmm_reconstruct(m, i).to_dense() - u.to_dense()) / norms[i]
        assert got == pytest.approx(m.errors[i], abs=1e-10)
    # the basis is orthonormal in the Frobenius inner product
    g = np.array([[inner(a, b) for b in m.basis] for a in m.basis])
    np.testing.assert_allclose(g, np.eye(p), atol=1e-10)
    assert m.coefficients.shape == (n, p)
    total = float(np.sum(m.singular_values**2))
    assert m.energy_kept == pytest.approx(float(np.sum(s_ref[:p] ** 2)) / total, rel=1e-10)


def test_rmm_factored_path_equals_dense_path() -> None:
    rng = np.random.default_rng(7)
    f = _factored(rng, 5, 16, 12, 2)
    d = _densified(f)
    for center in (False, True):
        mf, md = rmm_fit(f, basis=2, center=center), rmm_fit(d, basis=2, center=center)
        np.testing.assert_allclose(mf.errors, md.errors, atol=1e-12)
        np.testing.assert_allclose(mf.singular_values, md.singular_values, rtol=1e-10, atol=1e-10)
        assert all(b.is_factored for b in mf.basis) and not any(b.is_factored for b in md.basis)
        for i in range(5):
            np.testing.assert_allclose(
                rmm_reconstruct(mf, i).to_dense(), rmm_reconstruct(md, i).to_dense(), atol=1e-10
            )
        # storage: dense p·out·in (+ mean) + n·p; factored basis elements compressed to rank ≤ Σrᵢ = 10
        assert md.storage == 2 * 16 * 12 + 5 * 2 + (16 * 12 if center else 0)
        assert md.raw == 5 * 16 * 12 and mf.raw == 5 * 2 * (16 + 12)
        assert all(b.rank <= 10 for b in mf.basis)
        assert mf.storage == sum(b.size for b in mf.basis) + 5 * 2 + (mf.mean.size if mf.mean else 0)


def test_rmm_dependent_tasks_cap_the_basis_at_the_stack_rank() -> None:
    rng = np.random.default_rng(8)
    base = rng.standard_normal((10, 8))
    ups = [Update(dense=base), Update(dense=2 * base), Update(dense=-base)]
    m = rmm_fit(ups, basis=3)
    assert m.p == 1 and m.errors.max() < 1e-7
    np.testing.assert_allclose(rmm_reconstruct(m, 2).to_dense(), -base, atol=1e-6)
    mc = rmm_fit(ups, basis=3, center=True)
    assert mc.p == 1 and mc.errors.max() < 1e-7


def test_rmm_with_interference_gram_equals_its_own() -> None:
    rng = np.random.default_rng(21)
    for ups in (_dense(rng, 3, 9, 7), _factored(rng, 3, 9, 7, 2)):
        g = interference(ups, k=2)["gram"]
        np.testing.assert_allclose(
            g, [[np.vdot(a.to_dense(), b.to_dense()) for b in ups] for a in ups], rtol=1e-12
        )
        for center in (False, True):
            own, given_g = (
                rmm_fit(ups, basis=2, center=center),
                rmm_fit(ups, basis=2, center=center, gram_matrix=g),
            )
            np.testing.assert_allclose(given_g.errors, own.errors, atol=1e-12)
            for task in range(3):
                np.testing.assert_allclose(
                    rmm_reconstruct(given_g, task).to_dense(),
                    rmm_reconstruct(own, task).to_dense(),
                    atol=1e-10,
                )
        with pytest.raises(ShapeMismatch):
            rmm_fit(ups, basis=1, gram_matrix=g[:2, :2])


def test_rmm_energy_picks_the_smallest_basis() -> None:
    s = np.array([3.0, 2.0, 1.0, 0.5])  # σ² = 9, 4, 1, 0.25 of 14.25
    assert basis_for_energy(s, 9 / 14.25) == 1
    assert basis_for_energy(s, 9 / 14.25 + 1e-6) == 2
    assert basis_for_energy(s, 0.95) == 3
    assert basis_for_energy(s, 1.0) == 4
    rng = np.random.default_rng(9)
    ups = _dense(rng, 5, 9, 7)
    m = rmm_fit(ups, energy=0.7)
    frac = np.cumsum(m.singular_values**2) / np.sum(m.singular_values**2)
    assert frac[m.p - 1] >= 0.7 and (m.p == 1 or frac[m.p - 2] < 0.7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"basis": 4}, "between 1 and 3"),
        ({"basis": 0}, "between 1 and 3"),
        ({"energy": 0.0}, "in \\(0, 1\\]"),
        ({"energy": 1.5}, "in \\(0, 1\\]"),
        ({"basis": 2, "energy": 0.5}, "not both"),
    ],
)
def test_rmm_bad_budget_is_a_clear_error(kwargs: dict, match: str) -> None:
    ups = _dense(np.random.default_rng(10), 3, 4, 5)
    with pytest.raises(BudgetError, match=match):
        rmm_fit(ups, **kwargs)


def test_rmm_no_updates_and_bad_task_index() -> None:
    with pytest.raises(SpectraError):
        rmm_fit([], basis=1)
    m = rmm_fit(_dense(np.random.default_rng(11), 2, 3, 3), basis=1)
    with pytest.raises(SpectraError, match="out of range"):
        rmm_reconstruct(m, 2)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 6),
    out=st.integers(2, 9),
    inn=st.integers(2, 9),
    r=st.integers(1, 3),
    factored=st.booleans(),
    center=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_rmm_error_never_rises_with_p(
    n: int, out: int, inn: int, r: int, factored: bool, center: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    ups = _factored(rng, n, out, inn, r) if factored else _dense(rng, n, out, inn)
    errors = np.stack([rmm_fit(ups, basis=p, center=center).errors for p in range(1, n + 1)])
    assert np.all(np.diff(errors, axis=0) <= 1e-9)
    assert errors[-1].max() < 1e-6


# ----------------------------------------------------------------------------------------------------------
# Direct NumPy transcriptions of the published methods (independent of the module under test)


def _ref_tsv(deltas: list[np.ndarray], alpha: float) -> np.ndarray:
    """TSV-Merge as in the authors' code (AntoAndGar/task_singular_vectors, compute_and_sum_svd_mem_reduction):
    zero-initialised U (m×min), σ (min) and V (min×n); task i's top ⌊min/T⌋ triplets go to block i; the merged
    ΔW is polar(U)·diag(σ)·polar(V) with polar(X) = P·Qᵀ from X = P·S·Qᵀ."""
    t = len(deltas)
    m, n = deltas[0].shape
    full = min(m, n)
    k = full // t
    sum_u, sum_s, sum_v = np.zeros((m, full)), np.zeros(full), np.zeros((full, n))
    for i, d in enumerate(deltas):
        u, s, v = np.linalg.svd(d, full_matrices=False)
        sum_u[:, i * k : (i + 1) * k] = u[:, :k]
        sum_s[i * k : (i + 1) * k] = s[:k]
        sum_v[i * k : (i + 1) * k, :] = v[:k, :]
    u_u, _, v_u = np.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = np.linalg.svd(sum_v, full_matrices=False)
    return alpha * np.linalg.multi_dot([u_u, v_u, np.diag(sum_s), u_v, v_v])


def _ref_knots(deltas: list[np.ndarray], combine: str, top_k: float, scale: float) -> np.ndarray:
    """KnOTS as in the authors' code (gstoica27/KnOTS: SVDMerger.apply_svd, masking_ops.ties_masking,
    masked_merge): SVD of the column concatenation, task reps diag(s)·Vᵢᵀ; TIES: per task keep the ⌊d·K⌋
    largest magnitudes, sign = sign(Σ pruned) (0 → majority), mask = prune ∧ sign
    agreement, merged = Σ masked / #nonzero ('mean'); linear: all kept, summed. ΔW = scale·U·merged."""
    t = len(deltas)
    inn = deltas[0].shape[1]
    u, s, v = np.linalg.svd(np.concatenate(deltas, axis=1), full_matrices=False)
    keep = s > 1e-5
    u, s, v = u[:, keep], s[keep], v[keep]
    reps = np.stack([(np.diag(s) @ v[:, i * inn : (i + 1) * inn]).reshape(-1) for i in range(t)])
    if combine == "linear":
        merged = reps.sum(axis=0)
    else:
        d = reps.shape[1]
        # the paper's "top K%": the ⌊K·d⌋ largest magnitudes of each row (the authors' kthvalue(d − ⌊K·d⌋)
        # with ≥ keeps one entry more; spectra follows the paper and mergekit here)
        kth = -np.sort(-np.abs(reps), axis=1)[:, int(d * top_k) - 1 : int(d * top_k)]
        prune = np.abs(reps) >= kth
        pruned = reps * prune
        sign = np.sign(pruned.sum(axis=0))
        sign[sign == 0] = np.sign(sign.sum())
        agree = np.where(sign[None, :] > 0, pruned > 0, pruned < 0)
        masked = reps * (agree & prune)
        counts = (masked != 0).sum(axis=0)
        merged = masked.sum(axis=0) / np.clip(counts, 1, None)
    return scale * u @ merged.reshape(s.size, inn)


@pytest.mark.parametrize(("t", "m", "n"), [(3, 12, 9), (2, 10, 14), (4, 7, 11)])
def test_tsv_matches_the_published_procedure(t: int, m: int, n: int) -> None:
    rng = np.random.default_rng(12 + t)
    deltas = [rng.standard_normal((m, n)) for _ in range(t)]
    want = _ref_tsv(deltas, alpha=0.7)
    got = METHODS["tsv"]([Update(dense=d) for d in deltas], None, {"scale": 0.7})
    np.testing.assert_allclose(got.update.to_dense(), want, atol=1e-10)
    assert got.stats["rank"] == t * (min(m, n) // t)


@pytest.mark.parametrize("shape", [(10, 6), (30, 24)])
def test_tsv_factored_equals_dense(shape: tuple[int, int]) -> None:
    """Rank-2 updates, T = 3. For 10×6, ⌊6/3⌋ = 2 = r: the published procedure as is. For 30×24, ⌊24/3⌋ = 8 > r:
    the dense path finds 6 null triplets per task; they carry no energy and are dropped (the published code
    would feed their arbitrary vectors into the Procrustes step), so both paths still agree."""
    rng = np.random.default_rng(16)
    f = _factored(rng, 3, *shape, 2)
    a = METHODS["tsv"](f)
    b = METHODS["tsv"](_densified(f))
    np.testing.assert_allclose(a.update.to_dense(), b.update.to_dense(), atol=1e-9)
    assert a.stats["rank"] == b.stats["rank"] == 6


def test_all_zero_updates_merge_to_zero() -> None:
    ups = [Update(B=np.zeros((6, 2)), A=np.zeros((2, 5))) for _ in range(2)]
    for name in METHODS:
        out = METHODS[name](ups).update.to_dense()
        assert out.shape == (6, 5) and not np.any(out), name


@pytest.mark.parametrize("combine", ["ties", "linear"])
@pytest.mark.parametrize(("t", "m", "n"), [(3, 8, 6), (2, 5, 9), (2, 20, 6)])
def test_knots_matches_the_published_procedure(combine: str, t: int, m: int, n: int) -> None:
    rng = np.random.default_rng(20 + t)
    deltas = [rng.standard_normal((m, n)) for _ in range(t)]
    want = _ref_knots(deltas, combine, top_k=0.2, scale=0.6)
    got = METHODS["knots"]([Update(dense=d) for d in deltas], None, {"combine": combine, "scale": 0.6})
    np.testing.assert_allclose(got.update.to_dense(), want, atol=1e-10)
    if combine == "linear":  # aligned and summed back, the linear combination is task arithmetic
        np.testing.assert_allclose(got.update.to_dense(), 0.6 * sum(deltas), atol=1e-10)


def test_knots_factored_equals_dense() -> None:
    rng = np.random.default_rng(24)
    f = _factored(rng, 3, 14, 10, 2)
    for combine in ("ties", "linear"):
        a = METHODS["knots"](f, None, {"combine": combine}).update.to_dense()
        b = METHODS["knots"](_densified(f), None, {"combine": combine}).update.to_dense()
        np.testing.assert_allclose(a, b, atol=1e-9)


def test_ties_hand_computed() -> None:
    rows = np.array(
        [
            [4.0, -1.0, 0.5, -3.0],  # keeps 4, -3
            [-2.0, 5.0, 1.0, -0.5],  # keeps 5, -2
            [3.0, -2.0, -6.0, 1.0],  # keeps -6, 3
        ]
    )
    ups = [Update(dense=r.reshape(1, 4)) for r in rows]
    # elected signs from Σ trimmed = [5, 5, -6, -3]; agreeing means [mean(4, 3), 5, -6, -3]
    out = METHODS["ties"](ups, None, {"density": 0.5, "scale": 0.5})
    np.testing.assert_allclose(out.update.to_dense(), 0.5 * np.array([[3.5, 5.0, -6.0, -3.0]]))
    kept = (16 + 9 + 4 + 25 + 36 + 9) / float(np.sum(rows**2))
    assert out.stats["energy_kept"] == pytest.approx(kept)
    # weights enter the election: Σ wᵢτᵢ[0] = 4 − 8 + 3 < 0, so only task 2 agrees there: −8/4 = −2
    out_w = METHODS["ties"](ups, [1.0, 4.0, 1.0], {"density": 0.5})
    np.testing.assert_allclose(out_w.update.to_dense(), np.array([[-2.0, 5.0, -6.0, -3.0]]))


def test_task_arithmetic_stays_factored() -> None:
    rng = np.random.default_rng(25)
    f = _factored(rng, 3, 12, 10, 2)
    out = METHODS["task-arithmetic"](f, [1.0, -0.5, 2.0], {"scale": 0.3})
    assert out.update.is_factored and out.update.rank <= 6
    want = 0.3 * (f[0].to_dense() - 0.5 * f[1].to_dense() + 2.0 * f[2].to_dense())
    np.testing.assert_allclose(out.update.to_dense(), want, atol=1e-10)
    dense = METHODS["task-arithmetic"](_densified(f), [1.0, -0.5, 2.0], {"scale": 0.3})
    np.testing.assert_allclose(dense.update.to_dense(), want, atol=1e-10)


def test_mixed_dense_and_factored_inputs() -> None:
    rng = np.random.default_rng(26)
    f = _factored(rng, 2, 9, 7, 2)
    mixed = [f[0], Update(dense=f[1].to_dense())]
    for name in (
        "task-arithmetic",
        "ties",
        "knots",
    ):  # tsv: see test_tsv_factored_equals_dense_when_rank_allows
        a = METHODS[name](mixed).update.to_dense()
        b = METHODS[name](f).update.to_dense()
        np.testing.assert_allclose(a, b, atol=1e-9, err_msg=name)
    np.testing.assert_allclose(rmm_fit(mixed, basis=1).errors, rmm_fit(f, basis=1).errors, atol=1e-12)


def test_registry_and_parameter_errors() -> None:
    peft_names = {"linear", "cat", "svd", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                  "magnitude_prune", "magnitude_prune_svd"}  # fmt: skip
    assert set(METHODS) == {"task-arithmetic", "ties", "tsv", "knots", "iso-c", "iso-cts"} | peft_names
    for m in METHODS.values():
        assert m.reference and m.summary
        assert ("scale" in m.params) == (m.name not in peft_names)  # PEFT's types have no global scale
        assert ("PEFT" in m.reference) == (m.name in peft_names)
    assert METHODS["ties"].params["density"][0] == 0.2
    assert METHODS["knots"].params["combine"][0] == "ties"
    ups = _dense(np.random.default_rng(27), 2, 3, 3)
    with pytest.raises(MergeError, match="no parameter 'rho'"):
        METHODS["ties"](ups, None, {"rho": 1})
    with pytest.raises(MergeError, match="out of range"):
        METHODS["ties"](ups, None, {"density": 1.5})
    with pytest.raises(MergeError, match="'linear' or 'ties'"):
        METHODS["knots"](ups, None, {"combine": "mean"})
    with pytest.raises(ShapeMismatch, match="one weight per task"):
        METHODS["tsv"](ups, [1.0])


# ----------------------------------------------------------------------------------------------------------
# interference


def test_interference_orthogonal_and_identical() -> None:
    rng = np.random.default_rng(28)
    a = np.zeros((6, 5))
    a[:2, :2] = rng.standard_normal((2, 2))
    b = np.zeros((6, 5))
    b[3:, 2:] = rng.standard_normal((3, 3))
    res = interference([Update(dense=a), Update(dense=b)], k=2)
    assert res["cosine"][0, 1] == pytest.approx(0.0, abs=1e-12)
    assert res["overlap"][0, 1] == pytest.approx(0.0, abs=1e-12)
    assert res["cosine"][0, 0] == pytest.approx(1.0) and res["overlap"][1, 1] == pytest.approx(1.0)
    f = _factored(rng, 1, 12, 9, 3)[0]
    same = interference([f, f.scaled(-3.0), Update(dense=f.to_dense())], k=8)
    np.testing.assert_allclose(same["overlap"], 1.0, atol=1e-10)
    np.testing.assert_allclose(np.abs(same["cosine"]), 1.0, atol=1e-12)
    assert same["cosine"][0, 1] == pytest.approx(-1.0)
    np.testing.assert_allclose(same["norms"], [f.frob_norm(), 3 * f.frob_norm(), f.frob_norm()], rtol=1e-12)


@pytest.mark.parametrize("shape", [(10, 8), (8, 10), (300, 40)])
def test_interference_overlap_is_mean_cos2_of_principal_angles(shape: tuple[int, int]) -> None:
    """Tall and wide dense updates (the subspaces come from the Gram matrix of the smaller side)."""
    rng = np.random.default_rng(29)
    ups = _dense(rng, 2, *shape)
    k = 3
    res = interference(ups, k=k)
    u0 = np.linalg.svd(ups[0].to_dense())[0][:, :k]
    u1 = np.linalg.svd(ups[1].to_dense())[0][:, :k]
    cos = np.linalg.svd(u0.T @ u1, compute_uv=False)
    assert res["overlap"][0, 1] == pytest.approx(float(np.mean(cos**2)), rel=1e-10)


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("factored", [True, False])
def test_rmm_all_zero_module_reconstructs_zero(factored: bool, center: bool) -> None:
    """A module no task touched: zero errors, and every reconstruction is a zero matrix of the right shape."""
    if factored:
        ups = [Update(B=np.zeros((5, 1)), A=np.zeros((1, 4))) for _ in range(3)]
    else:
        ups = [Update(dense=np.zeros((5, 4))) for _ in range(3)]
    m = rmm_fit(ups, basis=2, center=center)
    assert np.all(m.errors == 0) and m.energy_kept == 1.0
    rec = rmm_reconstruct(m, 1).to_dense()
    assert rec.shape == (5, 4) and not np.any(rec)


def test_ties_zero_sign_takes_the_majority_and_chunks_do_not_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entry 0 cancels exactly (2 − 2): its sign is the majority of the elected signs (+), so task 1's 2 is
    kept. Processing the module one row at a time (a tiny chunk) gives the same result."""
    import spectra_cli.spectral.merge.elementwise as merge

    rows = np.array([[2.0, 1.0, 1.0, 3.0], [-2.0, 1.0, 1.0, -1.0]])
    want = np.array([2.0, 1.0, 1.0, 3.0])
    ups = [Update(dense=r.reshape(2, 2)) for r in rows]
    np.testing.assert_allclose(METHODS["ties"](ups, None, {"density": 1.0}).update.to_dense().ravel(), want)
    monkeypatch.setattr(merge, "CHUNK", 1)
    np.testing.assert_allclose(METHODS["ties"](ups, None, {"density": 1.0}).update.to_dense().ravel(), want)
    rng = np.random.default_rng(30)
    big = [Update(B=rng.standard_normal((9, 2)), A=rng.standard_normal((2, 7))) for _ in range(3)]
    chunked = METHODS["ties"](big, [1.0, 2.0, 0.5], {"density": 0.3}).update.to_dense()
    monkeypatch.setattr(merge, "CHUNK", 1 << 20)
    whole = METHODS["ties"](big, [1.0, 2.0, 0.5], {"density": 0.3}).update.to_dense()
    np.testing.assert_allclose(chunked, whole, atol=1e-12)


def test_ties_keeps_exactly_the_density_count_with_tied_magnitudes() -> None:
    """Four equal magnitudes and density 0.5 of 8 entries: exactly 4 are kept (the first in storage order)."""
    x = np.array([[1.0, -1.0, 1.0, -1.0, 0.1, 0.2, 0.3, 0.4]])
    out = METHODS["ties"]([Update(dense=x)], None, {"density": 0.5})
    np.testing.assert_allclose(out.update.to_dense(), [[1.0, -1.0, 1.0, -1.0, 0, 0, 0, 0]])
    out = METHODS["ties"]([Update(dense=x)], None, {"density": 0.25})
    np.testing.assert_allclose(out.update.to_dense(), [[1.0, -1.0, 0, 0, 0, 0, 0, 0]])
    assert out.stats["energy_kept"] == pytest.approx(2.0 / float(np.sum(x**2)))


def test_zero_results_stay_rank_one() -> None:
    """A zero merged or reconstructed adapter is a zero rank-1 pair, never rank 0 (an adapter writer needs r ≥ 1)."""
    ups = [Update(B=np.zeros((6, 2)), A=np.zeros((2, 5))) for _ in range(2)]
    for name in ("task-arithmetic", "tsv", "knots"):
        out = METHODS[name](ups).update
        assert out.is_factored and out.rank == 1, name
    assert rmm_reconstruct(rmm_fit(ups, basis=1, center=True), 0).rank == 1


@pytest.mark.parametrize("shape", [(40, 32), (16, 24)])
def test_tsv_dense_float32_equals_float64_for_low_rank_updates(shape: tuple[int, int]) -> None:
    """Dense rank-3 updates, T = 3, ⌊min/T⌋ > 3: the same updates stored in float32 and in float64 merge to the
    same matrix (to float32 resolution). Before the zero-energy triplets were dropped, each precision fed its
    own arbitrary null vectors into the Procrustes step and the results differed by ~0.1 relative."""
    rng = np.random.default_rng(21)
    deltas = [
        rng.standard_normal((shape[0], 3)) @ rng.standard_normal((3, shape[1])) * 0.01 for _ in range(3)
    ]
    a = METHODS["tsv"]([Update(dense=d.astype(np.float32)) for d in deltas])
    b = METHODS["tsv"]([Update(dense=d) for d in deltas])
    got, want = a.update.to_dense().astype(np.float64), b.update.to_dense()
    assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want)
    assert a.stats["rank"] == b.stats["rank"] == 9
