"""Fuzzing results JSON read by ``spectra report``: the recorded envelopes of every command (tests/golden) with
one field that the page computes on set to a value of the wrong type, envelope members of the wrong type, and
nesting of any depth past the limit."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

from spectra_cli.report.schema import NUMBER, NUMBERS, TEXT
from tests.hostile.helpers import FUZZ, ROOT, assert_refused, cli, json_values

GOLDEN = {p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "tests" / "golden").glob("*.json"))}
FOLDER = Path(tempfile.mkdtemp(prefix="spectra-hostile-report-"))


def report(env: Any) -> Any:
    path = FOLDER / "results.json"
    path.write_text(json.dumps(env))
    return cli("report", path, "-o", FOLDER / "page.html", "--force", "-q")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _wrong_for(field: str) -> Any:
    """Values a row field cannot hold (independently of spectra's own table)."""
    if field in TEXT:
        return json_values.filter(lambda v: v is not None and not isinstance(v, str))
    if field in NUMBERS:
        return json_values.filter(
            lambda v: v is not None and not (isinstance(v, list) and all(map(_number, v)))
        )
    return json_values.filter(lambda v: v is not None and not _number(v))


ROW_FIELDS = sorted((TEXT | NUMBER | NUMBERS) - {"value"})


@FUZZ
@given(st.sampled_from(sorted(GOLDEN)), st.data())
def test_a_row_field_of_the_wrong_type_is_one_error(case: str, data: st.DataObject) -> None:
    env = copy.deepcopy(GOLDEN[case])
    assume(env["rows"])
    i = data.draw(st.integers(0, len(env["rows"]) - 1))
    field = data.draw(st.sampled_from(ROW_FIELDS))
    env["rows"][i][field] = data.draw(_wrong_for(field))
    assert_refused(report(env), 1, "results.json")


SUMMARY = {
    "analyze": ["analysed", "matrices", "params", "mean_alpha", "over_trained", "mean_effective_rank_ratio"],
    "compare": ["epsilons", "tuned"],
    "check-fail": ["by_rule", "ok", "failed", "passed", "checks"],
}


@FUZZ
@given(st.sampled_from(sorted(SUMMARY)), st.data())
def test_a_summary_field_of_the_wrong_type_is_one_error(case: str, data: st.DataObject) -> None:
    env = copy.deepcopy(GOLDEN[case])
    field = data.draw(st.sampled_from(SUMMARY[case]))
    if field == "tuned":
        model = next(iter(env["summary"]["tuned"]))
        value = data.draw(st.one_of(
            json_values.filter(lambda v: v is not None and not isinstance(v, dict)),
            st.fixed_dictionaries({"total_intruders": json_values.filter(lambda v: v is not None and not isinstance(v, dict))}),
        ))  # fmt: skip
        env["summary"]["tuned"] = (
            {**env["summary"]["tuned"], model: value} if isinstance(value, dict) else value
        )
    elif field == "by_rule":
        env["summary"][field] = data.draw(json_values.filter(lambda v: v is not None and not (
            isinstance(v, dict) and all(isinstance(r, dict) for r in v.values()))))  # fmt: skip
    elif field == "ok":
        env["summary"][field] = data.draw(
            json_values.filter(lambda v: v is not None and not isinstance(v, bool))
        )
    elif field == "epsilons":
        env["summary"][field] = data.draw(json_values.filter(lambda v: v is not None and not (
            isinstance(v, list) and v and all(isinstance(e, int | float) and not isinstance(e, bool) for e in v))))  # fmt: skip
        assume(not (isinstance(env["summary"][field], list) and not env["summary"][field]))
    else:
        env["summary"][field] = data.draw(json_values.filter(lambda v: v is not None and not _number(v)))
    assert_refused(report(env), 1, "results.json")


@FUZZ
@given(
    st.sampled_from(sorted(GOLDEN)),
    st.sampled_from(["schema_version", "command", "rows", "inputs", "options", "summary", "spectra_version"]),
    json_values,
)
def test_an_envelope_member_of_the_wrong_type_is_one_error(case: str, key: str, value: Any) -> None:
    env = copy.deepcopy(GOLDEN[case])
    valid = {
        "schema_version": isinstance(value, int) and not isinstance(value, bool) and value == 1,
        "command": isinstance(value, str) and value != "",
        "rows": isinstance(value, list) and all(isinstance(r, dict) for r in value),
        "spectra_version": isinstance(value, str),
    }.get(key, value is None or isinstance(value, dict))
    assume(not valid)
    env[key] = value
    assert_refused(report(env), 1, "results.json")


@FUZZ
@given(st.integers(65, 200_000), st.sampled_from(["rows", "summary", "inputs", "top"]))
def test_nesting_past_the_limit_is_one_error(depth: int, where: str) -> None:
    """Arrays nested ``depth`` deep anywhere in the envelope (100k deep made json.loads raise RecursionError;
    a few hundred deep tripped the page's recursive formatting)."""
    env = copy.deepcopy(GOLDEN["analyze"])
    if where == "rows":
        env["rows"][0]["deep"] = "@@DEEP@@"
    elif where == "top":
        env["deep"] = "@@DEEP@@"
    else:
        env[where]["deep"] = "@@DEEP@@"
    path = FOLDER / "deep.json"
    path.write_text(json.dumps(env).replace('"@@DEEP@@"', "[" * depth + "]" * depth))
    assert_refused(cli("report", path, "-o", FOLDER / "page.html", "--force", "-q"), 1, "deep")
