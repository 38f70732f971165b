"""Eigenvector localisation metrics of one weight matrix, as WeightWatcher's ``analyze(vectors=True)``
(``apply_analyze_eigenvectors``; Martin & Mahoney, arXiv:1810.01075).

For every unit eigenvector v of the Gram matrix of the smaller side (WᵀW or WWᵀ; WWᵀ when W is square, as
WeightWatcher; W out×in as stored), decomposed through
:func:`spectra_cli.spectral.linalg.eigh`):

- localisation ratio ‖v‖₁ / ‖v‖_∞,
- participation ratio ‖v‖₂ / ‖v‖₄,
- vector entropy: |v| centred, a 100-bin density histogram h, p = (h + 1e-10)/Σ(h + 1e-10), −Σ p·ln p
  (WeightWatcher's ``discrete_entropy``; its division by √(2π) cancels in the normalisation).

Each is averaged (mean and population variance) over the bulk and over the tail of the power-law fit
(the ``num_pl_spikes`` largest eigenvalues, λ ≥ xmin; spectra splits by that count rather than by comparing the
Gram eigenvalues with xmin, which an eigenvalue equal to xmin could fall either side of): ``bulk_mean_loc_ratio``, ``tail_var_part_ratio``, … (WeightWatcher's column names). With NaN where a
side is empty.
"""

from __future__ import annotations

import numpy as np

from spectra_cli.spectral import linalg

EPSILON = 1e-10
METRICS = ("vec_entropy", "loc_ratio", "part_ratio")


def vector_metrics(vec: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(entropy, localisation ratio, participation ratio) of each column of ``vec``."""
    a = np.abs(vec)
    loc = a.sum(axis=0) / a.max(axis=0)
    part = np.sqrt((a**2).sum(axis=0)) / ((a**4).sum(axis=0)) ** 0.25
    ent = np.empty(vec.shape[1])
    for j in range(vec.shape[1]):
        c = a[:, j] - a[:, j].mean()
        h = np.histogram(c, density=True, bins=100)[0] + EPSILON
        p = h / h.sum()
        ent[j] = -float(np.sum(p * np.log(p)))
    return ent, loc, part


def vector_columns(w: np.ndarray, n_tail: int, backend: linalg.Backend | None = None) -> dict[str, float]:
    """The bulk/tail means and variances of the three metrics over the eigenvectors of W's Gram matrix; the tail
    is the eigenvectors of the ``n_tail`` largest eigenvalues."""
    x = np.asarray(w, dtype=np.float64)
    # the Gram matrix WeightWatcher takes: WWᵀ when out ≤ in (so for a square W too, its left vectors), else WᵀW
    lam, vec = linalg.eigh(linalg.gram(x.T if x.shape[0] == x.shape[1] else x), backend=backend)
    lam, vec = np.asarray(lam), np.asarray(vec)
    tail = np.zeros(lam.size, dtype=bool)
    tail[np.argsort(-lam, kind="stable")[: max(0, int(n_tail))]] = True
    out: dict[str, float] = {}
    for name, vals in zip(METRICS, vector_metrics(vec), strict=True):
        for side, mask in (("bulk", ~tail), ("tail", tail)):
            sel = vals[mask]
            out[f"{side}_mean_{name}"] = float(np.mean(sel)) if sel.size else float("nan")
            out[f"{side}_var_{name}"] = float(np.var(sel)) if sel.size else float("nan")
    return out
