"""The RMT columns against WeightWatcher's formulas (weightwatcher 0.7.x: RMT_Util.fit_density_with_range,
resid_mp, jensen_shannon_distance, detX_constraint and WeightWatcher.mp_fit), written out here from its source
and evaluated on MiniLM's own eigenvalues (SciPy's LAPACK SVD here, spectra's engine in the code under test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from scipy import optimize, stats

from spectra_cli.checkpoint.demo import demo_checkpoint
from spectra_cli.flows.analyze import AnalyzeOptions, run_analyze
from spectra_cli.spectral.rmt import RMTOptions, permute

NAMES = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight",
         "encoder.layer.5.output.dense.weight"]  # fmt: skip


def ww_mp_fit(evals: np.ndarray, n: int, m: int) -> tuple[float, float, float, int, float]:
    """WeightWatcher.mp_fit (rescale=True) with fit_density_with_range and resid_mp, sklearn's linear KDE
    written as its formula."""
    q = n / m
    wscale = np.sqrt(evals.shape[0]) / np.sqrt(np.sum(evals))
    to_plot = (wscale * wscale) * evals
    lam_max = np.max(to_plot)
    s0 = np.sqrt(np.max(to_plot) / np.square(1 + 1.0 / np.sqrt(q)))
    to_fit = np.sqrt(to_plot) if q == 1 else to_plot
    xde_all = np.linspace(0, np.max(to_fit) + 0.5, 1000)
    dens = np.array([np.sum(np.clip(1 - np.abs(x - to_fit) / 0.1, 0, None)) for x in xde_all]) / (to_fit.size * 0.1)
    good = dens > 0.01

    def resid(p: np.ndarray) -> float:
        sigma = p
        xde, yde = xde_all[good], dens[good]
        if q == 1:
            with np.errstate(invalid="ignore"):
                ymp = np.nan_to_num((1 / (np.pi * sigma * sigma)) * np.sqrt(4 - xde**2))
            r = ymp - yde
        else:
            b = np.power(sigma * (1 + np.sqrt(1 / q)), 2)
            a = np.power(sigma * (1 - np.sqrt(1 / q)), 2)
            with np.errstate(invalid="ignore", divide="ignore"):
                ymp = np.nan_to_num((1 / (2 * np.pi * sigma * sigma * xde * (1 / q))) * np.sqrt((b - xde) * (xde - a)))
            peak = xde[np.where(yde == max(yde))][0]
            bad = (b < peak) | (b > max(xde)) | (a > peak)
            r = np.zeros(len(yde)) + 1000 if bad else ymp - yde
        return float(np.sum(r**2))

    out = optimize.brute(resid, (slice(0.05 * s0, 2.0 * s0, 0.01 * s0),), full_output=True)
    s1 = float(out[0][0])
    bulk_max = (s1 * (1 + 1 / np.sqrt(q))) ** 2
    bulk_min = (s1 * (1 - 1 / np.sqrt(q))) ** 2
    tw = 1 / np.sqrt(q) * np.power(bulk_max, 2 / 3) * np.power(m, -2 / 3)
    spikes = len(to_plot[to_plot > bulk_max + np.sqrt(tw)])
    return s1, bulk_min / wscale**2, bulk_max / wscale**2, spikes, bulk_max / lam_max


def ww_detx(evals: np.ndarray) -> tuple[int, float]:
    r = evals * (len(evals) / np.sum(evals))
    num, idx = len(r), 0
    for idx in range(len(r) - 1, 0, -1):
        if np.prod(r[idx:]) < 1.0:
            num = len(r) - idx
            break
    return num, float(evals[idx])


def ww_jsd(p: np.ndarray, q: np.ndarray) -> float:
    m = (p + q) / 2
    return float(np.sqrt((stats.entropy(p, m) + stats.entropy(q, m)) / 2))


@pytest.fixture(scope="module")
def minilm() -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    ckpt = Path(demo_checkpoint())
    path = ckpt if ckpt.is_file() else next(ckpt.glob("*.safetensors"))
    with safe_open(str(path), "numpy") as f:
        weights = {k: f.get_tensor(k).astype(np.float64) for k in NAMES}
    opts = AnalyzeOptions(include=tuple(NAMES), rmt=RMTOptions(True, True, True, seed=7, vectors=True), precision="float64")
    res = run_analyze(ckpt, opts)
    return weights, {r["name"]: r for r in res.rows}


@pytest.mark.parametrize("name", NAMES)
def test_mp_fit_matches_weightwatcher(minilm, name):
    weights, rows = minilm
    w, row = weights[name], rows[name]
    ev = np.sort(np.linalg.svd(w, compute_uv=False) ** 2)
    s1, bmin, bmax, spikes, soft = ww_mp_fit(ev, max(w.shape), min(w.shape))
    assert row["sigma_mp"] == pytest.approx(s1, rel=1e-6)
    assert row["bulk_min"] == pytest.approx(bmin, rel=1e-6, abs=1e-300)
    assert row["bulk_max"] == pytest.approx(bmax, rel=1e-6)
    assert row["num_spikes"] == spikes
    assert row["mp_softrank"] == pytest.approx(soft, rel=1e-6)
    assert row["spikes_ratio"] == pytest.approx(spikes / min(w.shape))


@pytest.mark.parametrize("name", NAMES)
def test_randomized_matches_weightwatcher_on_the_same_permutation(minilm, name):
    weights, rows = minilm
    w, row = weights[name], rows[name]
    ev = np.sort(np.linalg.svd(w, compute_uv=False) ** 2)
    wr = permute(w, 7, name)
    assert sorted(wr.ravel()) == sorted(w.ravel()) and not np.array_equal(wr, w)
    rv = np.sort(np.linalg.svd(wr, compute_uv=False) ** 2)
    assert row["max_rand_eval"] == pytest.approx(rv[-1], rel=1e-6)
    assert row["ww_softrank"] == pytest.approx(rv[-1] / ev[-1], rel=1e-6)
    assert row["ww_maxdist"] == pytest.approx(ev[-1] - rv[-1], rel=1e-6)
    assert row["rand_distance"] == pytest.approx(ww_jsd(ev, rv), rel=1e-6)
    s1, bmin, bmax, traps, soft = ww_mp_fit(rv, max(w.shape), min(w.shape))
    assert row["rand_sigma_mp"] == pytest.approx(s1, rel=1e-6)
    assert row["rand_bulk_max"] == pytest.approx(bmax, rel=1e-6)
    assert row["rand_bulk_min"] == pytest.approx(bmin, rel=1e-6, abs=1e-300)
    assert row["rand_mp_softrank"] == pytest.approx(soft, rel=1e-6)
    assert row["num_traps"] == traps
    assert row["correlation_trap"] is (traps > 0)


@pytest.mark.parametrize("name", NAMES)
def test_detx_matches_weightwatcher(minilm, name):
    weights, rows = minilm
    ev = np.sort(np.linalg.svd(weights[name], compute_uv=False) ** 2)
    num, val = ww_detx(ev)
    assert rows[name]["detX_num"] == num
    assert rows[name]["detX_val"] == pytest.approx(val, rel=1e-6)


def test_permutation_is_seeded_and_per_name():
    x = np.arange(100.0).reshape(10, 10)
    assert np.array_equal(permute(x, 1, "a"), permute(x, 1, "a"))
    assert not np.array_equal(permute(x, 1, "a"), permute(x, 2, "a"))
    assert not np.array_equal(permute(x, 1, "a"), permute(x, 1, "b"))


def test_default_run_has_no_rmt_columns():
    res = run_analyze(demo_checkpoint(), AnalyzeOptions(include=(NAMES[0],)))
    assert "sigma_mp" not in res.rows[0] and "num_traps" not in res.rows[0]
    assert res.summary.correlation_traps is None and "rmt" not in res.options


def ww_vector_stats(w: np.ndarray, n_tail: int) -> dict[str, float]:
    """apply_analyze_eigenvectors: eig of the smaller Gram matrix, RMT_Util's three vector metrics per column,
    bulk/tail split at the PL xmin (here: the tail is the n_tail largest eigenvalues, λ ≥ xmin)."""
    x = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    evals, v = np.linalg.eig(x)
    evals, v = evals.real, v.real
    ent, loc, part = [], [], []
    for col in range(v.shape[1]):
        vec = v[:, col]
        a = np.absolute(vec)
        a = a - np.mean(a)
        p = np.array(np.histogram(a, density=True, bins=100)[0]) + 1e-10
        p = p / np.sqrt(2 * np.pi)
        p = p / np.sum(p)
        ent.append(-np.sum(p * np.log(p)))
        loc.append(np.linalg.norm(vec, ord=1) / np.linalg.norm(vec, ord=np.inf))
        part.append(np.linalg.norm(vec, ord=2) / np.linalg.norm(vec, ord=4))
    xmin = np.sort(evals)[::-1][n_tail - 1]
    out = {}
    for name, arr in (("vec_entropy", ent), ("loc_ratio", loc), ("part_ratio", part)):
        arr = np.array(arr)
        for side, mask in (("bulk", evals < xmin), ("tail", evals >= xmin)):
            out[f"{side}_mean_{name}"] = np.mean(arr[mask])
            out[f"{side}_var_{name}"] = np.var(arr[mask])
    return out


@pytest.mark.parametrize("name", NAMES)
def test_vector_metrics_match_weightwatcher(minilm, name):
    weights, rows = minilm
    ev = np.sort(np.linalg.svd(weights[name], compute_uv=False) ** 2)
    n_tail = int(np.count_nonzero(ev >= rows[name]["alpha_xmin"] * (1 - 1e-9)))
    assert rows[name]["num_pl_spikes"] == n_tail
    expected = ww_vector_stats(weights[name], n_tail)
    for key, value in expected.items():
        assert rows[name][key] == pytest.approx(value, rel=1e-6), key
