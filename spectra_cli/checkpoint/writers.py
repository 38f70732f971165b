"""Writing checkpoints: a patched copy of a safetensors checkpoint, and a PEFT LoRA adapter.

Outputs are staged under a temporary name beside the destination and renamed into place only when complete,
so an interrupted run leaves no half-written checkpoint. Inputs are never opened for writing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from spectra_cli.checkpoint.adapter import Adapter
from spectra_cli.checkpoint.safetensors_io import write_safetensors
from spectra_cli.checkpoint.source import Checkpoint
from spectra_cli.checkpoint.tensors import RawTensor, TensorInfo, from_float
from spectra_cli.errors import CheckpointError, SpectraError


def prepare_output(out: Path, force: bool, inputs: list[Path]) -> Path:
    """Check the destination and return a fresh staging folder beside it."""
    out = Path(out)
    for src in inputs:
        s, d = Path(src).resolve(), out.resolve()
        if d == s or s in d.parents or d in s.parents:
            raise SpectraError(f"{out}: the output must not be inside (or contain) an input ({src})")
    if out.exists() and not force:
        raise SpectraError(f"{out} already exists; choose another --out or pass --force to replace it")
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def commit_output(stage: Path, out: Path) -> None:
    """Move a complete staging folder to its destination (replacing an old one when --force was given)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.rename(out)


class PatchedCopy:
    """A copy of a safetensors checkpoint in a staging folder whose tensors can be overwritten in place.

    Shapes and dtypes do not change, so the copied headers stay valid and only the tensor bytes are
    rewritten (positioned writes into the copy).
    """

    def __init__(self, ckpt: Checkpoint, stage: Path) -> None:
        if any(t.offset is None for t in ckpt.tensors):
            raise CheckpointError(
                f"{ckpt.path}: writing a modified checkpoint needs safetensors input; convert the .bin/.pt file "
                "first (e.g. with safetensors.torch.save_file)"
            )
        self.ckpt = ckpt
        self.stage = stage
        src = Path(ckpt.path)
        if src.is_dir():
            shutil.copytree(src, stage, dirs_exist_ok=True)
        else:
            shutil.copy2(src, stage / src.name)
        self._root = src if src.is_dir() else src.parent

    def patch(self, info: TensorInfo, data: np.ndarray) -> None:
        """Overwrite ``info`` with ``data`` (any float array of the tensor's size), cast to its stored dtype."""
        raw = from_float(np.asarray(data).reshape(info.shape), info.dtype)
        target = self.stage / Path(info.file).relative_to(self._root)
        assert info.offset is not None
        buf = raw.data.reshape(-1).view(np.uint8)
        if buf.nbytes != info.nbytes:
            raise CheckpointError(f"{info.name}: new data has {buf.nbytes} bytes, expected {info.nbytes}")
        fd = os.open(target, os.O_WRONLY)
        try:
            os.pwrite(fd, buf.data, info.offset)
        finally:
            os.close(fd)


def _escape(path: str) -> str:
    return re.escape(path)


def write_adapter(adapter: Adapter, extra: Mapping[str, tuple[np.ndarray, np.ndarray]], stage: Path) -> None:
    """Write ``adapter`` with extra rank added to some modules, exactly: for module path p with extra factors
    (B_x out×q, A_x q×in) in the logical orientation, the new update s·B·A + B_x·A_x is stored as
    A′ = [A; A_x], B′ = [s·B, B_x] with scale 1 (rank_pattern / alpha_pattern set for p)."""
    cfg = json.loads(json.dumps(adapter.config))
    rslora = bool(cfg.get("use_rslora", False))
    new_ranks: dict[str, int] = {}
    new_alphas: dict[str, float] = {}
    by_path = {m.path: m for m in adapter.modules}
    tensors: dict[str, RawTensor | np.ndarray] = {}
    replaced: dict[str, np.ndarray] = {}
    for path, (bx, ax) in extra.items():
        mod = by_path[path]
        b, a = adapter.factors(mod)
        if mod.embedding:
            bx, ax = ax.T, bx.T  # embedding factors hold (B·A)ᵀ of the vocab×dim weight
        new_b = np.concatenate([mod.scale * b, bx], axis=1)
        new_a = np.concatenate([a, ax], axis=0)
        r_new = new_a.shape[0]
        replaced[mod.a.name] = new_a
        replaced[mod.b.name] = new_b
        key = _escape(path)
        new_ranks[key] = r_new
        new_alphas[key] = float(np.sqrt(r_new)) if rslora else float(r_new)
    for t in adapter.checkpoint.tensors:
        if t.name in replaced:
            tensors[t.name] = from_float(
                # float32 at least: s·B is pre-multiplied, so half precision would make the update inexact
                replaced[t.name],
                "F64" if t.dtype == "F64" else "F32",
            )
        else:
            tensors[t.name] = adapter.checkpoint.read(t)
    src = Path(adapter.path)
    for f in src.iterdir():
        if f.is_file() and f.name not in {
            "adapter_model.safetensors",
            "adapter_model.bin",
            "adapter_config.json",
        }:
            shutil.copy2(f, stage / f.name)
    write_safetensors(stage / "adapter_model.safetensors", tensors, {"format": "pt"})
    # PEFT takes the first matching key: the changed modules' exact keys go before any existing (broader) ones
    old_ranks, old_alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    cfg["rank_pattern"] = {**new_ranks, **{k: v for k, v in old_ranks.items() if k not in new_ranks}}
    cfg["alpha_pattern"] = {**new_alphas, **{k: v for k, v in old_alphas.items() if k not in new_alphas}}
    (stage / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
