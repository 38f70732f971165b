"""The rows of ``merge`` (one per module × task) and per-task means over them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from spectra_cli.checkpoint.matrices import MatrixSpec
from spectra_cli.checkpoint.tuned import Tuned
from spectra_cli.spectral.merge import Update


def rows_for_module(spec: MatrixSpec, tuned: list[Tuned], updates: list[Update], weights: list[float],
                     inter: dict[str, np.ndarray], errors: Sequence[float], kept: Sequence[float],
                     extra: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """One row per task: its update's norm, its error and kept share, its interference with the tasks that
    changed the module too."""
    n, (out, inp) = len(tuned), spec.shape
    cos, ov = inter["cosine"], inter["overlap"]
    rows = []
    for i, t in enumerate(tuned):
        others = [j for j in range(n) if j != i and inter["norms"][j] > 0]  # tasks that changed this module
        mod = t.modules.get(spec.name) if t.adapter is not None else None
        rows.append({
            "module": spec.name, "kind": spec.kind, "depth": spec.depth, "shape": f"{out}x{inp}", "task": t.name, "source": t.kind, "weight": weights[i],
            "lora_rank": mod.rank if mod is not None else None,
            "delta_norm": float(inter["norms"][i]),
            "rel_error": float(errors[i]), "kept": float(kept[i]),
            "max_cos": float(max(abs(cos[i, j]) for j in others)) if others else None,
            "mean_overlap": float(np.mean([ov[i, j] for j in others])) if others else None,
            **extra,
        })  # fmt: skip
    return rows


def task_means(rows: list[dict[str, Any]], tasks: list[str], key: str) -> dict[str, float | None]:
    """Per task, the mean of ``key`` over its finite rows (None when there are none)."""
    out: dict[str, float | None] = {}
    for t in tasks:
        v = [r[key] for r in rows if r["task"] == t and r[key] is not None and math.isfinite(r[key])]
        out[t] = float(np.mean(v)) if v else None
    return out
