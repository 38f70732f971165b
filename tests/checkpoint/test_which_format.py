"""A folder with both safetensors and PyTorch weights says which one it reads."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from fixtures.checkpoints import write_safetensors
from spectra_cli.checkpoint.source import open_checkpoint


def test_a_folder_with_both_formats_names_the_one_it_reads(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model.safetensors", {"w": np.ones((4, 4), np.float32)})
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.warns(UserWarning, match=r"both safetensors and PyTorch weights; reading model.safetensors"):
        ckpt = open_checkpoint(tmp_path)
    assert [t.name for t in ckpt.tensors] == ["w"]


def test_a_folder_with_one_format_is_silent(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model.safetensors", {"w": np.ones((4, 4), np.float32)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_checkpoint(tmp_path)
