"""``merge --to-adapter [--rank r]``: the merged update of every module written as one PEFT LoRA adapter instead
of a merged checkpoint.

Per module the method's merged update is factored exactly: a factored update B·A (every method but the
elementwise ones, on LoRA inputs) by QR of B and Aᵀ and an SVD of the small core
(:func:`spectra_cli.spectral.linalg.factored_svd`), never the out×in ΔW; a dense one (TIES and PEFT's
pruned types, or full fine-tunes) by its SVD, at its numerical rank (σ > 1e-10·σ₁). ``--rank r`` keeps the top
r triplets; the module's relative Frobenius error is then √(Σ discarded σ²)/‖ΔW‖ (Eckart–Young: no rank-r
adapter is closer). The adapter stores B = U·diag(σ), A = Vᵀ with α = r (scale 1), fan_in_fan_out for GPT-2
``Conv1D`` bases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.matrices import MatrixSpec
from spectra_cli.checkpoint.naming import module_path
from spectra_cli.errors import SelectionError
from spectra_cli.spectral import linalg
from spectra_cli.spectral.linalg import Backend
from spectra_cli.spectral.merge import RANK_RTOL, Update


def check_adapter_targets(work: list[MatrixSpec]) -> bool:
    """Refuse modules a LoRA adapter of linear layers cannot hold; returns fan_in_fan_out (GPT-2 Conv1D)."""
    bad = [s.name for s in work if s.role == "embedding" or s.part is not None or s.part_index is not None
           or len(s.tensor.shape) != 2]  # fmt: skip
    if bad:
        raise SelectionError(
            f"--to-adapter writes LoRA factors of linear layers only; {bad[0]} (and {len(bad) - 1} more) is an "
            "embedding, a convolution or part of a fused matrix: leave it out with --exclude or --kinds"
        )
    layouts = {s.transposed for s in work}
    if len(layouts) > 1:
        raise SelectionError(
            "--to-adapter: the modules mix nn.Linear and Conv1D layouts, which one PEFT config (fan_in_fan_out) "
            "cannot express; select one kind with --kinds"
        )
    return bool(layouts.pop()) if layouts else False


def factor_update(update: Update, rank: int | None, backend: Backend) -> tuple[np.ndarray, np.ndarray, int, float]:
    """(B out×k, A k×in, numerical rank, relative error) of the update truncated to ``rank`` (None: all)."""
    if update.is_factored:
        assert update.B is not None and update.A is not None
        svd = linalg.factored_svd(np.asarray(update.B, np.float64), np.asarray(update.A, np.float64),
                                  rtol=RANK_RTOL, backend=backend)  # fmt: skip
    else:
        svd = linalg.thin_svd(np.asarray(update.to_dense(), np.float64), backend)
    s = np.asarray(svd.s)
    full = int(np.sum(s > RANK_RTOL * s[0])) if s.size and s[0] > 0 else 0
    keep = full if rank is None else min(rank, full)
    total = float(np.sum(s[:full] ** 2))
    err = math.sqrt(float(np.sum(s[keep:full] ** 2)) / total) if total > 0 else 0.0
    return np.asarray(svd.u)[:, :keep] * s[:keep], np.asarray(svd.vt)[:keep], full, err


@dataclass
class AdapterSink:
    """Collects each module's factors; :meth:`write` writes the adapter folder."""

    rank: int | None
    backend: Backend
    dtype: type[np.floating]
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    full_rank: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    zero: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)

    def add(self, spec: MatrixSpec, update: Update) -> dict[str, Any]:
        """Factor one module's merged update; returns its row fields (adapter_rank, adapter_error)."""
        b, a, full, err = factor_update(update, self.rank, self.backend)
        path = module_path(spec.tensor.name)
        if not update.is_factored:
            self.dense.append(path)
        if b.shape[1] == 0:
            self.zero.append(path)
            return {"adapter_rank": 0, "adapter_error": 0.0}
        self.factors[path] = (b.astype(self.dtype), a.astype(self.dtype))
        self.full_rank[path] = full
        self.errors[path] = err
        return {"adapter_rank": int(b.shape[1]), "adapter_error": err}

    def write(self, stage: Path, base: str, fan_in_fan_out: bool) -> dict[str, Any]:
        from spectra_cli.checkpoint.writers import LoraFactors, write_lora_adapter

        if not self.factors:
            raise SelectionError("the merged update is zero in every module: there is no adapter to write")
        mods = {p: LoraFactors(a, b, float(a.shape[0])) for p, (b, a) in self.factors.items()}
        return write_lora_adapter(stage, mods, base=base, fan_in_fan_out=fan_in_fan_out)

    def summary(self) -> dict[str, Any]:
        ranks = [f[1].shape[0] for f in self.factors.values()]
        return {
            "adapter_rank": self.rank,
            "adapter_ranks": {"min": min(ranks), "max": max(ranks), "total": int(sum(ranks))} if ranks else None,
            "adapter_max_error": max(self.errors.values()) if self.errors else 0.0,
            "adapter_errors": self.errors,
            "adapter_zero_modules": self.zero or None,
            # modules whose merged update came dense (elementwise rules, full fine-tunes): factored by their SVD
            "adapter_from_dense": len(self.dense),
        }
