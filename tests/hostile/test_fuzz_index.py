"""Fuzzing ``model.safetensors.index.json`` through ``spectra analyze FOLDER``: shard names of every type, paths
that leave the folder, a weight_map of any shape. Beside the checkpoint folder lies a FIFO reachable as
``../outside.safetensors`` and a regular file whose size must never appear in a message: a name is checked
before any file is opened, so neither a hang nor a leak is possible."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fixtures.checkpoints import write_safetensors
from tests.hostile.helpers import FUZZ, assert_refused, cli, json_values, no_hang

SECRET_SIZE = 123457  # the size of ../secret.safetensors: it must never be shown
INDEX: dict[str, Any] = {
    "metadata": {"total_size": 128},
    "weight_map": {
        "layers.0.mlp.up_proj.weight": "model-00001-of-00002.safetensors",
        "layers.0.mlp.down_proj.weight": "model-00002-of-00002.safetensors",
    },
}
TENSORS = list(INDEX["weight_map"])


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ROOT/model`` (two shards and their index) beside ``ROOT/outside.safetensors`` (a FIFO) and
    ``ROOT/secret.safetensors``."""
    root = tmp_path_factory.mktemp("index")
    rng = np.random.default_rng(0)
    for i, (name, shard) in enumerate(INDEX["weight_map"].items()):
        write_safetensors(root / "model" / shard, {name: rng.standard_normal((4, 4)).astype(np.float32) + i})
    os.mkfifo(root / "outside.safetensors")
    (root / "secret.safetensors").write_bytes(b"\0" * SECRET_SIZE)
    return root / "model"


def analyze(model: Path, index: Any) -> Any:
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return cli("analyze", model, "-f", "json")


def test_the_unmutated_index_is_valid(model: Path) -> None:
    r = analyze(model, INDEX)
    assert r.exit_code == 0 and len(json.loads(r.stdout)["rows"]) == 2


escaping = st.one_of(
    st.sampled_from([
        "../outside.safetensors", "../secret.safetensors", "/dev/zero", "/etc/passwd", "~/x.safetensors",
        "..", ".", "", "model/../../outside.safetensors", "./model-00001-of-00002.safetensors",
        "sub/model-00001-of-00002.safetensors", "..\\outside.safetensors", "model-00001-of-00002.safetensors\0",
    ]),
    st.text(max_size=3).map(lambda t: f"../{t}outside.safetensors"),
)  # fmt: skip


@FUZZ
@given(st.sampled_from(TENSORS), st.one_of(json_values, escaping))
def test_a_shard_name_that_is_not_its_plain_file_name_is_one_error(
    model: Path, tensor: str, shard: Any
) -> None:
    index = copy.deepcopy(INDEX)
    assume(shard != index["weight_map"][tensor])
    index["weight_map"][tensor] = shard
    with no_hang():  # ../outside.safetensors is a FIFO: opening it before checking the name would block
        line = assert_refused(analyze(model, index), 1, "model.safetensors.index.json")
    assert str(SECRET_SIZE) not in line


@FUZZ
@given(json_values)
def test_a_weight_map_that_is_not_a_map_is_one_error(model: Path, value: Any) -> None:
    assume(value != INDEX["weight_map"])
    assert_refused(analyze(model, {**INDEX, "weight_map": value}), 1, "index")


@FUZZ
@given(json_values)
def test_an_index_that_is_not_an_object_is_one_error(model: Path, value: Any) -> None:
    assume(not isinstance(value, dict) or "weight_map" not in value)
    assert_refused(analyze(model, value), 1, "index")
