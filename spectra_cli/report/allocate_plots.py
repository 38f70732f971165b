"""Figures for ``allocate`` (matplotlib, Agg backend, PNG): allocated ranks by depth and kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spectra_cli.report.plots import _plt, plot_by_depth, plot_heatmap

ALLOCATE_METRICS = (
    ("rank", "allocated rank"),
    ("energy", "σ² energy captured at that rank"),
    ("energy_gain", "energy captured − uniform allocation's"),
)


def plot_ranks_bar(rows: list[dict[str, Any]], path: Path, strategy: str) -> None:
    """One bar per module (in checkpoint order): allocated rank, with the uniform rank as a step line."""
    plt = _plt()
    n = len(rows)
    fig, ax = plt.subplots(figsize=(min(4 + 0.25 * n, 24), 4.5), dpi=100)
    xs = range(n)
    ax.bar(xs, [r["rank"] for r in rows], color="tab:blue", label=f"{strategy} rank")
    ax.step(xs, [r["uniform_rank"] for r in rows], where="mid", color="tab:orange", label="uniform rank")
    if n <= 60:
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["name"] for r in rows], rotation=90, fontsize=6)
    else:
        ax.set_xlabel("module (checkpoint order)")
    ax.set_ylabel("LoRA rank")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"Allocated ranks ({strategy})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def allocate_plots(rows: list[dict[str, Any]], out: Path, strategy: str) -> list[Path]:
    """Write the ``allocate`` figures into ``out``; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ok = [{**r, "status": "ok"} for r in rows]
    p = out / "ranks_by_depth.png"
    if plot_by_depth(
        ok, p, ALLOCATE_METRICS, f"Allocated LoRA ranks ({strategy}) by depth, one line per kind"
    ):
        written.append(p)
    p = out / "heatmap_rank.png"
    if plot_heatmap(ok, "rank", "allocated rank", p, fmt=".0f"):
        written.append(p)
    p = out / "ranks.png"
    plot_ranks_bar(rows, p, strategy)
    written.append(p)
    return written
