"""Where ``merge`` builds its task updates, and its memory check.

On the NumPy route the base is read on the prefetch thread and each task's update is built on the host
(:func:`spectra_cli.checkpoint.task_updates.task_update`). On the torch route (``--backend torch``; CUDA)
:class:`DeviceUpdates` reads the base and every input's version of the module on the prefetch thread and
stages them in their stored dtype (pinned for CUDA); the main thread moves them once (``non_blocking``), upcasts
there, and builds ΔWᵢ = W_t − W₀ (full fine-tunes) or the adapters' B·A factors (scale folded into B) as
tensors on the device. The merge methods then compute where the updates are (:mod:`spectra_cli.spectral.merge.xp`);
only the merged matrix (to be written), the n×n statistics and the methods' small figures come back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spectra_cli.checkpoint import torch_tensors as tt
from spectra_cli.checkpoint.loader import MatrixLoader
from spectra_cli.checkpoint.matrices import MatrixSpec
from spectra_cli.checkpoint.tuned import Tuned
from spectra_cli.errors import BudgetError, CheckpointError
from spectra_cli.spectral.engine import ResolvedEngine
from spectra_cli.spectral.merge import RMMModule, Update
from spectra_cli.spectral.merge.updates import to_host

if TYPE_CHECKING:
    import torch


# ---- memory -------------------------------------------------------------------------------------------------


def module_bytes(spec: MatrixSpec, tuned: Sequence[Tuned], itemsize: int) -> int:
    """Peak bytes of one module's merge: W₀, the merged dense update and the patched matrix in float64
    (3 × 8·m·n), each full fine-tune's dense update (``itemsize``·m·n: 4 for float32 precision, 8 for
    float64), each adapter's factors in float64 and their scaled copy (16·r·(m + n)), and a k×k Gram matrix
    with its eigenvectors and the eigensolver's workspace (24·k², k = min(m, n)) for the decompositions."""
    m, n = spec.shape
    need = 24 * m * n + 24 * min(m, n) ** 2
    for t in tuned:
        if t.adapter is None:
            need += itemsize * m * n
        elif t.covers(spec.name):
            need += 16 * t.modules[spec.name].rank * (m + n)
    return need


def check_budget(work: Sequence[MatrixSpec], tuned: Sequence[Tuned], itemsize: int, eng: ResolvedEngine,
                 given: int | None) -> None:  # fmt: skip
    """Refuse, before anything is read or written, a module whose working set (:func:`module_bytes`) is over
    the budget: GPU memory on CUDA (``--max-memory``, by default half the free GPU memory); on the CPU the
    check applies when ``--max-memory`` is given (``given``), as merge held no default budget there."""
    on_cuda = tt.is_cuda(eng.device)
    if not on_cuda and given is None:
        return
    budget = eng.budget if given is None else given
    for spec in work:
        need = module_bytes(spec, tuned, itemsize)
        if need > budget:
            m, n = spec.shape
            where = f"GPU memory on {eng.device}" if on_cuda else "memory"
            raise BudgetError(
                f"{spec.name} ({m}×{n}) needs about {_size(need)} of {where} to merge {len(tuned)} "
                f"inputs (W₀, the updates and the decomposition), over the budget of {_size(budget)}; "
                "raise --max-memory, merge fewer models at once, or leave this kind out (--kinds)"
            )


# ---- the device route -----------------------------------------------------------------------------------------


@dataclass
class Staged:
    """One module on the host in stored dtypes (pinned for CUDA): the base, and per tuned input its tensor
    (``("dense", tensor, is_f64)``), its LoRA factors (``("factors", b, a, rows_b, rows_a)``) or nothing."""

    base: Any
    base_f64: bool
    tuned: list[tuple[Any, ...]]


class DeviceUpdates:
    """The task updates of each module, built on ``eng.device``; see the module docstring."""

    def __init__(self, base: MatrixLoader, loaders: dict[str, MatrixLoader], tuned: Sequence[Tuned],
                 eng: ResolvedEngine, dtype: type[np.floating], base_path: str | Path) -> None:  # fmt: skip
        self.base, self.loaders, self.tuned, self.dev = base, loaders, list(tuned), eng.device
        self.dtype, self.base_path = dtype, base_path

    def read(self, s: MatrixSpec) -> Staged:
        """On the prefetch thread: read and stage the module of every input."""
        raw = self.base.load(s)
        out: list[tuple[Any, ...]] = []
        for t in self.tuned:
            if t.adapter is not None:
                mod = t.modules.get(s.name)
                if mod is None:
                    out.append(("none",))
                    continue
                ck = t.adapter.checkpoint
                out.append(("factors", tt.stage(ck.read(mod.b), self.dev), tt.stage(ck.read(mod.a), self.dev),
                            mod.b.shape[0], mod.a.shape[0]))  # fmt: skip
            elif s.name in t.tensors:
                r = self.loaders[t.name].load(dataclasses.replace(s, tensor=t.tensors[s.name]))
                out.append(("dense", tt.stage(r, self.dev), r.dtype == "F64"))
            else:
                out.append(("none",))
        return Staged(tt.stage(raw, self.dev), raw.dtype == "F64", out)

    def _matrix(self, host: Any, spec: MatrixSpec, f64: bool) -> torch.Tensor:
        """A stored tensor on the device in the compute dtype (float64 weights stay float64), logical out×in."""
        name = "float64" if f64 or self.dtype == np.float64 else "float32"
        x = tt.upload(host, self.dev, tt.torch_dtype(name)).reshape(spec.stored_2d)
        return x.T if spec.transposed else x

    def updates(self, spec: MatrixSpec, staged: Staged) -> tuple[torch.Tensor, list[Update]]:
        """(W₀ on the device, each task's update there), every input checked for NaN/Inf where it is."""
        import torch

        f64 = torch.float64
        cd = tt.torch_dtype("float64" if self.dtype == np.float64 else "float32")
        w0 = self._matrix(staged.base, spec, staged.base_f64)
        _check_finite(w0, "base", spec.tensor.name, self.base_path)
        out, inp = spec.shape
        ups: list[Update] = []
        for t, got in zip(self.tuned, staged.tuned, strict=True):
            if got[0] == "none":
                zero = torch.zeros((out, inp) if t.adapter is None else (out, 1), dtype=cd, device=w0.device)
                ups.append(Update(dense=zero) if t.adapter is None else
                           Update(B=zero, A=torch.zeros((1, inp), dtype=cd, device=w0.device)))  # fmt: skip
                continue
            if got[0] == "dense":
                wt = self._matrix(got[1], spec, got[2])
                _check_finite(wt, t.name, spec.tensor.name, t.path)
                ups.append(Update(dense=(wt.to(f64) - w0.to(f64)).to(cd)))
                continue
            mod = t.modules[spec.name]
            b = tt.upload(got[1], self.dev, f64).reshape(got[3], -1)
            a = tt.upload(got[2], self.dev, f64).reshape(got[4], -1)
            for x in (b, a):
                _check_finite(x, t.name, spec.tensor.name, t.path)
            if mod.transposed != spec.transposed:  # embedding: B·A is the transpose of the logical update
                ups.append(Update(B=(mod.scale * a.T).to(cd), A=b.T.contiguous().to(cd), lora_scale=mod.scale))
            else:
                ups.append(Update(B=(mod.scale * b).to(cd), A=a.to(cd), lora_scale=mod.scale))
        return w0, ups


def _check_finite(x: torch.Tensor, who: str, tensor: str, path: str | Path) -> None:
    """As :func:`spectra_cli.checkpoint.task_updates.check_finite`, counted on the device."""
    import torch

    if bool(torch.isfinite(x).all()):
        return
    nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    raise CheckpointError(
        f"{who}: {tensor} in {path} has {nan} NaN and {inf} Inf values; merging non-finite weights is "
        "meaningless, repair or leave out this input"
    )


def host_fit(fit: RMMModule) -> RMMModule:
    """An rmm fit with its mean and basis copied back to NumPy (for the bundle writer)."""
    return dataclasses.replace(fit, mean=None if fit.mean is None else to_host(fit.mean),
                               basis=[to_host(b) for b in fit.basis])  # fmt: skip


def _size(n: int) -> str:
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
