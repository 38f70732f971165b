"""Fuzzing an rmm bundle's ``coefficients.json`` through ``spectra reconstruct``: every field reconstruct reads
set to a value of the wrong type, range or shape (coefficients that are not n×p, a module whose basis size
disagrees with its coefficients, task entries that are not tasks, …), and documents that are not objects."""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fixtures.merge_cases import full_case
from tests.hostile.helpers import FUZZ, assert_refused, cli, json_values


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("bundle")
    case = full_case(root / "case", n=2)
    out = root / "bundle"
    r = cli("merge", case.base_path, *(f"{k}={v}" for k, v in case.paths.items()), "--method", "rmm",
            "--out", out, "--kinds", "q_proj", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    return out, json.loads((out / "coefficients.json").read_text())


def reconstruct(bundle: tuple[Path, dict[str, Any]], doc: Any) -> Any:
    folder, _ = bundle
    (folder / "coefficients.json").write_text(json.dumps(doc))
    out = folder.parent / "rebuilt"
    shutil.rmtree(out, ignore_errors=True)
    return cli("reconstruct", folder, "--task", "t0", "--out", out, "-q")


def test_the_unmutated_bundle_is_rebuilt(bundle: tuple[Path, dict[str, Any]]) -> None:
    assert reconstruct(bundle, bundle[1]).exit_code == 0


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _matrix(n: int, p: int) -> Callable[[Any], bool]:
    return lambda v: (
        isinstance(v, list)
        and len(v) == n
        and all(isinstance(r, list) and len(r) == p and all(_num(c) for c in r) for r in v)
    )


def _cases(doc: dict[str, Any]) -> list[tuple[tuple[Any, ...], Callable[[Any], bool]]]:
    """(path to a field, what would still be valid there): any other value must be refused."""
    name = next(iter(doc["modules"]))
    m = doc["modules"][name]
    n, p = len(doc["tasks"]), m["p"]
    same = lambda original: lambda v: v == original and type(v) is type(original)  # noqa: E731
    mod = ("modules", name)
    return [
        (("format",), same(doc["format"])),
        (("version",), lambda v: _int(v) and v == 1),
        (("base",), same(doc["base"])),
        (("base", "tensors"), lambda v: isinstance(v, dict) and all(
            k in v for k in [*doc["tasks"][0]["extra_tensors"], m["tensor"]]
        ) and all(doc["base"]["tensors"].get(k) == x for k, x in v.items())),
        (("tasks",), same(doc["tasks"])),
        (("tasks", 0), same(doc["tasks"][0])),
        (("tasks", 0, "name"), same("t0")),
        (("tasks", 0, "kind"), same("full")),
        (("tasks", 0, "weight"), _num),
        (("tasks", 0, "extra_tensors"), lambda v: isinstance(v, list) and set(v) <= set(doc["tasks"][0]["extra_tensors"])),
        (("modules",), same(doc["modules"])),
        (mod, same(m)),
        ((*mod, "tensor"), same(m["tensor"])),
        ((*mod, "shape"), same(m["shape"])),
        ((*mod, "centered"), same(m["centered"])),
        ((*mod, "transposed"), lambda v: isinstance(v, bool)),
        ((*mod, "p"), same(p)),
        ((*mod, "storage"), lambda v: _int(v) and v >= 0),
        ((*mod, "raw"), lambda v: _int(v) and v >= 0),
        ((*mod, "coefficients"), _matrix(n, p)),
        ((*mod, "errors"), lambda v: isinstance(v, list) and len(v) == n and all(_num(e) and e >= 0 for e in v)),
        ((*mod, "singular_values"), lambda v: isinstance(v, list) and all(_num(x) for x in v)),
        ((*mod, "zero_tasks"), lambda v: isinstance(v, list) and all(_int(i) and 0 <= i < n for i in v)),
    ]  # fmt: skip


@FUZZ
@given(st.data(), st.one_of(json_values, st.just("(deleted)")))
def test_a_field_of_the_wrong_type_range_or_shape_is_one_error(bundle: tuple[Path, dict[str, Any]],
                                                               data: st.DataObject, value: Any) -> None:  # fmt: skip
    doc = copy.deepcopy(bundle[1])
    path, still_valid = data.draw(st.sampled_from(_cases(doc)))
    optional = path[-1] in ("zero_tasks",)
    assume(not (value == "(deleted)" and optional) and (value == "(deleted)" or not still_valid(value)))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if value == "(deleted)":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    assert_refused(reconstruct(bundle, doc), 1)


@FUZZ
@given(json_values)
def test_a_document_that_is_not_a_bundle_is_one_error(
    bundle: tuple[Path, dict[str, Any]], value: Any
) -> None:
    assume(value != bundle[1])
    assert_refused(reconstruct(bundle, value), 1, "coefficients.json")
