"""LoRA-GA (Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", arXiv:2407.05000):
the adapter whose first update step best matches the first step of full fine-tuning, from the SVD of each
weight's averaged gradient G (``InitInput.tuned`` holds G, out×in, read from a gradients file laid out like the
model: each target weight's mean gradient under the weight's own tensor name).

As PEFT 0.21's ``LoraLayer.lora_ga_init`` with ``LoraGAConfig``'s defaults:

    U, S, V = torch.svd_lowrank(G, q=min(4r, min(out, in)), niter=4);  keep the first 2r triplets
    direction "ArB2r" (default): A = Vᵀ[:r], B = U[:, r:2r]·diag(S[r:2r])
              "A2rBr": A = Vᵀ[r:2r], B = U[:, :r]·diag(S[:r]);  "ArBr": A = Vᵀ[1:2r:2], B = U[:, 0:2r:2]·diag(S[0:2r:2])
    scale "stable" (default): B ·= out^{1/4}/√γ, γ = ``options["stable_gamma"]`` (16);  "unit": nothing;
          "gd_scale": A /= s, B /= s
    W_res = W − s·B·A (computed in the weight's precision), so the model is unchanged at step 0.

The randomized SVD draws from torch's generator seeded with
:func:`~spectra_cli.spectral.init_peft.module_seed` (``options["seed"]``, default 0) inside a forked RNG state:
reproducible, and the caller's RNG untouched. When 4r ≥ min(out, in) the range finder spans everything and the
result is the exact SVD (up to signs). PEFT's "random" direction and "weight_svd" scale are not offered.
"""

from __future__ import annotations

from typing import Any

from spectra_cli.errors import ShapeMismatch, SpectraError
from spectra_cli.spectral import linalg
from spectra_cli.spectral.init import InitFactors, InitInput, InitMethod, register
from spectra_cli.spectral.init_peft import module_seed

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
SCALES = ("stable", "unit", "gd_scale")


def lora_ga(inp: InitInput) -> InitFactors:
    """LoRA-GA factors of one module (see the module's docstring)."""
    import torch

    direction = str(inp.options.get("direction", "ArB2r"))
    scale = str(inp.options.get("ga_scale", "stable"))
    gamma = float(inp.options.get("stable_gamma", 16))
    if direction not in DIRECTIONS or scale not in SCALES:
        raise SpectraError(f"LoRA-GA: direction must be one of {DIRECTIONS} and scale one of {SCALES}")
    if inp.tuned is None:
        raise SpectraError(f"{inp.name}: LoRA-GA needs the weights' gradients (--gradients FILE)")
    w, g = inp.weight, inp.tuned.to(torch.float32)
    m, n = w.shape
    r = int(inp.rank)
    if not 1 <= 2 * r <= min(m, n):
        raise ShapeMismatch(f"{inp.name}: LoRA-GA needs 2r ≤ min(out, in) = {min(m, n)}; got r = {r}")
    if not float(g.abs().max()) > 0:
        raise SpectraError(f"{inp.name}: its gradient is zero; capture gradients on data that reaches it")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(module_seed(int(inp.options.get("seed", 0)), inp.name))
        svd = linalg.lowrank_svd(g, min(4 * r, min(m, n)), 4)
    u, s, vh = svd.u[:, : 2 * r], svd.s[: 2 * r], svd.vt[: 2 * r]
    if direction == "ArB2r":
        a, b, s_b = vh[:r], u[:, r : 2 * r], s[r : 2 * r]
    elif direction == "A2rBr":
        a, b, s_b = vh[r : 2 * r], u[:, :r], s[:r]
    else:
        a, b, s_b = vh[1 : 2 * r : 2], u[:, 0 : 2 * r : 2], s[0 : 2 * r : 2]
    b = b * s_b[None, :]
    if scale == "stable":
        b = b * (m**0.25 / gamma**0.5)
    elif scale == "gd_scale":
        a, b = a / inp.scale, b / inp.scale
    a, b = a.to(w.dtype).contiguous(), b.to(w.dtype).contiguous()
    residual = w - inp.scale * (b @ a)
    info: dict[str, Any] = {"grad_norm": float(torch.linalg.norm(g)), "sigma_1": float(s[0])}
    return InitFactors(A=a, B=b, residual=residual, info=info)


LORA_GA = register(
    InitMethod(
        name="lora-ga",
        summary="A, B from disjoint singular ranges of the mean gradient (ArB2r, stable scale); residual base",
        reference="Wang et al. 2024, LoRA-GA, arXiv:2407.05000; PEFT LoraGAConfig + preprocess_loraga",
        factorize=lora_ga,
        needs_gradients=True,
    )
)
