"""Figures for ``compare`` (matplotlib Agg, PNG). Imported only when ``--plots`` is given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.report.plots import _plt, plot_by_depth, plot_heatmap, safe_name

DRIFT_METRICS = (
    ("relative_delta", "‖ΔW‖_F / ‖W₀‖_F"),
    ("delta_effective_rank", "effective rank of ΔW"),
    ("subspace_overlap", "top-k subspace overlap"),
    ("effective_rank_change", "erank(W_t) − erank(W₀)"),
)


def _worst(rows: list[dict[str, Any]], n: int = 3) -> list[dict[str, Any]]:
    ok = [r for r in rows if r.get("status") == "ok"]
    return sorted(ok, key=lambda r: (-r["intruders"], r["min_max_cos"]))[:n]


def plot_cosine_profile(rows: list[dict[str, Any]], epsilons: list[float], title: str, path: Path) -> None:
    """For the worst matrices: max |cos| of each top tuned singular vector against the base, with the ε lines
    (the paper's figure)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for r in _worst(rows):
        cos = r["max_cos"]
        ax.plot(
            range(1, len(cos) + 1), cos, marker="o", ms=4, label=f"{r['name']} ({r['intruders']} intruders)"
        )
    for e in epsilons:
        ax.axhline(e, color="#C44E52", ls="--", lw=1)
        ax.text(0.6, e + 0.01, f"ε = {e:g}", color="#C44E52", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("rank j of the tuned singular vector")
    ax.set_ylabel("max_i |⟨U₀[:, i], U_t[:, j]⟩|")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_spectra(modules: list[Any], names: list[str], title: str, path: Path) -> bool:
    """Base vs tuned singular values of the named matrices (log scale)."""
    chosen = [m for m in modules if m.spec.name in names]
    if not chosen:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 4), dpi=100, squeeze=False)
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
    plt = _plt()
    names = list(totals)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 4), dpi=100)
    bars = ax.bar(names, [totals[n] for n in names], color="#4C72B0")
    ax.bar_label(bars, fontsize=8)
    ax.set_ylabel(f"total intruder dimensions (ε = {epsilon:g})")
    ax.set_title("Intruder dimensions per tuned model")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare_plots(result: Any, out: Path) -> list[Path]:
    """Every ``compare`` figure into ``out``; returns the paths written."""
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
