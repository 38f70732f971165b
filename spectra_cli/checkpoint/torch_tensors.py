"""Stored tensors (:class:`~spectra_cli.checkpoint.tensors.RawTensor`) to and from PyTorch tensors on a compute
device, bf16 included (NumPy has no bfloat16: its bits travel as int16)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from spectra_cli.checkpoint.tensors import DTYPE_NAMES, RawTensor
from spectra_cli.errors import ShapeMismatch

if TYPE_CHECKING:
    import torch


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a precision / dtype name (float32, float64, float16, bfloat16)."""
    import torch

    return {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[name]  # fmt: skip


def to_device(raw: RawTensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    """A stored floating tensor on ``device`` in ``dtype`` (moved in its stored dtype, then converted)."""
    import torch

    if raw.dtype == "BF16":
        t = torch.from_numpy(np.ascontiguousarray(raw.data).view(np.int16)).view(torch.bfloat16)
    elif raw.dtype in ("F16", "F32", "F64"):
        t = torch.from_numpy(np.ascontiguousarray(raw.data))
    else:
        raise ShapeMismatch(f"cannot initialise from {raw.dtype} weights")
    return t.to(device).to(dtype)


def from_device(t: torch.Tensor, code: str) -> RawTensor:
    """A tensor back on the CPU as a stored tensor of safetensors dtype ``code``."""
    import torch

    if code == "BF16":
        return RawTensor(
            t.to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().view(np.uint16), code
        )
    name = DTYPE_NAMES[code]
    return RawTensor(t.to(torch_dtype(name)).cpu().contiguous().numpy(), code)
