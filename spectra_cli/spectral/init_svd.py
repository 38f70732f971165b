"""SVD- and QR-based adapter initialisations: PiSSA, MiLoRA, OLoRA, and ``extract`` (a LoRA from a fine-tune).

Each function takes one module (:class:`~spectra_cli.spectral.init.InitInput`, W out×in on the compute
device in float32 or float64) and returns lora_A (r×in), lora_B (out×r) and the residual W_res = W − s·B·A,
computed in the input's precision, so that W_res + s·B·A reproduces W. The conventions are PEFT's
(``peft/tuners/lora/layer.py``, ``pissa_init`` / ``olora_init``), so an adapter written from these factors is
the one PEFT would build with ``init_lora_weights="pissa"`` / ``"pissa_niter_N"`` / ``"olora"``:

- PiSSA: the top r triplets of W = U·S·Vᵀ (from the float64 Gram matrix where ``InitInput.backend`` computes,
  :func:`spectra_cli.spectral.linalg.top_k`; the exact ``torch.linalg.svd``, ``full_matrices=False``, of Wᵀ
  when W is wide, where σ_r is below the Gram route's resolution); A = diag(√(S_r/s))·V_rᵀ,
  B = U_r·diag(√(S_r/s)) with the top r triplets. ``options["niter"] = N`` uses ``torch.svd_lowrank(W, q=r,
  niter=N)`` as PEFT's ``pissa_niter_N`` does (random, so not reproducible bit for bit across runs unless the
  torch seed is fixed).
- MiLoRA: as PiSSA with the bottom r triplets (kept in descending order). No randomized variant: a range
  finder only finds the top of the spectrum.
- OLoRA: Q·R = W (``torch.linalg.qr``, reduced); B = Q[:, :r], A = R[:r, :], W_res = W − s·B·A. As in PEFT
  the factors are *not* divided by s: with s ≠ 1 the adapter holds s·Q_rR_r of W.
- extract: ΔW = W_tuned − W (``InitInput.tuned``); truncated SVD gives B = U_r·√(S_r/s), A = √(S_r/s)·V_rᵀ, so
  s·B·A is the best rank-r approximation of ΔW (Eckart–Young). The base is unchanged (no residual).
  ``options["energy"] = τ`` picks the smallest r whose captured energy Σ_{i≤r}σᵢ²/Σσᵢ² reaches τ (at most
  ``InitInput.rank`` when that is positive; 0 when ΔW = 0, which drops the module).

Per-module figures in ``InitFactors.info``: ``energy`` = the share of ‖W‖²_F (‖ΔW‖²_F for extract) that s·B·A
carries, and for extract ``relative_error`` = ‖ΔW − s·B·A‖_F / ‖ΔW‖_F.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spectra_cli.errors import ShapeMismatch, SpectraError
from spectra_cli.spectral import linalg
from spectra_cli.spectral.init import InitFactors, InitInput, InitMethod, checked_rank, register

if TYPE_CHECKING:  # PyTorch is imported by the functions that run, so the registry imports without it
    import torch


def _niter(inp: InitInput, method: str) -> int | None:
    value = inp.options.get("niter")
    if value is None:
        return None
    n = int(value)
    if n < 0:
        raise SpectraError(f"--fast {n}: the number of power iterations must be 0 or more")
    if method in ("milora", "olora"):
        raise SpectraError(
            f"--fast is not available for {method}: "
            + (
                "a randomized SVD finds only the top of the spectrum"
                if method == "milora"
                else "OLoRA is a QR"
            )
        )
    return n


def _split_sqrt(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (diag(√(s/scale))·vh, u·diag(√(s/scale))), PEFT's PiSSA split of the scale."""
    import torch

    root = torch.sqrt(s / scale)
    a = root[:, None] * vh
    b = u * root[None, :]
    return a.contiguous(), b.contiguous()


def _energy(part: torch.Tensor, total: torch.Tensor) -> float:
    t = float(total)
    return float(part) / t if t > 0 else 0.0


def _top(inp: InitInput, w: torch.Tensor, r: int, niter: int | None) -> tuple[torch.Tensor, ...]:
    """Top-r (U out×r, S r, Vh r×in) of w: the float64 Gram route where ``inp.backend`` computes
    (:func:`~spectra_cli.spectral.linalg.top_k`, exact SVD when σ_r is too small for it), or PEFT's
    ``torch.svd_lowrank(w, q=r, niter)`` when ``niter`` is given."""
    svd = linalg.top_k(w, r, inp.backend) if niter is None else linalg.lowrank_svd(w, r, niter)
    return svd.u, svd.s, svd.vt


def pissa(inp: InitInput) -> InitFactors:
    """PiSSA (Meng et al. 2024): the adapter holds the principal r singular triplets, the residual the rest."""
    checked_rank(inp)
    w, r = inp.weight, inp.rank
    u, s, vh = _top(inp, w, r, _niter(inp, "pissa"))
    a, b = _split_sqrt(u, s, vh, inp.scale)
    residual = w - inp.scale * (b @ a)
    info: dict[str, Any] = {"energy": _energy((s**2).sum(), (w * w).sum())}
    if s.numel():
        info["sigma_r"] = float(s[-1])
    return InitFactors(A=a, B=b, residual=residual, info=info)


def milora(inp: InitInput) -> InitFactors:
    """MiLoRA (Wang et al. 2024): the adapter holds the minor (smallest) r singular triplets."""
    checked_rank(inp)
    _niter(inp, "milora")
    w, r = inp.weight, inp.rank
    bottom, s = linalg.bottom_k(w, r)
    s_r = bottom.s
    a, b = _split_sqrt(bottom.u, s_r, bottom.vt, inp.scale)
    residual = w - inp.scale * (b @ a)
    return InitFactors(
        A=a,
        B=b,
        residual=residual,
        info={"energy": _energy((s_r**2).sum(), (s**2).sum()), "sigma_r": float(s_r[0])},
    )


def olora(inp: InitInput) -> InitFactors:
    """OLoRA (Büyükakyüz 2024): B = Q[:, :r], A = R[:r] of the reduced QR of W (PEFT's ``olora_init``)."""
    checked_rank(inp)
    _niter(inp, "olora")
    w, r = inp.weight, inp.rank
    q, rr = linalg.qr(w)
    b, a = q[:, :r].contiguous(), rr[:r].contiguous()
    update = inp.scale * (b @ a)
    residual = w - update
    return InitFactors(
        A=a, B=b, residual=residual, info={"energy": _energy((update * update).sum(), (w * w).sum())}
    )


def extract(inp: InitInput) -> InitFactors:
    """A LoRA adapter from a fine-tune: the truncated SVD of ΔW = W_tuned − W (base unchanged)."""
    import torch

    if inp.tuned is None:
        raise SpectraError(f"{inp.name}: extract needs the fine-tuned checkpoint (--tuned TUNED)")
    if inp.tuned.shape != inp.weight.shape:
        raise ShapeMismatch(
            f"{inp.name}: the tuned weight is {tuple(inp.tuned.shape)}, the base {tuple(inp.weight.shape)}"
        )
    energy = inp.options.get("energy")
    checked_rank(inp, allow_zero=energy is not None)
    delta = inp.tuned - inp.weight
    total = (delta * delta).sum()
    niter = _niter(inp, "extract")
    if energy is not None:
        tau = float(energy)
        if not 0.0 < tau <= 1.0:
            raise SpectraError(f"--energy {tau}: the energy threshold must be in (0, 1]")
        full = linalg.thin_svd(delta)
        u, s, vh = full.u, full.s, full.vt
        cap = inp.rank if inp.rank > 0 else s.numel()
        if float(total) == 0.0:
            r = 0
        else:
            cum = torch.cumsum(s**2, 0) / total
            # the tolerance absorbs rounding of the cumulative sum when τ = 1
            r = (
                int(
                    torch.searchsorted(
                        cum, torch.tensor(tau, dtype=cum.dtype, device=cum.device) - 1e-6
                    ).item()
                )
                + 1
            )
        r = min(r, cap, s.numel())
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, vh = _top(inp, delta, inp.rank, niter)
    a, b = _split_sqrt(u, s, vh, inp.scale)
    err = delta - inp.scale * (b @ a)
    rel = float(torch.sqrt((err * err).sum() / total)) if float(total) > 0 else 0.0
    return InitFactors(
        A=a, B=b, residual=None, info={"relative_error": rel, "energy": _energy((s**2).sum(), total)}
    )


PISSA = register(
    InitMethod(
        name="pissa",
        summary="top-r singular triplets in the adapter, the rest in the residual (--fast N: randomized SVD)",
        reference="Meng et al. 2024, PiSSA, arXiv:2404.02948; PEFT init_lora_weights='pissa'",
        factorize=pissa,
    )
)
MILORA = register(
    InitMethod(
        name="milora",
        summary="bottom-r (minor) singular triplets in the adapter, the principal part kept in the residual",
        reference="Wang et al. 2024, MiLoRA, arXiv:2406.09044",
        factorize=milora,
    )
)
OLORA = register(
    InitMethod(
        name="olora",
        summary="B = Q[:, :r], A = R[:r] of the QR decomposition of W",
        reference="Büyükakyüz 2024, OLoRA, arXiv:2406.01775; PEFT init_lora_weights='olora'",
        factorize=olora,
    )
)
EXTRACT = register(
    InitMethod(
        name="extract",
        summary="LoRA adapter from a fine-tune: truncated SVD of ΔW = tuned − base (--tuned, --energy τ)",
        reference="Eckart–Young truncation of ΔW (as in mergekit's extract_lora / PEFT's convert_to_lora)",
        factorize=extract,
        changes_base=False,
        needs_tuned=True,
    )
)
