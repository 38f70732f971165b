"""Merges in the singular bases of the updates: TSV-Merge (Gargiulo et al. CVPR 2025) and KnOTS (Stoica et
al. ICLR 2025).

- ``tsv``: per task keep the top ⌊min(out, in)/T⌋ singular triplets, concatenate the U's and V's,
  orthogonalise each by Procrustes (X⊥ = PQᵀ from X = PSQᵀ), ΔW = α·U⊥·diag(σ)·V⊥ᵀ.
- ``knots``: SVD of [ΔW₁ … ΔW_T] (column concatenation) → shared U; task i is its block diag(s)·Vᵢᵀ; the
  blocks are merged (linear sum, or TIES with a disjoint mean) and mapped back with U.

Every decomposition runs through :mod:`spectra_cli.spectral.linalg` on the ``backend`` given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spectra_cli.spectral import linalg
from spectra_cli.spectral.arrays import sqrt0
from spectra_cli.spectral.linalg import NUMPY, Backend
from spectra_cli.spectral.merge import xp
from spectra_cli.spectral.merge.elementwise import ties_combine
from spectra_cli.spectral.merge.updates import (
    GRAM_RTOL,
    MergeError,
    MergeOutcome,
    Update,
    check_shapes,
    dense_or_factored,
    f64,
    factored_svd,
    inner,
    out_dtype,
    param_float,
    stack_factors,
)


def tsv_rank(shape: tuple[int, int], n_tasks: int, rank: int) -> int:
    """Triplets asked of each task by TSV-Merge: ⌊min(out, in)/T⌋ (the authors' rule, by integer division),
    at most the update's r for a factored update, at least 1. Of those, only triplets with σ > 1e-7·σ₁ are
    used (see :func:`merge_tsv`)."""
    return max(1, min(min(shape) // n_tasks, rank))


def merge_tsv(
    updates: Sequence[Update], weights: Sequence[float], params: Mapping[str, Any], backend: Backend = NUMPY
) -> MergeOutcome:
    # Deviation from the published code, only for rank-deficient updates: triplets with σ ≤ 1e-7·σ₁ are
    # dropped. They carry no energy, but their singular vectors are arbitrary (LAPACK's choice of a null
    # basis) and would still move the Procrustes factors; dropping them makes dense and factored inputs agree.
    alpha = param_float(params, "scale")
    n = len(updates)
    us, ss, vts, kept = [], [], [], []
    for u, w in zip(updates, weights, strict=True):
        total = inner(u, u)  # ‖ΔW‖_F², one pass
        ref = u.dense if u.dense is not None else u.B
        if total <= 0:  # a task that left the module alone contributes no triplet (skip its SVD)
            kept.append(1.0)
            us.append(xp.zeros((u.shape[0], 0), ref))
            ss.append(xp.zeros((0,), ref))
            vts.append(xp.zeros((0, u.shape[1]), ref))
            continue
        uu, s, vt = factored_svd([u], None, tsv_rank(u.shape, n, u.rank), backend)
        keep = int((s > GRAM_RTOL * s[0]).sum()) if xp.nelem(s) and s[0] > 0 else 0
        kept.append(xp.total(s[:keep] ** 2) / total)
        us.append(uu[:, :keep])
        ss.append(s[:keep] * w)
        vts.append(vt[:keep])
    u_cat = xp.concat(us, 1)
    vt_cat = xp.concat(vts, 0)
    s_cat = xp.concat(ss)
    dtype = out_dtype(updates)
    stats = {"energy_kept": float(np.mean(kept)), "rank": float(xp.nelem(s_cat))}
    if xp.nelem(s_cat) == 0:  # every update is zero
        out, inn = updates[0].shape
        return MergeOutcome(Update(B=xp.zeros((out, 1), u_cat, dtype), A=xp.zeros((1, inn), u_cat, dtype)), stats)
    u_orth = linalg.procrustes(u_cat, backend)
    vt_orth = linalg.procrustes(vt_cat, backend)
    return MergeOutcome(dense_or_factored(alpha * u_orth * s_cat, vt_orth, dtype), stats)


def knots_svd(
    updates: Sequence[Update], backend: Backend = NUMPY
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """KnOTS alignment: thin SVD of the column concatenation [ΔW₁ … ΔW_T] (out × T·in) = U·diag(s)·Vᵀ,
    keeping σ > 1e-5·σ₁; returns (U out×k, s, [diag(s)·Vᵢᵀ (k×in) per task]).

    Factored updates: [B₁A₁ … B_TA_T] = [B₁ … B_T]·blockdiag(A₁ … A_T); QR of the stacked B's and of each Aᵢᵀ
    give an R×R core, so nothing out×T·in is formed."""
    check_shapes(updates)
    if all(u.is_factored for u in updates):
        b, _ = stack_factors(updates, [1.0] * len(updates))
        qb, rb = linalg.qr(b, backend)
        qas, ras = [], []
        for u in updates:
            assert u.A is not None
            qa, ra = linalg.qr(f64(u.A).T, backend)
            qas.append(qa)
            ras.append(ra)
        core = rb @ _block_diag(ras).T
        svd = linalg.thin_svd(core, backend)
        uc, s, vtc = svd.u, svd.s, svd.vt
        keep = _knots_keep(s)
        u = qb @ uc[:, :keep]
        reps, start = [], 0
        for qa, ra in zip(qas, ras, strict=True):
            width = ra.shape[0]
            reps.append(s[:keep, None] * (vtc[:keep, start : start + width] @ qa.T))
            start += width
        return u, s[:keep], reps
    out, inn = updates[0].shape
    if out <= len(updates) * inn:
        # U from the out×out Gram Σ ΔWᵢΔWᵢᵀ (float64), and diag(s)·Vᵢᵀ = Uᵀ·ΔWᵢ: no out×T·in matrix and no
        # division by small σ; σ is resolved to ~1e-8·σ₁, far inside the 1e-5·σ₁ cut-off
        g = xp.zeros((out, out), updates[0].to_dense())
        for u in updates:
            d = f64(u.to_dense())
            g += d @ d.T
        lam, vec = linalg.eigh(g, backend=backend)
        s = sqrt0(lam)
        keep = _knots_keep(s)
        uu = xp.contiguous(vec[:, :keep])
        return uu, s[:keep], [uu.T @ f64(u.to_dense()) for u in updates]
    cat = xp.concat([f64(u.to_dense()) for u in updates], 1)
    svd = linalg.thin_svd(cat, backend)
    uu, s, vt = svd.u, svd.s, svd.vt
    keep = _knots_keep(s)
    reps = [s[:keep, None] * vt[:keep, i * inn : (i + 1) * inn] for i in range(len(updates))]
    return uu[:, :keep], s[:keep], reps


def _knots_keep(s: np.ndarray) -> int:
    return int((s > 1e-5 * s[0]).sum()) if xp.nelem(s) and s[0] > 0 else 0


def _block_diag(blocks: Sequence[np.ndarray]) -> np.ndarray:
    rows = sum(b.shape[0] for b in blocks)
    cols = sum(b.shape[1] for b in blocks)
    out = xp.zeros((rows, cols), blocks[0])
    r = c = 0
    for b in blocks:
        out[r : r + b.shape[0], c : c + b.shape[1]] = b
        r += b.shape[0]
        c += b.shape[1]
    return out


def merge_knots(
    updates: Sequence[Update], weights: Sequence[float], params: Mapping[str, Any], backend: Backend = NUMPY
) -> MergeOutcome:
    lam = param_float(params, "scale")
    combine = str(params["combine"])
    u, s, reps = knots_svd(updates, backend)
    x = xp.stack([r.reshape(-1) for r in reps])
    if combine == "linear":
        merged = xp.values(weights, x) @ x
        kept = 1.0
    elif combine == "ties":
        merged, kept = ties_combine(x, weights, param_float(params, "density", 0.0, 1.0))
    else:
        raise MergeError(f"knots combine={combine!r} is unknown; use 'linear' or 'ties'")
    if xp.nelem(s) == 0:  # every update is zero
        out, inn = updates[0].shape
        dtype = out_dtype(updates)
        return MergeOutcome(
            Update(B=xp.zeros((out, 1), u, dtype), A=xp.zeros((1, inn), u, dtype)), {"energy_kept": 1.0}
        )
    rep = merged.reshape(xp.nelem(s), -1)
    update = dense_or_factored(lam * u, rep, out_dtype(updates))
    return MergeOutcome(update, {"energy_kept": kept, "rank": float(xp.nelem(s))})
