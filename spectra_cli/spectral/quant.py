"""spectra's own weight quantisers for LoftQ: NF4 (blockwise absmax, block 64) and int8 (absmax per row).

- NF4 (Dettmers et al. 2023, QLoRA, arXiv:2305.14314, Appendix E): the 16-value "normal float" code table as
  bitsandbytes publishes it (``bitsandbytes/functional.py``, ``get_4bit_type("nf4")``, the values below copied
  from it). The weight, flattened row-major (out×in, ``nn.Linear`` layout), is cut into blocks of 64 values;
  each block stores its absmax a and, per value x, the index of the code nearest to x/a (ties to the lower
  code, as bitsandbytes' thresholds at the midpoints do). Dequantised: code·a, in float32.
- int8 (Dettmers et al. 2022, LLM.int8(), arXiv:2208.07339; bitsandbytes' ``Int8Params``): per output row the
  absmax a; q = round(127·x/a) in [−127, 127]; dequantised (q/127)·a.

Idempotent by construction: the dequantised block (row) keeps its absmax exactly (the code ±1 / q = ±127 gives
back a bit for bit), and every dequantised value lies within a rounding error of its code, so quantising the
dequantised weight again gives the same codes and scales, hence the same dequantised weight bit for bit — the
base LoftQ writes is the quantised model it was fitted to. A block (row) of zeros keeps scale 0 and code 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# bitsandbytes' NF4 code table (bitsandbytes/functional.py, get_4bit_type("nf4")), ascending
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_BLOCK = 64


@dataclass(frozen=True)
class Quantised:
    """Codes (NF4: indices 0…15 per value, flattened and zero-padded to whole blocks; int8: q per value, the
    weight's shape), float32 scales (one per block / row) and the original shape."""

    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    bits: int


def quantise(w: torch.Tensor, bits: int) -> Quantised:
    """NF4 (``bits`` 4) or int8 (``bits`` 8) quantisation of the out×in weight ``w`` (computed in float32)."""
    import torch

    x = w.to(torch.float32)
    shape = (int(x.shape[0]), int(x.shape[1]))
    if bits == 4:
        flat = x.reshape(-1)
        pad = (-flat.numel()) % NF4_BLOCK
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        blocks = flat.view(-1, NF4_BLOCK)
        absmax = blocks.abs().amax(dim=1)
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        code = torch.tensor(NF4_CODE, dtype=torch.float64)
        mids = ((code[1:] + code[:-1]) / 2).to(torch.float32).to(x.device)
        # the nearest code: a value on a midpoint goes to the lower code (bucketize: mids[i-1] < v ≤ mids[i])
        idx = torch.bucketize(blocks / safe[:, None], mids)
        return Quantised(idx.to(torch.uint8).reshape(-1), absmax, shape, 4)
    if bits == 8:
        absmax = x.abs().amax(dim=1)
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        q = torch.round(x * (127.0 / safe[:, None])).clamp_(-127, 127)
        return Quantised(q.to(torch.int8), absmax, shape, 8)
    raise ValueError(f"bits {bits}: only 4 (NF4) and 8 (int8) are supported")


def dequantise(q: Quantised) -> torch.Tensor:
    """The float32 out×in weight the quantised one stands for."""
    import torch

    if q.bits == 4:
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=q.codes.device)
        vals = (code[q.codes.long()].view(-1, NF4_BLOCK) * q.scales[:, None]).reshape(-1)
        return vals[: q.shape[0] * q.shape[1]].reshape(q.shape)
    return (q.codes.to(torch.float32) / 127.0) * q.scales[:, None]


def fake_quantise(w: torch.Tensor, bits: int) -> torch.Tensor:
    """dequantise(quantise(w)): the weight as the quantised model sees it (float32)."""
    return dequantise(quantise(w, bits))
