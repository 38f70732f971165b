"""spectral/linalg: every decomposition route against numpy.linalg on matrices with known singular values, NumPy
and PyTorch giving the same answers, and singular values of float64 matrices far outside float32's range (issue
12: 1e200·M and 1e-200·M)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fixtures.checkpoints import write_safetensors
from fixtures.matrices import expected_singular_values, matrix_with_singular_values
from spectra_cli.spectral import linalg
from spectra_cli.spectral.linalg import Backend

torch = pytest.importorskip("torch")

TORCH = Backend("torch", "cpu")
BACKENDS = [pytest.param(None, id="numpy"), pytest.param(TORCH, id="torch")]
SHAPES = [(40, 20), (20, 40), (24, 24)]
S = np.geomspace(10.0, 0.01, 12)  # 12 distinct values: the rest of min(m, n) are zeros
GRAM_ATOL = 5e-7  # the float64 Gram route resolves σ to a few 1e-8·σ₁ (σ₁ = 10 here)


def known(m: int, n: int, seed: int = 0, s: np.ndarray = S) -> tuple[np.ndarray, np.ndarray]:
    return matrix_with_singular_values(s, m, n, seed=seed), expected_singular_values(s, m, n)


def np_(x: object) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def assert_same_subspace(u: np.ndarray, ref: np.ndarray, atol: float = 1e-8) -> None:
    """Columns of ``u`` equal those of ``ref`` up to sign (distinct singular values)."""
    cos = np.abs(np.sum(np.asarray(u) * ref, axis=0))
    np.testing.assert_allclose(cos, 1.0, atol=atol)


# ---- singular values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("shape", SHAPES)
def test_singular_values_are_the_designed_ones(shape, method, backend):
    x, want = known(*shape)
    got = linalg.singular_values(x, method, backend=backend)
    assert (
        isinstance(got, np.ndarray) and got.dtype == np.float64
    )  # NumPy in, NumPy out, whatever the backend
    np.testing.assert_allclose(got, want, atol=GRAM_ATOL if method == "gram" else 1e-12)


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_a_stack_is_decomposed_matrix_by_matrix_and_a_tensor_stays_a_tensor(method):
    xs = np.stack([known(30, 12, seed=i)[0] * (i + 1) for i in range(3)])
    want = np.stack([np.linalg.svd(x, compute_uv=False) for x in xs])
    for x in (xs, torch.from_numpy(xs)):
        got = linalg.singular_values(x, method)
        assert isinstance(got, type(x)) and tuple(got.shape) == (3, 12)
        np.testing.assert_allclose(np_(got), want, atol=GRAM_ATOL * 3)


def test_svd_values_in_a_narrower_dtype_and_a_half_tensor():
    x, want = known(20, 16)
    got = linalg.singular_values(x, "svd", dtype=np.float32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    half = torch.from_numpy(x).to(torch.bfloat16)  # no bf16 SVD in PyTorch: upcast to float32
    np.testing.assert_allclose(np_(linalg.singular_values(half, "svd")), want, atol=0.1)
    with pytest.raises(ValueError, match="unknown method"):
        linalg.singular_values(x, "qr")


def test_sym_eigenvalues_symmetrise_and_clamp():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 6))
    sym = a @ a.T - 0.5 * np.eye(6)  # indefinite: negatives clamp to 0
    want = np.maximum(np.sort(np.linalg.eigvalsh(sym))[::-1], 0)
    skewed = (
        sym + np.triu(np.full((6, 6), 1e-3), 1) - np.tril(np.full((6, 6), 1e-3), -1)
    )  # same symmetric part
    for be in (None, TORCH):
        np.testing.assert_allclose(linalg.sym_eigenvalues(skewed, be), want, atol=1e-12)
    assert np.any(want == 0)


def test_gram_sum_over_chunks_equals_the_whole():
    x, want = known(50, 12)
    for convert in (np.asarray, torch.from_numpy):
        acc = linalg.GramSum()
        for i in range(0, 50, 7):
            acc.add(convert(x[i : i + 7]), "rows")
        np.testing.assert_allclose(np_(acc.values()), want, atol=GRAM_ATOL)
    acc = linalg.GramSum()
    xt = x.T.copy()  # wide: chunks of columns accumulate XXᵀ
    for i in range(0, 50, 9):
        acc.add(xt[:, i : i + 9], "cols")
    np.testing.assert_allclose(acc.values(), want, atol=GRAM_ATOL)


# ---- SVD routes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_thin_svd_and_gram_svd_reproduce_the_matrix(shape, backend):
    x, want = known(*shape)
    ref_u, _, ref_vt = np.linalg.svd(x, full_matrices=False)
    k = min(shape)
    for route, atol in ((linalg.thin_svd, 1e-12), (linalg.gram_svd, GRAM_ATOL)):
        svd = route(x, backend=backend)
        assert svd.u.shape == (shape[0], k) and svd.vt.shape == (k, shape[1])
        np.testing.assert_allclose(svd.s, want, atol=atol)
        np.testing.assert_allclose((svd.u * svd.s) @ svd.vt, x, atol=atol)
        # vectors of σ ≥ 0.2 (the Gram route's vector error is ~1e-8·σ₁/σ)
        assert_same_subspace(svd.u[:, :6], ref_u[:, :6], atol=1e-6)
        assert_same_subspace(svd.vt[:6].T, ref_vt[:6].T, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gram_svd_top_and_top_k(shape, backend):
    x, want = known(*shape)
    ref_u, _, ref_vt = np.linalg.svd(x, full_matrices=False)
    for svd in (linalg.gram_svd(x, top=5, backend=backend), linalg.top_k(x, 5, backend=backend)):
        assert svd.u.shape == (shape[0], 5) and svd.s.shape == (5,) and svd.vt.shape == (5, shape[1])
        np.testing.assert_allclose(svd.s, want[:5], rtol=1e-12)
        assert_same_subspace(svd.u, ref_u[:, :5], atol=1e-10)
        assert_same_subspace(svd.vt.T, ref_vt[:5].T, atol=1e-10)


def test_top_k_keeps_the_dtype_and_device_and_falls_back_where_the_gram_route_is_blind():
    x, want = known(30, 16)
    t = torch.from_numpy(x).to(torch.float32)
    for be in (None, linalg.NUMPY, TORCH):
        top = linalg.top_k(t, 4, backend=be)
        assert isinstance(top.u, torch.Tensor) and top.u.dtype == torch.float32
        np.testing.assert_allclose(np_(top.s), want[:4], rtol=1e-6)
    # rank 3: σ₄ = 0 is below the Gram route's resolution, so the exact SVD answers (σ₄ ≈ 0, not noise·σ₁)
    low, want_low = known(30, 16, s=np.array([3.0, 2.0, 1.0]))
    top = linalg.top_k(low, 4)
    np.testing.assert_allclose(top.s, want_low[:4], atol=1e-13)
    assert top.u.shape == (30, 4)
    full = linalg.top_k(low, 16)  # k = the smaller side: no Gram route
    np.testing.assert_allclose(full.s, want_low, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bottom_k_is_the_smallest_in_descending_order(backend):
    s = np.geomspace(5.0, 0.5, 10)
    x, want = known(25, 10, s=s)
    bottom, values = linalg.bottom_k(x, 3, backend=backend)
    np.testing.assert_allclose(bottom.s, want[-3:], rtol=1e-12)
    np.testing.assert_allclose(values, want, rtol=1e-12)
    ref_u = np.linalg.svd(x, full_matrices=False)[0]
    assert_same_subspace(bottom.u, ref_u[:, -3:], atol=1e-10)


def test_randomized_top_k_finds_a_decaying_spectrum_and_the_backends_agree():
    s = 0.5 ** np.arange(40)
    x, want = known(120, 60, s=s)
    got = linalg.randomized_top_k(x, 5)
    np.testing.assert_allclose(got.s, want[:5], rtol=1e-10)
    same = linalg.randomized_top_k(x, 5, backend=TORCH)  # the same seeded test matrix on both
    np.testing.assert_allclose(same.s, got.s, rtol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(same.u * got.u, axis=0)), 1.0, atol=1e-10)


def test_lowrank_svd_is_torchs_and_takes_numpy():
    x, want = known(40, 30)
    torch.manual_seed(0)
    got = linalg.lowrank_svd(x, 4, niter=4)
    assert isinstance(got.s, np.ndarray) and got.vt.shape == (4, 30)
    np.testing.assert_allclose(got.s, want[:4], rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_factored_svd_and_values_never_form_the_product(backend):
    rng = np.random.default_rng(2)
    b, a = rng.standard_normal((30, 4)), rng.standard_normal((4, 25))
    ref = np.linalg.svd(b @ a, compute_uv=False)[:4]
    svd = linalg.factored_svd(b, a, backend=backend)
    np.testing.assert_allclose(svd.s, ref, rtol=1e-12)
    np.testing.assert_allclose((svd.u * svd.s) @ svd.vt, b @ a, atol=1e-12)
    assert linalg.factored_svd(b, a, k=2, backend=backend).s.shape == (2,)
    np.testing.assert_allclose(linalg.factored_values(b, a, -2.0, backend), 2 * ref, rtol=1e-12)
    dup = np.concatenate([b, b], axis=1), np.concatenate([a, a], axis=0)  # rank 4 written with 8 columns
    assert linalg.factored_svd(*dup, rtol=1e-10, backend=backend).s.shape == (4,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qr_procrustes_eigh(backend):
    x, _ = known(20, 8, s=np.geomspace(3.0, 0.3, 8))
    q, r = linalg.qr(x, backend)
    np.testing.assert_allclose(q @ r, x, atol=1e-12)
    np.testing.assert_allclose(q.T @ q, np.eye(8), atol=1e-12)
    p = linalg.procrustes(x, backend)
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(p, u @ vt, atol=1e-10)
    g = x.T @ x
    lam, vec = linalg.eigh(g, backend=backend)
    np.testing.assert_allclose(lam, np.sort(np.linalg.eigvalsh(g))[::-1], atol=1e-10)
    top_lam, top_vec = linalg.eigh(g, 3, backend)
    np.testing.assert_allclose(top_lam, lam[:3], rtol=1e-12)
    assert_same_subspace(top_vec, vec[:, :3])


def test_eigh_of_a_nan_matrix_propagates_nan_instead_of_raising():
    g = np.eye(4)
    g[0, 0] = np.nan
    linalg.eigh(g, 2)  # SciPy's subset driver would raise "array must not contain infs or NaNs"
    assert np.isnan(linalg.eigh(g)[0]).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(60, 20), (10, 20)])
def test_gram_right_is_the_top_right_singular_pairs(shape, backend):
    x, want = known(*shape, s=np.geomspace(4.0, 0.5, 8))
    s, vt = linalg.gram_right(x, 5, backend=backend)
    np.testing.assert_allclose(s, want[:5], rtol=1e-10)
    assert_same_subspace(vt.T, np.linalg.svd(x, full_matrices=False)[2][:5].T, atol=1e-8)
    s_all, _ = linalg.gram_right(x, 20, backend=backend)  # rank 8: nothing of the data beyond, dropped
    assert s_all.shape == (8,)


def test_arrays_move_between_the_kinds():
    x = np.arange(6.0).reshape(2, 3)
    t = linalg.to_backend(x, TORCH)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    back = linalg.to_backend(t, linalg.NUMPY)
    assert isinstance(back, np.ndarray) and np.array_equal(back, x)
    assert linalg.is_torch(t) and not linalg.is_torch(x)
    assert isinstance(linalg.like(x, t), torch.Tensor) and isinstance(linalg.like(t, x), np.ndarray)
    with pytest.raises(ValueError, match="unknown backend"):
        Backend("jax")


# ---- issue 12: far outside float32's range ------------------------------------------------------------------

EXTREMES = [1e200, 1e-200, 1e300, 1e-300]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factor", EXTREMES)
def test_values_of_a_scaled_matrix_are_the_scaled_values(factor, backend):
    x, want = known(30, 14)
    big = x * factor
    with np.errstate(over="ignore", invalid="ignore"):
        naive = big.T @ big  # the Gram route's product before: Inf, or all zeros
    assert not np.isfinite(naive).all() or not naive.any()
    for method, rtol in (("gram", 1e-6), ("svd", 1e-12)):
        got = linalg.singular_values(big, method, backend=backend)
        np.testing.assert_allclose(got[:12], factor * want[:12], rtol=rtol)
        assert np.all(np.abs(got[12:]) <= 1e-6 * factor * want[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factor", [1e200, 1e-200])
def test_vectors_of_a_scaled_matrix_are_unchanged(factor, backend):
    x, want = known(30, 14)
    ref = linalg.thin_svd(x)
    for route in (linalg.thin_svd, linalg.gram_svd, lambda a, backend: linalg.top_k(a, 5, backend)):
        svd = route(x * factor, backend=backend)
        np.testing.assert_allclose(svd.s[:5], factor * want[:5], rtol=1e-10)
        assert_same_subspace(svd.u[:, :5], ref.u[:, :5], atol=1e-8)
        assert np.all(np.isfinite(svd.vt))
    s, _ = linalg.gram_right(x * factor, 5, backend=backend)
    np.testing.assert_allclose(s, factor * want[:5], rtol=1e-10)
    b, a = x[:, :6] * factor, x[:6] / factor  # B huge, A tiny: B·A is ordinary
    np.testing.assert_allclose(
        linalg.factored_svd(b, a, backend=backend).s, np.linalg.svd(x[:, :6] @ x[:6], compute_uv=False)[:6],
        rtol=1e-10,
    )  # fmt: skip


def test_float64_values_into_float32_and_a_stack_of_mixed_scales():
    x, want = known(20, 10, s=S[:8])
    for factor in (1e200, 1e-200):
        got = linalg.singular_values(x * factor, "svd", dtype=np.float32)  # float32 alone: Inf or 0
        np.testing.assert_allclose(got[:8], factor * want[:8], rtol=1e-5, atol=1e-5 * factor * want[0])
    stack = np.stack([x, x * 1e250, x * 1e-250])
    for arr in (stack, torch.from_numpy(stack)):
        for method in ("gram", "svd"):
            f32 = torch.float32 if isinstance(arr, torch.Tensor) else np.float32
            got = np_(linalg.singular_values(arr, method, dtype=f32 if method == "svd" else None))
            for i, f in enumerate((1.0, 1e250, 1e-250)):
                np.testing.assert_allclose(got[i, :8], f * want[:8], rtol=1e-4)


def test_gram_sum_rescales_when_a_later_chunk_is_larger():
    x, _ = known(40, 10, s=S[:8])
    acc = linalg.GramSum()
    parts = [x[:10] * 1e-200, x[10:20], x[20:] * 1e200]  # the same matrix scaled chunk by chunk
    for p in parts:
        acc.add(p, "rows")
    whole = np.concatenate(parts)
    np.testing.assert_allclose(acc.values()[:1], np.linalg.svd(whole, compute_uv=False)[:1], rtol=1e-10)
    assert np.isfinite(acc.values()).all()


@pytest.mark.parametrize(("backend", "method"), [("numpy", "gram"), ("numpy", "svd"), ("torch", "gram"),
                                                 ("torch", "svd")])  # fmt: skip
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_engine_reads_float64_weights_far_outside_float32(tmp_path: Path, backend, method, precision):
    """A float64 checkpoint with 1e200·M and 1e-200·M: before, float32 compute reported them as Inf (or 0) and
    the Gram route gave σ = Inf / σ₁ = 0."""
    from spectra_cli.checkpoint.loader import MatrixLoader
    from spectra_cli.checkpoint.matrices import Selection, select_matrices
    from spectra_cli.checkpoint.source import open_checkpoint
    from spectra_cli.options import EngineOptions
    from spectra_cli.spectral.engine import resolve, singular_values

    x, want = known(24, 12)
    path = write_safetensors(
        tmp_path / "extreme.safetensors", {"big.weight": x * 1e200, "tiny.weight": x * 1e-200}
    )
    ckpt = open_checkpoint(path)
    specs, _ = select_matrices(ckpt, Selection())
    eng = resolve(EngineOptions(device="cpu", backend=backend, method=method, precision=precision))
    loader = MatrixLoader(ckpt)
    got = {mv.spec.name: mv for mv in singular_values(specs, eng, loader.load, loader.chunks)}
    for name, f in (("big.weight", 1e200), ("tiny.weight", 1e-200)):
        mv = got[name]
        assert (mv.nan_count, mv.inf_count) == (0, 0) and mv.values is not None
        np.testing.assert_allclose(mv.values[:12], f * want[:12], rtol=1e-5)
