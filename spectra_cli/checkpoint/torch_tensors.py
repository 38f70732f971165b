"""Stored tensors (:class:`~spectra_cli.checkpoint.tensors.RawTensor`) to and from PyTorch tensors on a compute
device, bf16 included (NumPy has no bfloat16: its bits travel as int16).

A transfer to the device has two steps, so that a reader thread can do the first while the device works:
:func:`stage` makes a host tensor in the *stored* dtype (pinned, i.e. page-locked, when the target is CUDA, so
the copy can be asynchronous), :func:`upload` copies it to the device in that dtype (``non_blocking``) and
upcasts it there. A bf16 weight thus crosses the bus as 2 bytes per entry, not as 4 or 8, and the upcast runs
on the GPU. :func:`to_device` does both.
"""

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


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def stage(raw: RawTensor, device: str) -> torch.Tensor:
    """A host tensor in ``raw``'s stored dtype (bf16 as bf16), pinned when ``device`` is CUDA. On the CPU it
    shares ``raw``'s memory (no copy); for CUDA the pinned copy is the one copy the host makes."""
    import torch

    if raw.dtype == "BF16":
        t = torch.from_numpy(np.ascontiguousarray(raw.data).view(np.int16)).view(torch.bfloat16)
    elif raw.dtype in ("F16", "F32", "F64"):
        t = torch.from_numpy(np.ascontiguousarray(raw.data))
    else:
        raise ShapeMismatch(f"cannot decompose or initialise from {raw.dtype} weights")
    if is_cuda(device) and torch.cuda.is_available():
        t = t.pin_memory()
    return t


def upload(host: torch.Tensor, device: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``host`` on ``device`` (moved in its own dtype, asynchronously from pinned memory), then converted to
    ``dtype`` there (None: kept as it is)."""
    t = host.to(device, non_blocking=host.is_pinned())
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def to_device(raw: RawTensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    """A stored floating tensor on ``device`` in ``dtype`` (moved in its stored dtype, then converted)."""
    return upload(stage(raw, device), device, dtype)


def from_device(t: torch.Tensor, code: str) -> RawTensor:
    """A tensor back on the CPU as a stored tensor of safetensors dtype ``code`` (rounded on the device, so
    only the stored bytes cross the bus)."""
    import torch

    if code == "BF16":
        return RawTensor(
            t.to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().view(np.uint16), code
        )
    name = DTYPE_NAMES[code]
    return RawTensor(t.to(torch_dtype(name)).cpu().contiguous().numpy(), code)
