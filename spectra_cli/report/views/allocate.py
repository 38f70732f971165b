"""``allocate``: the LoRA rank of each module under the budget, against the uniform allocation; the page's
cards and the figures of the ranks (the same as ``--plots``: they need nothing but the rows)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from spectra_cli.report.render import Column, fmt_num, plural
from spectra_cli.report.views.common import Card, Env, Row, num

if TYPE_CHECKING:
    from spectra_cli.report.plots import Figure

ALLOCATE_METRICS = (
    ("rank", "allocated rank"),
    ("energy", "σ² energy captured at that rank"),
    ("energy_gain", "energy captured − uniform allocation's"),
)


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def title(env: Env) -> str:
    return f"spectra allocate {env['inputs']['checkpoint']} ({env['summary']['strategy']})"


def columns(env: Env) -> list[Column]:
    """The fixed columns, then those of the strategy's own fields that the rows carry."""
    rows = env["rows"]
    extra = list(rows[0]) if rows else []
    cols = [
        Column("name", "module", str, "left", shorten=True),
        Column("kind", "kind", str, "left", default=False),
        Column("shape", "shape"),
        Column("rank", "rank"),
        Column("params", "params", lambda x: f"{x:,}"),
        Column("alpha", "α", lambda x: "-" if x is None else fmt_num(x, 2)),
        Column("energy", "energy", _pct),
        Column("uniform_rank", "uniform r"),
        Column("uniform_energy", "uniform energy", _pct, default=False),
    ]
    if "effective_rank" in extra:
        cols.append(Column("effective_rank", "eff. rank", lambda x: fmt_num(x, 1)))
    if "pruned_fraction" in extra:
        cols.append(Column("pruned_fraction", "pruned (σ̃ < t)", _pct))
    if "explained_variance" in extra:
        cols.append(Column("explained_variance", "expl. var.", _pct))
    return cols


def notes(env: Env) -> list[str]:
    s = env["summary"]
    unit = "ranks" if s["budget_kind"] == "rank" else "parameters"
    lines = [
        f"strategy {s['strategy']}: {s['adapted']:,} of {plural(s['modules'], 'module', 'modules')} adapted, "
        f"budget {s['budget']:,.0f} "
        f"{unit}, used {s['used']:,} ({s['params']:,} trainable parameters; uniform rank {s['uniform_rank']} "
        f"uses {s['uniform_params']:,})",
        f"mean energy captured {100 * s['mean_energy']:.1f}% vs {100 * s['mean_energy_uniform']:.1f}% for uniform",
    ]
    if "threshold" in s:
        lines.append(
            f"WeLore threshold t = {s['threshold']:.4g} (reduction ratio {s['reduction_ratio']:.3f}; "
            f"{s['low_rank_components']} low-rank components, more than half their rank below t)"
        )
    if s["dropped"]:
        lines.append(
            f"dropped (rank 0): {', '.join(s['dropped'][:5])}" + (" …" if len(s["dropped"]) > 5 else "")
        )
    lines.append(
        f"PEFT config: r = {s['r']} (the most common rank; the others in rank_pattern), lora_alpha = "
        f"{s['lora_alpha']:g} ({s['alpha_policy']}); {s['seconds']:.2f} s"
    )
    return lines


def cards(env: Env) -> list[Card]:
    s = env["summary"]
    unit = "ranks" if s.get("budget_kind") == "rank" else "parameters"
    energy, uniform = s.get("mean_energy"), s.get("mean_energy_uniform")
    return [
        ("strategy", str(s.get("strategy") or "-"), str(s.get("reference") or "")[:120]),
        ("modules adapted", f"{num(s.get('adapted'))} / {num(s.get('modules'))}",
         f"{len(s.get('dropped') or [])} get rank 0"),
        ("budget used", num(s.get("used")), f"of {num(s.get('budget'))} {unit}"),
        ("trainable parameters", num(s.get("params")), f"uniform rank {num(s.get('uniform_rank'))} uses "
         f"{num(s.get('uniform_params'))}"),
        ("mean energy captured", _pct(energy) if isinstance(energy, int | float) else "-",
         f"uniform: {_pct(uniform)}" if isinstance(uniform, int | float) else ""),
        ("PEFT r / lora_alpha", f"{num(s.get('r'))} / {num(s.get('lora_alpha'))}", str(s.get("alpha_policy") or "")),
    ]  # fmt: skip


def figures(env: Env) -> list[Figure]:
    """Ranks by depth, the depth × kind rank heatmap and one bar per module (what ``--plots`` writes)."""
    from spectra_cli.report import plots

    rows, strategy = env["rows"], str(env["summary"].get("strategy", ""))
    ok = [{**r, "status": "ok"} for r in rows]
    by_depth = f"Allocated LoRA ranks ({strategy}) by depth, one line per kind"
    return plots.draw_figures([
        (by_depth, lambda p: plots.plot_by_depth(ok, p, ALLOCATE_METRICS, by_depth)),
        ("Allocated rank by depth and kind", lambda p: plots.plot_heatmap(ok, "rank", "allocated rank", p, fmt=".0f")),
        (f"Allocated ranks ({strategy}) against the uniform rank, per module",
         lambda p: plot_ranks_bar(rows, p, strategy) if rows else False),
    ])  # fmt: skip


# ---- figures -----------------------------------------------------------------------------------------------


def plot_ranks_bar(rows: list[Row], path: Path, strategy: str) -> None:
    """One bar per module (in checkpoint order): allocated rank, with the uniform rank as a step line."""
    from spectra_cli.report.plots import DPI, pyplot

    plt = pyplot()
    n = len(rows)
    fig, ax = plt.subplots(figsize=(min(4 + 0.25 * n, 24), 4.5), dpi=DPI)
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


def allocate_plots(rows: list[Row], out: Path, strategy: str) -> list[Path]:
    """Write the ``allocate`` figures into ``out``; return the paths written."""
    from spectra_cli.report.plots import plot_by_depth, plot_heatmap

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
