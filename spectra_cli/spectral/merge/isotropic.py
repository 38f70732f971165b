"""Isotropic merging (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", arXiv:2502.04959; the authors' code: github.com/danielm1405/iso-merging).

- ``iso-c``: M = Σ wᵢΔWᵢ = U·diag(σ)·Vᵀ; ΔW = α·σ̄·U·Vᵀ with σ̄ the mean singular value (a flat spectrum).
- ``iso-cts``: r = rank, k = ⌊f·r⌋ common directions (f = ``common_fraction``, 0.8) adjusted so the r − k
  task-specific ones divide evenly among the T tasks (k = r − round((r − k)/T)·T); the top-k singular triplets
  of M are the common subspace; each task's update with the common part removed, (I − U_kU_kᵀ)ΔWᵢ, gives its
  top (r − k)/T triplets; all the U's and V's are concatenated and orthogonalised (Procrustes, X⊥ = PQᵀ from
  X = PSQᵀ), and every σ is replaced by the mean of the kept σ's: ΔW = α·σ̄·U⊥·V⊥ᵀ.

One deviation from the authors' code, for rank-deficient sums (e.g. LoRA adapters, rank ≤ Σrᵢ): r is the
numerical rank of M (σ > 1e-10·σ₁), not min(out, in). The authors flatten all min(out, in) values, so the
null directions of M (arbitrary, LAPACK's choice) would enter the merge with weight σ̄. On full-rank sums (the
paper's full fine-tunes) the two agree. ``iso-c`` on factored inputs stays factored (the exact factored SVD).
The scale α is chosen on validation in the paper (default 1 here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spectra_cli.spectral import linalg
from spectra_cli.spectral.linalg import NUMPY, Backend
from spectra_cli.spectral.merge import xp
from spectra_cli.spectral.merge.updates import (
    RANK_RTOL,
    MergeError,
    MergeOutcome,
    Update,
    dense_or_factored,
    f64,
    factored_svd,
    out_dtype,
    param_float,
    zero_outcome,
)


def _numerical(s: np.ndarray) -> int:
    return int((s > RANK_RTOL * s[0]).sum()) if xp.nelem(s) and s[0] > 0 else 0


def merge_iso_c(
    updates: Sequence[Update], weights: Sequence[float], params: Mapping[str, Any], backend: Backend = NUMPY
) -> MergeOutcome:
    alpha = param_float(params, "scale")
    u, s, vt = factored_svd(updates, weights, None, backend)
    r = _numerical(s)
    if r == 0:
        return zero_outcome(updates)
    mean = float(s[:r].mean())
    return MergeOutcome(
        dense_or_factored(alpha * mean * u[:, :r], vt[:r], out_dtype(updates)),
        {"rank": float(r), "flat_sigma": mean},
    )


def iso_cts_split(rank: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(k common directions, directions per task), the authors' rule: k = ⌊f·r⌋, then the r − k task-specific
    directions rounded to a multiple of T and k = r − that."""
    k = int(rank * common_fraction)
    specific = round((rank - k) / n_tasks) * n_tasks
    k = rank - specific
    return k, specific // n_tasks


def merge_iso_cts(
    updates: Sequence[Update], weights: Sequence[float], params: Mapping[str, Any], backend: Backend = NUMPY
) -> MergeOutcome:
    alpha = param_float(params, "scale")
    frac = param_float(params, "common_fraction", 0.0, 1.0)
    n = len(updates)
    u, s, vt = factored_svd(updates, weights, None, backend)
    r = _numerical(s)
    if r == 0:
        return zero_outcome(updates)
    k, per_task = iso_cts_split(r, n, frac)
    if k < 0:
        raise MergeError(f"iso-cts: rank {r} cannot hold {n} task subspaces; raise common_fraction")
    uc, sc, vtc = u[:, :k], s[:k], vt[:k]
    us, ss, vts = [], [], []
    for upd, w in zip(updates, weights, strict=True):
        if per_task == 0:
            break
        d = float(w) * f64(upd.to_dense())
        d = d - uc @ (uc.T @ d)
        svd = linalg.thin_svd(d, backend)
        us.append(svd.u[:, :per_task])
        ss.append(svd.s[:per_task])
        vts.append(svd.vt[:per_task])
    u_all = xp.concat([*us, uc], 1)
    vt_all = xp.concat([*vts, vtc], 0)
    s_all = xp.concat([*ss, sc])
    mean = float(s_all.mean())
    u_orth = linalg.procrustes(u_all, backend)
    vt_orth = linalg.procrustes(vt_all, backend)
    return MergeOutcome(
        dense_or_factored(alpha * mean * u_orth, vt_orth, out_dtype(updates)),
        {"rank": float(xp.nelem(s_all)), "common": float(k), "per_task": float(per_task), "flat_sigma": mean},
    )
