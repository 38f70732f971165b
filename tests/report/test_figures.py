"""The figures as matplotlib objects (not pixels): axis labels and limits, colour-bar ticks, annotation text and
colour, legend placement and resolution, for each figure type the commands draw."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spectra_cli.report.plots import plot_by_depth, plot_heatmap, pyplot
from spectra_cli.report.views.analyze import plot_esd
from spectra_cli.report.views.compare import plot_cosine_profile
from spectra_cli.report.views.merge import plot_interference

# viridis at its ends (matplotlib's table): dark purple and yellow; RdBu_r at -1 is dark blue
VIRIDIS_LOW, VIRIDIS_HIGH = "#440154", "#fde725"


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Each figure a plot function closes, kept open for the test to inspect (closed afterwards)."""
    plt = pyplot()
    figs: list[Any] = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    yield figs
    monkeypatch.undo()
    for f in figs:
        plt.close(f)


def _texts(ax: Any) -> dict[str, list[str]]:
    """Annotation text → the colours it is drawn in."""
    out: dict[str, list[str]] = {}
    for t in ax.texts:
        out.setdefault(t.get_text(), []).append(t.get_color())
    return out


def _rows(values: dict[tuple[str, int], list[float]], key: str) -> list[dict[str, Any]]:
    return [{"status": "ok", "kind": k, "depth": d, key: v} for (k, d), vs in values.items() for v in vs]


def test_heatmap_labels_size_and_text_colour_by_cell_luminance(tmp_path: Path, drawn: list[Any]) -> None:
    rows = _rows({("query", 0): [1.0], ("query", 1): [2.0], ("value", 0): [3.0], ("value", 1): [4.5]}, "alpha")
    assert plot_heatmap(rows, "alpha", "power-law α", tmp_path / "h.png")
    (fig,) = drawn
    ax, bar = fig.axes
    assert fig.dpi >= 150
    w, h = fig.get_size_inches() * fig.dpi
    assert w >= 1000 and h >= 500  # not the old 600×380 px
    assert ax.get_xlabel() == "block depth" and ax.get_ylabel() == "module kind"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["query", "value"]
    texts = _texts(ax)
    # the lowest cell is viridis' dark purple: white text; the highest is yellow: black text
    assert texts["1.00"] == ["white"] and texts["4.50"] == ["black"]
    assert bar.get_ylabel() == "power-law α"
    assert (Path(tmp_path / "h.png").read_bytes()[:4]) == b"\x89PNG"


def test_intruder_heatmap_colour_bar_has_whole_number_ticks(tmp_path: Path, drawn: list[Any]) -> None:
    # counts whose cell means are fractional (7.5): the old colour bar read 7.25, 7.50, 7.75 …
    rows = _rows({("query", 0): [7, 8], ("query", 1): [9], ("value", 0): [7], ("value", 1): [8]}, "intruders")
    assert plot_heatmap(rows, "intruders", "intruders (ε = 0.5)", tmp_path / "i.png", fmt=".0f")
    (fig,) = drawn
    bar = fig.axes[1]
    lo, hi = bar.get_ylim()
    assert (lo, hi) == (0.0, 9.0)  # counts from none to the most
    ticks = [t for t in bar.get_yticks() if lo - 1e-9 <= t <= hi + 1e-9]
    assert len(ticks) >= 3 and all(t == int(t) for t in ticks)
    assert bar.get_ylabel() == "intruders (ε = 0.5)"
    assert set(_texts(fig.axes[0])) == {"8", "9", "7"}  # 7.5 rounds to 8 under ".0f"


def test_a_heatmap_of_zero_counts_has_whole_number_ticks(tmp_path: Path, drawn: list[Any]) -> None:
    # no intruders anywhere: the colour bar spanned -0.1 … 0.1 in steps of 0.02
    rows = _rows({("query", 0): [0], ("value", 1): [0]}, "intruders")
    assert plot_heatmap(rows, "intruders", "intruders", tmp_path / "z.png", fmt=".0f")
    (fig,) = drawn
    bar = fig.axes[1]
    lo, hi = bar.get_ylim()
    assert (lo, hi) == (0.0, 1.0)
    assert [t for t in bar.get_yticks() if lo <= t <= hi] == [0.0, 1.0]
    assert _texts(fig.axes[0]) == {"0": ["white", "white"]}  # viridis' dark end


def test_merge_interference_no_negative_zero_and_readable_on_every_cell(tmp_path: Path, drawn: list[Any]) -> None:
    cosine = np.array([[1.0, -0.001, -0.9], [-0.001, 1.0, 0.0], [-0.9, 0.0, 1.0]])
    overlap = np.array([[1.0, 0.02, 0.5], [0.02, 1.0, 0.1], [0.5, 0.1, 1.0]])
    plot_interference(["a", "b", "c"], cosine, overlap, tmp_path / "m.png")
    (fig,) = drawn
    ax_cos, ax_ov = fig.axes[:2]  # the two heatmaps (their colour bars follow)
    assert fig.dpi >= 150
    cos_texts, ov_texts = _texts(ax_cos), _texts(ax_ov)
    assert not any(t.startswith("-0.00") for t in cos_texts)
    assert cos_texts["0.00"] == ["black"] * 4  # -0.001 and 0.0 alike, black on RdBu_r's near-white middle
    assert cos_texts["1.00"] == ["white"] * 3  # dark red
    assert cos_texts["-0.90"] == ["white"] * 2  # dark blue
    assert ov_texts["0.02"] == ["white"] * 2  # viridis' dark purple: was black on dark purple
    assert ov_texts["1.00"] == ["black"] * 3  # yellow
    assert ax_cos.get_xlabel() == "task j" and ax_cos.get_ylabel() == "task i"
    assert [t.get_text() for t in ax_ov.get_xticklabels()] == ["a", "b", "c"]


def test_cosine_profile_legend_outside_the_data_and_a_plain_label(tmp_path: Path, drawn: list[Any]) -> None:
    rows = [
        {"status": "ok", "name": f"encoder.layer.{i}.attention.self.query.weight", "intruders": i,
         "min_max_cos": 0.1 * i, "max_cos": list(np.linspace(0.95, 0.1 * (i + 1), 16))}
        for i in range(4)
    ]  # fmt: skip
    plot_cosine_profile(rows, [0.3, 0.5, 0.7], "tuned: best match", tmp_path / "c.png")
    (fig,) = drawn
    (ax,) = fig.axes
    assert fig.dpi >= 150
    assert ax.get_ylabel() == "best |cosine| with any base singular vector"
    assert "max_i" not in ax.get_ylabel() and "U₀" not in ax.get_ylabel()
    assert ax.get_ylim() == (0.0, 1.05)
    assert ax.get_xlim() == (0.5, 16.5)
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    data = ax.get_window_extent()
    assert legend.y1 <= data.y0  # wholly below the axes: it covers no line
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "encoder.layer.3.attention.self.query.weight (3 intruders)"  # the worst first
    assert "encoder.layer.1.attention.self.query.weight (1 intruder)" in labels
    assert {t.get_text() for t in ax.texts} == {"ε = 0.3", "ε = 0.5", "ε = 0.7"}
    assert all(t.get_position()[0] > 1 for t in ax.texts)  # in axes x: right of the plot


def test_esd_axis_on_the_data_and_the_fitted_tail_visible(tmp_path: Path, drawn: list[Any]) -> None:
    # one lone small eigenvalue far below the bulk (as in MiniLM's pooler): 1e-8, then 1e-4 … 10
    lam = np.concatenate([[1e-8], np.logspace(-4, 1, 383)])
    xmin, alpha = 1.0, 3.0
    row = {"name": "pooler.dense.weight", "shape": "384x384", "alpha": alpha, "alpha_xmin": xmin,
           "alpha_flag": "ok"}  # fmt: skip
    plot_esd(row, np.sqrt(lam), tmp_path / "e.png")
    (fig,) = drawn
    ax, tail_ax = fig.axes
    assert fig.dpi >= 150
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_xlabel() == "eigenvalue λ (squared singular value)"
    assert ax.get_ylabel() == "eigenvalues per bin"
    lo, hi = ax.get_xlim()
    assert 1e-8 / 1.3 < lo < 1e-8 and 10 < hi < 10 * 1.3  # on the data: no empty decade either side
    heights = [p.get_height() for p in ax.containers[0]]  # the histogram's bars
    assert sum(heights) == 384  # every eigenvalue counted, the smallest and the largest included
    assert ax.get_ylim()[0] < 1  # a bin holding one eigenvalue is visible
    (fit,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("power-law fit")]
    x = fit.get_xdata()
    assert math.isclose(min(x), xmin) and math.isclose(max(x), 10.0)  # over the whole tail, not a stub
    # the fit's expected count per log bin falls as λ^(1-α) over the tail
    y = fit.get_ydata()
    assert math.isclose(y[0] / y[-1], (10.0 / xmin) ** (alpha - 1), rel_tol=1e-9)
    # right: the tail's empirical CCDF and the fit (λ/xmin)^-(α-1), on the tail's range
    n_tail = int(np.sum(lam >= xmin))
    points, line = tail_ax.get_lines()
    assert len(points.get_xdata()) == n_tail
    assert points.get_ydata()[0] == 1.0 and math.isclose(points.get_ydata()[-1], 1 / n_tail)
    assert math.isclose(line.get_ydata()[-1], 10.0 ** (1 - alpha))
    t_lo, t_hi = tail_ax.get_xlim()
    assert xmin / 1.2 < t_lo < xmin and 10 < t_hi < 12
    assert tail_ax.get_ylabel() == "fraction of the tail ≥ λ"
    assert f"{n_tail} eigenvalues" in tail_ax.get_title()


def test_esd_without_a_fit_still_draws_the_histogram(tmp_path: Path, drawn: list[Any]) -> None:
    row = {"name": "tiny", "shape": "2x384", "alpha": None, "alpha_xmin": None, "alpha_flag": "n/a"}
    plot_esd(row, np.array([2.0, 1.0]), tmp_path / "e.png")
    (fig,) = drawn
    ax, tail_ax = fig.axes
    lo, hi = ax.get_xlim()
    assert lo < 1.0 and hi > 4.0
    assert not ax.get_lines() and "no power-law fit" in [t.get_text() for t in tail_ax.texts]


def test_metrics_by_depth_resolution_and_labels(tmp_path: Path, drawn: list[Any]) -> None:
    rows = [{"status": "ok", "kind": k, "depth": d, "effective_rank_ratio": 0.5 + 0.1 * d, "stable_rank": 3.0,
             "alpha": 3.0, "spectral_norm": 1.0, "log_norm": 0.1, "entropy": 0.9}
            for k in ("query", "value") for d in range(3)]  # fmt: skip
    assert plot_by_depth(rows, tmp_path / "d.png")
    (fig,) = drawn
    assert fig.dpi >= 150
    axes = [a for a in fig.axes if a.get_visible()]
    assert len(axes) == 6 and all(a.get_xlabel() == "block depth" for a in axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["query", "value"]
