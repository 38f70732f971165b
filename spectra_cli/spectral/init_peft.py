"""Initialisations PEFT 0.21 defines that leave the base unchanged: MiCA and orthogonal.

Both follow ``peft/tuners/lora/layer.py`` (``LoraLayer.mica_init`` / ``orthogonal_init``) step by step, so the
factors equal PEFT's (MiCA up to the sign of each singular vector; orthogonal exactly, given the same torch
seed):

- MiCA (Minor Component Adaptation): W = U·S·Vᵀ (exact thin SVD, float32 as PEFT takes it), B = U[:, −r:] —
  the left singular vectors of the r SMALLEST singular values, in descending order of σ — and A = 0, so
  s·B·A = 0 and the base is unchanged. B stays frozen in training: the adapter config says
  ``init_lora_weights: "mica"``, which makes PEFT attach its ``MiCALinearVariant`` (``lora_B`` registered as a
  frozen weight; only ``lora_A`` trains). PEFT also re-runs the SVD on load, which gives the same B up to
  sign, and the saved factors then replace it.
- orthogonal (Datta 2024, "Rethinking LoRA initialisations"): a random orthogonal Q (QR of an r×r Gaussian),
  A = (G_A·Q[0::2])ᵀ / 10 with G_A in×(r/2) Gaussian, B = G_Bᵀ·Q[1::2] / 10 with G_B (r/2)×out Gaussian; r
  must be even. B·A ≠ 0: as in PEFT, the base is not changed, so the initialised model differs from the
  original by s·B·A (the adapter is not a no-op). The draws come from a CPU ``torch.Generator`` seeded with
  :func:`module_seed` (``options["seed"]``, default 0, and the module path), after drawing as many uniforms
  as PEFT's ``nn.Linear`` constructors of lora_A and lora_B consume: with ``torch.manual_seed(module_seed(s,
  path))`` before ``get_peft_model`` on a model with that one target, PEFT draws the same numbers.
"""

from __future__ import annotations

import zlib
from typing import Any

from spectra_cli.errors import SpectraError
from spectra_cli.spectral import linalg
from spectra_cli.spectral.init import InitFactors, InitInput, InitMethod, checked_rank, register


def module_seed(seed: int, path: str) -> int:
    """The seed of one module's random draws: ``(seed + crc32(path)) mod 2⁶³`` — the same module gets the
    same draws whatever else is selected and in whatever order the checkpoint stores it."""
    return (int(seed) + zlib.crc32(path.encode())) % (2**63)


def mica(inp: InitInput) -> InitFactors:
    """MiCA (arXiv:2604.01694): B = the left singular vectors of the r smallest singular values, A = 0."""
    import torch

    r = checked_rank(inp)
    w = inp.weight
    bottom, s = linalg.bottom_k(w.to(torch.float32) if w.dtype != torch.float64 else w, r)
    b = bottom.u.to(w.dtype).contiguous()
    a = torch.zeros(r, w.shape[1], dtype=w.dtype, device=w.device)
    total = float((s**2).sum())
    info: dict[str, Any] = {"sigma_r": float(bottom.s[0]), "energy": float((bottom.s**2).sum()) / total if total else 0.0}
    return InitFactors(A=a, B=b, residual=None, info=info)


def orthogonal(inp: InitInput) -> InitFactors:
    """PEFT's ``init_lora_weights="orthogonal"``: A and B from the interleaved rows of a random orthogonal
    r×r matrix, projected by Gaussian matrices and divided by 10 (r even)."""
    import torch

    r = checked_rank(inp)
    if r % 2:
        raise SpectraError(f"{inp.name}: orthogonal initialisation needs an even rank (got {r}); use --rank {r + 1}")
    out_f, in_f = inp.weight.shape
    g = torch.Generator().manual_seed(module_seed(int(inp.options.get("seed", 0)), inp.name))
    # PEFT builds lora_A = nn.Linear(in, r) and lora_B = nn.Linear(r, out) first: their kaiming_uniform_
    # initialisations draw r·in and out·r uniforms from the same generator
    torch.empty(r, in_f).uniform_(generator=g)
    torch.empty(out_f, r).uniform_(generator=g)
    q, _ = linalg.qr(torch.randn(r, r, generator=g))
    a = torch.randn(in_f, r // 2, generator=g).mm(q[0::2, :]).T / 10.0
    b = torch.randn(r // 2, out_f, generator=g).T.mm(q[1::2, :]) / 10.0
    dt, dev = inp.weight.dtype, inp.weight.device
    return InitFactors(A=a.contiguous().to(dev, dt), B=b.contiguous().to(dev, dt), residual=None)


MICA = register(
    InitMethod(
        name="mica",
        summary="B = left singular vectors of the r smallest singular values, frozen in training; A = 0",
        reference="MiCA, arXiv:2604.01694; PEFT init_lora_weights='mica'",
        factorize=mica,
        changes_base=False,
        peft_init="mica",
    )
)
ORTHOGONAL = register(
    InitMethod(
        name="orthogonal",
        summary="A and B from a random orthogonal r×r matrix (even r; base unchanged, B·A ≠ 0)",
        reference="Datta 2024, 'Rethinking LoRA initialisations'; PEFT init_lora_weights='orthogonal'",
        factorize=orthogonal,
        changes_base=False,
        parameters="--seed N",
    )
)
