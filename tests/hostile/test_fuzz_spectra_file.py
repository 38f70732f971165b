"""Fuzzing saved spectra (``analyze --save-spectra``) read back by ``spectra analyze``: the matrix records with
missing or mistyped fields, the options, the skipped count, the singular values themselves."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fixtures.checkpoints import read_header, read_tensor, write_safetensors
from tests.hostile.helpers import FUZZ, assert_refused, cli, json_values

FIELDS_TEXT = ["name", "tensor", "kind", "role", "dtype"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray], dict[str, str]]:
    """A spectra file of two 6×4 matrices: its path, its tensors and its metadata."""
    root = tmp_path_factory.mktemp("spectra")
    rng = np.random.default_rng(3)
    ckpt = write_safetensors(root / "m.safetensors", {
        f"layers.{i}.mlp.up_proj.weight": rng.standard_normal((6, 4)).astype(np.float32) for i in range(2)
    })  # fmt: skip
    out = root / "m.spectra.safetensors"
    assert cli("analyze", ckpt, "--save-spectra", out, "-q", "-f", "json").exit_code == 0
    header, _ = read_header(out)
    tensors = {k: read_tensor(out, k) for k in header}
    with open(out, "rb") as f:  # the metadata, read here (fixtures.read_header drops it)
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))["__metadata__"]
    return out, tensors, meta


def analyze_with(
    saved: Any, meta: dict[str, str] | None = None, tensors: dict[str, np.ndarray] | None = None
) -> Any:
    path, t0, m0 = saved
    target = path.with_name("mutated.spectra.safetensors")
    write_safetensors(target, tensors if tensors is not None else t0, meta if meta is not None else m0)
    return cli("analyze", target, "-f", "json")


def test_the_unmutated_file_is_read_back(saved: Any) -> None:
    r = analyze_with(saved)
    assert r.exit_code == 0 and len(json.loads(r.stdout)["rows"]) == 2


def _ok_shape(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) for d in v)
        and min(v) >= 4
    )


def _ok_count(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)


bad_field = st.one_of(
    st.tuples(st.sampled_from(FIELDS_TEXT), json_values.filter(lambda v: not isinstance(v, str))),
    st.tuples(st.just("note"), json_values.filter(lambda v: v is not None and not isinstance(v, str))),
    st.tuples(st.just("shape"), json_values.filter(lambda v: not _ok_shape(v))),
    st.tuples(st.sampled_from(["depth", "nan_count", "inf_count"]), json_values.filter(lambda v: not _ok_count(v))),
    st.tuples(st.sampled_from([*FIELDS_TEXT, "shape"]), st.just("(deleted)")),
)  # fmt: skip


@FUZZ
@given(st.integers(0, 1), bad_field)
def test_a_matrix_record_with_a_missing_or_mistyped_field_is_one_error(
    saved: Any, i: int, bad: tuple[str, Any]
) -> None:
    field, value = bad
    meta = dict(saved[2])
    records = json.loads(meta["matrices"])
    if value == "(deleted)":
        del records[i][field]
    else:
        records[i][field] = value
    meta["matrices"] = json.dumps(records)
    assert_refused(analyze_with(saved, meta), 1, "spectra.safetensors")


@FUZZ
@given(st.sampled_from(["matrices", "options"]), st.one_of(st.text(max_size=30), json_values.map(json.dumps)))
def test_a_record_that_is_not_a_list_of_records_is_one_error(saved: Any, key: str, text: str) -> None:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    # any object whose precision/resolved are of the right type is a valid options record
    if key == "options":
        assume(not (isinstance(value, dict) and value.get("precision") in (None, "float32", "float64")
                    and isinstance(value.get("resolved", {}), dict)))  # fmt: skip
    assume(value != [])  # an empty list is valid (and then selects nothing: also one error, tested below)
    meta = {**saved[2], key: text}
    assert_refused(analyze_with(saved, meta), 1, "spectra.safetensors")


@FUZZ
@given(st.text(max_size=8).filter(lambda t: not (t.isascii() and t.isdigit()) and t != ""))
def test_a_skipped_count_that_is_not_a_count_is_one_error(saved: Any, text: str) -> None:
    assert_refused(analyze_with(saved, {**saved[2], "skipped_tensors": text}), 1, "skipped_tensors")


@FUZZ
@given(st.integers(0, 3), st.sampled_from([np.nan, np.inf, -np.inf, -1.0, -1e-300]))
def test_singular_values_that_cannot_be_singular_values_are_one_error(saved: Any, k: int, bad: float) -> None:
    tensors = {n: t.copy() for n, t in saved[1].items()}
    name = sorted(tensors)[0]
    tensors[name][k] = bad
    assert_refused(analyze_with(saved, tensors=tensors), 1, "singular values")
