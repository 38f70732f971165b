"""How well two matrices' singular vectors agree, before and after weight matching
(:mod:`spectra_cli.spectral.align`).

For A and B (same shape) with top-k singular triplets A ≈ U_A Σ_A V_Aᵀ, B ≈ U_B Σ_B V_Bᵀ:

- ``cos`` per index i: |⟨u_i^A, u_i^B⟩| (left) and |⟨v_i^A, v_i^B⟩| (right): 1 when the i-th directions
  coincide (up to sign, which an SVD does not fix), about √(2/(π·m)) for unrelated directions in ℝ^m;
- ``overlap``: ‖U_Aᵀ U_B‖_F² / k, the mean cos² of the principal angles between the two top-k subspaces
  (1 = the same subspace, whatever the order inside it; k/m for random subspaces of ℝ^m).

A permutation of B's hidden units moves only one side of each matrix: the rows of an input projection (its
left singular vectors are permuted, the right ones stay), the columns of an output projection. The
``permuted`` side is the one alignment can change; the other side's agreement is the same before and after.

The finding of Git Re-Basin's follow-ups (the seeds' linear-mode-connectivity work) is that weight matching
aligns the large-σ directions first: agreement after alignment is highest at small i.
:func:`finding` states it from the data, or says that the data do not show it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spectra_cli.spectral.linalg import SVD, top_k


@dataclass(frozen=True)
class Agreement:
    """Top-k agreement of two same-shape matrices: per-index |cos| left and right, subspace overlaps."""

    u_cos: np.ndarray
    v_cos: np.ndarray
    u_overlap: float
    v_overlap: float

    def side(self, side: str) -> tuple[np.ndarray, float]:
        """(per-index |cos|, overlap) of the ``left`` or ``right`` side."""
        return (self.u_cos, self.u_overlap) if side == "left" else (self.v_cos, self.v_overlap)


def top_vectors(x: np.ndarray, k: int) -> SVD:
    """The top-``k`` singular triplets of x (k capped at the smaller side), in float64."""
    return top_k(np.asarray(x, dtype=np.float64), max(1, min(k, *x.shape)))


def permuted(svd: SVD, index: np.ndarray, side: str) -> SVD:
    """The top triplets of B[index] (``left``: rows permuted) or B[:, index] (``right``) from B's own: the
    permuted side's singular vectors are B's with their entries permuted, the values and the other side stay."""
    if side == "left":
        return SVD(svd.u[index], svd.s, svd.vt)
    return SVD(svd.u, svd.s, svd.vt[:, index])


def agreement_of(sa: SVD, sb: SVD) -> Agreement:
    """The agreement of two sets of top-k triplets (:func:`top_vectors`)."""
    k = min(len(sa.s), len(sb.s))
    mu = sa.u[:, :k].T @ sb.u[:, :k]
    mv = sa.vt[:k] @ sb.vt[:k].T
    return Agreement(np.abs(np.diag(mu)), np.abs(np.diag(mv)),
                     float(np.sum(mu**2) / k), float(np.sum(mv**2) / k))  # fmt: skip


def agreement(a: np.ndarray, b: np.ndarray, k: int) -> Agreement:
    """The agreement of A's and B's top-``k`` singular vectors (k capped at the smaller side)."""
    return agreement_of(top_vectors(a, k), top_vectors(b, k))


def rel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖A − B‖_F / ‖A‖_F (0 when A is zero and B equals it)."""
    na = float(np.linalg.norm(a))
    d = float(np.linalg.norm(a - b))
    return d / na if na > 0 else (0.0 if d == 0 else float("inf"))


@dataclass(frozen=True)
class Finding:
    """Mean agreement after alignment over the first and the last quarter of the k indices (before in
    parentheses), and the sentence that says what they show."""

    head: int
    top_before: float
    top_after: float
    tail_before: float
    tail_after: float
    text: str


#: a difference in mean |cos| smaller than this is not called a finding
MARGIN = 0.05


def finding(before: np.ndarray, after: np.ndarray) -> Finding:
    """From the mean per-index agreement before and after (length k): whether alignment raised the large-σ
    directions' agreement more than the small-σ ones'."""
    k = len(after)
    n = max(1, k // 4)
    tb, ta = float(np.mean(before[:n])), float(np.mean(after[:n]))
    lb, la = float(np.mean(before[-n:])), float(np.mean(after[-n:]))
    top = f"indices 1–{n}" if n > 1 else "index 1"
    tail = f"{k - n + 1}–{k}" if n > 1 else f"{k}"
    nums = f"{top}: {ta:.2f} (was {tb:.2f}); indices {tail}: {la:.2f} (was {lb:.2f})"
    if ta - tb > MARGIN and (ta - tb) - (la - lb) > MARGIN:
        text = f"weight matching aligns the large-σ directions most: {nums}"
    elif ta - tb > MARGIN or la - lb > MARGIN:
        text = f"weight matching raised the agreement about evenly across the top-{k}: {nums}"
    else:
        text = f"weight matching did not raise the singular vectors' agreement: {nums}"
    return Finding(n, tb, ta, lb, la, text)
