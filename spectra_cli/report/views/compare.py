"""``compare``: intruders and drift per tuned model and matrix; the page's cards and figures per tuned model;
and the ``--plots`` figures (which also draw base-vs-tuned spectra from the decompositions of a live run)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spectra_cli.report.render import Column, fmt_num, plural
from spectra_cli.report.views.common import Card, Env, Row, dash, num

if TYPE_CHECKING:
    from spectra_cli.report.plots import Figure

DRIFT_METRICS = (
    ("relative_delta", "‖ΔW‖_F / ‖W₀‖_F"),
    ("delta_effective_rank", "effective rank of ΔW"),
    ("subspace_overlap", "top-k subspace overlap"),
    ("effective_rank_change", "erank(W_t) − erank(W₀)"),
)


def epsilons(env: Env) -> list[float]:
    """The intruder thresholds of the run; the first is the primary one."""
    eps = env["summary"].get("epsilons") or env["options"].get("epsilons") or [0.5]
    return [float(e) for e in eps]


def title(env: Env) -> str:
    return f"spectra compare {env['inputs']['base']}"


def columns(env: Env) -> list[Column]:
    cols = [
        Column("tuned", "tuned", str, "left"),
        Column("name", "name", str, "left", shorten=True),
        Column("kind", "kind", str, "left", default=False),
        Column("depth", "depth", dash, default=False),
        Column("shape", "shape", default=False),  # the base's shape: the name says which matrix
    ]
    # the first two ε by default (and overlap@k with one ε only), the others with --wide: fits 100 columns
    eps = epsilons(env)
    cols += [Column(f"intruders@{e:g}", f"intr@{e:g}", dash, default=i < 2) for i, e in enumerate(eps)]
    cols += [
        Column(
            "intruder_ranks", "ranks", lambda x: ",".join(map(str, x)) if x else "-", "left", default=False
        ),
        Column("min_max_cos", "min max|cos|", fmt_num),
        Column("relative_delta", "‖ΔW‖/‖W‖", fmt_num),
        Column("delta_effective_rank", "erank ΔW", fmt_num, default=False),
        Column("subspace_overlap", "overlap@k", fmt_num, default=len(eps) == 1),
        Column("effective_rank_change", "Δ erank", fmt_num, default=False),
        Column("status", "status", lambda x: x or "-", "left"),
    ]
    return cols


def notes(env: Env) -> list[str]:
    s = env["summary"]
    lines = []
    for name, t in s["tuned"].items():
        totals = ", ".join(f"{v} at ε={k}" for k, v in t["total_intruders"].items())
        rel = t["mean_relative_delta"]
        lines.append(
            f"{name} ({t['source']}): intruder dimensions {totals}; {t['matrices_with_intruders']} of "
            f"{plural(t['matrices'], 'matrix has', 'matrices have')} any; mean ‖ΔW‖/‖W‖ "
            + ("-" if rel is None else f"{rel:.3g}")
        )
        worst = [w for w in t["worst_modules"] if w["intruders"] > 0][:3]
        if worst:
            lines.append("  most intruders: " + "; ".join(f"{w['name']} ({w['intruders']})" for w in worst))
        if t["missing"]:
            lines.append(f"  skipped (not in the other model): {len(t['missing'])}")
        if t["nonfinite"]:
            lines.append(f"  {plural(t['nonfinite'], 'matrix', 'matrices')} with NaN/Inf not compared")
    lines.append(f"{s['seconds']:.2f} s")
    return lines


def cards(env: Env) -> list[Card]:
    s = env["summary"]
    key = f"{epsilons(env)[0]:g}"
    out: list[Card] = []
    for name, t in (s.get("tuned") or {}).items():
        if not isinstance(t, dict):
            continue
        out.append((f"{name}: intruders (ε = {key})", num((t.get("total_intruders") or {}).get(key)),
                    f"{num(t.get('matrices_with_intruders'))} of {num(t.get('matrices'))} "
                    f"{'matrix has' if t.get('matrices') == 1 else 'matrices have'} any"))  # fmt: skip
        out.append((f"{name}: mean ‖ΔW‖/‖W‖", num(t.get("mean_relative_delta")),
                    f"mean top-k subspace overlap {num(t.get('mean_subspace_overlap'))}"))  # fmt: skip
    return out


def figures(env: Env) -> list[Figure]:
    """Per tuned model: the intruder heatmap, the cosine profile of the worst matrices and drift by depth; and
    the intruder totals across models (the base-vs-tuned spectra need the decompositions: ``--plots``)."""
    from spectra_cli.report import plots

    summary = env["summary"]
    eps = epsilons(env)
    names = list(dict.fromkeys(r.get("tuned") for r in env["rows"] if r.get("tuned") is not None))
    todo: list[tuple[str, Callable[[Any], object]]] = []
    for name in names:
        rows = [r for r in env["rows"] if r.get("tuned") == name]
        label = f"intruders (ε = {eps[0]:g}) — {name}"
        todo.append((f"{name}: intruder dimensions (ε = {eps[0]:g}) by depth and kind",
                     partial(plots.plot_heatmap, rows, "intruders", label, fmt=".0f")))  # fmt: skip
        if any(isinstance(r.get("max_cos"), list) and r["max_cos"] for r in rows):
            caption = f"{name}: best match of each top tuned singular vector in the base"
            todo.append((caption, partial(plot_cosine_profile, rows, eps, caption)))
        caption = f"{name}: drift by depth, one line per module kind"
        todo.append((caption, partial(plots.plot_by_depth, rows, metrics=DRIFT_METRICS, title=caption)))
    tuned = summary.get("tuned") or {}
    if len(names) > 1 and all(isinstance(tuned.get(n), dict) for n in names):
        key = f"{eps[0]:g}"
        totals = {str(n): int(tuned[n].get("total_intruders", {}).get(key) or 0) for n in names}
        todo.append(("Intruder dimensions per tuned model", lambda p: plot_totals(totals, eps[0], p)))
    return plots.draw_figures(todo)


# ---- figures -----------------------------------------------------------------------------------------------


def _worst(rows: list[Row], n: int = 3) -> list[Row]:
    ok = [r for r in rows if r.get("status") == "ok"]
    return sorted(ok, key=lambda r: (-r["intruders"], r["min_max_cos"]))[:n]


def plot_cosine_profile(rows: list[Row], epsilons: list[float], title: str, path: Path) -> None:
    """For the worst matrices: max |cos| of each top tuned singular vector against the base, with the ε lines
    (the paper's figure)."""
    from spectra_cli.report.plots import DPI, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=DPI)
    longest = 1
    for r in _worst(rows):
        cos = r["max_cos"]
        longest = max(longest, len(cos))
        ax.plot(range(1, len(cos) + 1), cos, marker="o", ms=4,
                label=f"{r['name']} ({r['intruders']} intruder{'' if r['intruders'] == 1 else 's'})")  # fmt: skip
    for e in epsilons:
        ax.axhline(e, color="#C44E52", ls="--", lw=1)
        # the ε label sits just outside the right edge, where it covers no point
        ax.text(1.01, e, f"ε = {e:g}", color="#C44E52", fontsize=8, va="center",
                transform=ax.get_yaxis_transform())  # fmt: skip
    ax.set_xlim(0.5, longest + 0.5)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("j: the tuned matrix's j-th singular vector (largest σ first)")
    ax.set_ylabel("best |cosine| with any base singular vector")
    ax.set_title(title + "\n(below ε: an intruder dimension)", fontsize=10)
    # below the axes, outside the data: the names are long and the lines fill the plot
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def plot_spectra(modules: list[Any], names: list[str], title: str, path: Path) -> bool:
    """Base vs tuned singular values of the named matrices (log scale)."""
    import numpy as np

    from spectra_cli.report.plots import DPI, pyplot

    chosen = [m for m in modules if m.spec.name in names]
    if not chosen:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 4), dpi=DPI, squeeze=False)
    for ax, m in zip(axes.flat, chosen, strict=True):
        ax.semilogy(np.arange(1, m.s_base.size + 1), np.maximum(m.s_base, 1e-300), label="base", lw=1.5)
        ax.semilogy(
            np.arange(1, m.svd_tuned.s.size + 1),
            np.maximum(m.svd_tuned.s, 1e-300),
            label="tuned",
            lw=1.2,
            ls="--",
        )
        ax.set_title(m.spec.name, fontsize=8)
        ax.set_xlabel("index i")
        ax.set_ylabel("σᵢ")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_totals(totals: dict[str, int], epsilon: float, path: Path) -> None:
    """Total intruder dimensions of each tuned model, as bars."""
    from spectra_cli.report.plots import DPI, pyplot

    plt = pyplot()
    names = list(totals)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 4), dpi=DPI)
    bars = ax.bar(names, [totals[n] for n in names], color="#4C72B0")
    ax.bar_label(bars, fontsize=8)
    ax.set_ylabel(f"total intruder dimensions (ε = {epsilon:g})")
    ax.set_title("Intruder dimensions per tuned model")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare_plots(result: Any, out: Path) -> list[Path]:
    """Every ``compare`` figure into ``out`` (``result`` a live compare result: its modules hold the
    decompositions); returns the paths written."""
    from spectra_cli.report.plots import plot_by_depth, plot_heatmap, safe_name

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    eps = result.summary.epsilons
    tuned_names = [t["name"] for t in result.inputs["tuned"]]
    for name in tuned_names:
        rows = [r for r in result.rows if r["tuned"] == name]
        tag = safe_name(name)
        p = out / f"intruders_heatmap_{tag}.png"
        if plot_heatmap(rows, "intruders", f"intruders (ε = {eps[0]:g}) — {name}", p, fmt=".0f"):
            written.append(p)
        p = out / f"cosine_profile_{tag}.png"
        plot_cosine_profile(rows, eps, f"{name}: best match of each top tuned singular vector in the base", p)
        written.append(p)
        p = out / f"spectra_{tag}.png"
        mods = [m for m in result.modules if m.tuned == name]
        if plot_spectra(mods, [r["name"] for r in _worst(rows)], f"{name}: base vs tuned singular values", p):
            written.append(p)
        p = out / f"drift_by_depth_{tag}.png"
        if plot_by_depth(rows, p, DRIFT_METRICS, f"{name}: drift by depth, one line per module kind"):
            written.append(p)
    if len(tuned_names) > 1:
        p = out / "intruders_by_model.png"
        totals = {n: result.summary.tuned[n]["total_intruders"][f"{eps[0]:g}"] for n in tuned_names}
        plot_totals(totals, eps[0], p)
        written.append(p)
    return written
