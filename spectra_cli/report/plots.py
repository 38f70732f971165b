"""Figures for ``analyze`` (matplotlib, Agg backend, PNG). Imported only when ``--plots`` is given."""

from __future__ import annotations

import fnmatch
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

DEPTH_METRICS = (
    ("effective_rank_ratio", "effective rank / min(m, n)"),
    ("stable_rank", "stable rank"),
    ("alpha", "power-law α (ESD tail)"),
    ("spectral_norm", "spectral norm σ₁"),
    ("log_norm", "log₁₀ Σλ"),
    ("entropy", "spectral entropy / log rank"),
)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:120]


def choose_layers(rows: list[dict[str, Any]], pattern: str | None, n: int = 3) -> list[str]:
    """Layers whose ESD to draw: those matching ``pattern`` (glob), else the most extreme few
    (lowest α, highest α, lowest effective-rank ratio)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if pattern:
        return [r["name"] for r in ok if fnmatch.fnmatchcase(r["name"], pattern)]
    chosen: list[str] = []
    fitted = [r for r in ok if r["alpha"] is not None and math.isfinite(r["alpha"])]
    for key, reverse, pool in (("alpha", False, fitted), ("alpha", True, fitted),
                               ("effective_rank_ratio", False, ok)):  # fmt: skip
        for r in sorted(pool, key=lambda r: r[key], reverse=reverse):
            if r["name"] not in chosen:
                chosen.append(r["name"])
                break
        if len(chosen) >= n:
            break
    return chosen


def plot_esd(row: dict[str, Any], values: np.ndarray, path: Path) -> None:
    """Log–log histogram of the eigenvalues λ = σ² with the fitted power-law tail."""
    plt = _plt()
    lam = np.asarray(values, dtype=np.float64) ** 2
    lam = lam[lam > 0]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if lam.size:
        bins = np.logspace(np.log10(lam.min()), np.log10(lam.max()), num=max(10, min(80, lam.size // 4)))
        ax.hist(lam, bins=bins, density=True, color="#4C72B0", alpha=0.75, label="ESD (λ = σ²)")
        alpha, xmin = row.get("alpha"), row.get("alpha_xmin")
        if alpha is not None and xmin and math.isfinite(alpha):
            tail = lam[lam >= xmin]
            xs = np.logspace(np.log10(xmin), np.log10(lam.max()), 50)
            frac = tail.size / lam.size
            ax.plot(xs, frac * (alpha - 1) / xmin * (xs / xmin) ** (-alpha), color="#C44E52", lw=2,
                    label=f"power-law fit α = {alpha:.2f}")  # fmt: skip
            ax.axvline(xmin, color="#C44E52", ls="--", lw=1, label=f"xmin = {xmin:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue λ (squared singular value)")
    ax.set_ylabel("density")
    ax.set_title(f"{row['name']}\n{row['shape']}, {row.get('alpha_flag', '')}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_by_depth(
    rows: list[dict[str, Any]],
    path: Path,
    metrics: tuple[tuple[str, str], ...] = DEPTH_METRICS,
    title: str = "Spectral metrics by depth, one line per module kind",
) -> bool:
    """Each metric against depth, one line per module kind. False when no row has a depth."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    ok = [r for r in rows if r.get("status") == "ok" and r.get("depth") is not None]
    if not ok:
        return False
    kinds = sorted({r["kind"] for r in ok})
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows + 0.5), dpi=100, squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    cmap = plt.get_cmap("tab20" if len(kinds) > 10 else "tab10")
    for ax, (key, label) in zip(axes.flat, metrics, strict=False):
        for i, kind in enumerate(kinds):
            pts = sorted((r["depth"], r[key]) for r in ok if r["kind"] == kind and r[key] is not None
                         and math.isfinite(r[key]))  # fmt: skip
            if pts:
                d, v = zip(*pts, strict=True)
                ax.plot(d, v, marker="o", ms=3, lw=1.2, color=cmap(i % cmap.N), label=kind)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("block depth")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # depths are whole numbers
        ax.ticklabel_format(axis="y", useOffset=False)  # 0.9999999, not '1e-7+1' above the axis
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(kinds), 6), fontsize=8, frameon=False)
    fig.suptitle(title)
    bottom = (0.06 + 0.03 * ((len(kinds) - 1) // 6)) * (2 / nrows)
    fig.tight_layout(rect=(0, bottom, 1, 0.95))
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_heatmap(
    rows: list[dict[str, Any]], key: str, label: str, path: Path, fmt: str | None = None
) -> bool:
    """A depth × kind heatmap of one metric (the mean over rows sharing a cell), each cell labelled with
    ``format(value, fmt)``; without ``fmt``, whole numbers print without decimals and others with two.
    False when no row has a depth."""
    plt = _plt()
    ok = [r for r in rows if r.get("status") == "ok" and r.get("depth") is not None]
    if not ok:
        return False
    depths = sorted({r["depth"] for r in ok})
    kinds = sorted({r["kind"] for r in ok})
    grid = np.full((len(kinds), len(depths)), np.nan)
    acc: dict[tuple[int, int], list[float]] = defaultdict(list)
    for r in ok:
        v = r.get(key)
        if v is not None and math.isfinite(v):
            acc[(kinds.index(r["kind"]), depths.index(r["depth"]))].append(v)
    for (i, j), vs in acc.items():
        grid[i, j] = float(np.mean(vs))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(depths) + 3), max(3, 0.4 * len(kinds) + 1.5)), dpi=100)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    if grid.size <= 300 and np.isfinite(grid).any():
        lo, hi = np.nanmin(grid), np.nanmax(grid)
        finite = grid[np.isfinite(grid)]
        cell_fmt = fmt or (".0f" if np.all(finite == np.round(finite)) else ".2f")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                dark = hi > lo and (v - lo) / (hi - lo) < 0.6
                ax.text(
                    j,
                    i,
                    format(v, cell_fmt),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
    ax.set_xticks(range(len(depths)), [str(d) for d in depths], fontsize=8)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel("block depth")
    ax.set_ylabel("module kind")
    ax.set_title(f"{label} by depth and kind")
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def analyze_plots(rows: list[dict[str, Any]], spectra: dict[str, np.ndarray], out: Path,
                  layers_pattern: str | None = None) -> list[Path]:  # fmt: skip
    """Write every ``analyze`` figure into ``out``; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    by_name = {r["name"]: r for r in rows}
    for name in choose_layers(rows, layers_pattern):
        if name in spectra:
            p = out / f"esd_{safe_name(name)}.png"
            plot_esd(by_name[name], spectra[name], p)
            written.append(p)
    p = out / "metrics_by_depth.png"
    if plot_by_depth(rows, p):
        written.append(p)
    for key, label in (("effective_rank_ratio", "effective rank / min(m, n)"), ("alpha", "power-law α")):
        p = out / f"heatmap_{key}.png"
        if plot_heatmap(rows, key, label, p):
            written.append(p)
    return written
