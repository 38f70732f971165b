"""EoRA (Liu et al. 2024, "EoRA: Fine-tuning-free Compensation for Compressed LLM with Eigenspace Low-Rank
Approximation", arXiv:2410.21271): the rank-r adapter that best compensates a compressed weight W_c for the
inputs the module actually sees.

With ΔW = W − W_c (out×in) and the inputs' uncentred second moment C = E[x·xᵀ] = QΛQᵀ (from ``spectra capture
--stats covariance``), the layer's output error on inputs X is ‖(ΔW − s·B·A)·X‖, whose expectation is
‖(ΔW − s·B·A)·QΛ^{1/2}‖_F². So, projecting into the eigenspace:

    ΔW′ = ΔW·QΛ^{1/2};  SVD_r(ΔW′) = U_rΣ_rV_rᵀ;  B = U_rΣ_r / s,  A = V_rᵀΛ^{−1/2}Qᵀ

and s·B·A·QΛ^{1/2} = U_rΣ_rV_rᵀ is the best rank-r fit of ΔW′ (Eckart–Young). Eigenvalues below
``EIG_FLOOR``·λ_max (directions the inputs never take; also negative rounding) are raised to that floor so that
Λ^{−1/2} stays finite; the fit in those directions does not matter to the output. The base is the compressed
model: the adapter is loaded on it (nothing else is written).

``info`` per module: ``recovered`` = the share of the activation-weighted compression error
‖ΔW·QΛ^{1/2}‖²_F that the adapter removes, and ``weight_recovered`` the same share of the plain ‖ΔW‖²_F
(which a plain SVD of ΔW would maximise instead).
"""

from __future__ import annotations

import numpy as np

from spectra_cli.errors import ShapeMismatch, SpectraError
from spectra_cli.spectral import linalg
from spectra_cli.spectral.init import InitFactors, InitInput, InitMethod, checked_rank, register

EIG_FLOOR = 1e-6


def eora(inp: InitInput) -> InitFactors:
    """EoRA factors of one module: ``inp.tuned`` is the compressed weight, ``inp.activations`` the inputs'
    statistics."""
    import torch

    if inp.tuned is None:
        raise SpectraError(f"{inp.name}: EoRA needs the compressed checkpoint (--compressed CKPT)")
    if inp.activations is None:
        raise SpectraError(f"{inp.name}: EoRA needs the inputs' statistics (--activations from `spectra capture`)")
    w = inp.weight
    n = w.shape[1]
    r = checked_rank(inp)
    c_np = inp.activations.second_moment()
    if c_np.shape != (n, n):
        raise ShapeMismatch(
            f"{inp.name}: the input second moment is {c_np.shape[0]}×{c_np.shape[1]}, the module takes {n} inputs; "
            "capture the activations from this model"
        )
    c = torch.as_tensor(np.ascontiguousarray(c_np), dtype=torch.float64, device=w.device)
    lam, q = linalg.eigh((c + c.T) / 2)
    top = float(lam[0]) if lam.numel() else 0.0
    if not top > 0:
        raise SpectraError(f"{inp.name}: the inputs' second moment is zero; capture on data that reaches this module")
    lam = torch.clamp(lam, min=EIG_FLOOR * top)
    root = torch.sqrt(lam)
    delta = (w - inp.tuned).to(torch.float64)
    proj = delta @ (q * root[None, :])  # ΔW·QΛ^{1/2}
    svd = linalg.top_k(proj, r, inp.backend)
    b = svd.u * svd.s[None, :] / inp.scale
    a = (svd.vt / root[None, :]) @ q.T  # V_rᵀΛ^{−1/2}Qᵀ
    fit = inp.scale * (b @ a)
    total_act = float((proj * proj).sum())
    left = proj - fit @ (q * root[None, :])
    total_w = float((delta * delta).sum())
    info = {
        "recovered": 1.0 - float((left * left).sum()) / total_act if total_act > 0 else 0.0,
        "weight_recovered": 1.0 - float(((delta - fit) ** 2).sum()) / total_w if total_w > 0 else 0.0,
    }
    return InitFactors(A=a.to(w.dtype).contiguous(), B=b.to(w.dtype).contiguous(), residual=None, info=info)


EORA = register(
    InitMethod(
        name="eora",
        summary="compensates a compressed model: SVD of the compression error in the inputs' eigenspace",
        reference="Liu et al. 2024, EoRA, arXiv:2410.21271",
        factorize=eora,
        changes_base=False,
        needs_activations=True,
        needs_compressed=True,
    )
)
