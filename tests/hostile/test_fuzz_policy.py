"""Fuzzing policy files through ``spectra check --policy``: rule values of the wrong type or range, top-level
keys and overrides of the wrong shape, unknown keys, random text, and nesting of any depth. A policy error
means the gate could not run: one ``Error:`` line and exit 2 (never 1, which means "a rule failed")."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

from fixtures.checkpoints import write_safetensors
from tests.hostile.helpers import FUZZ, assert_refused, cli

FOLDER = Path(tempfile.mkdtemp(prefix="spectra-hostile-policy-"))
CKPT = write_safetensors(
    FOLDER / "m.safetensors", {"layers.0.mlp.up_proj.weight": np.eye(8, dtype=np.float32)}
)

_scalar = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=8))
#: values TOML can write (no null)
toml_values = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def toml(v: Any) -> str:
    """``v`` as a TOML value (inline tables for objects)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml(x)}" for k, x in v.items()) + "}"


def check(text: str) -> Any:
    path = FOLDER / "spectra.toml"
    path.write_text(text, encoding="utf-8")
    return cli("check", CKPT, "--policy", path, "-q")


def test_a_valid_policy_runs() -> None:
    assert check("[rules]\nno_nonfinite = true\n").exit_code == 0


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


#: rule → what its value may be (besides false, which turns it off), written here from the docs
VALID = {
    "no_nonfinite": lambda v: v is True,
    "max_intruders": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "alpha_range": lambda v: isinstance(v, list) and len(v) == 2 and all(map(_num, v)) and v[0] < v[1],
    "min_effective_rank_ratio": lambda v: _num(v) and v > 0,
    "max_relative_delta": lambda v: _num(v) and v >= 0,
    "max_spectral_norm": lambda v: _num(v) and v > 0,
    "max_drift_pct": lambda v: _num(v) and v >= 0,
    "intruder_epsilon": lambda v: _num(v) and 0 < v <= 1,
    "intruder_top_k": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
}


@FUZZ
@given(st.sampled_from(sorted(VALID)), toml_values)
def test_a_rule_value_of_the_wrong_type_or_range_is_one_error(rule: str, value: Any) -> None:
    assume(not VALID[rule](value) and value is not False)
    assert_refused(check(f"[rules]\nno_nonfinite = true\n{rule} = {toml(value)}\n"), 2, "spectra.toml")


@FUZZ
@given(st.sampled_from(["baseline", "allow_unevaluated", "rules", "overrides"]), toml_values)
def test_a_top_level_key_of_the_wrong_type_is_one_error(key: str, value: Any) -> None:
    valid = {
        "baseline": isinstance(value, str) and value != "",
        "allow_unevaluated": isinstance(value, bool),
        "overrides": isinstance(value, list) and all(isinstance(o, dict) and "modules" in o for o in value),
    }
    assume(not valid.get(key, False))
    text = f"{key} = {toml(value)}\n" + ("[rules]\nno_nonfinite = true\n" if key != "rules" else "")
    assert_refused(check(text), 2, "spectra.toml")


@FUZZ
@given(toml_values, st.sampled_from(sorted(VALID)), toml_values)
def test_an_override_of_the_wrong_shape_is_one_error(modules: Any, rule: str, value: Any) -> None:
    ok_modules = (isinstance(modules, str) and modules) or (
        isinstance(modules, list) and modules and all(isinstance(m, str) and m for m in modules))  # fmt: skip
    ok_value = rule not in ("intruder_epsilon", "intruder_top_k") and (value is False or VALID[rule](value))
    assume(not (ok_modules and ok_value))
    text = f"[rules]\nno_nonfinite = true\n[[overrides]]\nmodules = {toml(modules)}\n{rule} = {toml(value)}\n"
    assert_refused(check(text), 2, "spectra.toml")


@FUZZ
@given(st.text(max_size=200))
def test_random_text_is_one_error(text: str) -> None:
    assume("no_nonfinite" not in text)
    assert_refused(check(text), 2)


@FUZZ
@given(st.integers(65, 20_000), st.sampled_from(["[", "{x = "]))
def test_nesting_past_the_limit_is_one_error(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    assert_refused(check(f"[rules]\nalpha_range = {opener * depth}{closer * depth}\n"), 2, "spectra.toml")
