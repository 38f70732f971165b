"""PEFT's combination types (``LoraModel.add_weighted_adapter``) as merge methods, under PEFT's names, computed
as PEFT computes them (torch, in the adapters' dtype) so the results agree with it.

Two families (see ``peft/tuners/lora/model.py`` and ``peft/utils/merge_utils.py``):

- On the factors (``linear``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): every adapter's lora_A and
  lora_B are combined separately, with weights sgn(wᵢsᵢ)·√|wᵢsᵢ| on A and √|wᵢsᵢ| on B (sᵢ = αᵢ/rᵢ); the
  result is an adapter of the same rank r and scale 1. Not Σ wᵢΔWᵢ: the cross terms BᵢAⱼ stay. All adapters
  of a module need the same rank.
- On the dense updates, then truncated (``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
  ``magnitude_prune_svd``): ΔW = combine(wᵢ, ΔWᵢ), B = U_k·diag(σ_k), A = V_kᵀ with k = ``rank`` (0: the
  largest input rank, PEFT's default). ``svd`` (the plain weighted sum) on factored inputs uses the exact
  factored SVD (QR of the stacked factors + an R×R SVD), never the dense ΔW.
- ``cat``: A = [w₁s₁A₁; …], B = [B₁ … B_n]: exactly Σ wᵢΔWᵢ at rank Σrᵢ.

Their elementwise pieces, as PEFT: magnitude pruning keeps the top ⌊density·numel⌋ entries (``torch.topk``);
DARE keeps each entry with probability ``density`` (``torch.bernoulli``) and rescales by 1/density; TIES elects
the sign of the summed *unweighted* pruned tensors ("total") and divides the weighted agreeing sum by the
number of agreeing tasks. DARE's masks come from a torch generator seeded with ``seed`` (the merge flow adds
the module's index); PEFT draws from torch's global generator, so ``torch.manual_seed(seed)`` before PEFT's
call gives the same masks for a module drawn first. Masks are drawn in the logical out×in layout (PEFT: the
stored layout, in×out for GPT-2 ``Conv1D``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from spectra_cli.spectral.linalg import NUMPY, Backend
from spectra_cli.spectral.merge import xp
from spectra_cli.spectral.merge.updates import (
    MergeError,
    MergeOutcome,
    Update,
    factored_svd,
    out_dtype,
    param_float,
    stack_factors,
    zero_outcome,
)

if TYPE_CHECKING:
    import torch

FACTOR_TYPES = ("linear", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


def _live(updates: Sequence[Update], weights: Sequence[float]) -> list[tuple[Update, float]]:
    """The (update, weight) pairs of the adapters that change the module (PEFT skips the others)."""
    out = []
    for u, w in zip(updates, weights, strict=True):
        if u.is_factored:
            assert u.B is not None and u.A is not None
            if not (xp.any_nonzero(u.B) and xp.any_nonzero(u.A)):
                continue
        elif not xp.any_nonzero(u.to_dense()):
            continue
        out.append((u, float(w)))
    return out


def _raw(u: Update, what: str) -> tuple[np.ndarray, np.ndarray, float]:
    """The stored lora_B, lora_A and scale s of an adapter's update (B was s·lora_B)."""
    if not u.is_factored or u.lora_scale is None:
        raise MergeError(f"--method {what} combines LoRA factors (as PEFT's add_weighted_adapter): give LoRA "
                         "adapters only, or use task-arithmetic / svd for full fine-tunes")  # fmt: skip
    assert u.B is not None and u.A is not None
    s = float(u.lora_scale)
    return xp.astype(u.B / s, u.dtype), u.A, s


# ---- PEFT's elementwise pieces (merge_utils), in torch -----------------------------------------------------


def _prune(x: torch.Tensor, density: float, how: str, gen: torch.Generator | None) -> torch.Tensor:
    import torch

    if density >= 1:
        return x
    if how == "magnitude":
        mask = torch.zeros_like(x).reshape(-1)
        top = torch.topk(x.abs().reshape(-1), k=int(density * x.numel()), largest=True)
        mask[top[1]] = 1
        return x * mask.reshape(x.shape)
    # drawn on the CPU generator whatever the device, so every backend draws the same masks
    mask = torch.bernoulli(torch.full(tuple(x.shape), density, dtype=x.dtype), generator=gen).to(x.device)
    return x * mask / density


def _combine(kind: str, xs: list[torch.Tensor], w: list[float], density: float,
             gen: torch.Generator | None) -> torch.Tensor:  # fmt: skip
    """PEFT's task_arithmetic / magnitude_prune / dare_linear / ties / dare_ties on same-shaped tensors."""
    import torch

    if kind in ("dare_linear", "dare_ties"):
        xs = [_prune(x, density, "random", gen) for x in xs]
    elif kind in ("magnitude_prune", "ties"):
        xs = [_prune(x, density, "magnitude", None) for x in xs]
    stacked = torch.stack(xs, dim=0)
    wt = torch.tensor(w, dtype=stacked.dtype, device=stacked.device).view((-1,) + (1,) * (stacked.dim() - 1))
    weighted = stacked * wt
    if kind in ("ties", "dare_ties"):
        majority = torch.where(stacked.sum(dim=0) >= 0, 1, -1)
        agree = stacked.sign() == majority
        return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)
    return weighted.sum(dim=0)


def _density(kind: str, params: Mapping[str, Any]) -> float:
    if kind in ("linear", "svd"):
        return 1.0
    return param_float(params, "density", 0.0, 1.0)


def _generator(kind: str, params: Mapping[str, Any]) -> torch.Generator | None:
    if not kind.startswith("dare"):
        return None
    import torch

    return torch.Generator().manual_seed(int(param_float(params, "seed", 0.0)))


def module_seed(params: Mapping[str, Any], k: int) -> dict[str, Any]:
    """The parameters of the k-th module (from 0): a ``seed`` parameter becomes seed + k (DARE's masks differ
    between modules, reproducibly); others are returned as they are."""
    if "seed" not in params:
        return dict(params)
    return {**params, "seed": int(param_float(params, "seed", 0.0)) + k}


# ---- the methods --------------------------------------------------------------------------------------------


def merge_factorwise(kind: str):  # type: ignore[no-untyped-def]
    """A factor-wise PEFT combination (``linear``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``)."""

    def merge(updates: Sequence[Update], weights: Sequence[float], params: Mapping[str, Any],
              backend: Backend = NUMPY) -> MergeOutcome:  # fmt: skip

        live = _live(updates, weights)
        if not live:
            return zero_outcome(updates)
        raws = [(*_raw(u, kind), w) for u, w in live]
        ranks = {a.shape[0] for _, a, _, _ in raws}
        if len(ranks) > 1:
            raise MergeError(f"--method {kind} needs adapters of one rank per module (got ranks "
                             f"{sorted(ranks)}); use cat or svd for adapters of different ranks")  # fmt: skip
        wa, wb = [], []
        for _, _, s, w in raws:
            ws = w * s
            wa.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
            wb.append(math.sqrt(abs(ws)))
        density, gen = _density(kind, params), _generator(kind, params)
        a = _combine(kind, [_tensor(x) for _, x, _, _ in raws], wa, density, gen)
        b = _combine(kind, [_tensor(x) for x, _, _, _ in raws], wb, density, gen)
        dtype = out_dtype(updates)
        on_device = xp.is_torch(raws[0][0])  # the torch route: the result stays where the inputs are
        b_out, a_out = (b, a) if on_device else (b.numpy(), a.numpy())
        return MergeOutcome(Update(B=xp.astype(b_out, dtype), A=xp.astype(a_out, dtype)), {"rank": float(a.shape[0])})

    return merge


def _svd_rank(params: Mapping[str, Any], updates: Sequence[Update], kind: str) -> int:
    k = int(param_float(params, "rank", 0.0))
    if k == 0:
        if not all(u.is_factored for u in updates):
            raise MergeError(f"--method {kind} on full fine-tunes needs an output rank: --param rank=R")
        k = max(u.rank for u in updates)
    return k


def _tensor(x: Any) -> torch.Tensor:
    """A tensor of x: itself on the torch route, a CPU tensor sharing a NumPy array's memory otherwise."""
    import torch

    return x if xp.is_torch(x) else torch.from_numpy(np.ascontiguousarray(x))


def _delta(u: Update) -> torch.Tensor:
    """ΔW as PEFT's get_delta_weight forms it: (lora_B @ lora_A)·s, in the adapter's dtype."""

    if u.is_factored and u.lora_scale is not None:
        b, a, s = _raw(u, "svd")
        return (_tensor(b) @ _tensor(a)) * s
    return _tensor(u.to_dense())


def merge_svd_type(kind: str):  # type: ignore[no-untyped-def]
    """A PEFT ``*_svd`` combination: combine the dense ΔWᵢ elementwise, keep the top ``rank`` triplets."""
    inner_kind = {"svd": "linear", "ties_svd": "ties", "dare_linear_svd": "dare_linear",
                  "dare_ties_svd": "dare_ties", "magnitude_prune_svd": "magnitude_prune"}[kind]  # fmt: skip

    def merge(updates: Sequence[Update], weights: Sequence[float], params: Mapping[str, Any],
              backend: Backend = NUMPY) -> MergeOutcome:  # fmt: skip
        from spectra_cli.spectral import linalg

        live = _live(updates, weights)
        if not live:
            return zero_outcome(updates)
        k = _svd_rank(params, updates, kind)
        dtype = out_dtype(updates)
        if kind == "svd" and all(u.is_factored for u, _ in live):
            uu, s, vt = factored_svd([u for u, _ in live], [w for _, w in live], None, backend)
        else:
            d = _combine(inner_kind, [_delta(u) for u, _ in live], [w for _, w in live], _density(kind, params),
                         _generator(kind, params))  # fmt: skip
            on_device = xp.is_torch(live[0][0].dense if live[0][0].dense is not None else live[0][0].B)
            svd = linalg.thin_svd(xp.as_f64(d) if on_device else d.numpy().astype(np.float64), backend)
            uu, s, vt = svd.u, svd.s, svd.vt
        total = xp.total(s**2)
        kept = xp.total(s[:k] ** 2) / total if total > 0 else 1.0
        # PEFT keeps k columns even past the rank: zeros change nothing
        b, a = xp.pad_rank(uu[:, :k] * s[:k], vt[:k], k)
        return MergeOutcome(Update(B=xp.astype(b, dtype), A=xp.astype(a, dtype)), {"energy_kept": kept, "rank": float(k)})

    return merge


def merge_cat(
    updates: Sequence[Update], weights: Sequence[float], params: Mapping[str, Any], backend: Backend = NUMPY
) -> MergeOutcome:
    """PEFT's ``cat``: A = [w₁s₁A₁; …; w_ns_nA_n], B = [B₁ … B_n] (stored factors): Σ wᵢΔWᵢ exactly, rank Σrᵢ."""
    live = _live(updates, weights)
    if not live:
        return zero_outcome(updates)
    for u, _ in live:
        _raw(u, "cat")
    b, a = stack_factors([u for u, _ in live], [w for _, w in live])
    dtype = out_dtype(updates)
    return MergeOutcome(Update(B=xp.astype(b, dtype), A=xp.astype(a, dtype)), {"energy_kept": 1.0, "rank": float(a.shape[0])})
