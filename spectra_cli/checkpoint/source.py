"""Opening a checkpoint by path: detect the format, list its tensors lazily, read one tensor at a time.

Accepted: a single ``.safetensors`` file; a folder with sharded safetensors and
``model.safetensors.index.json``; a Hugging Face model folder (``config.json`` + weights); PyTorch
``.bin`` / ``.pt`` / ``.pth`` files (``weights_only=True``; ``{"state_dict": ...}`` / ``{"model": ...}``
wrappers unwrapped), also sharded with ``pytorch_model.bin.index.json``; a PEFT adapter folder.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint import safetensors_io as st
from spectra_cli.checkpoint.tensors import RawTensor, TensorInfo
from spectra_cli.checkpoint.validate import Fields, load_json, require_regular_file, safe_member_name
from spectra_cli.errors import CheckpointError

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.bin",
)


@dataclass
class Checkpoint:
    """A lazily opened checkpoint. ``tensors`` lists every tensor in read order (shard order, then offset)."""

    path: Path
    format: str
    files: list[Path]
    tensors: list[TensorInfo]
    config: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    _torch_tensors: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.tensors}

    def info(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def read(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> RawTensor:
        """Read rows ``start:stop`` of a tensor (the whole tensor by default) in its stored dtype."""
        if info.offset is not None:
            return st.read_rows(info, start, stop)
        t = self._torch_tensors[info.name]
        return _torch_to_raw(t[start:stop] if (start or stop is not None) else t)

    def read_columns(
        self,
        info: TensorInfo,
        shape2d: tuple[int, int],
        start: int,
        stop: int,
        row_start: int = 0,
        row_stop: int | None = None,
    ) -> RawTensor:
        """Read columns ``start:stop`` of rows ``row_start:row_stop`` of the tensor viewed as ``shape2d``."""
        if info.offset is not None:
            return st.read_columns(info, shape2d, start, stop, row_start, row_stop)
        return _torch_to_raw(self._torch_tensors[info.name].reshape(shape2d)[row_start:row_stop, start:stop])

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint; raise :class:`CheckpointError` with a clear message when the path is not one."""
    p = Path(path).expanduser()
    try:
        is_dir = stat.S_ISDIR(os.stat(p).st_mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(
                f"{p}: a symlink loop (the link points back at itself); give the checkpoint itself"
            ) from None
        if isinstance(e, FileNotFoundError | NotADirectoryError):
            raise CheckpointError(f"{p}: no such file or directory") from None
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e})") from None
    if is_dir:
        return _open_dir(p)
    name = p.name
    if name.endswith(".safetensors"):
        return _open_safetensors([p], p, "safetensors")
    if name.endswith(".index.json"):
        return _open_index(p, p.parent)
    if name.endswith(TORCH_SUFFIXES):
        return _open_torch([p], p, "torch")
    raise CheckpointError(
        f"{p}: unknown checkpoint format; expected a .safetensors file, a .bin/.pt/.pth file, "
        "a *.index.json, or a model folder"
    )


#: config.json fields spectra reads (model_type to tell GPT-2's Conv1D layout, the head counts to split fused
#: projections), with their types checked when present
_CONFIG_INTS = ("num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "multi_query_group_num",
                "hidden_size", "n_embd", "head_dim")  # fmt: skip


def _read_config(folder: Path) -> dict[str, Any] | None:
    for name in ("config.json", "adapter_config.json"):
        f = folder / name
        if os.path.lexists(f):
            data = load_json(f, name, "re-save it (save_pretrained) or remove it")
            fields = Fields(data, str(f), "re-save it (save_pretrained) or fix that field")
            fields.text("model_type", None)
            for key in _CONFIG_INTS:
                fields.integer(key, None, minimum=1)
            return fields.obj
    return None


#: what a Hugging Face Trainer checkpoint keeps beside the weights: training state, not a second set of weights
_TRAINER_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "scaler.pt"}


def _say_which(folder: Path, used: str) -> None:
    """Warn when ``folder`` holds weights in both formats: which one is read, and how to choose the other."""
    safetensors = any(folder.glob("*.safetensors"))
    torch_files = any(f.name.endswith(TORCH_SUFFIXES) and f.name not in _TRAINER_STATE for f in folder.iterdir())
    if safetensors and torch_files:
        import warnings

        other = "the .bin/.pt file" if used.endswith((".safetensors", ".safetensors.index.json")) else "a .safetensors file"
        warnings.warn(f"{folder} holds both safetensors and PyTorch weights; reading {used} (pass {other} itself to "
                      "read that one)", stacklevel=2)  # fmt: skip


def _open_dir(folder: Path) -> Checkpoint:
    for name in _WEIGHT_FILES:
        f = folder / name
        if os.path.lexists(f):
            if os.path.isdir(f):
                raise CheckpointError(
                    f"{f}: is a folder, not a weights file; remove it or give the weights file"
                )
            _say_which(folder, name)
            return (
                open_checkpoint(f)
                if name.endswith(".index.json")
                else _with_config(open_checkpoint(f), folder)
            )
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        _say_which(folder, "*.safetensors")
        return _with_config(_open_safetensors(shards, folder, "safetensors-folder"), folder)
    indexes = sorted(folder.glob("*.index.json"))
    if indexes:
        return _open_index(indexes[0], folder)
    torch_files = sorted(f for f in folder.iterdir() if f.name.endswith(TORCH_SUFFIXES))
    if len(torch_files) == 1:
        return _with_config(_open_torch(torch_files, folder, "torch"), folder)
    raise CheckpointError(
        f"{folder}: no weights found (looked for {', '.join(_WEIGHT_FILES[:3])}, *.safetensors, "
        "*.index.json and a single .bin/.pt file)"
    )


def _with_config(ckpt: Checkpoint, folder: Path) -> Checkpoint:
    ckpt.path = folder
    ckpt.config = _read_config(folder)
    return ckpt


def _open_index(index: Path, folder: Path) -> Checkpoint:
    """A sharded checkpoint by its index. Every shard name is checked *before* any file is opened: a plain
    file name in the index's folder (no folder part, no ``..``, not absolute), then a regular file."""
    hint = (
        "not a valid index file (it needs a 'weight_map' object of tensor name → shard file name); re-save "
        "the model (save_pretrained)"
    )
    data = load_json(index, "index file", hint)
    weight_map = Fields(data, str(index), hint).mapping("weight_map")
    if not weight_map:
        raise CheckpointError(f"{index}: the weight_map is empty; {hint}")
    for tname, shard in weight_map.items():
        why = safe_member_name(shard)
        if why is not None:
            shown = repr(shard[:80]) if isinstance(shard, str) else ""
            raise CheckpointError(
                f"{index}: the shard of tensor {tname[:80]!r}, {shown or 'its value'}, {why}; the index must "
                "name files beside it"
            )
    shard_names = sorted(set(weight_map.values()))
    shards = [index.parent / s for s in shard_names]
    for s in shards:
        if not os.path.lexists(s):
            raise CheckpointError(f"{index}: names shard {s.name} which does not exist in {index.parent}")
        require_regular_file(s, "shard")
    fmt = "torch-sharded" if all(s.name.endswith(TORCH_SUFFIXES) for s in shards) else "safetensors-sharded"
    ckpt = (
        _open_torch(shards, folder, fmt) if fmt == "torch-sharded" else _open_safetensors(shards, folder, fmt)
    )
    present = {t.name: t.file.name for t in ckpt.tensors}
    for tname, shard in weight_map.items():
        if present.get(tname) != shard:
            raise CheckpointError(f"{index}: tensor {tname!r} is listed in {shard} but not found there")
    ckpt.config = _read_config(folder)
    return ckpt


def _open_safetensors(files: list[Path], path: Path, fmt: str) -> Checkpoint:
    tensors: list[TensorInfo] = []
    metadata: dict[str, str] = {}
    for f in files:
        infos, meta = st.read_header(f)
        tensors.extend(infos)
        metadata.update(meta)
    _refuse_duplicates(tensors, path)
    return Checkpoint(path=path, format=fmt, files=list(files), tensors=tensors, metadata=metadata)


def _refuse_duplicates(tensors: list[TensorInfo], path: Path) -> None:
    """Several weight files that hold the same tensor (e.g. two copies of a model in one folder) are ambiguous:
    which one is meant? Refuse rather than analyse both or silently pick one."""
    seen: dict[str, Path] = {}
    for t in tensors:
        first = seen.setdefault(t.name, t.file)
        if first != t.file:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} is in both {first.name} and {t.file.name}; point at one weight "
                "file, or keep one copy per tensor (sharded models need their .index.json)"
            )


# ---- torch pickles --------------------------------------------------------------------------------------

_TORCH_DTYPES = {
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
}


def _torch_code(t: Any) -> str:
    code = _TORCH_DTYPES.get(str(t.dtype))
    if code:
        return code
    s = str(t.dtype).replace("torch.", "")
    if s.startswith("float8"):
        return "F8_E4M3" if "e4m3" in s else "F8_E5M2"
    return {"int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}.get(
        s, "I64"
    )


def _torch_to_raw(t: Any) -> RawTensor:
    import torch

    code = _torch_code(t)
    t = t.detach().cpu().contiguous()
    if code == "BF16":
        return RawTensor(t.view(torch.int16).numpy().view(np.uint16), code)
    return RawTensor(t.numpy(), code)


def flatten_tensors(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    """Collect the tensors of nested dicts into ``out`` under dotted names (``a.b.c``)."""
    import torch

    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            flatten_tensors(f"{prefix}.{k}" if prefix else str(k), v, out)


def _unwrap(obj: Any, path: Path) -> dict[str, Any]:
    import torch

    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        flat: dict[str, Any] = {}
        flatten_tensors("", obj, flat)
        if flat:
            return flat
    raise CheckpointError(
        f"{path}: the pickle holds no dict of tensors (got {type(obj).__name__}); "
        "save a state_dict (torch.save(model.state_dict(), ...))"
    )


def _open_torch(files: list[Path], path: Path, fmt: str) -> Checkpoint:
    for f in files:  # before importing torch (seconds): a FIFO or a device is refused at once
        require_regular_file(f, "PyTorch weights file")
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency
        raise CheckpointError(f"{path}: reading .bin/.pt files needs PyTorch (pip install torch)") from e
    tensors: dict[str, Any] = {}
    infos: list[TensorInfo] = []
    for f in files:
        obj = _torch_load(torch, f)
        for name, t in _unwrap(obj, f).items():
            tensors[name] = t
            infos.append(TensorInfo(name=name, shape=tuple(t.shape), dtype=_torch_code(t), file=f))
    _refuse_duplicates(infos, path)
    return Checkpoint(path=path, format=fmt, files=list(files), tensors=infos, _torch_tensors=tensors)


def _torch_load(torch: Any, f: Path) -> Any:
    require_regular_file(f, "PyTorch weights file")
    mmap = zipfile.is_zipfile(f)
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types here: all mean "not a readable weights-only pickle"
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
        msg = text.splitlines()[0] if text else type(e).__name__
        raise CheckpointError(
            f"{f}: cannot load as a PyTorch weights file ({msg[:200]}); "
            "it may be truncated, or contain objects other than tensors (only weights_only pickles are read)"
        ) from e


def checkpoint_inputs(ckpt: Checkpoint) -> dict[str, Any]:
    return {
        "checkpoint": str(ckpt.path),
        "format": ckpt.format,
        "files": len(ckpt.files),
        "bytes": ckpt.total_bytes,
        "model_type": (ckpt.config or {}).get("model_type"),
    }
