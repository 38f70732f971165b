"""Array plumbing for :mod:`spectra_cli.spectral.linalg`: where a decomposition runs (:class:`Backend`), moving
arrays between NumPy and PyTorch, the few operations both spell differently, and the power-of-two scaling that
keeps float64 matrices far outside float32's (or float64's Gram) range decomposable (see linalg's docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: entries whose magnitude is within 2^±SAFE_EXPONENT are decomposed as they are (no scaling)
SAFE_EXPONENT = 400
#: a narrower window for values computed in float32 (its range ends near 2^±126)
SAFE_EXPONENT_32 = 60

Array = Any  # np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Backend:
    """Where decompositions run: ``numpy`` (CPU; LAPACK through NumPy/SciPy) or ``torch`` on ``device``."""

    name: str = "numpy"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.name not in ("numpy", "torch"):
            raise ValueError(f"unknown backend {self.name!r}; use numpy or torch")


NUMPY = Backend()


def is_torch(x: object) -> bool:
    """Whether ``x`` is a torch tensor (checked without importing torch)."""
    return type(x).__module__.split(".", 1)[0] == "torch"


def to_backend(x: Array, backend: Backend) -> Array:
    """``x`` where ``backend`` computes: a NumPy array, or a tensor on its device (same dtype; bfloat16 bits
    stored as uint16 are not handled here: convert them with the checkpoint reader)."""
    if backend.name == "numpy":
        return x.detach().cpu().numpy() if is_torch(x) else x
    import torch

    if is_torch(x):
        return x.to(backend.device)
    return torch.from_numpy(np.ascontiguousarray(x)).to(backend.device)


def like(y: Array, ref: Array) -> Array:
    """``y`` converted to the kind (and device) of ``ref``."""
    if is_torch(ref):
        import torch

        return (y if is_torch(y) else torch.from_numpy(np.ascontiguousarray(y))).to(ref.device)
    return y.detach().cpu().numpy() if is_torch(y) else y


def to_numpy(x: Array) -> np.ndarray:
    return x.detach().cpu().numpy() if is_torch(x) else np.asarray(x)


def as_f64(x: Array) -> Array:
    if is_torch(x):
        import torch

        return x.to(torch.float64)
    return np.asarray(x, dtype=np.float64)


def wide_float(x: Array) -> Array:
    """torch half types upcast to float32 (no bf16/fp16 SVD); anything else as it is."""
    if is_torch(x) and x.dtype.itemsize < 4:
        import torch

        return x.to(torch.float32)
    return x


def flip(x: Array, axis: int) -> Array:
    return x.flip(axis) if is_torch(x) else np.flip(x, axis)


def sqrt0(x: Array) -> Array:
    """√max(x, 0)."""
    return x.clamp_min(0).sqrt() if is_torch(x) else np.sqrt(np.clip(x, 0.0, None))


def swap_last(x: Array) -> Array:
    return x.mT if is_torch(x) else np.swapaxes(x, -1, -2)


def linalg_of(x: Array) -> Any:
    if is_torch(x):
        import torch

        return torch.linalg
    return np.linalg


def route(x: Array, backend: Backend | None) -> Array:
    return x if backend is None else to_backend(x, backend)


# ---- scaling -------------------------------------------------------------------------------------------------


def scale_exponent(x: Array, window: int = SAFE_EXPONENT) -> int:
    """e such that x·2⁻ᵉ has its largest |entry| near 1, or 0 when it is within 2^±window already (or is zero,
    or not finite)."""
    if (x.numel() if is_torch(x) else x.size) == 0:
        return 0
    return exponent_of(abs_max(x), window)


def abs_max(x: Array, axis: tuple[int, int] | None = None) -> Any:
    """max |entry| (over ``axis``) without an |x| copy: max(max x, −min x)."""
    if is_torch(x):
        if axis is None:
            lo, hi = x.aminmax()
        else:
            lo, hi = x.amin(dim=axis), x.amax(dim=axis)
        out = (-lo).maximum(hi)
        return float(out) if axis is None else out
    out = np.maximum(np.max(x, axis=axis), -np.min(x, axis=axis))
    return float(out) if axis is None else out


def exponent_of(amax: float, window: int) -> int:
    if not math.isfinite(amax) or amax == 0.0:
        return 0
    e = math.frexp(amax)[1]
    return e if abs(e) > window else 0


def scaled(x: Array, window: int = SAFE_EXPONENT) -> tuple[Array, Any]:
    """(x·2⁻ᵉ, 2ᵉ), exact; x itself (factor 1.0) inside the window. A stack (…×m×n) is scaled matrix by
    matrix: the factor is then an array of the leading shape (or 1.0)."""
    if x.ndim <= 2:
        e = scale_exponent(x, window)
        if e == 0:
            return x, 1.0
        return x * math.ldexp(1.0, -e), math.ldexp(1.0, e)
    if (x.numel() if is_torch(x) else x.size) == 0:
        return x, 1.0
    amax = to_numpy(abs_max(x, (-2, -1)))
    exps = np.vectorize(lambda v: exponent_of(float(v), window), otypes=[np.int64])(amax)
    if not exps.any():
        return x, 1.0
    factor = np.ldexp(1.0, exps)
    inv = like(np.ldexp(1.0, -exps), x)
    return x * inv.to(x.dtype)[..., None, None] if is_torch(x) else x * inv[..., None, None], factor


def rescale(vals: Array, c: Any) -> Array:
    """Values times the factor of :func:`scaled` (a float, or an array over a stack's leading shape)."""
    if isinstance(c, float):
        return vals * c if c != 1.0 else vals
    f = like(c, vals)
    return vals * (f.to(vals.dtype) if is_torch(vals) else f)[..., None]


def downcast(x: Array, dtype: Any) -> tuple[Array, Any]:
    """``x`` in ``dtype`` (a NumPy or torch dtype), scaled first by a power of two when float64 entries would
    overflow or vanish in a narrower dtype; returns (array, factor to multiply its singular values by)."""
    if is_torch(x):
        import torch

        narrow = x.dtype == torch.float64 and dtype != torch.float64
    else:
        narrow = np.dtype(x.dtype) == np.float64 and np.dtype(dtype) != np.float64
    y, c = scaled(x, SAFE_EXPONENT_32) if narrow else (x, 1.0)
    return (y.to(dtype) if is_torch(y) else y.astype(dtype, copy=False)), c
