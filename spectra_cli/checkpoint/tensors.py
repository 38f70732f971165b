"""Tensor descriptions and raw tensor data, independent of the file format.

A :class:`RawTensor` carries the bytes of a tensor as a NumPy array in its *stored* dtype; bfloat16, which
NumPy lacks, travels as ``uint16`` bit patterns. Upcasting happens later, on the compute device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# safetensors dtype code -> (itemsize in bytes, NumPy dtype used to carry the raw data, is floating point)
DTYPES: dict[str, tuple[int, str, bool]] = {
    "F64": (8, "<f8", True),
    "F32": (4, "<f4", True),
    "F16": (2, "<f2", True),
    "BF16": (2, "<u2", True),
    "F8_E4M3": (1, "u1", True),
    "F8_E5M2": (1, "u1", True),
    "I64": (8, "<i8", False),
    "I32": (4, "<i4", False),
    "I16": (2, "<i2", False),
    "I8": (1, "i1", False),
    "U64": (8, "<u8", False),
    "U32": (4, "<u4", False),
    "U16": (2, "<u2", False),
    "U8": (1, "u1", False),
    "BOOL": (1, "?", False),
}

#: floating dtypes spectra can decompose (float8 is recognised but skipped).
SUPPORTED_FLOATS = ("F64", "F32", "F16", "BF16")

#: display names used in rows and tables
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# float dtype name → safetensors code (the --dtype choices of the writers)
DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, read from a header or an index without loading it.

    ``offset`` is the absolute byte offset of the tensor data in ``file`` for safetensors files and ``None``
    for pickled torch files.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    offset: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0] if self.dtype in DTYPES else 0

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype in DTYPES and DTYPES[self.dtype][2]


@dataclass(frozen=True)
class RawTensor:
    """Tensor data in its stored dtype (bfloat16 as uint16 bit patterns)."""

    data: np.ndarray
    dtype: str


def to_float(raw: RawTensor, target: type[np.floating] | np.dtype = np.float64) -> np.ndarray:
    """Upcast raw data to a NumPy float dtype (bfloat16 bits are widened exactly into float32)."""
    if raw.dtype == "BF16":
        wide = raw.data.astype(np.uint32)
        wide <<= 16
        f32 = wide.view(np.float32)
        return f32 if np.dtype(target) == np.float32 else f32.astype(target)
    if raw.dtype not in SUPPORTED_FLOATS:
        raise TypeError(f"cannot upcast dtype {raw.dtype}")
    with np.errstate(over="ignore"):  # float64 → float32 beyond its range: ±inf, which callers check for
        return raw.data.astype(target, copy=False)


def from_float(x: np.ndarray, code: str) -> RawTensor:
    """Round float data to a stored dtype (bfloat16 with round-to-nearest-even, NaN kept NaN)."""
    if code == "BF16":
        f32 = np.ascontiguousarray(x, dtype=np.float32)
        bits = f32.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(f32)
        if nan.any():
            rounded[nan] = 0x7FC0
        return RawTensor(rounded, code)
    if code not in SUPPORTED_FLOATS:
        raise TypeError(f"cannot write dtype {code}")
    return RawTensor(np.ascontiguousarray(x, dtype=DTYPES[code][1]), code)
