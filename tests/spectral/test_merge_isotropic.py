"""ISO-C / ISO-CTS (Marczak et al. 2025) on matrices with known spectra, against a NumPy transcription of the
published procedure written here from the paper and the authors' code; and the adapter factoring of
``merge --to-adapter`` (its truncation error is the discarded singular values)."""

from __future__ import annotations

import numpy as np
import pytest

from spectra_cli.flows.merge_adapter import factor_update
from spectra_cli.spectral.merge import METHODS, Update
from spectra_cli.spectral.merge.isotropic import iso_cts_split


def _orth(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def _known(rng: np.random.Generator, out: int, inn: int, sigma: list[float]) -> np.ndarray:
    return (_orth(rng, out, len(sigma)) * np.asarray(sigma)) @ _orth(rng, inn, len(sigma)).T


def test_iso_c_flattens_a_known_spectrum():
    rng = np.random.default_rng(0)
    sigma = [5.0, 3.0, 2.0, 1.0, 0.5, 0.25]
    m = _known(rng, 10, 6, sigma)  # full rank: min(10, 6) = 6 values
    noise = rng.standard_normal((10, 6))
    tasks = [Update(dense=m / 2 + noise), Update(dense=m / 2 - noise)]
    got = METHODS["iso-c"](tasks, None, {"scale": 1.5}).update.to_dense()
    s = np.linalg.svd(got, compute_uv=False)
    np.testing.assert_allclose(s, 1.5 * np.mean(sigma), rtol=1e-10)
    u, _, vt = np.linalg.svd(m)
    np.testing.assert_allclose(got, 1.5 * np.mean(sigma) * u[:, :6] @ vt, atol=1e-10)


def test_iso_c_on_factored_inputs_flattens_the_numerical_rank_only():
    """A rank-4 sum of LoRA-like updates: the flat spectrum spans its 4 directions, not min(out, in)."""
    rng = np.random.default_rng(1)
    sigma = [4.0, 2.0, 1.0, 1.0]
    u, v = _orth(rng, 12, 4), _orth(rng, 9, 4)
    ups = [Update(B=u[:, :2] * sigma[:2], A=v[:, :2].T), Update(B=u[:, 2:] * sigma[2:], A=v[:, 2:].T)]
    out = METHODS["iso-c"](ups)
    assert out.update.is_factored
    s = np.linalg.svd(out.update.to_dense(), compute_uv=False)
    np.testing.assert_allclose(s[:4], 2.0, rtol=1e-10)
    assert np.all(s[4:] < 1e-10)
    np.testing.assert_allclose(out.update.to_dense(), 2.0 * u @ v.T, atol=1e-10)


@pytest.mark.parametrize(("r", "t", "f", "want"), [(12, 2, 0.8, (8, 2)), (64, 8, 0.8, (48, 2)), (10, 3, 0.5, (4, 2))])
def test_iso_cts_split_follows_the_authors_rule(r, t, f, want):
    assert iso_cts_split(r, t, f) == want


def _iso_cts_reference(tasks: list[np.ndarray], frac: float) -> np.ndarray:
    """The authors' ISO-CTS (iso-merging, iso_cts) transcribed to NumPy for full-rank task matrices."""
    shape = tasks[0].shape
    t = len(tasks)
    r = min(shape)
    k = int(r * frac)
    k = r - round((r - k) / t) * t
    u, s, vt = np.linalg.svd(sum(tasks), full_matrices=False)
    per = (r - k) // t
    cu, cs, cv = np.zeros_like(u), np.zeros_like(s), np.zeros_like(vt)
    for i, w in enumerate(tasks):
        w_ts = w - u[:, :k] @ u[:, :k].T @ w
        ut, st, vtt = np.linalg.svd(w_ts, full_matrices=False)
        cu[:, i * per : (i + 1) * per] = ut[:, :per]
        cs[i * per : (i + 1) * per] = st[:per]
        cv[i * per : (i + 1) * per] = vtt[:per]
    cu[:, t * per : t * per + k], cs[t * per : t * per + k], cv[t * per : t * per + k] = u[:, :k], s[:k], vt[:k]
    pu, _, qu = np.linalg.svd(cu, full_matrices=False)
    pv, _, qv = np.linalg.svd(cv, full_matrices=False)
    return (pu @ qu) * cs.mean() @ (pv @ qv)


@pytest.mark.parametrize("frac", [0.8, 0.5])
def test_iso_cts_equals_the_published_procedure(frac):
    rng = np.random.default_rng(2)
    tasks = [rng.standard_normal((14, 12)) for _ in range(3)]
    got = METHODS["iso-cts"]([Update(dense=x) for x in tasks], None, {"common_fraction": frac, "scale": 1.0})
    want = _iso_cts_reference(tasks, frac)
    np.testing.assert_allclose(got.update.to_dense(), want, atol=1e-9)
    s = np.linalg.svd(got.update.to_dense(), compute_uv=False)
    np.testing.assert_allclose(s, s[0], rtol=1e-9)  # isotropic: one singular value


def test_iso_cts_keeps_a_task_direction_the_sum_drowns():
    """Task 2 lives in one direction orthogonal to task 1's large ones: ISO-C's common top-k misses it when k is
    small, ISO-CTS gives it a task-specific slot."""
    rng = np.random.default_rng(3)
    u, v = _orth(rng, 8, 8), _orth(rng, 8, 8)
    big = (u[:, :7] * np.linspace(10, 4, 7)) @ v[:, :7].T
    small = 0.01 * np.outer(u[:, 7], v[:, 7])
    got = METHODS["iso-cts"]([Update(dense=big), Update(dense=small)], None, {"common_fraction": 0.5, "scale": 1.0})
    d = got.update.to_dense()
    assert abs(u[:, 7] @ d @ v[:, 7]) > 0.5 * np.linalg.svd(d, compute_uv=False)[0]


# ---- the adapter factoring of --to-adapter ----------------------------------------------------------------


@pytest.mark.parametrize("factored", [True, False])
@pytest.mark.parametrize("rank", [1, 3, 5, None])
def test_adapter_truncation_error_is_the_discarded_singular_values(factored, rank):
    rng = np.random.default_rng(4)
    sigma = np.array([8.0, 4.0, 2.0, 1.0, 0.5])
    u, v = _orth(rng, 20, 5), _orth(rng, 16, 5)
    upd = Update(B=u * sigma, A=v.T) if factored else Update(dense=(u * sigma) @ v.T)
    b, a, full, err = factor_update(upd, rank, None)  # type: ignore[arg-type]
    keep = 5 if rank is None else rank
    assert full == 5 and b.shape == (20, keep) and a.shape == (keep, 16)
    np.testing.assert_allclose(err, np.sqrt(np.sum(sigma[keep:] ** 2) / np.sum(sigma**2)), atol=1e-12)
    np.testing.assert_allclose(b @ a, (u[:, :keep] * sigma[:keep]) @ v[:, :keep].T, atol=1e-10)
