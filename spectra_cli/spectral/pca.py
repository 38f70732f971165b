"""Incremental, mean-centred PCA of a stream of row batches (the update of scikit-learn's / PEFT's
``IncrementalPCA``), used by ``capture`` for EVA's input statistics. Float64 on any PyTorch device."""

from __future__ import annotations

import contextlib

import torch

from spectra_cli.spectral import linalg
from spectra_cli.spectral.engine import blas_threads
from spectra_cli.spectral.linalg import Backend

DEFAULT_TAU = 0.99  # EVA's convergence threshold on the cosine of consecutive estimates


def _flip_signs(vt: torch.Tensor) -> torch.Tensor:
    """Make the largest-magnitude entry of every row positive (PEFT's ``_svd_flip(u_based_decision=False)``)."""
    idx = torch.argmax(vt.abs(), dim=1)
    signs = torch.sign(vt[torch.arange(vt.shape[0], device=vt.device), idx])
    signs[signs == 0] = 1
    return vt * signs[:, None]


_GRAM_RTOL = 1e-12  # λ (= σ²) below this fraction of λ₁ is at the float64 Gram route's noise floor


def _top_right_singular(
    a: torch.Tensor, k: int, backend: Backend | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k singular values (descending) and right singular vectors (k×d rows) of a float64 m×d matrix, by
    the Gram route of the smaller side (:func:`spectra_cli.spectral.linalg.gram_right`: one GEMM and a
    symmetric eigensolve, 2-5× faster than an SVD on CPU and more on CUDA), on ``backend`` (None: where ``a``
    is). Directions whose σ² is below 1e-12·σ₁² (nothing left of the data there) are dropped, so fewer than k
    may come back. Small problems run on one BLAS thread (as the engine does: several threads only add
    contention there).
    """
    m, d = a.shape
    with blas_threads((m, d), openmp=True) if a.device.type == "cpu" else contextlib.nullcontext():
        s, vt = linalg.gram_right(a, k, _GRAM_RTOL, backend)
        return s, vt


class IncrementalPCA:
    """Mean-centred incremental PCA of a stream of row batches (n×d), float64.

    Each :meth:`update` takes the SVD of [diag(σ)·V_kᵀ; X − x̄_batch; √(n₀n/(n₀+n))·(μ₀ − x̄_batch)] and keeps
    the top k right singular vectors (Ross et al. 2008, as in scikit-learn and PEFT's ``IncrementalPCA``, but
    with an exact decomposition, the Gram route of :func:`~spectra_cli.spectral.linalg.gram_right`, instead of PEFT's ``svd_lowrank``). ``explained_variance_ratio`` is σₖ² / Σ‖x − μ‖²
    over all rows seen, i.e. λₖ over the total (population) variance. ``cosines`` holds, per component, the
    cosine between the last two estimates (NaN before the second update).
    """

    def __init__(
        self, k: int, dim: int, device: torch.device | str = "cpu", backend: Backend | None = None
    ) -> None:
        self.k = min(k, dim)
        self.backend = backend  # where the decompositions run (None: on ``device``, in PyTorch)
        self.dim = dim
        self.device = torch.device(device)
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.ss = 0.0  # Σ‖x − μ‖² over the rows seen
        self.components = torch.zeros(0, dim, dtype=torch.float64, device=self.device)
        self.singular_values = torch.zeros(0, dtype=torch.float64, device=self.device)
        self.cosines = torch.full((self.k,), float("nan"), dtype=torch.float64)
        self.updates = 0

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch of rows (n×d) into the estimate."""
        n = int(x.shape[0])
        if n == 0:
            return
        x = x.to(device=self.device, dtype=torch.float64)
        batch_mean = x.mean(dim=0)
        xc = x - batch_mean
        batch_ss = float((xc * xc).sum())
        if self.n == 0:
            stacked = xc
            total_ss = batch_ss
        else:
            factor = (self.n * n / (self.n + n)) ** 0.5
            correction = factor * (self.mean - batch_mean)
            stacked = torch.cat([self.singular_values[:, None] * self.components, xc, correction[None, :]])
            total_ss = self.ss + batch_ss + float(correction @ correction)
        s, vt = _top_right_singular(stacked, self.k, self.backend)
        keep = int(s.shape[0])
        vt = _flip_signs(vt)
        previous = self.components
        common = min(len(previous), keep)
        if common:
            cos = (vt[:common] * previous[:common]).sum(dim=1)
            cos = cos / (torch.linalg.norm(vt[:common], dim=1) * torch.linalg.norm(previous[:common], dim=1))
            self.cosines = torch.full((self.k,), float("nan"), dtype=torch.float64)
            self.cosines[:common] = cos.cpu()
        self.mean = (self.mean * self.n + batch_mean * n) / (self.n + n)
        self.n += n
        self.ss = total_ss
        self.components = vt
        self.singular_values = s[:keep]
        self.updates += 1

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        if self.ss <= 0:
            return torch.zeros_like(self.singular_values)
        return self.singular_values**2 / self.ss

    def converged(self, tau: float = DEFAULT_TAU) -> int:
        """How many leading components have a last-step cosine ≥ τ (0 before the second update)."""
        ok = (self.cosines[: len(self.components)] >= tau).tolist()
        count = 0
        for flag in ok:
            if not flag:
                break
            count += 1
        return count
