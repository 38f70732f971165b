"""Text outputs of ``spectra check`` for CI: a Markdown summary (a PR comment or ``$GITHUB_STEP_SUMMARY``)
and GitHub Actions ``::error`` annotations. Pure functions from verdicts to text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from spectra_cli.gate.rules import Verdict
from spectra_cli.gate.summary import CheckSummary
from spectra_cli.report.render import Column, fmt_num, markdown_table, plural, write_text
from spectra_cli.report.terminal import terminal_safe

MAX_FAILURE_ROWS = 50


def _cell(x: Any) -> str:
    if isinstance(x, tuple | list):
        return "[" + ", ".join(_cell(v) for v in x) + "]"
    return fmt_num(x, 4)


def _esc(s: str) -> str:
    return terminal_safe(s.replace("|", "\\|").replace("\n", " "), newlines=False)


def _line(s: Any) -> str:
    return terminal_safe(str(s).replace("\n", " "), newlines=False)


def _code(s: Any) -> str:
    return "`" + _line(s) + "`"


_RULE_COLUMNS = [
    Column("rule", "rule", str, "left"),
    Column("limit", "limit", _cell),
    *(Column(k, k) for k in ("checks", "passed", "failed", "skipped")),
]
_FAILURE_COLUMNS = [
    Column("rule", "rule", _code, "left"),
    Column("module", "module", _code, "left"),
    Column("value", "value", _cell),
    Column("limit", "limit", _cell),
    Column("message", "why", _line, "left"),
]


def markdown_summary(verdicts: Sequence[Verdict], summary: CheckSummary, title: str, policy: str) -> str:
    """A heading that says pass/fail, one table row per rule (limit, checks, passed, failed, skipped), and a
    table of the failures (the first :data:`MAX_FAILURE_ROWS`)."""
    ok = summary.failed == 0
    out = [f"## {'✅' if ok else '❌'} spectra check {'passed' if ok else 'failed'}: {_esc(title)}", ""]
    out.append(
        f"Policy `{policy}` · {plural(summary.checks, 'check', 'checks')} on "
        f"{plural(summary.modules, 'module', 'modules')}: "
        f"{summary.passed} passed, {summary.failed} failed, {summary.skipped} skipped"
    )
    rules = [{**r, "rule": f"{'❌ ' if r['failed'] else ''}`{rule}`"} for rule, r in summary.by_rule.items()]
    out += ["", *markdown_table(rules, _RULE_COLUMNS)]
    failed = [v for v in verdicts if v.status == "fail"]
    if failed:
        out += ["", "### Failures", ""]
        out += markdown_table([asdict(v) for v in failed[:MAX_FAILURE_ROWS]], _FAILURE_COLUMNS)
        if len(failed) > MAX_FAILURE_ROWS:
            out += [
                "",
                f"… and {len(failed) - MAX_FAILURE_ROWS} more failures (see the JUnit report or --format json).",
            ]
    for note in summary.notes:
        out += ["", f"> {_esc(note)}"]
    return "\n".join(out) + "\n"


def _data(s: str) -> str:
    # GitHub's escapes for % CR LF, then every other control character shown as an escape (not sent raw)
    return terminal_safe(s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A"), newlines=False)


def _prop(s: str) -> str:
    return _data(s).replace(":", "%3A").replace(",", "%2C")


def github_annotations(verdicts: Sequence[Verdict], policy: str) -> list[str]:
    """One ``::error file=POLICY,line=N,title=spectra check: RULE::MODULE: message`` line per failure, escaped
    as GitHub's workflow-command syntax requires; the file/line point at the policy value that failed."""
    lines = []
    for v in verdicts:
        if v.status != "fail":
            continue
        props = [f"file={_prop(policy)}"] + ([f"line={v.line}"] if v.line else [])
        props.append(f"title={_prop(f'spectra check: {v.rule}')}")
        lines.append(f"::error {','.join(props)}::{_data(f'{v.module}: {v.message}')}")
    return lines


__all__ = ["github_annotations", "markdown_summary", "write_text"]
