"""``rankme``: RankMe and the other ranks of each embedding matrix, the best input named; and the ``--plots``
figures (the normalised spectra need the singular values of a live run)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spectra_cli.report.render import Column, fmt_num
from spectra_cli.report.views.common import Card, Env, Row, num

if TYPE_CHECKING:
    import numpy as np

    from spectra_cli.report.plots import Figure


def title(env: Env) -> str:
    """``spectra rankme``, with the input's name when there is exactly one embedding file (no --model)."""
    inputs = env["inputs"]
    files, models = inputs.get("embeddings") or [], inputs.get("models") or []
    return "spectra rankme" + (f" {files[0]['name']}" if len(files) == 1 and not models else "")


def columns(env: Env) -> list[Column]:
    return [
        Column("input", "input", str, "left", shorten=True),
        Column("N", "N", fmt_num),
        Column("K", "K", fmt_num),
        Column("rankme", "RankMe", fmt_num),
        Column("rankme_fraction", "RankMe/min(N,K)", fmt_num),
        Column("effective_rank", "erank", fmt_num),
        Column("stable_rank", "stable rank", fmt_num, default=False),
        Column("participation_ratio", "PR", fmt_num, default=False),
        Column("alpha_req", "α-ReQ", fmt_num),
        Column("numerical_rank", "num. rank", fmt_num, default=False),
    ]


def notes(env: Env) -> list[str]:
    s = env["summary"]
    lines: list[str] = []
    if s["best"] is not None and s["inputs"] > 1:
        lines.append(
            f"best: {s['best']} (RankMe {s['best_rankme']:.4g}, {100 * s['best_rankme_fraction']:.1f}% of the "
            "maximum min(N, K)); higher RankMe = richer representation (compare within one method)"
        )
    elif s["best"] is not None:
        lines.append(
            f"RankMe {s['best_rankme']:.4g} = {100 * s['best_rankme_fraction']:.1f}% of the maximum min(N, K)"
        )
    if not s["same_K"]:
        lines.append("the inputs differ in K: compare RankMe/min(N,K), and only between inputs of one method")
    if not s["same_N"]:
        lines.append(
            "the inputs differ in N: RankMe grows with N until N ≫ K; score every input on the same samples"
        )
    lines.append(f"{s['seconds']:.2f} s")
    return lines


def cards(env: Env) -> list[Card]:
    s = env["summary"]
    fraction = s.get("best_rankme_fraction")
    return [
        ("inputs", num(s.get("inputs")), "embedding matrices scored"),
        ("best", str(s["best"]) if s.get("best") is not None else "-", "highest RankMe"),
        ("best RankMe", num(s.get("best_rankme")),
         f"{100 * fraction:.1f}% of the maximum min(N, K)" if isinstance(fraction, int | float) else ""),
        ("same K", num(s.get("same_K")), "compare RankMe/min(N, K) across different K"),
        ("same N", num(s.get("same_N")), "RankMe grows with N until N ≫ K"),
        ("warnings", str(len(s.get("warnings") or [])), "; ".join(s.get("warnings") or [])[:200]),
    ]  # fmt: skip


def figures(env: Env) -> list[Figure]:
    """RankMe per input, as bars (the normalised spectra need the singular values: ``--plots``)."""
    from spectra_cli.report import plots

    rows = env["rows"]
    caption = "RankMe per input (best in green; % of min(N, K))"
    return plots.draw_figures([(caption, lambda p: plot_scores(rows, p))])


# ---- figures -----------------------------------------------------------------------------------------------


def plot_spectra(spectra: dict[str, np.ndarray], order: list[str], path: Path) -> bool:
    """The normalised singular-value spectrum σₖ/σ₁ of every input against k, on one log–log figure."""
    import numpy as np

    from spectra_cli.report.plots import DPI, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=DPI)
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


def plot_scores(rows: list[Row], path: Any) -> bool:
    """RankMe of every input as bars (best first), annotated with RankMe / min(N, K)."""
    import numpy as np

    from spectra_cli.report.plots import DPI, pyplot

    ok = [r for r in rows if r.get("rankme") is not None and math.isfinite(r["rankme"])]
    if not ok:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(ok) + 2.5), 4.5), dpi=DPI)
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


def rankme_plots(rows: list[Row], spectra: dict[str, np.ndarray], out: Path) -> list[Path]:
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
