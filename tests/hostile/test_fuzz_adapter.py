"""Fuzzing ``adapter_config.json`` through ``spectra compare BASE ADAPTER``: every field spectra reads set to a
value of the wrong type or range (``r: "four"``, ``r: 0``, a ``rank_pattern`` that is a list, an invalid regex
key, a ``lora_alpha`` that is text, …), and a config that is not an object at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fixtures.checkpoints import lora_adapter, lora_base
from tests.hostile.helpers import FUZZ, assert_refused, cli, json_values

MODULE = "model.layers.0.self_attn.q_proj"
RANK = 2
BAD_REGEX = st.sampled_from(
    ["(", "[", "*q_proj", "a{2,1}", "(?P<x", "\\", "q_proj)", "(?<!a+)b", "x{99999999999}"]
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapter")
    base = lora_base(root / "base").path
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((RANK, 16)), rng.standard_normal((16, RANK))
    adapter = lora_adapter(root / "adapter", {MODULE: (a, b)}, r=RANK, alpha=4.0)
    return base, adapter


def compare(models: tuple[Path, Path], config: Any) -> Any:
    base, adapter = models
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return cli("compare", base, adapter, "-f", "json")


def _config(models: tuple[Path, Path]) -> dict[str, Any]:
    return json.loads((models[1] / "adapter_config.json").read_text())


def test_the_unmutated_adapter_is_valid(models: tuple[Path, Path]) -> None:
    cfg = {**_config(models), "r": RANK, "lora_alpha": 4.0, "rank_pattern": {}, "alpha_pattern": {}}
    r = compare(models, cfg)
    assert r.exit_code == 0, r.stderr


def _int_at_least_1(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(float(v))


non_map = json_values.filter(lambda v: not isinstance(v, dict) and v is not None)
#: (field, a value spectra must refuse for it)
bad_fields = st.one_of(
    st.tuples(st.just("r"), json_values.filter(lambda v: not (_int_at_least_1(v) and v == RANK))),
    st.tuples(st.just("lora_alpha"), json_values.filter(lambda v: v is not None and not _number(v))),
    st.tuples(st.sampled_from(["use_rslora", "fan_in_fan_out", "use_dora"]),
              json_values.filter(lambda v: v is not None and not isinstance(v, bool))),
    st.tuples(st.just("peft_type"), json_values.filter(lambda v: v is not None and not (isinstance(v, str) and v.upper() == "LORA"))),
    st.tuples(st.sampled_from(["rank_pattern", "alpha_pattern"]), non_map),
    st.tuples(st.sampled_from(["rank_pattern", "alpha_pattern"]), st.dictionaries(BAD_REGEX, st.just(1), min_size=1)),
    st.tuples(st.just("rank_pattern"), st.fixed_dictionaries({"q_proj": json_values.filter(lambda v: not (_int_at_least_1(v) and v == RANK))})),
    st.tuples(st.just("alpha_pattern"), st.fixed_dictionaries({"q_proj": json_values.filter(lambda v: not _number(v))})),
    st.tuples(st.just("target_modules"),
              st.one_of(BAD_REGEX, json_values.filter(lambda v: v is not None and not isinstance(v, str) and not (
                  isinstance(v, list) and all(isinstance(x, str) for x in v))))),
)  # fmt: skip


@FUZZ
@given(bad_fields)
def test_a_config_field_of_the_wrong_type_or_range_is_one_error(
    models: tuple[Path, Path], bad: tuple[str, Any]
) -> None:
    field, value = bad
    cfg = {
        **_config(models),
        "r": RANK,
        "lora_alpha": 4.0,
        "rank_pattern": {},
        "alpha_pattern": {},
        field: value,
    }
    assert_refused(compare(models, cfg), 1)


@FUZZ
@given(json_values)
def test_a_config_that_is_not_an_object_is_one_error(models: tuple[Path, Path], value: Any) -> None:
    assume(not isinstance(value, dict))
    assert_refused(compare(models, value), 1, "adapter_config.json")
