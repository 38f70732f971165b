"""``analyze``: the per-matrix spectrum table, its notes, the page's key figures and figures, and the
``--plots`` figures (which also draw the eigenvalue histograms from the singular values of a live run)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spectra_cli.report.render import Column, plural
from spectra_cli.report.views.analyze_rmt import draw_other_fit, plot_rmt, rmt_columns, rmt_notes
from spectra_cli.report.views.common import Card, Env, Row, dash, num, number

if TYPE_CHECKING:
    import numpy as np

    from spectra_cli.report.plots import Figure


def title(env: Env) -> str:
    return f"spectra analyze {env['inputs']['checkpoint']}"


def columns(env: Env) -> list[Column]:
    return [
        Column("name", "name", str, "left", shorten=True),
        Column("kind", "kind", str, "left", default=False),
        Column("depth", "depth", dash, default=False),
        Column("shape", "shape"),
        Column("dtype", "dtype", str, "left", default=False),
        Column("spectral_norm", "σ₁", number(), default=False),
        Column("stable_rank", "stable rank", number(), default=False),
        Column("effective_rank", "eff. rank", number(1)),
        Column("energy_rank_90", "r90", dash, default=False),
        Column("alpha", "α", number()),
        Column("alpha_tail", "tail", dash),
        Column("alpha_flag", "α reading", lambda x: x or "-", "left"),
        Column("entropy", "entropy", number(), default=False),
        Column("status", "status", lambda x: x or "-", "left"),
        *rmt_columns(env),  # opt-in: only when --mp-fit/--randomize/--detx computed them
    ]


def notes(env: Env) -> list[str]:
    s = env["summary"]
    eng = s.get("engine", {})
    lines = [count_line(s)]
    if s.get("mean_alpha") is not None:
        lines.append(
            f"α: mean {s['mean_alpha']:.2f}, {s['over_trained']:,} below 2 (over-trained), "
            f"{s['under_trained']:,} above 6 (under-trained)"
            + (
                f", {s['small_tail']} fitted on fewer than 50 tail eigenvalues (small-tail: α not read)"
                if s.get("small_tail")
                else ""
            )
        )
    if s.get("lowest_alpha"):
        lo = s["lowest_alpha"][0]
        hi = s["highest_alpha"][0]
        lines.append(
            f"lowest α {lo['alpha']:.2f} in {lo['name']}; highest α {hi['alpha']:.2f} in {hi['name']}"
        )
    if s["nonfinite"]:
        names = ", ".join(
            f"{b['name']} ({b['nan_count']} NaN, {b['inf_count']} Inf)" for b in s["nonfinite"][:5]
        )
        lines.append(f"NaN/Inf found in {plural(len(s['nonfinite']), 'matrix', 'matrices')} (not decomposed): {names}")
    else:
        lines.append("no NaN/Inf weights")
    if "device" in eng:
        lines.append(
            f"{s['seconds']:.2f} s on {eng['device']} ({eng['backend']}, {eng['method']}, {eng['precision']})"
        )
    else:
        lines.append(f"{s['seconds']:.2f} s from saved spectra")
    return lines + rmt_notes(env)


def count_line(s: dict[str, Any]) -> str:
    """``24 of 40 matrices analysed (16 excluded by --kinds query,value), 884,736 parameters; 53 non-matrix
    tensors skipped``: the total counts the matrices the selection flags left out (an older envelope without
    ``excluded`` reads as none left out)."""
    excluded = s.get("excluded") or 0
    total = s["matrices"] + excluded
    why = " ".join(s.get("excluded_by") or []) or "the selection"
    return (
        f"{s['analysed']:,} of {plural(total, 'matrix', 'matrices')} analysed"
        + (f" ({excluded:,} excluded by {why})" if excluded else "")
        + f", {s['params']:,} parameters"
        + (f"; {plural(s['skipped_tensors'], 'non-matrix tensor', 'non-matrix tensors')} skipped"
           if s.get("skipped_tensors") else "")
    )  # fmt: skip


def cards(env: Env) -> list[Card]:
    s = env["summary"]
    excluded = s.get("excluded") or 0
    foot = [f"{excluded:,} excluded by the selection" if excluded else "",
            plural(s["skipped_tensors"], "non-matrix tensor", "non-matrix tensors") + " skipped"
            if s.get("skipped_tensors") else ""]  # fmt: skip
    total = s.get("matrices") + excluded if isinstance(s.get("matrices"), int) else s.get("matrices")
    return [
        ("matrices analysed", f"{num(s.get('analysed'))} / {num(total)}", "; ".join(f for f in foot if f)),
        ("parameters", f"{s['params']:,}" if isinstance(s.get("params"), int) else "-", "in the analysed matrices"),
        ("mean α", num(s.get("mean_alpha"), 2), "heavy-tail exponent; WeightWatcher reads 2–6 as well trained"),
        ("α < 2", num(s.get("over_trained")), "over-trained (of the fitted)"),
        ("α > 6", num(s.get("under_trained")), "under-trained (of the fitted)"),
        ("mean eff. rank ratio", num(s.get("mean_effective_rank_ratio")), "effective rank / min(m, n)"),
        ("NaN/Inf matrices", str(len(s.get("nonfinite") or [])), "not decomposed"),
    ]  # fmt: skip


def figures(env: Env) -> list[Figure]:
    """Metrics by depth, the α histogram and two depth × kind heatmaps, from the rows (the eigenvalue
    histograms need the singular values: ``--plots`` draws them)."""
    from spectra_cli.report import plots

    rows = env["rows"]
    todo: list[tuple[str, Callable[[Any], object]]] = [
        ("Spectral metrics by depth, one line per module kind", lambda p: plots.plot_by_depth(rows, p)),
        ("Distribution of the heavy-tail exponent α", lambda p: alpha_histogram(rows, p)),
    ]
    for key, label in (("effective_rank_ratio", "effective rank / min(m, n)"), ("alpha", "power-law α")):
        if not any(isinstance(r.get(key), int | float) and math.isfinite(r[key]) for r in rows):
            continue  # an empty heatmap says nothing
        todo.append((f"{label} by depth and kind", partial(plots.plot_heatmap, rows, key, label)))
    return plots.draw_figures(todo)


def alpha_histogram(rows: list[Row], path: Any) -> bool:
    """Histogram of the fitted α over all matrices, with the 2 and 6 reading thresholds."""
    from spectra_cli.report.plots import DPI, pyplot

    alphas = [
        r["alpha"] for r in rows if isinstance(r.get("alpha"), int | float) and math.isfinite(r["alpha"])
    ]
    if not alphas:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=DPI)
    ax.hist(alphas, bins=min(40, max(8, len(alphas) // 3)), color="#4C72B0", alpha=0.85)
    ax.axvline(2.0, color="#C44E52", ls="--", lw=1, label="α = 2 (below: over-trained)")
    ax.axvline(6.0, color="#DD8452", ls="--", lw=1, label="α = 6 (above: under-trained)")
    ax.legend(fontsize=8)
    ax.set_xlabel("power-law α of the ESD tail")
    ax.set_ylabel("matrices")
    ax.set_title(f"α over {plural(len(alphas), 'matrix', 'matrices')}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ---- --plots DIR -------------------------------------------------------------------------------------------


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
    """Left: log–log histogram of the eigenvalues λ = σ² (counts per logarithmic bin) over the data's range,
    the fitted tail shaded and the fit's expected count per bin drawn over it. Right: the tail alone as an empirical complementary CDF
    P(Λ ≥ λ) with the fit's (λ / xmin)^-(α-1), the standard way to show a power-law fit (Clauset, Shalizi &
    Newman 2009), where a tail of a few eigenvalues is still visible."""
    import numpy as np

    from spectra_cli.report.plots import DPI, pyplot

    plt = pyplot()
    lam = np.sort(np.asarray(values, dtype=np.float64) ** 2)
    lam = lam[lam > 0]
    a, x = row.get("alpha"), row.get("alpha_xmin")
    alpha = float(a) if isinstance(a, int | float) else math.nan
    xmin = float(x) if isinstance(x, int | float) else math.nan
    fitted = bool(lam.size) and math.isfinite(alpha) and xmin > 0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=DPI, gridspec_kw={"width_ratios": [3, 2]})
    ax, tail_ax = axes
    ax.set_xscale("log")
    ax.set_yscale("log")
    if lam.size:
        lo, hi = lam[0], lam[-1]
        if hi <= lo:  # one distinct value: a decade around it
            lo, hi = lo / 3.0, hi * 3.0
        # edges a hair outside the extremes, so that rounding in logspace drops neither of them
        bins = np.logspace(np.log10(lo) - 1e-9, np.log10(hi) + 1e-9, num=max(10, min(80, lam.size // 4)))
        # counts per logarithmic bin, not density: a lone small eigenvalue is a bar of height 1, not an
        # invisible sliver or a spike of 10⁶
        ax.hist(lam, bins=bins, color="#4C72B0", alpha=0.75, label="ESD (λ = σ²)")
    if fitted:
        tail = lam[lam >= xmin]
        ax.axvspan(xmin, lam[-1], color="#C44E52", alpha=0.12, lw=0, label=f"fitted tail ({tail.size} λ ≥ xmin)")
        xs = np.logspace(np.log10(xmin), np.log10(lam[-1]), 50)
        # the fit's expected count per bin: N_tail·p(λ)·λ·Δln λ with p(λ) = (α-1)/xmin·(λ/xmin)^-α
        dln = math.log(bins[1] / bins[0])
        ax.plot(xs, tail.size * (alpha - 1) * dln * (xs / xmin) ** (1.0 - alpha), color="#C44E52", lw=2.5,
                label=f"power-law fit α = {alpha:.2f}")  # fmt: skip
        ccdf = 1.0 - np.arange(tail.size) / tail.size  # P(Λ ≥ λ_k) among the tail, λ sorted ascending
        tail_ax.loglog(tail, ccdf, marker="o", ms=3, ls="none", color="#4C72B0", label="tail eigenvalues")
        tail_ax.loglog(xs, (xs / xmin) ** (1.0 - alpha), color="#C44E52", lw=2.5,
                       label=f"fit (λ / xmin)^-(α-1), α = {alpha:.2f}")  # fmt: skip
        tail_ax.set_xlim(xmin / 1.1, lam[-1] * 1.1)
        draw_other_fit(row, lam, ax, tail_ax, dln)  # --fit tpl/e_tpl, --fix-fingers: the chosen fit's line
        tail_ax.set_title(f"the fitted tail: {tail.size} eigenvalues λ ≥ xmin = {xmin:.3g}", fontsize=9)
        tail_ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    else:
        tail_ax.text(0.5, 0.5, "no power-law fit", ha="center", va="center", transform=tail_ax.transAxes)
        tail_ax.set_title("the fitted tail", fontsize=9)
        tail_ax.set_xticks([])
        tail_ax.set_yticks([])
    if lam.size:  # the axis on the data (set last: drawing the tail would widen it again)
        ax.set_xlim(bins[0] / 1.15, bins[-1] * 1.15)
        ax.set_ylim(bottom=0.5)  # a bin holding one eigenvalue stays visible
    ax.set_xlabel("eigenvalue λ (squared singular value)")
    ax.set_ylabel("eigenvalues per bin")
    # legends below the axes: inside, they cover the bars at either end
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    tail_ax.set_xlabel("eigenvalue λ")
    if fitted:
        from matplotlib.ticker import LogLocator, NullFormatter

        tail_ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow tail: no crowded minor labels
        tail_ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    tail_ax.set_ylabel("fraction of the tail ≥ λ")
    tail_ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{row['name']} — {row['shape']}, {row.get('alpha_flag', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def analyze_plots(rows: list[dict[str, Any]], spectra: dict[str, np.ndarray], out: Path,
                  layers_pattern: str | None = None, rand: dict[str, np.ndarray] | None = None
                  ) -> list[Path]:  # fmt: skip
    """Write every ``analyze`` figure into ``out``: the ESD of the chosen layers (``layers_pattern``, else
    the most extreme few; they need the singular values ``spectra``), metrics by depth and two heatmaps.
    Return the paths written."""
    from spectra_cli.report.plots import plot_by_depth, plot_heatmap, safe_name

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    by_name = {r["name"]: r for r in rows}
    for name in choose_layers(rows, layers_pattern):
        if name in spectra:
            p = out / f"esd_{safe_name(name)}.png"
            plot_esd(by_name[name], spectra[name], p)
            written.append(p)
            p = out / f"mp_{safe_name(name)}.png"  # with --mp-fit / --randomize: MP fit and randomised ESD
            if ("sigma_mp" in by_name[name] or rand) and plot_rmt(by_name[name], spectra[name],
                                                                  (rand or {}).get(name), p):  # fmt: skip
                written.append(p)
    p = out / "metrics_by_depth.png"
    if plot_by_depth(rows, p):
        written.append(p)
    for key, label in (("effective_rank_ratio", "effective rank / min(m, n)"), ("alpha", "power-law α")):
        p = out / f"heatmap_{key}.png"
        if plot_heatmap(rows, key, label, p):
            written.append(p)
    return written
