"""``analyze --mp-fit / --randomize / --detx``: the random-matrix diagnostics added to each row of a run.

The randomised spectra go through the same engine as the real ones (same backend, method, batching and
``--max-memory`` budget): the loader hands the engine each matrix with its entries permuted by a seeded
permutation (:func:`spectra_cli.spectral.rmt.permute`). A matrix too large for the budget is decomposed in
chunks as usual, but its permutation needs the whole matrix in memory once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from spectra_cli.checkpoint.loader import MatrixLoader, split_lines
from spectra_cli.checkpoint.matrices import MatrixSpec
from spectra_cli.checkpoint.tensors import RawTensor, to_float
from spectra_cli.spectral.engine import ResolvedEngine, singular_values
from spectra_cli.spectral.fits import FitOptions, fit_columns, reliability
from spectra_cli.spectral.rmt import RMTOptions, permute, rmt_columns


class PermutedLoader:
    """The engine's two loader callables, returning each matrix with its entries permuted (seeded by name)."""

    def __init__(self, loader: MatrixLoader, seed: int) -> None:
        self.loader, self.seed = loader, seed

    def load(self, spec: MatrixSpec) -> RawTensor:
        raw = self.loader.load(spec)
        return RawTensor(permute(raw.data, self.seed, spec.name), raw.dtype)

    def chunks(self, spec: MatrixSpec, lines: int) -> Iterator[tuple[RawTensor, str]]:
        return split_lines(self.load(spec), lines)

def random_spectra(
    specs: list[MatrixSpec], eng: ResolvedEngine, loader: MatrixLoader, seed: int,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[dict[str, np.ndarray], float]:  # fmt: skip
    """Singular values of every permuted matrix (NaN/Inf ones left out), and the decomposition seconds."""
    p = PermutedLoader(loader, seed)
    out: dict[str, np.ndarray] = {}
    seconds = 0.0
    for i, mv in enumerate(singular_values(specs, eng, p.load, p.chunks)):
        seconds += mv.seconds
        if mv.values is not None:
            out[mv.spec.name] = mv.values
        if progress:
            progress(i + 1, len(specs), f"randomised {mv.spec.name}")
    return out, seconds


def add_rmt_columns(
    rows: list[dict[str, Any]], spectra: dict[str, np.ndarray], rand: dict[str, np.ndarray], opts: RMTOptions
) -> None:
    """Add the opt-in columns to each decomposed row (in place), plus ``num_pl_spikes``, the PL tail's size."""
    for r in rows:
        values = spectra.get(r["name"])
        if r["status"] != "ok" or values is None:
            continue
        shape = (int(r["rows"]), int(r["cols"]))
        r.update(rmt_columns(values, rand.get(r["name"]), shape, opts))
        xmin = r.get("alpha_xmin")
        lam = np.asarray(values, dtype=np.float64) ** 2
        r["num_pl_spikes"] = int(np.count_nonzero(lam >= xmin)) if xmin is not None and np.isfinite(xmin) else 0


def add_vector_columns(rows: list[dict[str, Any]], specs: list[MatrixSpec], loader: MatrixLoader,
                       eng: ResolvedEngine) -> None:  # fmt: skip
    """``--vectors``: the eigenvector metrics of each decomposed matrix (read again, one at a time)."""
    from spectra_cli.spectral.rmt_vectors import vector_columns

    by_name = {r["name"]: r for r in rows}
    for spec in specs:
        r = by_name.get(spec.name)
        if r is None or r["status"] != "ok":
            continue
        r.update(vector_columns(to_float(loader.load(spec)), int(r.get("num_pl_spikes", 0)), eng.compute))


def fit_eigenvalues(values: np.ndarray) -> np.ndarray:
    """The ESD WeightWatcher fits: all M eigenvalues λ = σ² (its fits then keep λ > 1e-5)."""
    return np.sort(np.clip(np.asarray(values, dtype=np.float64), 0.0, None)) ** 2


def add_fit_columns(rows: list[dict[str, Any]], spectra: dict[str, np.ndarray], fit: FitOptions | None) -> None:
    """``alpha_reliability`` (the default power-law fit's reading) and, with ``--fit/--fix-fingers/--xmax``, the
    chosen fit's ``fit_*`` columns, in place."""
    for r in rows:
        values = spectra.get(r["name"])
        if r["status"] != "ok" or values is None:
            continue
        r["alpha_reliability"] = reliability(r["alpha"], r["alpha_ks"], int(r["alpha_tail"]))
        if fit is not None:
            r.update(fit_columns(fit_eigenvalues(values), fit))
