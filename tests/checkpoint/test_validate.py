"""The shared reader guards (spectra_cli.checkpoint.validate): regular files only, bounded JSON, typed fields."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from spectra_cli.checkpoint.validate import (
    MAX_DEPTH,
    Fields,
    JSONProblem,
    decode_json,
    json_depth,
    load_json,
    open_regular,
    require_regular_file,
    safe_member_name,
    type_name,
)
from spectra_cli.errors import CheckpointError, PolicyError


def test_open_regular_reads_a_file_and_refuses_everything_else(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    with open_regular(tmp_path / "f") as f:
        assert f.read() == b"abc"
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    cases = {
        tmp_path / "fifo": "a FIFO",
        tmp_path: "a folder",
        Path("/dev/null"): "a character device",
        tmp_path / "loop": "symlink loop",
        tmp_path / "missing": "no such",
    }
    for path, fragment in cases.items():
        with pytest.raises(CheckpointError, match=fragment):
            open_regular(path, "weights file")
        with pytest.raises(CheckpointError, match=fragment):
            require_regular_file(path, "weights file")


def test_the_error_class_is_the_callers(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such policy"):
        load_json(tmp_path / "missing", "policy", error=PolicyError)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "levels deep"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "levels deep"),
        (b'{"a": \xff}', "not UTF-8"),
        (b"{oops", "not valid JSON"),
        (b"1" * 5000, "not valid JSON"),  # more digits than Python converts
    ],
)
def test_decode_json_raises_only_json_problem(text: bytes, fragment: str) -> None:
    with pytest.raises(JSONProblem, match=fragment):
        decode_json(text)


def test_decode_json_accepts_the_depth_limit_and_finds_repeated_keys() -> None:
    assert json_depth(decode_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)) == MAX_DEPTH
    assert decode_json(b'{"a": 1, "a": 2}') == {"a": 2}
    with pytest.raises(JSONProblem, match="'a' appears twice"):
        decode_json(b'{"a": 1, "a": 2}', unique_keys=True)


def test_load_json_names_the_file_and_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text("[" * 1000 + "]" * 1000)
    with pytest.raises(
        CheckpointError, match=r"c\.json: the config is nested more than 64 levels deep; re-save"
    ):
        load_json(tmp_path / "c.json", "config", "re-save it")


def test_json_depth_does_not_recurse() -> None:
    deep: Any = 1
    for _ in range(50_000):
        deep = {"a": [deep]}
    assert json_depth(deep) == 100_000
    assert json_depth(deep, stop=10) == 11


def test_fields_check_types_and_ranges() -> None:
    f = Fields({"r": 4, "alpha": 8.0, "name": "x", "flag": True, "none": None}, "cfg.json", hint="fix it")
    assert (f.integer("r", minimum=1), f.number("alpha"), f.text("name"), f.flag("flag")) == (
        4,
        8.0,
        "x",
        True,
    )
    assert f.integer("none", 7) == 7 and f.integer("absent", None) is None
    bad = {
        "r": ({"r": "four"}, "cfg.json: 'r' must be a whole number ≥ 1, not a string; fix it"),
        "zero": ({"r": 0}, "'r' must be a whole number ≥ 1, not 0"),
        "bool": ({"r": True}, "not true"),
        "float": ({"r": 2.0}, "not the number 2.0"),
        "missing": ({}, "'r' is missing"),
        "null": ({"r": None}, "not null"),
    }
    for obj, message in bad.values():
        with pytest.raises(CheckpointError, match=message):
            Fields(obj, "cfg.json", hint="fix it").integer("r", minimum=1)
    with pytest.raises(CheckpointError, match="'a' must be a finite number, not Infinity"):
        Fields({"a": float("inf")}, "c").number("a")
    with pytest.raises(CheckpointError, match="must be a JSON object, not a list"):
        Fields([1], "c")


@pytest.mark.parametrize(
    ("name", "ok"),
    [("model-00001.safetensors", True), ("../x", False), ("/etc/passwd", False), ("a/b", False), ("a\\b", False),
     ("..", False), (".", False), ("", False), ("x\0", False), (3, False), (None, False)],
)  # fmt: skip
def test_safe_member_names(name: Any, ok: bool) -> None:
    assert (safe_member_name(name) is None) is ok


def test_type_names_in_messages() -> None:
    assert [type_name(v) for v in (None, True, float("nan"), -float("inf"), 2**200, 3, "s", [], {})] == [
        "null", "true", "NaN", "-Infinity", "a huge number", "the number 3", "a string", "a list", "an object",
    ]  # fmt: skip
    assert json.dumps(type_name(10**5000)) == '"a huge number"'
