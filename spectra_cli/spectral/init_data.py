"""Data-driven adapter initialisations: CorDA and EVA (``init-adapter --method corda|eva``).

Both need statistics of each target module's inputs (``spectra capture`` writes them; see
:mod:`spectra_cli.checkpoint.activations`). Pure functions on tensors: W is out×in, ``lora_A`` r×in,
``lora_B`` out×r, s = α/r, and a method that changes the base returns W_res with W_res + s·B·A = W.

CorDA (Yang et al. 2024, PEFT ``init_lora_weights="corda"``): C = mean xᵀx (in×in), damped to C + λI with
λ = 0.01·mean(diag C), doubled until ‖(C+λI)(C+λI)⁻¹ − I‖_F < 0.05; SVD(W·(C+λI)) = U S V̂ᵀ and
V = (V̂ᵀ (C+λI)⁻¹)ᵀ; IPM keeps the top r triplets, KPM the bottom r; A = √(S/s)·Vᵀ, B = U·√(S/s).

EVA (Paischer et al. 2024, PEFT ``init_lora_weights="eva"``): A = the top-r principal directions of the
mean-centred inputs (optionally whitened), B = 0, base unchanged. Ranks are redistributed over the modules
by explained variance (:func:`eva_plan_ranks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from spectra_cli.errors import CheckpointError, ShapeMismatch, SpectraError
from spectra_cli.spectral import linalg
from spectra_cli.spectral.allocation import eva_components, eva_ranks
from spectra_cli.spectral.init import InitFactors, InitInput, InitMethod, checked_rank, register

if TYPE_CHECKING:  # PyTorch is imported by the functions that run, so the registry imports without it
    import torch

    from spectra_cli.checkpoint.activations import ModuleActivations

CORDA_DAMP_START = 0.01  # λ starts at this fraction of mean(diag C) ...
CORDA_INV_TOL = 0.05  # ... and doubles until ‖C_λ C_λ⁻¹ − I‖_F is below this
_CORDA_MAX_DOUBLINGS = 60


def corda_damped_inverse(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Damp a second-moment matrix C (in×in) as CorDA does; return (C + λI, its inverse, λ/mean(diag C)).

    λ = 0.01·mean(diag C), doubled until ‖(C+λI)(C+λI)⁻¹ − I‖_F < 0.05 (PEFT's ``collect_eigens_for_layer``),
    computed in C's dtype.
    """
    import torch

    n = c.shape[0]
    mean_diag = torch.mean(torch.diagonal(c))
    if not bool(torch.isfinite(c).all()) or float(mean_diag) <= 0.0:
        raise SpectraError(
            "the input second moment is zero or not finite, so CorDA cannot use it; capture the activations "
            "again on data that reaches this module"
        )
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    damp = CORDA_DAMP_START
    for _ in range(_CORDA_MAX_DOUBLINGS):
        fixed = c + eye * (mean_diag * damp)
        inv = torch.linalg.inv(fixed)
        if float(torch.dist(fixed @ inv, eye)) < CORDA_INV_TOL:
            return fixed, inv, damp
        damp *= 2
    raise SpectraError("could not damp the input second moment into an invertible matrix for CorDA")


def corda_factorize(inp: InitInput) -> InitFactors:
    """CorDA factors of one module (options: ``mode`` "ipm" (default) or "kpm").

    Needs ``inp.activations`` with the uncentred second moment C = mean xᵀx. Computed in the weight's dtype
    on its device. ``info``: ``damping`` (λ/mean(diag C)) and ``relative_residual`` ‖W_res‖_F/‖W‖_F.
    """
    import torch

    mode = str(inp.options.get("mode", "ipm")).lower()
    if mode not in ("ipm", "kpm"):
        raise SpectraError(f"CorDA mode {mode!r} is unknown; use ipm (instruction-previewed) or kpm")
    if inp.activations is None:
        raise SpectraError(f"{inp.name}: CorDA needs activations; pass --activations from `spectra capture`")
    w = inp.weight
    in_dim = w.shape[1]
    r = checked_rank(inp)
    c_np = inp.activations.second_moment()
    if c_np.shape != (in_dim, in_dim):
        raise ShapeMismatch(
            f"{inp.name}: the input second moment is {c_np.shape[0]}×{c_np.shape[1]}, the module takes {in_dim} "
            "inputs; capture the activations from this model"
        )
    c = torch.as_tensor(np.ascontiguousarray(c_np), dtype=w.dtype, device=w.device)
    try:
        fixed, inv, damp = corda_damped_inverse(c)
    except SpectraError as e:
        raise SpectraError(f"{inp.name}: {e}") from None
    svd = linalg.thin_svd(w @ fixed)
    u, s, vh = svd.u, svd.s, svd.vt
    v = (vh @ inv).T  # in×min(out, in), not orthonormal
    sl = slice(0, r) if mode == "ipm" else slice(s.shape[0] - r, s.shape[0])
    u, s, v = u[:, sl], s[sl], v[:, sl]
    root = torch.sqrt(s / inp.scale)
    a = (v.T * root[:, None]).contiguous()
    b = (u * root[None, :]).contiguous()
    residual = w - inp.scale * (b @ a)
    norm = float(torch.linalg.norm(w))
    rel = float(torch.linalg.norm(residual)) / norm if norm > 0 else 0.0
    return InitFactors(
        A=a, B=b, residual=residual, info={"damping": damp, "relative_residual": rel, "mode": mode}
    )


def _total_variance(acts: ModuleActivations) -> float | None:
    """Σ per-feature variance of the inputs (population), when the file lets us compute it."""
    if acts.input_variance is not None:
        return float(np.sum(acts.input_variance))
    if acts.input_samples is not None:
        x = acts.input_samples
        return float(((x - x.mean(axis=0)) ** 2).sum() / max(len(x), 1))
    if acts.input_covariance is not None and acts.input_mean is not None:
        return float(np.trace(acts.input_covariance) - acts.input_mean @ acts.input_mean)
    return None


def eva_factorize(inp: InitInput) -> InitFactors:
    """EVA factors of one module: A = top-r principal directions of its inputs (r×in), B = 0 (out×r).

    With ``options["whiten"]`` each row is divided by √σₖ, σₖ = √(N·λₖ) the k-th singular value of the
    mean-centred N×in input matrix (PEFT's convention: ``IncrementalPCA.singular_values_``, with
    σₖ² = ratioₖ·Σⱼ varⱼ·N). That needs the total variance and N (``tokens``), so the file must hold
    ``input_variance`` (spectra capture writes it), ``input_covariance`` with ``input_mean``, or
    ``input_samples``. The base is unchanged (residual None).
    """
    import torch

    if inp.activations is None:
        raise SpectraError(f"{inp.name}: EVA needs activations; pass --activations from `spectra capture`")
    w = inp.weight
    out_dim, in_dim = w.shape
    r = checked_rank(inp, in_dim)
    acts = inp.activations
    if acts.in_features != in_dim:
        raise ShapeMismatch(
            f"{inp.name}: activations have {acts.in_features} input features, the module takes {in_dim}"
        )
    comps, ratios = acts.pca(r)
    if len(comps) < r:
        raise CheckpointError(
            f"{inp.name}: the activations give only {len(comps)} principal directions, {r} needed"
        )
    a = torch.as_tensor(np.ascontiguousarray(comps[:r]), dtype=w.dtype, device=w.device)
    if inp.options.get("whiten", False):
        total = _total_variance(acts)
        n = acts.tokens or (len(acts.input_samples) if acts.input_samples is not None else 0)
        if total is None or n <= 0:
            raise CheckpointError(
                f"{inp.name}: whitening needs the inputs' total variance and token count; store "
                "input_variance and tokens (spectra capture writes both), or capture with `--stats both`"
            )
        sv = np.sqrt(np.clip(np.asarray(ratios[:r]) * total * n, 0.0, None))
        if np.any(sv <= 0):
            raise SpectraError(
                f"{inp.name}: a principal direction has zero variance, so it cannot be whitened"
            )
        a = a / torch.as_tensor(np.sqrt(sv), dtype=w.dtype, device=w.device)[:, None]
    b = torch.zeros(out_dim, r, dtype=w.dtype, device=w.device)
    info = {"explained_variance": float(np.sum(ratios[:r]))}
    return InitFactors(A=a.contiguous(), B=b, residual=None, info=info)


def eva_plan_ranks(
    activations: Mapping[str, ModuleActivations], rank: int, options: Mapping[str, Any]
) -> dict[str, int]:
    """EVA's rank redistribution: module → rank (0 = no adapter), the total at most rank × modules.

    Takes the explained-variance ratios of the top round(ρ·r) components of every module's inputs (ρ =
    ``options["rho"]``, default 2; capped by the input width) and hands them to
    :func:`spectra_cli.spectral.allocation.eva_ranks`, the one implementation of the rule that ``allocate
    --strategy eva`` also uses: sort them all globally, keep the top r × (number of modules), count per module
    (PEFT's ``_get_rank_distribution``); ties keep the modules' order. ``options["redistribute"] = False``
    gives every module r. Modules sharing an input (aliases) each take part with their own copy of the
    ratios, as in PEFT.
    """
    names = list(activations)
    if rank < 1:
        raise SpectraError(f"rank {rank} must be at least 1")
    rho = float(options.get("rho", 2.0))
    if rho < 1:
        raise SpectraError(f"rho {rho:g} must be at least 1 (1 means no redistribution)")
    if not options.get("redistribute", True):
        return {n: rank for n in names}
    k = eva_components(rank, rho)
    explained = {n: np.asarray(activations[n].pca(min(k, activations[n].in_features))[1]) for n in names}
    return eva_ranks(explained, rank, rho)


def eva_alpha(alpha: float, rank: int, new_rank: int) -> float:
    """α for a module whose rank changed from r to r′, keeping α/r constant (α′ = α·r′/r)."""
    return alpha * new_rank / rank if rank else alpha


register(
    InitMethod(
        name="corda",
        summary="Context-oriented decomposition: SVD of W·C (C = input second moment); IPM keeps the top r, "
        "KPM the bottom r; residual base",
        reference="Yang et al. 2024, CorDA: Context-Oriented Decomposition Adaptation (arXiv:2406.05223)",
        factorize=corda_factorize,
        parameters="--corda-mode [ipm|kpm]",
        changes_base=True,
        needs_activations=True,
    )
)

register(
    InitMethod(
        name="eva",
        summary="Explained-variance adaptation: A = top principal directions of the inputs, B = 0, ranks "
        "redistributed by explained variance; base unchanged",
        reference="Paischer et al. 2024, One Initialization to Rule them All: Fine-tuning via Explained "
        "Variance Adaptation (arXiv:2410.07170)",
        factorize=eva_factorize,
        parameters="--rho RHO, --whiten, --no-redistribute",
        changes_base=False,
        needs_activations=True,
        plan_ranks=eva_plan_ranks,
    )
)

__all__ = [
    "corda_damped_inverse",
    "corda_factorize",
    "eva_alpha",
    "eva_factorize",
    "eva_plan_ranks",
]
