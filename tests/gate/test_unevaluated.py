"""A rule that no module could be evaluated on fails the gate (a gate that checked nothing must not pass), unless
the policy says ``allow_unevaluated = true``; policy values are shown cut short in messages; deep policies and
the model-level intruder total when nothing was compared."""

from __future__ import annotations

from pathlib import Path

import pytest

from spectra_cli.errors import PolicyError
from spectra_cli.gate.policy import load_policy
from spectra_cli.gate.rules import MODEL, Facts, Verdict, evaluate_total_intruders, shown, unevaluated


def _v(rule: str, module: str, status: str, message: str = "") -> Verdict:
    return Verdict(rule, module, status, None, 1.0, message)


def test_a_rule_whose_every_verdict_is_a_skip_fails() -> None:
    verdicts = [_v("alpha_range", "a", "skip", "α could not be fitted"), _v("alpha_range", "b", "skip")]
    (extra,) = unevaluated(verdicts, ["alpha_range"], allow=False, lines={"alpha_range": 3})
    assert (extra.rule, extra.module, extra.status, extra.line) == ("alpha_range", MODEL, "fail", 3)
    assert "could not be evaluated on any of 2 modules" in extra.message
    assert "α could not be fitted" in extra.message and "allow_unevaluated" in extra.message


def test_a_rule_with_no_verdict_at_all_fails() -> None:
    (extra,) = unevaluated([], ["max_spectral_norm"], allow=False, lines={})
    assert extra.status == "fail" and "0 modules" in extra.message


def test_allow_unevaluated_makes_it_a_skip() -> None:
    (extra,) = unevaluated([_v("alpha_range", "a", "skip")], ["alpha_range"], allow=True, lines={})
    assert extra.status == "skip"


@pytest.mark.parametrize("status", ["pass", "fail"])
def test_one_evaluated_module_is_enough(status: str) -> None:
    verdicts = [_v("alpha_range", "a", "skip"), _v("alpha_range", "b", status)]
    assert unevaluated(verdicts, ["alpha_range"], allow=False, lines={}) == []


def test_excused_rules_are_left_alone() -> None:
    verdicts = [_v("max_drift_pct", "a", "skip", "no baseline yet")]
    assert unevaluated(verdicts, ["max_drift_pct"], allow=False, lines={}, excused={"max_drift_pct"}) == []


def test_the_intruder_total_over_no_compared_module_is_not_a_pass() -> None:
    facts = {"a": Facts("a", note="a is not in the base"), "b": Facts("b")}
    verdict = evaluate_total_intruders(0, facts, 2)
    assert verdict.status == "skip" and "a is not in the base" in verdict.message
    # and so the gate fails on it
    (extra,) = unevaluated([verdict], ["max_intruders"], allow=False, lines={})
    assert extra.status == "fail"


def test_policy_reads_allow_unevaluated(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text("[rules]\nno_nonfinite = true\n")
    assert load_policy(p).allow_unevaluated is False and "allow_unevaluated" not in load_policy(p).as_dict()
    p.write_text("allow_unevaluated = true\n[rules]\nno_nonfinite = true\n")
    policy = load_policy(p)
    assert policy.allow_unevaluated is True and policy.as_dict()["allow_unevaluated"] is True
    p.write_text('allow_unevaluated = "yes"\n[rules]\nno_nonfinite = true\n')
    with pytest.raises(PolicyError, match=r"p.toml:1: allow_unevaluated must be true or false, got 'yes'"):
        load_policy(p)


@pytest.mark.parametrize(
    "text", ["[rules]\nalpha_range = " + "[" * 5000 + "]" * 5000, "[rules]\nx = " + "[" * 70 + "]" * 70]
)
def test_a_deep_policy_is_a_policy_error(tmp_path: Path, text: str) -> None:
    p = tmp_path / "p.toml"
    p.write_text(text)
    with pytest.raises(PolicyError, match="levels deep"):
        load_policy(p)


def test_a_policy_that_is_a_fifo_is_refused_unopened(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "p.toml")
    with pytest.raises(PolicyError, match="FIFO"):
        load_policy(tmp_path / "p.toml")


def test_values_in_messages_are_cut_short() -> None:
    assert shown([1.0] * 10_000).endswith("…") and len(shown([1.0] * 10_000)) == 60
    assert shown("x") == "'x'"
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert shown(deep) == "a list"  # repr of a 5,000-deep list raises RecursionError
