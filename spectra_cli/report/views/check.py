"""``check``: one verdict per rule × module (the page, ``--all``, JSON and CSV) or one row per rule (the table
and Markdown by default, :func:`by_rule`); the failures and the verdict line under the table."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spectra_cli.report.render import Column, fmt_num, plural
from spectra_cli.report.views import generic
from spectra_cli.report.views.common import Card, Env, Row, View, num

if TYPE_CHECKING:
    from spectra_cli.report.plots import Figure

MAX_NOTE_FAILURES = 20


def title(env: Env) -> str:
    return f"spectra check {env['inputs']['checkpoint']}"


def columns(env: Env) -> list[Column]:
    """The verdict columns (one row per rule × module)."""
    return [
        Column("rule", "rule", str, "left"),
        Column("module", "module", str, "left", shorten=True),
        Column("value", "value", lambda x: fmt_num(x, 4)),
        Column("limit", "limit", lambda x: str(x) if isinstance(x, list) else fmt_num(x)),
        Column("status", "status", str, "left"),
        Column("message", "why", str, "left"),
    ]


def policy_name(env: Env) -> str:
    """The policy file as the run names it: relative to the current folder when it is below it (what GitHub
    annotations need)."""
    raw = env["inputs"].get("policy") or env["options"].get("policy") or "?"
    try:
        return str(Path(raw).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(raw)


def notes(env: Env) -> list[str]:
    """Each failure (the first :data:`MAX_NOTE_FAILURES`), the run's own notes, and the verdict line."""
    s = env["summary"]
    lines = []
    failed = [r for r in env["rows"] if r.get("status") == "fail"]
    for v in failed[:MAX_NOTE_FAILURES]:
        lines.append(f"✗ {v['rule']} · {v['module']}: {v['message']}")
    if len(failed) > MAX_NOTE_FAILURES:
        lines.append(
            f"… and {plural(len(failed) - MAX_NOTE_FAILURES, 'more failure', 'more failures')} "
            "(--junit / --format json list all)"
        )
    lines.extend(s.get("notes", []))
    counts = f"{s['failed']} failed, {s['passed']} passed, {s['skipped']} skipped"
    tail = (f"{plural(s['checks'], 'check', 'checks')} on {plural(s['modules'], 'module', 'modules')}, "
            f"policy {policy_name(env)}, {s['seconds']:.2f} s")  # fmt: skip
    lines.append(f"{'FAILED' if s['failed'] else 'PASSED'}: {counts} ({tail})")
    return lines


def cards(env: Env) -> list[Card]:
    s = env["summary"]
    by_rule = s.get("by_rule") if isinstance(s.get("by_rule"), dict) else {}
    broken = [k for k, r in by_rule.items() if isinstance(r, dict) and r.get("failed")]
    ok = s.get("ok")
    verdict = "PASSED" if ok is True else "FAILED" if ok is False else "-"
    code = {"PASSED": "exit code 0: every rule holds", "FAILED": "exit code 1: a rule failed"}.get(
        verdict, ""
    )
    return [
        ("gate", verdict, code),
        ("failed", num(s.get("failed")), ("rules: " + ", ".join(broken)) if broken else "no rule broken"),
        ("passed", num(s.get("passed")), ""),
        ("skipped", num(s.get("skipped")), "a rule could not apply (e.g. α not fitted)"),
        ("checks", num(s.get("checks")), f"{plural(len(by_rule), 'rule', 'rules')}, each on the modules it applies to"),
        ("modules", num(s.get("modules")), "matrices checked"),
    ]


def figures(env: Env) -> list[Figure]:
    return generic.figures(env)


# ---- one row per rule --------------------------------------------------------------------------------------


def rule_rows(env: Env) -> list[Row]:
    """One row per rule: its limit and how many checks passed, failed and were skipped."""
    return [
        {"rule": k, **r, "status": "FAIL" if r["failed"] else "ok"}
        for k, r in env["summary"]["by_rule"].items()
    ]


def rule_columns(env: Env) -> list[Column]:
    def limit(x: Any) -> str:
        if isinstance(x, list | tuple):
            return "[" + ", ".join(fmt_num(v) for v in x) + "]"
        return "per module" if x is None else fmt_num(x)

    return [
        Column("rule", "rule", str, "left"),
        Column("limit", "limit", limit),
        Column("checks", "checks"),
        Column("passed", "passed"),
        Column("failed", "failed"),
        Column("skipped", "skipped"),
        Column("status", "status", str, "left"),
    ]


def by_rule(view: View, markdown: str | None = None) -> View:
    """``view`` with one table row per rule (the default table of ``spectra check``); ``markdown``, when
    given, is the whole ``--format markdown`` document (the gate's summary, as ``--markdown FILE`` writes it)."""
    doc = None if markdown is None else (lambda env: markdown)
    return dataclasses.replace(view, rows=rule_rows, columns=rule_columns, markdown=doc)
