"""Writing checkpoints: a patched copy of a safetensors checkpoint, and a PEFT LoRA adapter.

Outputs are staged under a temporary name beside the destination and renamed into place only when complete,
so an interrupted run leaves no half-written checkpoint. Inputs are never opened for writing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.adapter import Adapter, pattern_value
from spectra_cli.checkpoint.safetensors_io import read_header, read_rows, write_safetensors
from spectra_cli.checkpoint.source import TORCH_SUFFIXES, Checkpoint
from spectra_cli.checkpoint.tensors import (
    DTYPE_CODES,
    DTYPE_NAMES,
    DTYPES,
    RawTensor,
    TensorInfo,
    from_float,
    to_float,
)
from spectra_cli.errors import CheckpointError, ShapeMismatch, SpectraError

# files that make a folder a model: never copied from a model folder beside the residual's own
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES, ".h5", ".msgpack", ".onnx", ".gguf", ".ot")


def prepare_output(out: Path, force: bool, inputs: list[Path]) -> Path:
    """Check the destination folder, take its lock (:func:`~spectra_cli.checkpoint.output.lock_output`: a second
    run into the same folder fails here, before any work) and return a fresh staging folder beside it.

    A symlink is followed: its target folder is what gets replaced, the link stays. Anything there that is not
    a folder (a file, a device, a FIFO) is refused, even with ``force``: only a folder is ever replaced.
    :func:`commit_output` moves the staging folder into place and releases the lock; :func:`discard_output`
    removes it and releases the lock."""
    from spectra_cli.checkpoint.output import held_lock, is_stdout, lock_output

    if is_stdout(out):
        raise SpectraError("-: an output folder cannot go to stdout; give --out a folder path")
    out = Path(out)
    real = Path(os.path.realpath(out))
    for src in inputs:
        s, d = Path(src).resolve(), real
        if d == s or s in d.parents or d in s.parents:
            raise SpectraError(f"{out}: the output must not be inside (or contain) an input ({src})")
    _check_destination(out, real, force)
    if real == Path(real.anchor):
        raise SpectraError(f"{out}: cannot replace the root folder; choose another --out")
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpectraError(f"{real.parent}: cannot create the folder ({e.strerror or e})") from e
    stale = held_lock(real)
    if stale is not None and stale.stage is not None and not stale.stage.exists():
        stale.release()  # a run of this process that failed and removed its stage without discard_output
    lock = lock_output(out, "--out")
    try:
        _check_destination(out, real, force)  # again, now that no other run can change it
        stage = real.parent / f".{real.name}.tmp-{os.getpid()}"
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir()
    except BaseException:
        lock.release()
        raise
    lock.stage = stage
    return stage


def _check_destination(out: Path, real: Path, force: bool) -> None:
    if not os.path.lexists(real):
        return
    if not real.is_dir():
        what = "a symlink to a file" if out.is_symlink() else "not a folder"
        raise SpectraError(f"{out} is {what}; --out writes a folder: choose another path (--force only replaces a folder)")
    if not force:
        raise SpectraError(f"{out} already exists; choose another --out or pass --force to replace it")


def commit_output(stage: Path, out: Path) -> None:
    """Move a complete staging folder to its destination (replacing an old folder when --force was given; a
    symlink's target folder, the link stays) and release the destination's lock."""
    from spectra_cli.checkpoint.output import held_lock

    real = Path(os.path.realpath(out))
    try:
        if os.path.lexists(real):
            if not real.is_dir():
                raise SpectraError(f"{out} is no longer a folder; nothing was written there")
            old = real.parent / f".{real.name}.old-{os.getpid()}"
            real.rename(old)
            stage.rename(real)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(real)
    finally:
        lock = held_lock(real)
        if lock is not None and lock.stage == stage:
            lock.release()


def discard_output(stage: Path, out: Path) -> None:
    """Remove a staging folder (the run failed or was interrupted) and release the destination's lock."""
    from spectra_cli.checkpoint.output import held_lock

    shutil.rmtree(stage, ignore_errors=True)
    lock = held_lock(out)
    if lock is not None and lock.stage == stage:
        lock.release()


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


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA factors as stored: ``a`` lora_A (r×in for a linear layer), ``b`` lora_B (out×r), its α,
    and the stored tensor names (default ``base_model.model.<module>.lora_A.weight`` / ``….lora_B.weight``).
    Rank r = ``a.shape[0]``."""

    a: np.ndarray
    b: np.ndarray
    alpha: float
    keys: tuple[str, str] | None = None


def _most_common(values: Sequence[Any]) -> Any:
    counts = Counter(values)
    best = max(counts.values())
    return max(v for v, c in counts.items() if c == best)


def json_number(x: float) -> float | int:
    """``x`` as a JSON int when it is integral (α = 16, not 16.0), else a float."""
    return int(x) if float(x).is_integer() else float(x)


def lora_config(
    modules: Mapping[str, tuple[int, float]], base: str, rslora: bool, fan_in_fan_out: bool,
    init_lora_weights: bool | str = True,
) -> dict[str, Any]:
    """A fresh PEFT LoRA config for modules path → (rank, α): ``r``/``lora_alpha`` the most common values, exact
    escaped module paths in ``rank_pattern``/``alpha_pattern`` for the others (PEFT's first-match rule).
    ``init_lora_weights`` True loads the factors as they are; a PEFT variant's name ("mica") also selects it."""
    r0 = int(_most_common([r for r, _ in modules.values()]))
    a0 = _most_common([a for r, a in modules.values() if r == r0])
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base,
        "r": r0,
        "lora_alpha": json_number(a0),
        "target_modules": sorted(modules),
        "rank_pattern": {_escape(p): int(r) for p, (r, _) in modules.items() if r != r0},
        "alpha_pattern": {_escape(p): json_number(a) for p, (_, a) in modules.items() if a != a0},
        "use_rslora": rslora,
        "init_lora_weights": init_lora_weights,
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": None,
        "inference_mode": True,
    }


def write_lora_adapter(
    stage: Path,
    modules: Mapping[str, LoraFactors],
    *,
    config: Mapping[str, Any] | None = None,
    base: str = "",
    rslora: bool = False,
    fan_in_fan_out: bool = False,
    tensors: Mapping[str, RawTensor | np.ndarray] | None = None,
    init_lora_weights: bool | str = True,
) -> dict[str, Any]:
    """Write a complete PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` with
    metadata ``{"format": "pt"}``) into ``stage``; returns the config written.

    ``modules`` maps module path → factors. Without ``config`` a fresh config is made (:func:`lora_config`
    from ``base``, ``rslora``, ``fan_in_fan_out``); with one (an existing adapter's), every module given gets
    its exact escaped path in ``rank_pattern``/``alpha_pattern`` *before* the existing keys (PEFT takes the
    first matching key), the rest of the config is kept. Factors are stored float32 (float64 arrays as
    float64): pre-scaled factors in half precision would make the update inexact. ``tensors`` are further
    tensors written as they are (e.g. an adapter's untouched factors), in their order, with each module's
    factors in place of a tensor of the same name (or after them)."""
    if config is None:
        cfg = lora_config(
            {p: (int(f.a.shape[0]), f.alpha) for p, f in modules.items()}, base, rslora, fan_in_fan_out,
            init_lora_weights,
        )
    else:
        cfg = json.loads(json.dumps(config))
        new_r = {_escape(p): int(f.a.shape[0]) for p, f in modules.items()}
        new_a = {_escape(p): json_number(f.alpha) for p, f in modules.items()}
        old_r, old_a = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        cfg["rank_pattern"] = {**new_r, **{k: v for k, v in old_r.items() if k not in new_r}}
        cfg["alpha_pattern"] = {**new_a, **{k: v for k, v in old_a.items() if k not in new_a}}
    factors: dict[str, np.ndarray] = {}
    for p, f in modules.items():
        r = int(pattern_value(cfg.get("rank_pattern"), p, cfg.get("r")))
        if r != f.a.shape[0] or r != f.b.shape[-1]:
            raise RuntimeError(f"{p}: the adapter config gives rank {r}, the factors have {f.a.shape[0]}")
        ka, kb = f.keys or (f"base_model.model.{p}.lora_A.weight", f"base_model.model.{p}.lora_B.weight")
        for key, x in ((ka, f.a), (kb, f.b)):
            factors[key] = np.ascontiguousarray(x, np.float64 if x.dtype == np.float64 else np.float32)
    out: dict[str, RawTensor | np.ndarray] = {}
    for name, t in (tensors or {}).items():
        out[name] = factors.pop(name, t)
    out.update(factors)
    write_safetensors(stage / "adapter_model.safetensors", out, {"format": "pt"})
    (stage / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def write_adapter(adapter: Adapter, extra: Mapping[str, tuple[np.ndarray, np.ndarray]], stage: Path) -> None:
    """Write ``adapter`` with extra rank added to some modules, exactly: for module path p with extra factors
    (B_x out×q, A_x q×in) in the logical orientation, the new update s·B·A + B_x·A_x is stored as
    A′ = [A; A_x], B′ = [s·B, B_x] with scale 1 (rank_pattern / alpha_pattern set for p)."""
    rslora = bool(adapter.config.get("use_rslora", False))
    by_path = {m.path: m for m in adapter.modules}
    modules: dict[str, LoraFactors] = {}
    for path, (bx, ax) in extra.items():
        mod = by_path[path]
        b, a = adapter.factors(mod)
        if mod.embedding:
            bx, ax = ax.T, bx.T  # embedding factors hold (B·A)ᵀ of the vocab×dim weight
        new_b = np.concatenate([mod.scale * b, bx], axis=1)
        new_a = np.concatenate([a, ax], axis=0)
        r_new = new_a.shape[0]
        dt = np.float64 if mod.a.dtype == "F64" else np.float32
        modules[path] = LoraFactors(
            new_a.astype(dt), new_b.astype(np.float64 if mod.b.dtype == "F64" else np.float32),
            float(np.sqrt(r_new)) if rslora else float(r_new), (mod.a.name, mod.b.name),
        )  # fmt: skip
    src = Path(adapter.path)
    for f in src.iterdir():
        if f.is_file() and f.name not in {
            "adapter_model.safetensors",
            "adapter_model.bin",
            "adapter_config.json",
        }:
            shutil.copy2(f, stage / f.name)
    ck = adapter.checkpoint
    write_lora_adapter(
        stage, modules, config=adapter.config, tensors={t.name: ck.read(t) for t in ck.tensors}
    )


class ResidualWriter:
    """Writes the residual checkpoint in the input's layout, streaming: tensors are written in read order;
    :meth:`put` gives a target's new data (stored orientation, raw bytes in the output dtype) and copies
    every tensor before it; :meth:`finish` copies the rest. Non-target tensors are copied bit for bit
    (converted when ``dtype`` changes the floating tensors' dtype)."""

    def __init__(self, ckpt: Checkpoint, stage: Path, dtype: str | None) -> None:
        if any(t.offset is None for t in ckpt.tensors):
            raise CheckpointError(
                f"{ckpt.path}: writing a residual model needs safetensors input; convert the .bin/.pt "
                "checkpoint first (e.g. save it with `save_pretrained(..., safe_serialization=True)`)"
            )
        self.ckpt, self.stage, self.dtype = ckpt, stage, dtype
        src = Path(ckpt.path)
        if src.is_file() and src.name.endswith(".index.json"):
            src = src.parent  # the index names a sharded folder: write the folder
        self.src = src
        self.root = src if src.is_dir() else src.parent
        self.skipped_files: list[str] = []
        self._copy_side_files(src)
        self.order = list(ckpt.tensors)
        self.pos = 0
        self.out_code = {t.name: self._code(t) for t in self.order}
        self._fd: int | None = None
        self._file: Path | None = None
        self.sizes: dict[Path, int] = {}

    def _code(self, t: TensorInfo) -> str:
        return DTYPE_CODES[self.dtype] if self.dtype and t.is_float and t.dtype in DTYPE_NAMES else t.dtype

    def code_for(self, info: TensorInfo) -> str:
        return self.out_code[info.name]

    def _copy_side_files(self, src: Path) -> None:
        if not src.is_dir():
            return
        weights = {f.resolve() for f in self.ckpt.files}
        for f in sorted(src.iterdir()):
            if f.is_dir():
                if any(g.name.endswith(WEIGHT_SUFFIXES) for g in f.rglob("*")):
                    self.skipped_files.append(f.name + "/")
                else:
                    shutil.copytree(f, self.stage / f.name)
            elif f.resolve() in weights:
                continue
            elif f.name.endswith(WEIGHT_SUFFIXES) or (f.name.endswith(".index.json") and f.name != _INDEX):
                self.skipped_files.append(f.name)
            elif f.name == _INDEX:
                continue  # rewritten by finish()
            else:
                shutil.copy2(f, self.stage / f.name)
        cfg = self.stage / "config.json"
        if self.dtype and cfg.is_file():
            data = json.loads(cfg.read_text())
            for key in ("torch_dtype", "dtype"):
                if key in data:
                    data[key] = self.dtype
            cfg.write_text(json.dumps(data, indent=2) + "\n")

    def _open(self, file: Path) -> None:
        self._close()
        infos, meta = read_header(file)
        header: dict[str, Any] = {"__metadata__": meta} if meta else {}
        pos = 0
        for t in infos:
            code = self.out_code[t.name]
            nbytes = t.numel * DTYPES[code][0]
            header[t.name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        target = self.stage / file.relative_to(self.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._fd, struct.pack("<Q", len(blob)) + blob)
        self._file = file
        self.sizes[file] = pos

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self, data: np.ndarray) -> None:
        assert self._fd is not None
        view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8).data)
        while len(view):
            n = os.write(self._fd, view)
            view = view[n:]

    def _copy(self, t: TensorInfo) -> None:
        rows = t.shape[0] if t.shape else 1
        row_bytes = max(t.nbytes // max(rows, 1), 1)
        step = max(1, (64 << 20) // row_bytes)
        code = self.out_code[t.name]
        for a in range(0, max(rows, 1), step):
            raw = read_rows(t, a, a + step) if t.shape else read_rows(t)
            self._write(raw.data if code == t.dtype else from_float(to_float(raw, np.float64), code).data)

    def _advance(self, until: TensorInfo | None) -> None:
        while self.pos < len(self.order):
            t = self.order[self.pos]
            if until is not None and t.name == until.name:
                return
            if t.file != self._file:
                self._open(t.file)
            self._copy(t)
            self.pos += 1
        if until is not None:
            raise RuntimeError(f"{until.name} was put out of read order")

    def put(self, info: TensorInfo, raw: RawTensor) -> None:
        """Write ``raw`` (the whole tensor, dtype ``code_for(info)``) in place of ``info``."""
        self._advance(info)
        if info.file != self._file:
            self._open(info.file)
        if raw.dtype != self.out_code[info.name] or raw.data.size != info.numel:
            raise ShapeMismatch(f"{info.name}: residual of {raw.data.size} {raw.dtype} values does not fit")
        self._write(raw.data)
        self.pos += 1

    def finish(self) -> None:
        self._advance(None)
        self._close()
        src = self.src
        index = src / _INDEX if src.is_dir() else None
        if index is not None and index.is_file():
            data = json.loads(index.read_text())
            data.setdefault("metadata", {})["total_size"] = int(sum(self.sizes.values()))
            (self.stage / _INDEX).write_text(json.dumps(data, indent=2) + "\n")

    def abort(self) -> None:
        self._close()


_INDEX = "model.safetensors.index.json"
