"""The few array operations the merge methods need, for NumPy arrays and torch tensors alike (an array
namespace of our own: NumPy's and PyTorch's spellings differ). A task update's arrays are NumPy arrays on the
NumPy route and tensors on the torch device on the torch route (``merge --backend torch``, CUDA); every method
computes with these, so its arithmetic runs where its updates are. Results keep the kind (and device) of the
reference array given; dtypes are NumPy dtypes on both routes (mapped to torch's where needed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from spectra_cli.spectral.arrays import Array, as_f64, is_torch, like, to_numpy

__all__ = ["any_nonzero", "as_f64", "astype", "concat", "contiguous", "is_torch", "like", "nelem", "np_dtype",
           "pad_rank", "stack", "to_host", "to_numpy", "total", "values", "zeros"]  # fmt: skip


def np_dtype(x: Array) -> np.dtype:
    """x's dtype as a NumPy dtype (torch.float32 → float32; bfloat16/float16 → float32: computed in float32)."""
    if is_torch(x):
        name = str(x.dtype).split(".")[-1]
        return np.dtype(np.float32) if name in ("bfloat16", "float16") else np.dtype(name)
    return np.dtype(x.dtype)


def _torch_dtype(dtype: Any) -> Any:
    import torch

    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
            np.dtype(np.float16): torch.float16}[np.dtype(dtype)]  # fmt: skip


def astype(x: Array, dtype: Any) -> Array:
    """x in the NumPy ``dtype`` (no copy when it already is)."""
    if is_torch(x):
        return x.to(_torch_dtype(dtype))
    return x.astype(dtype, copy=False)


def zeros(shape: tuple[int, ...], ref: Array, dtype: Any = np.float64) -> Array:
    """Zeros of ``shape`` and NumPy ``dtype``, of the kind and device of ``ref``."""
    if is_torch(ref):
        import torch

        return torch.zeros(shape, dtype=_torch_dtype(dtype), device=ref.device)
    return np.zeros(shape, dtype)


def values(v: Sequence[float] | np.ndarray, ref: Array) -> Array:
    """A float64 vector of ``v`` of the kind and device of ``ref``."""
    return like(np.asarray(v, dtype=np.float64), ref)


def concat(xs: Sequence[Array], axis: int = 0) -> Array:
    if is_torch(xs[0]):
        import torch

        return torch.cat(list(xs), dim=axis)
    return np.concatenate(xs, axis=axis)


def stack(xs: Sequence[Array]) -> Array:
    if is_torch(xs[0]):
        import torch

        return torch.stack(list(xs))
    return np.stack(xs)


def nelem(x: Array) -> int:
    return int(x.numel()) if is_torch(x) else int(x.size)


def total(x: Array) -> float:
    """Σ entries as a Python float (one number back from a device)."""
    return float(x.sum())


def any_nonzero(x: Array) -> bool:
    return bool((x != 0).any()) if is_torch(x) else bool(np.any(x))


def contiguous(x: Array) -> Array:
    return x.contiguous() if is_torch(x) else np.ascontiguousarray(x)


def pad_rank(b: Array, a: Array, k: int) -> tuple[Array, Array]:
    """B (out×r) and A (r×in) padded with zero columns / rows to rank k ≥ r."""
    extra = k - b.shape[1]
    if extra <= 0:
        return b, a
    return concat([b, zeros((b.shape[0], extra), b, np_dtype(b))], 1), concat(
        [a, zeros((extra, a.shape[1]), a, np_dtype(a))], 0
    )


def to_host(x: Array | None) -> np.ndarray | None:
    return None if x is None else to_numpy(x)
