"""The numeric core of ``spectra merge``: task updates, merge methods and the reversible basis merge (RMM).

Conventions: a task update ΔW is out×in (``nn.Linear`` layout). An :class:`Update` is either dense or
factored, ΔW = B·A with B out×r and A r×in (a PEFT LoRA update with its scale s = α/r folded into B).
Factored updates stay factored: every quantity here (norms, inner products, SVDs, the RMM basis) is computed
from the factors by QR of the stacked B's and A's and small r×r problems, never by forming out×in.

Methods (the registry :data:`METHODS` in :mod:`.registry`; the papers' "Merging by basis" formulas):

- ``task-arithmetic`` (Ilharco et al. 2023): ΔW = λ·Σ wᵢΔWᵢ.
- ``ties`` (Yadav et al. 2023, as mergekit): per task keep the top ``density`` fraction of entries by magnitude,
  elect each entry's sign by the summed (weighted) mass, average the agreeing entries, times λ.
- ``tsv`` (TSV-Merge, Gargiulo et al. CVPR 2025): per task keep the top ⌊min(out, in)/T⌋ singular triplets,
  concatenate the U's and V's, orthogonalise each by Procrustes (X⊥ = PQᵀ from X = PSQᵀ),
  ΔW = α·U⊥·diag(σ)·V⊥ᵀ.
- ``knots`` (KnOTS, Stoica et al. ICLR 2025): SVD of [ΔW₁ … ΔW_T] (column concatenation) → shared U; task i
  is its block diag(s)·Vᵢᵀ; the blocks are merged (linear sum, or TIES with a disjoint mean) and mapped back
  with U.

The reversible merge (:func:`rmm_fit`, :func:`rmm_reconstruct`) stores, per module, a basis of p elements and
an n×p coefficient matrix from which every task's ΔWᵢ is recovered; the basis is the Eckart–Young optimum of
the stacked (optionally centred) updates, computed through their n×n Gram matrix.

One file per family: :mod:`.updates` (updates, inner products, exact compression and SVD of sums),
:mod:`.elementwise` (task arithmetic, TIES), :mod:`.subspace` (TSV, KnOTS), :mod:`.rmm` (the reversible merge,
interference), :mod:`.registry`. Every decomposition goes through :mod:`spectra_cli.spectral.linalg`, on the
``backend`` the caller passes (NumPy by default).
"""

from spectra_cli.spectral.merge.elementwise import merge_task_arithmetic, merge_ties, ties_combine
from spectra_cli.spectral.merge.registry import METHODS, MergeMethod
from spectra_cli.spectral.merge.rmm import RMMModule, basis_for_energy, interference, rmm_fit, rmm_reconstruct
from spectra_cli.spectral.merge.subspace import knots_svd, merge_knots, merge_tsv, tsv_rank
from spectra_cli.spectral.merge.updates import (
    CHUNK,
    GRAM_RTOL,
    GRAM_SVD_MIN_SIDE,
    RANDOMIZED_FRACTION,
    RANDOMIZED_MIN_SIDE,
    RANK_RTOL,
    MergeError,
    MergeOutcome,
    Update,
    as_factored,
    compress,
    factored_svd,
    gram,
    inner,
)

__all__ = [
    "CHUNK", "GRAM_RTOL", "GRAM_SVD_MIN_SIDE", "METHODS", "RANDOMIZED_FRACTION", "RANDOMIZED_MIN_SIDE",
    "RANK_RTOL", "MergeError", "MergeMethod", "MergeOutcome", "RMMModule", "Update", "as_factored",
    "basis_for_energy", "compress", "factored_svd", "gram", "inner", "interference", "knots_svd",
    "merge_knots", "merge_task_arithmetic", "merge_ties", "merge_tsv", "rmm_fit", "rmm_reconstruct",
    "ties_combine", "tsv_rank",
]  # fmt: skip
