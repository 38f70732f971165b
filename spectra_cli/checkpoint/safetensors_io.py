"""A small, strict safetensors reader and writer.

We parse the header ourselves so that a truncated or corrupt file is detected before any work starts, and we
read tensors with positioned reads (``os.preadv``) into our own buffers: nothing is memory-mapped, so a
tensor's file pages never count towards the process's resident memory, and the page-cache copy is dropped
after reading (``posix_fadvise(DONTNEED)``).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from spectra_cli.checkpoint.output import open_output
from spectra_cli.checkpoint.tensors import DTYPES, RawTensor, TensorInfo
from spectra_cli.errors import CheckpointError

_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; return the tensors (in file order) and the metadata."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: truncated safetensors file ({size} bytes); re-download or re-save it"
                )
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: not a valid safetensors file (header length {n} does not fit in {size} bytes); "
                    "the file is truncated or not safetensors"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e}); re-download or re-save it") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start = 8 + n
    data_size = size - data_start
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from e
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        info = TensorInfo(name=name, shape=shape, dtype=dtype, file=path, offset=data_start + begin)
        if end - begin != info.nbytes or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} is declared {shape} {dtype} ({info.nbytes} bytes) "
                f"but spans {end - begin} bytes; the file is corrupt"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes; "
                "re-download or re-save it"
            )
        infos.append(info)
    infos.sort(key=lambda t: t.offset or 0)
    return infos, {str(k): str(v) for k, v in metadata.items()}


def _drop_cache(fd: int, offset: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _read_into(fd: int, buf: np.ndarray, offset: int) -> None:
    view = buf.reshape(-1).view(np.uint8).data
    done = 0
    total = len(view)
    while done < total:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CheckpointError(f"unexpected end of file while reading {total} bytes at offset {offset}")
        done += got


def read_rows(info: TensorInfo, start: int = 0, stop: int | None = None) -> RawTensor:
    """Read rows ``start:stop`` of the tensor's first axis (all of it by default), in its stored dtype."""
    assert info.offset is not None
    rows = info.shape[0] if info.shape else 1
    stop = rows if stop is None else min(stop, rows)
    row_shape = info.shape[1:]
    row_items = 1
    for d in row_shape:
        row_items *= d
    np_dtype = np.dtype(DTYPES[info.dtype][1])
    out = np.empty((stop - start, *row_shape) if info.shape else (), dtype=np_dtype)
    offset = info.offset + start * row_items * info.itemsize
    fd = os.open(info.file, os.O_RDONLY)
    try:
        if out.nbytes:
            _read_into(fd, out, offset)
            _drop_cache(fd, offset, out.nbytes)
    finally:
        os.close(fd)
    return RawTensor(out, info.dtype)


def read_columns(
    info: TensorInfo,
    shape2d: tuple[int, int],
    start: int,
    stop: int,
    row_start: int = 0,
    row_stop: int | None = None,
) -> RawTensor:
    """Read columns ``start:stop`` of rows ``row_start:row_stop`` of the tensor viewed as the 2-D ``shape2d``
    (one positioned read per row)."""
    assert info.offset is not None
    rows, cols = shape2d
    row_stop = rows if row_stop is None else row_stop
    np_dtype = np.dtype(DTYPES[info.dtype][1])
    out = np.empty((row_stop - row_start, stop - start), dtype=np_dtype)
    isz = info.itemsize
    fd = os.open(info.file, os.O_RDONLY)
    try:
        for j, i in enumerate(range(row_start, row_stop)):
            _read_into(fd, out[j], info.offset + (i * cols + start) * isz)
        _drop_cache(fd, info.offset, info.nbytes)
    finally:
        os.close(fd)
    return RawTensor(out, info.dtype)


_NP_TO_CODE = {"float64": "F64", "float32": "F32", "float16": "F16"}


def write_safetensors(
    path: Path, tensors: Mapping[str, RawTensor | np.ndarray], metadata: Mapping[str, str]
) -> None:
    """Write a safetensors file through the one output writer (:func:`~spectra_cli.checkpoint.output.open_output`:
    a regular file atomically, a symlink's target, a device or FIFO in place; never stdout)."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    arrays: list[np.ndarray] = []
    pos = 0
    for name, t in tensors.items():
        if isinstance(t, RawTensor):
            arr, code = np.ascontiguousarray(t.data), t.dtype
        else:
            arr = np.ascontiguousarray(t)
            code = _NP_TO_CODE.get(arr.dtype.name, "")
            if not code:
                raise ValueError(f"cannot write dtype {arr.dtype} for {name}")
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [pos, pos + arr.nbytes]}
        pos += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open_output(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.reshape(-1).view(np.uint8).data if arr.nbytes else b"")
