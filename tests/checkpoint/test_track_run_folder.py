"""Checkpoint discovery for `spectra track` (checkpoint/run_folder.py) and its cache (checkpoint/spectra_cache.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fixtures.checkpoints import write_safetensors
from spectra_cli.checkpoint.run_folder import checkpoint_at, discover, parse_step, resolve_inputs
from spectra_cli.checkpoint.spectra_cache import CachedMatrix, SpectraCache
from spectra_cli.errors import SelectionError


@pytest.mark.parametrize(("name", "step"), [
    ("checkpoint-500", 500), ("global_step2000", 2000), ("epoch=3-step=1500.ckpt", 1500),
    ("epoch=12-step=99.ckpt", 99), ("step_1000", 1000), ("step-7.safetensors", 7), ("ckpt_1000.pt", 1000),
    ("model_01000.safetensors", 1000), ("final", None), ("run2-checkpoint-300", 300),
])  # fmt: skip
def test_parse_step(name: str, step: int | None) -> None:
    assert parse_step(name) == step


def _weights(path: Path) -> None:
    write_safetensors(path, {"layers.0.mlp.up_proj.weight": np.ones((4, 3), dtype=np.float32)})


def test_discover_orders_by_step_and_ignores_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    for step in (10000, 500, 1000):
        _weights(tmp_path / f"checkpoint-{step}" / "model.safetensors")
    (tmp_path / "checkpoint-1500").mkdir()  # no weights (being written, or emptied): not a checkpoint
    (tmp_path / "runs").mkdir()  # TensorBoard logs
    (tmp_path / "trainer_state.json").write_text("{}")
    (tmp_path / "last.ckpt").write_bytes(b"copy")
    _weights(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "step_20000.safetensors")
    found = discover(tmp_path)
    assert [(c.name, c.step, c.layout) for c in found] == [
        ("checkpoint-500", 500, "hf"), ("checkpoint-1000", 1000, "hf"), ("checkpoint-10000", 10000, "hf"),
        ("step_20000.safetensors", 20000, "file"),
    ]  # fmt: skip
    assert checkpoint_at(tmp_path / "checkpoint-1500") is None


def test_a_single_checkpoint_folder_is_not_taken_for_a_run(tmp_path: Path) -> None:
    _weights(tmp_path / "checkpoint-500" / "model.safetensors")
    got = resolve_inputs([(None, tmp_path / "checkpoint-500")])
    assert [(c.name, c.step) for c in got] == [("checkpoint-500", 500)]
    with pytest.raises(SelectionError, match="--steps: no checkpoint at step 7"):
        resolve_inputs([(None, tmp_path)], steps=(7,))
    with pytest.raises(SelectionError, match="distinct names"):
        resolve_inputs([("a", tmp_path / "checkpoint-500"), ("a", tmp_path / "checkpoint-500")])


def test_cache_round_trip_and_a_damaged_file_is_ignored(tmp_path: Path) -> None:
    c = SpectraCache(tmp_path / "cache", "s1")
    rec = {"name": "m", "tensor": "m.weight", "shape": [3, 2], "dtype": "float32", "depth": 0, "kind": "up_proj",
           "role": "mlp", "note": "", "nan_count": 0, "inf_count": 0}  # fmt: skip
    vs = {"intruders": 1, "relative_delta": float("inf")}
    path = c.store("k1", "ckpt", [CachedMatrix(rec, np.array([2.0, 1.0]), "b", vs)])
    (got,) = c.lookup("k1")["m"]
    assert got.values is not None and list(got.values) == [2.0, 1.0]
    assert got.base_key == "b" and got.vs_base == vs and got.previous_key is None
    assert SpectraCache(tmp_path / "cache", "s2").lookup("k1") == {}  # other settings: nothing
    path.write_bytes(path.read_bytes()[:40])
    assert c.lookup("k1") == {}
