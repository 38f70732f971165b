"""Where ``compare`` does its numbers: :class:`HostSide` (NumPy/LAPACK, the default CPU route) or
:class:`DeviceSide` (``--backend torch``: CUDA, or PyTorch on the CPU). Both give :class:`Pair` results the flow
turns into rows; only small results come back from the device.

The device route, per base matrix: the prefetch thread reads the base and every tuned input's version of it
(full checkpoints: the tensor as stored; adapters: their factors) and stages them on the host in their stored
dtype (pinned for CUDA); the main thread moves them to the device (``non_blocking``) once, upcasts there,
builds W_t there (the tuned tensor, or W₀ + s·B·A), takes both SVDs there (float64 Gram route, or the exact
SVD for ``--precision float64``), forms |U₀ᵀU_t[:, :k]| and σ(ΔW) there, and copies back the k best cosines,
the singular values and the top-k vectors (m×k and k×n: what drift and intruder removal need).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from spectra_cli.checkpoint import torch_tensors as tt
from spectra_cli.checkpoint.loader import MatrixLoader
from spectra_cli.checkpoint.matrices import MatrixSpec
from spectra_cli.checkpoint.tensors import to_float
from spectra_cli.checkpoint.tuned import Tuned
from spectra_cli.errors import BudgetError
from spectra_cli.spectral import linalg
from spectra_cli.spectral.compare import (
    SVD,
    Drift,
    Intruders,
    drift,
    factored_values,
    intruder_dimensions,
    intruders_from_cosines,
    max_abs_cosines,
    svd_function,
)
from spectra_cli.spectral.engine import ResolvedEngine, nonfinite_counts
from spectra_cli.spectral.linalg import Backend, singular_values

if TYPE_CHECKING:
    import torch


@dataclass
class Pair:
    """One (tuned, matrix) comparison: NaN/Inf count of the tuned side; when finite, the intruders, the drift,
    the top-k SVD of W_t (NumPy) and a function giving W_t on the host (for intruder removal)."""

    bad: int
    intruders: Intruders | None = None
    drift: Drift | None = None
    svd_top: SVD | None = None
    tuned_matrix: Callable[[], np.ndarray] | None = None


def _nonfinite(x: np.ndarray) -> int:
    return sum(nonfinite_counts(x))


def _top(svd: SVD, k: int) -> SVD:
    return SVD(svd.u[:, :k], svd.s, svd.vt[:k])


# ---- memory -------------------------------------------------------------------------------------------------


def host_bytes(spec: MatrixSpec, n_tuned: int) -> int:
    """The host route's working set for one module: every input's copy plus two thin SVDs' workspace."""
    m, n = spec.shape
    return 8 * m * n * (4 + n_tuned) + 16 * min(m, n) ** 2


def device_bytes(spec: MatrixSpec, precision: str) -> int:
    """The device route's peak memory for one module (one tuned input is on the device at a time): the base in
    its stored dtype and upcast (8 bytes/entry at most), W_t stored and upcast, the float64 copy and temporary
    of the decomposition (2 × 8·m·n; ΔW for a full tune reuses one), a k×k Gram matrix with eigenvectors and
    eigensolver workspace (3 × 8·k²), and the two SVDs held (2 × 8·(m·k + k·n)), k = min(m, n)."""
    m, n = spec.shape
    k = min(m, n)
    stored = spec.nbytes_stored
    upcast = 8 if precision == "float64" else 4
    return 2 * (stored + upcast * m * n) + 16 * m * n + 24 * k * k + 16 * (m * k + k * n)


def check_budget(work: Sequence[MatrixSpec], n_tuned: int, eng: ResolvedEngine) -> None:
    """Refuse (before anything is read) a module whose working set is over ``--max-memory``: device memory on
    the torch route (GPU memory on CUDA), host memory on the NumPy route."""
    for spec in work:
        m, n = spec.shape
        if eng.backend == "torch":
            need = device_bytes(spec, eng.precision)
            where = "GPU memory" if tt.is_cuda(eng.device) else "memory"
            if need > eng.budget:
                raise BudgetError(
                    f"{spec.name} ({m}×{n}) needs about {_size(need)} of {where} on {eng.device} (the base "
                    f"and one tuned matrix with their SVDs), over the budget of {_size(eng.budget)}; raise "
                    "--max-memory (on CUDA half the free GPU memory by default) or leave this kind out (--kinds)"
                )
            continue
        need = host_bytes(spec, n_tuned)
        if need > eng.budget:
            raise BudgetError(
                f"{spec.name} ({m}×{n}) needs about {_size(need)} with {n_tuned} tuned input(s), over the "
                f"memory budget of {_size(eng.budget)}; raise --max-memory or compare fewer models at once"
            )


# ---- the host route -------------------------------------------------------------------------------------------


class HostSide:
    """NumPy/LAPACK: the base read (and converted) on the prefetch thread, each tuned matrix in the main thread."""

    def __init__(self, base: MatrixLoader, loaders: dict[str, MatrixLoader], eng: ResolvedEngine,
                 dtype: type[np.floating], top_k: int, epsilons: Sequence[float]) -> None:  # fmt: skip
        self.base, self.loaders, self.dtype, self.top_k, self.eps = base, loaders, dtype, top_k, tuple(epsilons)
        self.svd = svd_function(eng.compute, eng.precision)
        self.be: Backend = eng.compute
        self.w0: np.ndarray | None = None
        self.base_svd: SVD | None = None

    def read(self, s: MatrixSpec) -> Any:
        w = to_float(self.base.load(s), self.dtype).reshape(s.stored_2d)
        return w.T if s.transposed else w

    def open(self, spec: MatrixSpec, w0: Any) -> tuple[int, np.ndarray | None]:
        """Take the base's SVD; (NaN/Inf count, its singular values or None)."""
        bad0 = _nonfinite(w0)
        self.w0 = w0
        self.base_svd = self.svd(w0) if not bad0 else None
        return bad0, None if self.base_svd is None else self.base_svd.s

    def pair(self, t: Tuned, spec: MatrixSpec, _staged: Any) -> Pair:
        assert self.w0 is not None
        wt, delta_values, bad = self._tuned(t, spec)
        if self.base_svd is None or bad:
            return Pair(bad)
        b0 = self.base_svd
        k = min(self.top_k, b0.s.size)
        svd_t = self.svd(wt)
        intr = intruder_dimensions(b0.u, svd_t.u[:, :k], svd_t.s[:k], self.eps)
        d = drift(b0.s, svd_t.s, delta_values(), b0.u[:, :k], svd_t.u[:, :k])
        return Pair(bad, intr, d, _top(svd_t, k), lambda: wt)

    def _tuned(self, t: Tuned, spec: MatrixSpec) -> tuple[np.ndarray, Callable[[], np.ndarray], int]:
        """(W_t in the logical orientation, a function giving σ(ΔW), NaN/Inf count of the tuned side).
        ΔW's values come from the factors for adapters; nothing is decomposed before the finiteness check."""
        w0 = self.w0
        assert w0 is not None
        if t.adapter is not None:
            mod = t.modules[spec.name]
            b, a = t.adapter.factors(mod)
            bad = _nonfinite(b) + _nonfinite(a)
            delta = mod.scale * (b @ a)
            if mod.transposed != spec.transposed:
                delta = delta.T
            wt = (w0 + delta).astype(self.dtype, copy=False)
            return wt, lambda: factored_values(b, a, mod.scale, self.be), bad
        info = t.tensors[spec.name]
        wt = self.loaders[t.name].dense(dataclasses.replace(spec, tensor=info), self.dtype)
        return wt, lambda: singular_values(wt.astype(np.float64) - w0.astype(np.float64), backend=self.be), _nonfinite(wt)  # fmt: skip


# ---- the device route -----------------------------------------------------------------------------------------


@dataclass
class Staged:
    """One module's inputs on the host, in their stored dtypes (pinned for CUDA): the base as stored, and per
    tuned input either its tensor as stored or its (B, A) factors."""

    base: Any
    base_f64: bool
    tuned: dict[str, tuple[Any, ...]]


class DeviceSide:
    """PyTorch on ``eng.device``: everything of one module read and staged on the prefetch thread, moved once,
    computed there; see the module docstring."""

    def __init__(self, base: MatrixLoader, loaders: dict[str, MatrixLoader], tuned: Sequence[Tuned],
                 eng: ResolvedEngine, top_k: int, epsilons: Sequence[float]) -> None:  # fmt: skip
        self.base, self.loaders, self.tuned, self.eng = base, loaders, list(tuned), eng
        self.top_k, self.eps = top_k, tuple(epsilons)
        self.dev = eng.device
        self.w0: Any = None
        self.base_svd: Any = None

    # on the prefetch thread
    def read(self, s: MatrixSpec) -> Any:
        raw = self.base.load(s)
        out: dict[str, tuple[Any, ...]] = {}
        for t in self.tuned:
            if not t.covers(s.name):
                continue
            if t.adapter is not None:  # lora_B and lora_A as stored (as Adapter.factors reads them)
                mod, ck = t.modules[s.name], t.adapter.checkpoint
                out[t.name] = ("factors", tt.stage(ck.read(mod.b), self.dev), tt.stage(ck.read(mod.a), self.dev),
                               mod.b.shape[0], mod.a.shape[0])  # fmt: skip
            else:
                r = self.loaders[t.name].load(dataclasses.replace(s, tensor=t.tensors[s.name]))
                out[t.name] = ("dense", tt.stage(r, self.dev), r.dtype == "F64")
        return Staged(tt.stage(raw, self.dev), raw.dtype == "F64", out)

    def _matrix(self, host: Any, spec: MatrixSpec, f64: bool) -> Any:
        """A staged stored tensor on the device, upcast there (float64 weights stay float64), logical out×in."""
        dtype = tt.torch_dtype("float64" if f64 or self.eng.precision == "float64" else "float32")
        x = tt.upload(host, self.dev, dtype).reshape(spec.stored_2d)
        return x.T if spec.transposed else x

    def _svd(self, w: Any) -> SVD:
        """Thin SVD on the device (tensors stay there): the float64 Gram route, or the exact one in float64."""
        if self.eng.precision == "float32":
            return linalg.gram_svd(w)
        return linalg.thin_svd(linalg.as_f64(w))

    def open(self, spec: MatrixSpec, staged: Any) -> tuple[int, np.ndarray | None]:
        self.w0 = self._matrix(staged.base, spec, staged.base_f64)
        bad0 = _bad(self.w0)
        self.base_svd = self._svd(self.w0) if not bad0 else None
        return bad0, None if self.base_svd is None else linalg.to_numpy(self.base_svd.s)

    def pair(self, t: Tuned, spec: MatrixSpec, staged: Any) -> Pair:
        import torch

        got = staged.tuned[t.name]
        w0 = self.w0
        if got[0] == "factors":
            mod = t.modules[spec.name]
            f64 = tt.torch_dtype("float64")
            b = tt.upload(got[1], self.dev, f64).reshape(got[3], -1)
            a = tt.upload(got[2], self.dev, f64).reshape(got[4], -1)
            bad = _bad(b) + _bad(a)
            delta = mod.scale * (b @ a)
            if mod.transposed != spec.transposed:
                delta = delta.T
            wt = (w0.to(torch.float64) + delta).to(w0.dtype)

            def delta_values() -> Any:
                return factored_values(b, a, mod.scale)
        else:
            wt = self._matrix(got[1], spec, got[2])
            bad = _bad(wt)

            def delta_values() -> Any:
                return singular_values(wt.to(torch.float64) - w0.to(torch.float64))
        if self.base_svd is None or bad:
            return Pair(bad)
        b0 = self.base_svd
        k = min(self.top_k, int(b0.s.shape[0]))
        svd_t = self._svd(wt)
        cos = linalg.to_numpy(max_abs_cosines(b0.u, svd_t.u[:, :k]))
        s_t = linalg.to_numpy(svd_t.s)
        intr = intruders_from_cosines(cos, s_t[:k], self.eps)
        u0k, utk = linalg.to_numpy(b0.u[:, :k]), linalg.to_numpy(svd_t.u[:, :k])
        d = drift(linalg.to_numpy(b0.s), s_t, linalg.to_numpy(delta_values()), u0k, utk)
        top = SVD(utk, s_t, linalg.to_numpy(svd_t.vt[:k]))
        return Pair(bad, intr, d, top, lambda: linalg.to_numpy(wt))


def _bad(x: torch.Tensor) -> int:
    """NaN/Inf count of a tensor, counted where it is (one number comes back)."""
    import torch

    return int((~torch.isfinite(x)).sum())


def _size(n: int) -> str:
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
