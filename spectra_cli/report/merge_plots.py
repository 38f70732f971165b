"""Figures for ``merge`` (matplotlib Agg, PNG). Imported only when ``--plots`` is given.

- ``interference.png``: two n×n heatmaps, the cosine between task updates and the overlap of their top-k
  subspaces, each averaged over modules.
- ``sweep.png`` (with ``--sweep``): relative reconstruction error against storage for an rmm basis of p = 1..n
  (the whole model), and per module error against p.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.report.plots import _plt


def plot_interference(tasks: list[str], cosine: np.ndarray, overlap: np.ndarray, path: Path) -> None:
    """Mean cosine between task updates and mean top-k subspace overlap (n×n heatmaps, annotated)."""
    plt = _plt()
    n = len(tasks)
    size = max(3.5, 0.7 * n + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), dpi=110)
    for ax, mat, title, (lo, hi), cmap in (
        (axes[0], cosine, "cosine ⟨ΔWᵢ, ΔWⱼ⟩ / ‖ΔWᵢ‖‖ΔWⱼ‖", (-1, 1), "RdBu_r"),
        (axes[1], overlap, "top-k subspace overlap", (0, 1), "viridis"),
    ):
        im = ax.imshow(mat, vmin=lo, vmax=hi, cmap=cmap)
        ax.set_xticks(range(n), tasks, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), tasks, fontsize=8)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(mat[i, j]) > 0.6 * max(abs(lo), hi) else "black")  # fmt: skip
        ax.set_title(title + " (mean over modules)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep(sweep: dict[str, Any], path: Path, chosen_storage: float | None = None,
               chosen_error: float | None = None) -> None:  # fmt: skip
    """Left: error vs storage for p = 1..n (points labelled by p; the bundle written, when given, as a star).
    Right: each module's error vs p."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    st, err = sweep["storage"], sweep["error"]
    a1.plot(st, err, marker="o", color="#4C72B0")
    for p, x, y in zip(sweep["p"], st, err, strict=True):
        a1.annotate(f"p={p}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if chosen_storage is not None and chosen_error is not None:
        a1.plot(
            [chosen_storage], [chosen_error], marker="*", ms=14, color="#C44E52", ls="none", label="written"
        )
        a1.legend(fontsize=8)
    a1.axvline(1.0, color="grey", ls=":", lw=1)
    a1.set_xlabel("storage (fraction of the n inputs' numbers)")
    a1.set_ylabel("relative reconstruction error (all tasks)")
    a1.set_title("storage / error trade-off of the rmm basis", fontsize=10)
    mods = sweep["modules"]
    for errs in list(mods.values())[:40]:
        a2.plot(sweep["p"], errs, lw=1, alpha=0.6)
    a2.set_xlabel("basis size p")
    a2.set_ylabel("relative error per module")
    a2.set_xticks(sweep["p"])
    a2.set_title(f"per module ({min(len(mods), 40)} of {len(mods)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def merge_plots(result: Any, out: Path) -> list[Path]:
    """Write the figures of one merge result into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if result.cosine is not None and result.overlap is not None:
        p = out / "interference.png"
        plot_interference(result.tasks, result.cosine, result.overlap, p)
        paths.append(p)
    if result.sweep is not None:
        p = out / "sweep.png"
        s = result.summary.rmm
        plot_sweep(result.sweep, p, s.matrix_storage if s else None, s.overall_error if s else None)
        paths.append(p)
    return paths
