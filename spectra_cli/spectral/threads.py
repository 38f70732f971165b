"""How many CPU threads a decomposition gets: one for small matrices (the analyze engine's rule,
:func:`~spectra_cli.spectral.engine.is_small`), for PyTorch as well as for the NumPy/SciPy BLAS."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def torch_threads(shape: tuple[int, int], device: str) -> Iterator[None]:
    """One CPU thread for small matrices (the analyze engine's rule, ``engine.is_small``), for PyTorch and for
    the NumPy/SciPy BLAS of the Gram route (:func:`~spectra_cli.spectral.init_svd.gram_top`,
    ``engine.blas_threads``): threads gain little there, and on a busy machine their spinning made the
    decompositions several times slower."""
    import torch

    from spectra_cli.spectral.engine import blas_threads, is_small

    if device != "cpu" or not is_small(shape):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with blas_threads(shape):
            yield
    finally:
        torch.set_num_threads(before)
