"""LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
arXiv:2310.08659): a quantised base Q and a rank-r adapter fitted together, so that Q + s·B·A ≈ W.

Alternating, as PEFT's ``peft/utils/loftq_utils.py`` ``loftq_init`` does, for T = ``options["loftq_iter"]``
steps (default 1, PEFT's default):

    R₀ = W;  for t = 1…T:  Q_t = deq(quant(R_{t−1})),  U·S·Vᵀ = SVD_r(W − Q_t),  R_t = W − U_rS_rV_rᵀ

and the adapter is the last low-rank part, split as PEFT's PiSSA splits it, with the scale taken out so that
W ≈ Q_T + s·B·A: B = U_r·√(S_r/s), A = √(S_r/s)·V_rᵀ. (PEFT's own LoftQ does not divide by s: with s = 1 the
factors are the same.) quant is spectra's NF4 (``options["bits"]`` 4, default) or int8 (8), see
:mod:`spectra_cli.spectral.quant`; unlike PEFT it needs no bitsandbytes and no GPU. The "residual" written for
the base is the dequantised Q_T: quantising it again gives back Q_T exactly.

``info`` per module: ``quant_error`` = ‖W − deq(quant(W))‖_F/‖W‖_F (quantisation alone), ``relative_error`` =
‖W − Q_T − s·B·A‖_F/‖W‖_F, and ``first_error`` the same after the first step.
"""

from __future__ import annotations

from typing import Any

from spectra_cli.errors import SpectraError
from spectra_cli.spectral import linalg
from spectra_cli.spectral.init import InitFactors, InitInput, InitMethod, checked_rank, register
from spectra_cli.spectral.quant import fake_quantise


def loftq(inp: InitInput) -> InitFactors:
    """LoftQ factors of one module (see the module's docstring)."""
    import torch

    bits = int(inp.options.get("bits", 4))
    steps = int(inp.options.get("loftq_iter", 1))
    if bits not in (4, 8):
        raise SpectraError(f"--bits {bits}: LoftQ quantises to 4 (NF4) or 8 (int8) bits")
    if steps < 1:
        raise SpectraError(f"--loftq-iter {steps}: at least one step is needed")
    w = inp.weight
    r = checked_rank(inp)
    w32 = w.to(torch.float32)
    norm = float(torch.linalg.norm(w32)) or 1.0
    res = w32
    errors: list[float] = []
    q = u = s = vt = None
    for _ in range(steps):
        q = fake_quantise(res, bits)
        svd = linalg.top_k((w32 - q).to(w.dtype), r, inp.backend)
        u, s, vt = svd.u, svd.s, svd.vt
        low = (u * s[None, :]) @ vt
        res = w32 - low.to(torch.float32)
        errors.append(float(torch.linalg.norm(w32 - q - low.to(torch.float32))) / norm)
    assert q is not None and u is not None and s is not None and vt is not None
    root = torch.sqrt(s / inp.scale)
    a = (root[:, None] * vt).contiguous()
    b = (u * root[None, :]).contiguous()
    info: dict[str, Any] = {
        "bits": bits,
        "quant_error": float(torch.linalg.norm(w32 - fake_quantise(w32, bits))) / norm,
        "relative_error": errors[-1],
        "first_error": errors[0],
    }
    return InitFactors(A=a, B=b, residual=q.to(w.dtype), info=info)


LOFTQ = register(
    InitMethod(
        name="loftq",
        summary="quantised base (NF4 or int8, spectra's own) + the rank-r SVD of its error, alternated",
        reference="Li et al. 2023, LoftQ, arXiv:2310.08659; PEFT init_lora_weights='loftq' (needs bitsandbytes)",
        factorize=loftq,
        parameters="--bits [4|8], --loftq-iter N",
    )
)
