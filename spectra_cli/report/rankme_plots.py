"""Figures for ``rankme`` (matplotlib Agg, PNG). Imported only when ``--plots`` is given."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.report.plots import _plt


def plot_spectra(spectra: dict[str, np.ndarray], order: list[str], path: Path) -> bool:
    """The normalised singular-value spectrum σₖ/σ₁ of every input against k, on one log–log figure."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    drawn = 0
    for name in order:
        s = np.asarray(spectra.get(name, np.empty(0)), dtype=np.float64)
        if s.size == 0 or s[0] <= 0:
            continue
        s = s[s > 0] / s[0]
        ax.loglog(np.arange(1, s.size + 1), s, lw=1.5, label=name)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("index k")
    ax.set_ylabel("σₖ / σ₁")
    ax.set_title("normalised singular-value spectrum of the embeddings", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_scores(rows: list[dict[str, Any]], path: Path) -> bool:
    """RankMe of every input as bars (best first), annotated with RankMe / min(N, K)."""
    ok = [r for r in rows if r.get("rankme") is not None and math.isfinite(r["rankme"])]
    if not ok:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(ok) + 2.5), 4.5), dpi=110)
    x = np.arange(len(ok))
    vals = [r["rankme"] for r in ok]
    colors = ["#4C72B0"] * len(ok)
    colors[0] = "#55A868"
    ax.bar(x, vals, color=colors)
    for i, r in enumerate(ok):
        ax.text(i, r["rankme"], f"{r['rankme']:.3g}\n({100 * r['rankme_fraction']:.0f}%)", ha="center",
                va="bottom", fontsize=7)  # fmt: skip
    ax.set_xticks(x)
    ax.set_xticklabels(
        [str(r["input"]) for r in ok],
        rotation=30 if len(ok) > 3 else 0,
        ha="right" if len(ok) > 3 else "center",
        fontsize=8,
    )
    ax.set_ylabel("RankMe")
    ax.set_ylim(0, max(vals) * 1.2)
    ax.set_title("RankMe per input (best in green; % of min(N, K))", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def rankme_plots(rows: list[dict[str, Any]], spectra: dict[str, np.ndarray], out: Path) -> list[Path]:
    """Write ``spectra.png`` and ``rankme.png`` into ``out``; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    p = out / "spectra.png"
    if plot_spectra(spectra, [r["input"] for r in rows], p):
        written.append(p)
    p = out / "rankme.png"
    if plot_scores(rows, p):
        written.append(p)
    return written
