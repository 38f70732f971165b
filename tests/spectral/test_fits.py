"""``--fit tpl|e_tpl``, ``--fix-fingers``, ``--xmax`` against WeightWatcher 0.7's definitions, written out here
from its source (``WeightWatcher.fit_powerlaw``, ``RMT_Util.fit_clipped_powerlaw``, ``WW_powerlaw.WWFit``) and
from the ``powerlaw`` 1.5 package it calls for the truncated power law (``Fit.find_xmin``, ``Distribution.fit``,
``Distribution.KS``, ``Truncated_Power_Law``, with mpmath's incomplete gamma as ``powerlaw`` uses it), on
MiniLM's own eigenvalues (LAPACK SVD here, spectra's engine in the code under test).

The truncated power law's (α, Λ) come out of a Nelder–Mead search (``scipy.optimize.fmin``, xtol = ftol = 1e-4):
the written-out search here runs the same optimiser on the same likelihood, so its result agrees to rounding;
the KS distance D agrees to 1e-6 (mpmath's Γ(s, x) here, SciPy's in spectra). The recorded values were printed
by WeightWatcher 0.7.7 itself (``fit="E_TPL"``/``"TPL"``, ``pl_package="powerlaw"``, powerlaw 1.5) on these
eigenvalues.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from scipy import optimize

from spectra_cli.checkpoint.demo import demo_checkpoint
from spectra_cli.errors import SpectraError
from spectra_cli.flows.analyze import AnalyzeOptions, run_analyze
from spectra_cli.spectral.fits import FitOptions, fit_tail, reliability

Q0 = "encoder.layer.0.attention.self.query.weight"
OUT5 = "encoder.layer.5.output.dense.weight"
INT0 = "encoder.layer.0.intermediate.dense.weight"
TINY = 10.0**-307


@pytest.fixture(scope="module")
def evals() -> dict[str, np.ndarray]:
    ckpt = Path(demo_checkpoint())
    path = ckpt if ckpt.is_file() else next(ckpt.glob("*.safetensors"))
    with safe_open(str(path), "numpy") as f:
        return {k: np.sort(np.linalg.svd(f.get_tensor(k).astype(np.float64), compute_uv=False) ** 2)
                for k in (Q0, OUT5, INT0)}  # fmt: skip


def run_rows(fit: FitOptions, names: tuple[str, ...]) -> dict[str, dict]:
    opts = AnalyzeOptions(include=names, precision="float64", fit=fit)
    return {r["name"]: r for r in run_analyze(demo_checkpoint(), opts).rows}


# ---- WeightWatcher's formulas, written out -------------------------------------------------------------------


def ww_xmin_peak(ev: np.ndarray) -> tuple[float, float]:
    """fit_powerlaw, fix_fingers == XMIN_PEAK: the range it passes as ``xmin`` (log10 and linear, as is)."""
    nz = ev[ev > 1e-5]
    h = np.histogram(np.log10(nz), bins=100)
    xmin2 = 10 ** h[1][np.argmax(h[0])]
    return (np.log10(0.95 * xmin2), 1.5 * xmin2)


def ww_pl(data: np.ndarray, xmins: np.ndarray) -> tuple[float, float, float]:
    """WWFit.fit_power_law_standard on the given candidates: α = 1 + n/Σln(x/xmin), D vs arange(n)/n."""
    data = np.sort(data)
    best = (np.inf, math.nan, math.nan)
    for xmin in xmins:
        tail = data[data >= xmin]
        n = float(tail.size)
        alpha = 1 + n / (np.sum(np.log(tail)) - n * np.log(xmin))
        d = np.max(np.abs(1 - (tail / xmin) ** (-alpha + 1) - np.arange(n) / n)) if alpha > 1 else 1.0
        if d < best[0]:
            best = (d, alpha, xmin)
    return best[1], best[2], best[0]


def powerlaw_tpl(data: np.ndarray, xmin_range=None):
    """powerlaw 1.5: Fit(data, xmin=xmin_range, distribution=xmin_distribution='truncated_power_law')."""
    import mpmath

    gammainc = np.vectorize(mpmath.gammainc)
    data = np.sort(data)
    n_all = float(data.size)
    bins, actual = data, np.arange(data.size) / n_all  # MiniLM's eigenvalues are distinct
    assert np.unique(data).size == data.size
    possible = data if xmin_range is None else data[(min(xmin_range) <= data) & (data <= max(xmin_range))]
    xmins = np.unique(possible)[:-1]
    rows = []
    for xmin in xmins:
        tail = data[data >= xmin]

        def in_range(a, lam):
            return lam > 0 and a > 1

        def nll(p, tail=tail, xmin=xmin):
            a, lam = p
            if not in_range(a, lam):
                lik = np.tile(TINY, tail.size)
            else:
                c = lam ** (1 - a) / float(mpmath.gammainc(1 - a, lam * xmin))
                lik = tail ** (-a) * np.exp(-lam * tail) * c
                lik[lik == 0] = TINY
            return -sum(np.log(lik))

        x0 = (1 + tail.size / np.sum(np.log(tail / xmin)), 1 / np.mean(tail))
        a, lam = optimize.fmin(nll, x0, full_output=1, disp=False)[0]
        ind = bins >= xmin
        emp = actual[ind].copy()
        emp = (emp - emp[0]) / (1 - emp[0])
        if in_range(a, lam):
            base = 1 - gammainc(1 - a, lam * bins[ind]).astype(float) / lam ** (1 - a)
            b0 = 1 - float(mpmath.gammainc(1 - a, lam * xmin)) / lam ** (1 - a)
            theo = (base - b0) / (1 - b0)
        else:
            theo = np.tile(TINY, int(ind.sum()))
        diff = theo - emp
        rows.append((max(diff.max(), -diff.min()), a, lam, in_range(a, lam), xmin))
    good = [r for r in rows if r[3]] or rows
    d, a, lam, _, xmin = min(good, key=lambda r: r[0])
    return a, lam, xmin, d


# ---- tests ---------------------------------------------------------------------------------------------------


def test_e_tpl_matches_powerlaw_written_out_and_weightwatcher(evals):
    ev = evals[OUT5]
    row = run_rows(FitOptions("e_tpl"), (OUT5,))[OUT5]
    # printed by WeightWatcher 0.7.7 + powerlaw 1.5 on the same eigenvalues (fit="E_TPL")
    assert row["fit_alpha"] == pytest.approx(1.000027684946739, rel=1e-6)
    assert row["fit_Lambda"] == pytest.approx(0.2828904745095934, rel=1e-6)
    assert row["fit_xmin"] == pytest.approx(1.4849694171639574, rel=1e-9)
    assert row["fit_ks"] == pytest.approx(0.04353584334657523, rel=1e-6)
    assert row["fit_tail"] == 196 and row["fit_reliability"] == "at-bound"  # α within 0.01 of 1
    # the written-out search (mpmath's Γ, as powerlaw): a dev dependency through torch/sympy
    pytest.importorskip("mpmath")
    a, lam, xmin, d = powerlaw_tpl(ev[ev > 1e-5], ww_xmin_peak(ev))
    assert row["fit_alpha"] == pytest.approx(a, rel=1e-6)
    assert row["fit_Lambda"] == pytest.approx(lam, rel=1e-6)
    assert row["fit_xmin"] == pytest.approx(xmin, rel=1e-9)
    assert row["fit_ks"] == pytest.approx(d, rel=1e-6)
    assert row["fit_tail"] == int(np.sum(ev >= xmin))  # WeightWatcher's num_pl_spikes


def test_tpl_matches_weightwatcher_and_its_xmin_is_the_argmin(evals):
    ev = evals[Q0]
    f = fit_tail(ev, FitOptions("tpl"))
    # printed by WeightWatcher 0.7.7 + powerlaw 1.5 (fit="TPL"): its full scan takes about a minute
    assert f.alpha == pytest.approx(1.0000055299468629, rel=1e-6)
    assert f.Lambda == pytest.approx(0.07980701942438967, rel=1e-6)
    assert f.xmin == pytest.approx(3.421746376122062, rel=1e-9)
    assert f.ks == pytest.approx(0.02980844416621431, rel=1e-6)
    assert f.n_tail == 116 and not f.unstable
    # the written-out search, at the chosen xmin and a few others: same (α, Λ, D) there, and no smaller D
    pytest.importorskip("mpmath")
    a, lam, xmin, d = powerlaw_tpl(ev, (f.xmin, float(ev[ev > f.xmin][0])))
    assert (a, lam, xmin) == pytest.approx((f.alpha, f.Lambda, f.xmin), rel=1e-6) and d == pytest.approx(f.ks, rel=1e-6)
    for lo in ev[::40][:-1]:
        assert powerlaw_tpl(ev, (lo, float(ev[ev > lo][0])))[3] >= f.ks * (1 - 1e-9)


def test_tpl_xmax_force_matches_weightwatcher(evals):
    f = fit_tail(evals[Q0], FitOptions("tpl", xmax="force"))
    # WeightWatcher 0.7.7 + powerlaw 1.5, fit="TPL", xmax="force"
    assert f.alpha == pytest.approx(1.00003553299676, rel=1e-6)
    assert f.Lambda == pytest.approx(0.07907245999074244, rel=1e-6)
    assert f.xmin == pytest.approx(3.1366511469048506, rel=1e-9)
    assert f.ks == pytest.approx(0.038738271888859144, rel=1e-6)
    assert f.n_tail == 123 and f.xmax == pytest.approx(float(evals[Q0].max()))


@pytest.mark.parametrize("name", [Q0, OUT5, INT0])
def test_pl_xmin_peak_is_powerlaw_pl_on_the_peak_range(evals, name):
    ev = evals[name]
    lo, hi = sorted(ww_xmin_peak(ev))
    data = ev[ev > 1e-5]
    xmins = np.unique(data[(data >= lo) & (data <= hi)])[:-1]
    alpha, xmin, d = ww_pl(data, xmins)
    row = run_rows(FitOptions("pl", "xmin_peak"), (name,))[name]
    assert row["fit_alpha"] == pytest.approx(alpha, rel=1e-9)
    assert row["fit_xmin"] == pytest.approx(xmin, rel=1e-9)
    assert row["fit_ks"] == pytest.approx(d, rel=1e-9)
    assert row["fit_tail"] == int(np.sum(ev >= xmin))


@pytest.mark.parametrize("name", [Q0, OUT5, INT0])
def test_clip_xmax_matches_fit_clipped_powerlaw(evals, name):
    data = evals[name][evals[name] > 1e-5]

    def fit(x):
        return ww_pl(x, x[:-1])

    first = fit(data)
    best, fingers = first, 0
    for idx in range(2, 10):  # range(2, max_fingers=10)
        f = fit(data[:-idx])
        if f[0] + 1.0 < first[0]:
            best, fingers = f, idx - 1
            break
        if f[0] <= 2.0:
            break
    row = run_rows(FitOptions("pl", "clip_xmax"), (name,))[name]
    assert row["fit_alpha"] == pytest.approx(best[0], rel=1e-9)
    assert row["fit_raw_alpha"] == pytest.approx(first[0], rel=1e-9)
    assert row["fit_num_fingers"] == fingers
    assert row["fit_tail"] == int(np.sum(data >= best[1]))  # counted on all eigenvalues, fingers included


def test_xmax_drops_the_largest_eigenvalues(evals):
    data = evals[INT0]
    alpha, xmin, d = ww_pl(data[:-3], data[:-4])
    f = fit_tail(data, FitOptions("pl", xmax=3))
    assert (f.alpha, f.xmin, f.ks) == pytest.approx((alpha, xmin, d), rel=1e-9)
    assert f.n_tail == int(np.sum(data[:-3] >= xmin))
    assert math.isnan(fit_tail(data[:10], FitOptions("pl", xmax=6)).alpha)  # more than half: WW fails


def test_reliability_thresholds():
    assert reliability(3.0, 0.1, 49) == "small-tail"
    assert reliability(3.0, 1.36 / math.sqrt(100) * 1.01, 100) == "poor-fit"
    assert reliability(3.0, 1.36 / math.sqrt(100) * 0.99, 100) == "ok"
    assert reliability(3.0, 0.01, 100, unstable=True) == "unstable"
    assert reliability(float("nan"), 0.1, 100) == "n/a"
    assert reliability(1.005, 0.01, 100, at_bound=True) == "at-bound"
    assert reliability(1.005, 0.01, 40, at_bound=True) == "small-tail"


@pytest.mark.parametrize("kwargs, words", [
    ({"fit": "xx"}, "--fit xx"), ({"fix_fingers": "yy"}, "--fix-fingers yy"),
    ({"fit": "e_tpl", "fix_fingers": "clip_xmax"}, "--fix-fingers clip_xmax"),
    ({"xmax": 0}, "--xmax 0"), ({"xmax": 3, "fix_fingers": "xmin_peak"}, "--xmax 3"),
    ({"xmax": "force"}, "--xmax force"), ({"xmax": "auto"}, "--xmax auto"),
])  # fmt: skip
def test_invalid_combinations_name_the_flag(kwargs, words):
    with pytest.raises(SpectraError, match=words.replace("-", r"\-")):
        FitOptions(**kwargs)


def test_default_run_has_no_fit_columns():
    row = run_analyze(demo_checkpoint(), AnalyzeOptions(include=(Q0,))).rows[0]
    assert not any(k.startswith("fit") or k == "alpha_reliability" for k in row)
