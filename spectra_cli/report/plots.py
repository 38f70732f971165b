"""Drawing primitives shared by every command's figures (matplotlib, Agg backend, PNG): metrics by depth, a
depth × kind heatmap, and the in-memory rendering the HTML page embeds. A command's own figures live in its
view (:mod:`spectra_cli.report.views`). matplotlib is imported only when something is drawn."""

from __future__ import annotations

import io
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
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

DPI = 150  # every figure: sharp enough for a paper or a slide


def cell_label(value: float, fmt: str) -> str:
    """``format(value, fmt)`` without a negative zero: -0.001 at ".2f" prints "0.00", not "-0.00"."""
    text = format(value, fmt)
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def text_color(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads better on a cell of colour ``rgba``: by the colour's relative
    luminance (WCAG 2.x: linearised sRGB, weights 0.2126, 0.7152, 0.0722), white below 0.179, the point at
    which white and black have the same contrast ratio against it."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(c)) for c in rgba[:3])
    return "white" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.179 else "black"


def annotate_cells(ax: Any, im: Any, grid: np.ndarray, fmt: str, fontsize: float = 7) -> None:
    """Write each finite cell's value on an ``imshow`` heatmap, in the text colour its cell colour needs."""
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, cell_label(float(v), fmt), ha="center", va="center", fontsize=fontsize,
                    color=text_color(im.cmap(im.norm(v))))  # fmt: skip


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def safe_name(name: str) -> str:
    """A matrix or model name as a file-name part: anything but letters, digits, ``_.-`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:120]


def plot_by_depth(
    rows: list[dict[str, Any]],
    path: Path,
    metrics: tuple[tuple[str, str], ...] = DEPTH_METRICS,
    title: str = "Spectral metrics by depth, one line per module kind",
) -> bool:
    """Each metric against depth, one line per module kind. False when no row has a depth."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    ok = [r for r in rows if r.get("status") == "ok" and r.get("depth") is not None]
    if not ok:
        return False
    kinds = sorted({r["kind"] for r in ok})
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows + 0.5), dpi=DPI, squeeze=False)
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
    plt = pyplot()
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
    fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(depths) + 3), max(3.5, 0.45 * len(kinds) + 1.8)), dpi=DPI)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    finite = grid[np.isfinite(grid)]
    whole = bool(finite.size) and bool(np.all(finite == np.round(finite)))
    ax.set_xticks(range(len(depths)), [str(d) for d in depths], fontsize=8)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel("block depth")
    ax.set_ylabel("module kind")
    ax.set_title(f"{label} by depth and kind")
    counts = fmt == ".0f" or (fmt is None and whole)
    if counts and finite.size:  # from 0 (none) in whole numbers: a grid of zeros is 0 … 1, not -0.1 … 0.1
        lo_c = min(0, math.floor(float(finite.min())))
        im.set_clim(lo_c, max(math.ceil(float(finite.max())), lo_c + 1))
    bar = fig.colorbar(im, ax=ax, label=label)
    if counts:  # whole-number ticks, not 7.25, 7.5 …
        from matplotlib.ticker import MaxNLocator

        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    if grid.size <= 300 and finite.size:  # after the colour limits are final: the text colour follows the cell's
        annotate_cells(ax, im, grid, fmt or (".0f" if whole else ".2f"))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


Figure = tuple[str, bytes]  # (caption, PNG bytes)


def png_of(draw: Callable[[Any], object]) -> bytes | None:
    """Run a plot function (which takes a path for ``fig.savefig``) on an in-memory file; its PNG bytes, or
    None when it drew nothing (returned False or wrote no bytes)."""
    buf = io.BytesIO()
    # fig.savefig takes a binary file object just as well as a path
    drawn = draw(buf)
    data = buf.getvalue()
    return data if data and drawn is not False else None


def draw_figures(todo: Sequence[tuple[str, Callable[[Any], object]]]) -> list[Figure]:
    """(caption, PNG) of each plot function in ``todo`` that drew something, in order."""
    out: list[Figure] = []
    for caption, draw in todo:
        png = png_of(draw)
        if png is not None:
            out.append((caption, png))
    return out
