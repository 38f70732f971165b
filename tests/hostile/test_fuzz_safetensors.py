"""Fuzzing the safetensors header through ``spectra analyze``: every field of every tensor entry, the metadata,
the header length and the bytes themselves replaced by generated values. Each generated file is invalid, and
each must end in one ``Error:`` line and exit 1, never a traceback."""

from __future__ import annotations

import copy
import json
import math
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

from spectra_cli.checkpoint.tensors import DTYPES
from tests.hostile.helpers import FUZZ, assert_refused, cli, json_values, safetensors_raw

HEADER: dict[str, Any] = {
    "__metadata__": {"format": "pt"},
    "layers.0.mlp.up_proj.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
    "layers.0.mlp.down_proj.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [64, 128]},
}
DATA = np.arange(32, dtype="<f4").tobytes()
NAMES = [k for k in HEADER if k != "__metadata__"]
FOLDER = Path(tempfile.mkdtemp(prefix="spectra-hostile-st-"))


def analyze(content: bytes) -> Any:
    """``spectra analyze`` of a file holding ``content`` (one file, rewritten for every example)."""
    path = FOLDER / "model.safetensors"
    path.write_bytes(content)
    return cli("analyze", path, "-f", "json")


def test_the_unmutated_file_is_valid() -> None:
    r = analyze(safetensors_raw(HEADER, DATA))
    assert r.exit_code == 0 and len(json.loads(r.stdout)["rows"]) == 2


def _still_valid(field: str, value: Any, original: Any) -> bool:
    if value == original and type(value) is type(original):
        return True
    if field == "dtype":
        return isinstance(value, str) and value in DTYPES and DTYPES[value][0] == 4
    if field == "shape":
        ok = isinstance(value, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
        )
        return ok and math.prod(value) == 16
    return False


@FUZZ
@given(st.sampled_from(NAMES), st.sampled_from(["dtype", "shape", "data_offsets"]), json_values)
def test_any_mistyped_or_out_of_range_entry_field_is_one_error(name: str, field: str, value: Any) -> None:
    header = copy.deepcopy(HEADER)
    assume(not _still_valid(field, value, header[name][field]))
    header[name][field] = value
    assert_refused(analyze(safetensors_raw(header, DATA)), 1, "model.safetensors")


@FUZZ
@given(st.sampled_from(NAMES), st.one_of(json_values, st.just("missing")))
def test_an_entry_that_is_not_an_entry_is_one_error(name: str, value: Any) -> None:
    header = copy.deepcopy(HEADER)
    if value == "missing":
        del header[name]["dtype"]
    else:
        header[name] = value
    assert_refused(analyze(safetensors_raw(header, DATA)), 1, "model.safetensors")


@FUZZ
@given(json_values)
def test_metadata_that_is_not_a_map_of_strings_is_one_error(value: Any) -> None:
    assume(
        not (value is None or (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())))
    )
    header = {**HEADER, "__metadata__": value}
    assert_refused(analyze(safetensors_raw(header, DATA)), 1, "__metadata__")


@FUZZ
@given(st.integers(0, 2**64 - 1))
def test_any_wrong_header_length_is_one_error(n: int) -> None:
    good = safetensors_raw(HEADER, DATA)
    (real,) = struct.unpack("<Q", good[:8])
    assume(n != real)
    assert_refused(analyze(struct.pack("<Q", n) + good[8:]), 1, "model.safetensors")


@FUZZ
@given(st.binary(max_size=200))
def test_random_header_bytes_are_one_error(raw: bytes) -> None:
    assert_refused(analyze(safetensors_raw(None, DATA, raw=raw)), 1, "model.safetensors")


@FUZZ
@given(st.data())
def test_a_file_cut_anywhere_is_one_error(data: st.DataObject) -> None:
    good = safetensors_raw(HEADER, DATA)
    cut = data.draw(st.integers(0, len(good) - 1))
    assert_refused(analyze(good[:cut]), 1, "model.safetensors")


@FUZZ
@given(st.integers(0, 127), st.integers(0, 128))
def test_overlapping_tensor_data_is_refused(begin: int, end: int) -> None:
    """Two tensors whose bytes overlap are a crafted or corrupt file: refused, whatever the offsets."""
    assume(begin < end and begin < 64 and end > 0)  # [begin, end) overlaps the first tensor's [0, 64)
    header = {
        "a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
        "b.weight": {"dtype": "U8", "shape": [end - begin], "data_offsets": [begin, end]},
    }
    assert_refused(analyze(safetensors_raw(header, DATA)), 1, "overlap")
