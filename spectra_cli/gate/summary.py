"""The summary of one ``spectra check`` run: the verdicts counted per rule and overall (what the JSON
envelope's ``summary`` holds, what the Markdown summary and the JUnit report show)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from spectra_cli.gate.policy import Policy
from spectra_cli.gate.rules import MODEL, Verdict


class FirstFailure(TypedDict):
    module: str
    value: float | int | None
    message: str


class RuleTally(TypedDict):
    """One rule's verdicts: how many checks, passed, failed and skipped; its policy limit and line (the
    ``[rules]`` value), and its first failure."""

    checks: int
    passed: int
    failed: int
    skipped: int
    limit: Any
    line: int | None
    first_failure: FirstFailure | None


@dataclass(frozen=True)
class CheckSummary:
    """``ok`` when nothing failed; counts over every verdict; ``modules`` checked (model-level verdicts aside);
    one :class:`RuleTally` per rule (registry order); the notes for the reader (unused flags, overrides that
    match nothing, baseline modules not measured)."""

    ok: bool
    checks: int
    passed: int
    failed: int
    skipped: int
    modules: int
    by_rule: dict[str, RuleTally]
    notes: list[str]
    seconds: float


_COUNTER = {"pass": "passed", "fail": "failed", "skip": "skipped"}


def tally(verdicts: Sequence[Verdict], policy: Policy, notes: list[str], seconds: float) -> CheckSummary:
    """Count the verdicts per rule and overall."""
    by_rule: dict[str, RuleTally] = {}
    for v in verdicts:
        limit = policy.rules.get(v.rule)
        r = by_rule.setdefault(v.rule, RuleTally(checks=0, passed=0, failed=0, skipped=0,
                                                 limit=list(limit) if isinstance(limit, tuple) else limit,
                                                 line=policy.line_of(v.rule), first_failure=None))  # fmt: skip
        r["checks"] += 1
        key = _COUNTER[v.status]
        r[key] += 1  # type: ignore[literal-required]
        if v.status == "fail" and r["first_failure"] is None:
            r["first_failure"] = FirstFailure(module=v.module, value=v.value, message=v.message)
    failed = sum(1 for v in verdicts if v.status == "fail")
    return CheckSummary(
        ok=failed == 0,
        checks=len(verdicts),
        passed=sum(1 for v in verdicts if v.status == "pass"),
        failed=failed,
        skipped=sum(1 for v in verdicts if v.status == "skip"),
        modules=len({v.module for v in verdicts if v.module != MODEL}),
        by_rule=by_rule,
        notes=notes,
        seconds=seconds,
    )


__all__ = ["CheckSummary", "FirstFailure", "RuleTally", "tally"]
