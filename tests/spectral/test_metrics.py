"""Spectral metrics from known singular values, and the power-law fit, against formulas written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.matrices import bulk_plus_pareto_tail, pareto_samples
from spectra_cli.spectral.metrics import (
    compute_metrics,
    effective_rank,
    energy_rank,
    numerical_rank,
    stable_rank,
)
from spectra_cli.spectral.powerlaw import PowerLawFit, fit_power_law

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)


# ---- one matrix, by hand --------------------------------------------------------------------------------


def test_all_metrics_of_a_known_spectrum():
    s = [4.0, 2.0, 1.0, 0.5]
    m = compute_metrics(np.array(s), (6, 4))
    lam = [x * x for x in s]  # 16, 4, 1, 0.25
    total_lam = sum(lam)  # 21.25
    p = [x / sum(s) for x in s]  # σ / Σσ, Σσ = 7.5
    q = [x / total_lam for x in lam]  # λ / Σλ
    assert m.spectral_norm == 4.0
    assert m.frobenius_norm == pytest.approx(math.sqrt(21.25), rel=1e-15)
    assert m.nuclear_norm == pytest.approx(7.5, rel=1e-15)
    assert m.condition_number == pytest.approx(8.0, rel=1e-15)
    assert m.stable_rank == pytest.approx(21.25 / 16, rel=1e-15)
    assert m.effective_rank == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-14)
    assert m.numerical_rank == 4
    # cumulative energy 16, 20, 21, 21.25: 90% (19.125) reached at k=2, 99% (21.0375) at k=4
    assert (m.energy_rank_90, m.energy_rank_99) == (2, 4)
    assert m.entropy == pytest.approx(-sum(x * math.log(x) for x in q) / math.log(4), rel=1e-14)
    assert m.log_norm == pytest.approx(math.log10(21.25), rel=1e-15)
    assert m.log_spectral_norm == pytest.approx(math.log10(16.0), rel=1e-15)
    # 4 eigenvalues are too few for a power-law fit
    assert math.isnan(m.alpha) and math.isnan(m.alpha_weighted) and math.isnan(m.alpha_xmin)
    assert m.alpha_flag == "n/a"


def test_metrics_do_not_depend_on_the_order_of_the_values():
    s = np.random.default_rng(0).permutation(np.geomspace(10.0, 0.1, 16))
    shuffled, ordered = compute_metrics(s, (20, 16)), compute_metrics(np.sort(s)[::-1], (20, 16))
    assert math.isfinite(ordered.alpha)
    assert shuffled == ordered


def test_rank_deficient_spectrum():
    s = np.array([3.0, 1.0, 0.0, 0.0])
    m = compute_metrics(s, (5, 4))
    p = [0.75, 0.25]  # zeros contribute 0·log 0 = 0
    assert m.effective_rank == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-14)
    assert m.numerical_rank == 2
    assert m.condition_number == math.inf
    assert m.stable_rank == pytest.approx(10 / 9, rel=1e-15)
    q = [9 / 10, 1 / 10]
    assert m.entropy == pytest.approx(-sum(x * math.log(x) for x in q) / math.log(2), rel=1e-14)
    assert (m.energy_rank_90, m.energy_rank_99) == (1, 2)  # 9/10 is exactly 90%


def test_single_value_and_flat_spectra():
    one = compute_metrics(np.array([2.5]), (1, 16))
    assert (one.effective_rank, one.stable_rank, one.numerical_rank, one.entropy) == (1.0, 1.0, 1, 0.0)
    assert one.condition_number == 1.0
    flat = compute_metrics(np.full(7, 3.0), (7, 7))
    assert flat.effective_rank == pytest.approx(7.0, rel=1e-14)
    assert flat.stable_rank == pytest.approx(7.0, rel=1e-14)
    assert flat.entropy == pytest.approx(1.0, rel=1e-14)
    assert (flat.energy_rank_90, flat.energy_rank_99) == (7, 7)  # 6/7 < 0.9


def test_numerical_rank_tolerance_is_max_dim_eps_sigma1():
    s = np.array([1.0, 1e-5, 1e-9, 0.0])
    # float32: τ = 10 · 1.19e-7 · 1 ≈ 1.2e-6 → 1e-5 counts, 1e-9 does not
    assert numerical_rank(s, (10, 4), "float32") == 2
    # float64: τ = 10 · 2.2e-16 → 1e-9 counts too
    assert numerical_rank(s, (10, 4), "float64") == 3
    # just above / below the float32 threshold for a 1000×4 matrix: τ = 1000·ε₃₂
    tau = 1000 * EPS32
    assert numerical_rank(np.array([1.0, tau * 1.01, tau * 0.99]), (1000, 4), "float32") == 2
    assert numerical_rank(np.array([2.0, 1e-300]), (3, 2), "float64") == 1
    assert compute_metrics(s, (10, 4), "float64").numerical_rank == 3


def test_energy_rank_by_hand():
    s = np.sqrt(np.array([50.0, 30.0, 10.0, 9.0, 1.0]))  # energies sum to 100
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 0.8) == 2  # exactly 80% counts
    assert energy_rank(s, 0.9) == 3
    assert energy_rank(s, 0.99) == 4
    assert energy_rank(s, 1.0) == 5
    assert energy_rank(np.zeros(3), 0.9) == 0


def test_helper_functions_match_their_formulas():
    s = np.array([5.0, 3.0, 1.0])
    p = s / 9.0
    assert effective_rank(s) == pytest.approx(math.exp(-float(np.sum(p * np.log(p)))), rel=1e-14)
    assert stable_rank(s) == pytest.approx(35.0 / 25.0, rel=1e-15)
    assert effective_rank(np.zeros(4)) == 0.0
    assert stable_rank(np.zeros(4)) == 0.0


def test_zero_matrix():
    m = compute_metrics(np.zeros(5), (5, 5))
    assert (m.spectral_norm, m.frobenius_norm, m.nuclear_norm) == (0.0, 0.0, 0.0)
    assert (m.numerical_rank, m.energy_rank_90, m.effective_rank, m.stable_rank) == (0, 0, 0.0, 0.0)
    assert math.isnan(m.alpha)


def test_alpha_columns_use_the_eigenvalues():
    lam = pareto_samples(1000, 3.0, xmin=1.0, seed=7)
    m = compute_metrics(np.sqrt(lam), (1000, 1000))
    assert m.numerical_rank == 1000
    assert abs(m.alpha - 3.0) <= 0.2
    assert m.alpha_weighted == pytest.approx(m.alpha * math.log10(lam.max()), rel=1e-12)
    assert m.log_spectral_norm == pytest.approx(math.log10(lam.max()), rel=1e-12)
    assert m.log_norm == pytest.approx(math.log10(lam.sum()), rel=1e-12)
    assert m.alpha_flag == "ok"


# ---- properties ---------------------------------------------------------------------------------------------

spectra = st.lists(st.floats(min_value=1e-3, max_value=1e3, allow_nan=False), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(spectra)
def test_rank_inequalities(values):
    s = np.array(values)
    k = s.size
    m = compute_metrics(s, (k + 3, k))
    tol = 1e-9
    assert 1 - tol <= m.effective_rank <= k + tol
    assert 1 - tol <= m.stable_rank <= k + tol
    # srank ≤ σ₁⁻¹Σσ = 1/p₁ ≤ exp(H(p)): stable rank never exceeds effective rank
    assert m.stable_rank <= m.effective_rank * (1 + tol)
    assert 1 <= m.energy_rank_90 <= m.energy_rank_99 <= m.numerical_rank <= k
    assert -tol <= m.entropy <= 1 + tol
    assert m.spectral_norm <= m.frobenius_norm * (1 + tol)
    assert m.frobenius_norm <= m.nuclear_norm * (1 + tol)
    assert m.nuclear_norm <= math.sqrt(k) * m.frobenius_norm * (1 + tol)
    assert m.condition_number >= 1.0


@settings(max_examples=40, deadline=None)
@given(spectra, st.floats(min_value=1e-3, max_value=1e3))
def test_scale_invariance(values, c):
    a = compute_metrics(np.array(values), (50, 40))
    b = compute_metrics(c * np.array(values), (50, 40))
    for key in ("effective_rank", "stable_rank", "entropy", "condition_number"):
        assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-9)
    assert b.spectral_norm == pytest.approx(c * a.spectral_norm, rel=1e-12)
    assert (b.numerical_rank, b.energy_rank_90, b.energy_rank_99) == (
        a.numerical_rank,
        a.energy_rank_90,
        a.energy_rank_99,
    )


# ---- power-law fit ------------------------------------------------------------------------------------------


def test_fit_recovers_alpha_and_xmin_of_a_pareto_sample():
    x = pareto_samples(5000, 3.0, xmin=1.0, seed=0)
    fit = fit_power_law(x)
    assert abs(fit.alpha - 3.0) <= 0.15
    assert 1.0 <= fit.xmin <= 1.15
    assert fit.n_tail >= 0.75 * x.size
    assert fit.ks_distance < 0.03
    assert fit.flag == "ok"


def test_fit_finds_where_the_tail_starts():
    x = bulk_plus_pareto_tail(n_bulk=3000, n_tail=2000, alpha=3.0, xmin=2.0, seed=0)
    fit = fit_power_law(np.random.default_rng(1).permutation(x))  # any order
    assert abs(fit.alpha - 3.0) <= 0.15
    assert abs(fit.xmin / 2.0 - 1.0) <= 0.1


def test_fit_is_the_clauset_mle_with_minimum_ks_distance():
    """A direct transcription of WeightWatcher's WWFit.fit_power_law_standard on a small sample: for every
    candidate xmin (each sorted value but the largest), α = 1 + n / Σ ln(x/xmin) and
    D = max_j |P(x_j) − j/n| over the tail; the smallest D wins."""
    x = np.sort(bulk_plus_pareto_tail(120, 80, 2.5, xmin=1.0, seed=3))
    best = (math.inf, 0.0, 0.0, 0)
    for k in range(x.size - 1):
        xmin = x[k]
        tail = x[k:]
        n = tail.size
        alpha = 1.0 + n / float(np.sum(np.log(tail / xmin)))
        model = 1.0 - (tail / xmin) ** (1.0 - alpha)
        d = float(np.max(np.abs(model - np.arange(n) / n))) if alpha > 1 else 1.0
        if d < best[0]:
            best = (d, alpha, float(xmin), n)
    fit = fit_power_law(x)
    assert fit.ks_distance == pytest.approx(best[0], rel=1e-9)
    assert fit.alpha == pytest.approx(best[1], rel=1e-9)
    assert fit.xmin == best[2]
    assert fit.n_tail == best[3]


def test_fit_ignores_non_positive_values_and_needs_ten():
    nine = pareto_samples(9, 3.0, seed=1)
    assert math.isnan(fit_power_law(nine).alpha)
    assert fit_power_law(nine).flag == "n/a"
    padded = np.concatenate([nine, np.zeros(5), -np.ones(3)])  # 17 values, 9 positive
    assert math.isnan(fit_power_law(padded).alpha)
    ten = pareto_samples(10, 3.0, seed=1)
    assert math.isfinite(fit_power_law(ten).alpha)
    assert math.isnan(fit_power_law(np.full(50, 2.0)).alpha)  # no candidate below the largest value


def test_fewer_than_ten_singular_values_give_nan_alpha():
    m = compute_metrics(np.geomspace(10, 1, 9), (9, 9))
    assert math.isnan(m.alpha) and m.alpha_flag == "n/a"


@pytest.mark.parametrize(("alpha", "flag"), [(1.6, "over-trained"), (3.0, "ok"), (7.5, "under-trained")])
def test_training_flags_from_fitted_alpha(alpha, flag):
    fit = fit_power_law(pareto_samples(1000, alpha, seed=2))
    assert abs(fit.alpha - alpha) <= 0.25 * alpha
    assert fit.flag == flag


@pytest.mark.parametrize(
    ("alpha", "flag"),
    [(1.99, "over-trained"), (2.0, "ok"), (6.0, "ok"), (6.01, "under-trained"), (float("nan"), "n/a")],
)
def test_flag_thresholds(alpha, flag):
    assert PowerLawFit(alpha, 1.0, 0.1, 50).flag == flag


@pytest.mark.parametrize("alpha", [1.5, 3.0, 8.0])
def test_a_fit_on_fewer_than_50_tail_eigenvalues_reads_small_tail(alpha):
    assert PowerLawFit(alpha, 1.0, 0.1, 49).flag == "small-tail"
    assert PowerLawFit(float("nan"), 1.0, 0.1, 5).flag == "n/a"


def test_alpha_tail_counts_the_eigenvalues_at_or_above_xmin():
    s = np.sqrt(pareto_samples(400, 3.0, seed=4))
    m = compute_metrics(s, (400, 400), "float64")
    lam = np.sort(s**2)
    assert m.alpha_tail == int(np.count_nonzero(lam >= m.alpha_xmin))
    assert m.alpha_tail >= 50 and m.alpha_flag == "ok"
