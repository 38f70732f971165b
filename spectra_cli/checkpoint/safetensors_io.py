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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from spectra_cli.checkpoint.output import open_output
from spectra_cli.checkpoint.tensors import DTYPES, RawTensor, TensorInfo
from spectra_cli.checkpoint.validate import JSONProblem, decode_json, is_int, open_regular, str_map, type_name
from spectra_cli.errors import CheckpointError

_MAX_HEADER = 100 * 1024 * 1024
#: the largest dimension accepted in a header (a tensor with a zero dimension holds no bytes, so its other
#: dimensions are not bounded by the file size)
_MAX_DIM = 2**48


def read_header(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; return the tensors (in file order) and the metadata.

    Everything is checked before use, each failure one :class:`CheckpointError`: a regular file (a FIFO or a
    device is refused unopened), a header length that fits the file, a JSON object nested at most
    :data:`~spectra_cli.checkpoint.validate.MAX_DEPTH` levels whose keys appear once, ``__metadata__`` a map of
    strings, and for every tensor a known dtype, a shape of whole numbers ≥ 0, ``data_offsets`` two whole
    numbers 0 ≤ begin ≤ end ≤ the data size, end − begin = the tensor's size, and no two tensors' bytes
    overlapping."""
    with open_regular(path, "safetensors file") as f:
        try:
            size = os.fstat(f.fileno()).st_size
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
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) < n:
        raise CheckpointError(f"{path}: truncated while reading (the file shrank); re-download or re-save it")

    def corrupt(why: str) -> NoReturn:
        raise CheckpointError(f"{path}: corrupt safetensors header ({why}); re-download or re-save it")

    try:
        header = decode_json(raw, unique_keys=True)
    except JSONProblem as e:
        corrupt(str(e))
    if not isinstance(header, dict):
        corrupt(f"not a JSON object but {type_name(header)}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        corrupt(f"__metadata__ is not an object but {type_name(metadata)}")
    if not str_map(metadata):
        bad = next(k for k, v in metadata.items() if not isinstance(v, str))
        corrupt(f"__metadata__ must map strings to strings; {bad!r} is {type_name(metadata[bad])}")
    data_start = 8 + n
    data_size = size - data_start
    infos = [
        _tensor_info(path, name, entry, data_start, data_size, corrupt) for name, entry in header.items()
    ]
    infos.sort(key=lambda t: (t.offset or 0, t.nbytes))
    _refuse_overlaps(path, infos)
    return infos, dict(metadata)


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, data_size: int,
                 corrupt: Callable[[str], NoReturn]) -> TensorInfo:  # fmt: skip
    if not isinstance(entry, dict):
        corrupt(f"the entry of tensor {name!r} is {type_name(entry)}, not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        corrupt(f'tensor {name!r} has dtype {type_name(dtype)}, not a string such as "F32"')
    if dtype not in DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has unknown dtype {dtype[:40]!r}; known: {', '.join(DTYPES)}"
        )
    if not isinstance(shape, list) or not all(is_int(d) and 0 <= d <= _MAX_DIM for d in shape):
        shown = type_name(shape) if not isinstance(shape, list) else _shown(shape)
        corrupt(f"tensor {name!r} has shape {shown}, not a list of whole numbers from 0 to 2**48")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(x) for x in offsets):
        shown = type_name(offsets) if not isinstance(offsets, list) else _shown(offsets)
        corrupt(f"tensor {name!r} has data_offsets {shown}, not two whole numbers [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        corrupt(f"tensor {name!r} has data_offsets [{begin}, {end}], not 0 ≤ begin ≤ end")
    info = TensorInfo(name=name, shape=tuple(shape), dtype=dtype, file=path, offset=data_start + begin)
    if end - begin != info.nbytes:
        raise CheckpointError(
            f"{path}: tensor {name!r} is declared {info.shape} {dtype} ({info.nbytes} bytes) "
            f"but spans {end - begin} bytes; the file is corrupt"
        )
    if end > data_size:
        raise CheckpointError(
            f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the file has "
            f"{data_start + data_size} bytes; re-download or re-save it"
        )
    return info


def _shown(values: list[Any]) -> str:
    text = "[" + ", ".join(str(v) if is_int(v) and abs(v) < 10**15 else type_name(v) for v in values[:4])
    return text + (", …]" if len(values) > 4 else "]")


def _refuse_overlaps(path: Path, infos: list[TensorInfo]) -> None:
    """Two tensors whose bytes overlap would read (and, written back, change) each other's data: a crafted or
    corrupt file. ``infos`` is sorted by offset; empty tensors overlap nothing."""
    prev: TensorInfo | None = None
    for t in infos:
        if not t.nbytes:
            continue
        assert t.offset is not None
        if prev is not None and prev.offset is not None and t.offset < prev.offset + prev.nbytes:
            raise CheckpointError(
                f"{path}: tensors {prev.name!r} and {t.name!r} share bytes of the file (their data_offsets "
                "overlap); the file is corrupt or crafted: re-download or re-save it"
            )
        prev = t


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
