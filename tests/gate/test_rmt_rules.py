"""max_spikes_ratio and max_correlation_traps."""

from __future__ import annotations

from spectra_cli.gate.rules import RULES, Facts, validate_value


def _eval(rule: str, limit, tuned):
    return RULES[rule].evaluate(validate_value(rule, limit), Facts("m", tuned=tuned))


def test_spikes_ratio_passes_at_and_fails_above_the_limit():
    assert _eval("max_spikes_ratio", 0.05, {"spikes_ratio": 0.05, "num_spikes": 5})[0] == "pass"
    status, value, msg = _eval("max_spikes_ratio", 0.05, {"spikes_ratio": 0.06, "num_spikes": 6})
    assert (status, value) == ("fail", 0.06) and "6 spikes" in msg


def test_traps_count():
    assert _eval("max_correlation_traps", 0, {"num_traps": 0})[0] == "pass"
    status, value, _ = _eval("max_correlation_traps", 1, {"num_traps": 2})
    assert (status, value) == ("fail", 2)


def test_unmeasured_skips_and_nonfinite_fails():
    assert _eval("max_correlation_traps", 0, {"alpha": 3.0})[0] == "skip"
    assert _eval("max_spikes_ratio", 0.1, None)[0] == "skip"
    f = Facts("m", nonfinite=3)
    assert RULES["max_correlation_traps"].evaluate(0, f)[0] == "fail"
    assert RULES["max_spikes_ratio"].needs == "mp_fit" and RULES["max_correlation_traps"].needs == "randomize"


def test_reliable_alpha_reads_the_tail_size_and_ks_distance():
    # 100 tail eigenvalues: the KS 5 % critical value is 1.36/√100 = 0.136
    assert _eval("reliable_alpha", True, {"alpha": 3.0, "alpha_tail": 100, "alpha_ks": 0.13})[0] == "pass"
    status, value, msg = _eval("reliable_alpha", True, {"alpha": 3.0, "alpha_tail": 100, "alpha_ks": 0.14})
    assert (status, value) == ("fail", 0.14) and "poor-fit" in msg
    status, _, msg = _eval("reliable_alpha", True, {"alpha": 3.0, "alpha_tail": 49, "alpha_ks": 0.01})
    assert status == "fail" and "small-tail" in msg
    assert _eval("reliable_alpha", True, {"alpha": float("nan"), "alpha_tail": 0, "alpha_ks": 1.0})[0] == "skip"
    assert RULES["reliable_alpha"].needs == "tuned"
