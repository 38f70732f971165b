"""capture on Hugging Face folders that cannot be trusted: a checkpoint missing weights of the model its config
builds (transformers would initialise them at random, its warning muted), non-UTF-8 data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fixtures.capture_data import text_file, tiny_bert, tiny_llama
from fixtures.checkpoints import read_header, read_tensor, write_safetensors
from spectra_cli.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama": tiny_llama(root / "llama"),
        "bert": tiny_bert(root / "bert"),
        "data": text_file(root / "d.txt"),
    }


def _without(src: Path, dst: Path, drop: str) -> Path:
    """A copy of the model folder whose model.safetensors lacks the tensors whose name contains ``drop``."""
    shutil.copytree(src, dst)
    header, _ = read_header(src / "model.safetensors")
    kept = {
        name: read_tensor(src / "model.safetensors", name).astype("float32")
        for name in header
        if drop not in name
    }
    assert len(kept) < len(header)
    write_safetensors(dst / "model.safetensors", kept, {"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("kind", "drop"), [("llama", "layers.1.mlp.down_proj"), ("bert", "encoder.layer.0.output.dense")]
)
def test_capture_refuses_a_checkpoint_missing_weights(models: dict[str, Path], tmp_path: Path, kind: str,
                                                      drop: str) -> None:  # fmt: skip
    model = _without(models[kind], tmp_path / "model", drop)
    r = runner.invoke(
        app, ["capture", str(model), "--data", str(models["data"]), "--out", str(tmp_path / "a.safetensors")]
    )
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "lacks" in lines[0] and drop in lines[0] and "random" in lines[0], r.stderr
    assert not (tmp_path / "a.safetensors").exists()


def test_capture_accepts_the_complete_checkpoint(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "a.safetensors"
    r = runner.invoke(
        app, ["capture", str(models["llama"]), "--data", str(models["data"]), "--out", str(out), "-q"]
    )
    assert r.exit_code == 0, r.output
    assert out.is_file()


def test_capture_refuses_non_utf8_data(models: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "d.txt"
    data.write_bytes(b"a fine first line\n\xff\xfe not text\n")
    r = runner.invoke(
        app, ["capture", str(models["llama"]), "--data", str(data), "--out", str(tmp_path / "a.safetensors")]
    )
    assert r.exit_code == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "not UTF-8" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_capture_refuses_architectures_that_are_not_class_names(
    models: dict[str, Path], tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(models["llama"], model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "architectures": [["LlamaForCausalLM"]]}))
    r = runner.invoke(
        app, ["capture", str(model), "--data", str(models["data"]), "--out", str(tmp_path / "a.safetensors")]
    )
    assert r.exit_code == 1 and (r.exception is None or isinstance(r.exception, SystemExit))
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "architectures" in lines[0], r.stderr
