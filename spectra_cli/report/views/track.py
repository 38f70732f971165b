"""``track``: one row per checkpoint × matrix; the findings under the table; the page's cards; and the
figures: each metric against the step by module kind (median and range), and depth × step heatmaps of α,
the effective-rank ratio and (with a base) the intruders."""

from __future__ import annotations

import math
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spectra_cli.report.render import Column, fmt_num
from spectra_cli.report.views.common import Card, Env, Row, dash, num

if TYPE_CHECKING:
    from spectra_cli.report.plots import Figure

#: (row key, label) of the metric-vs-step figures
STEP_METRICS = (
    ("alpha", "heavy-tail α"),
    ("effective_rank_ratio", "effective rank / min(m, n)"),
    ("stable_rank", "stable rank"),
    ("relative_delta", "‖ΔW‖_F / ‖W₀‖_F (vs base)"),
    ("intruders", "intruder dimensions (vs base)"),
    ("step_relative_delta", "‖ΔW‖_F / ‖W‖_F (vs previous)"),
)


def title(env: Env) -> str:
    n = len(env["inputs"].get("checkpoints") or [])
    return f"spectra track: {n} checkpoints" + (f" against {env['inputs']['base']}" if env["inputs"].get("base") else "")


def columns(env: Env) -> list[Column]:
    opts = env["options"]
    base, prev = opts.get("base") is not None, opts.get("against") == "previous"
    eps = [float(e) for e in opts.get("epsilons") or [0.5]]
    cols = [
        Column("checkpoint", "checkpoint", str, "left", default=False),
        Column("step", "step", dash),
        Column("name", "name", str, "left", shorten=True),
        Column("kind", "kind", str, "left", default=False),
        Column("depth", "depth", dash, default=False),
        Column("alpha", "α", fmt_num),
        Column("effective_rank_ratio", "erank ratio", fmt_num),
        Column("stable_rank", "stable rank", fmt_num, default=not base),
        Column("spectral_norm", "σ₁", fmt_num, default=not (base and prev)),
    ]
    if base:
        cols += [Column(f"intruders@{e:g}", f"intr@{e:g}", dash, default=i == 0) for i, e in enumerate(eps)]
        cols += [Column("relative_delta", "‖ΔW‖/‖W₀‖", fmt_num), Column("delta_frobenius", "‖ΔW‖", fmt_num,
                 default=not prev), Column("subspace_overlap", "overlap@k", fmt_num, default=False)]  # fmt: skip
    if prev:
        cols += [Column("step_intruders", "step intr", dash, default=not base),
                 Column("step_relative_delta", "step ‖ΔW‖/‖W‖", fmt_num)]  # fmt: skip
    cols.append(Column("status", "status", lambda x: x or "-", "left", default=False))
    return cols


def notes(env: Env) -> list[str]:
    s = env["summary"]
    lines = [f"{s['checkpoints']} checkpoints, steps {s.get('first_step')}…{s.get('last_step')}, "
             f"{s['matrices']} rows"]  # fmt: skip
    lines += [f"• {f}" for f in s.get("findings") or []]
    for k in s.get("skipped_checkpoints") or []:
        lines.append(f"skipped {k['name']}: {k['reason']}")
    if s.get("from_cache"):
        lines.append(f"{s['computed']} matrices computed, {s['from_cache']} read back from the cache")
    lines.append(f"{s['seconds']:.2f} s")
    return lines


def cards(env: Env) -> list[Card]:
    s = env["summary"]
    by_step = s.get("by_step") or []
    out: list[Card] = [("checkpoints", num(s.get("checkpoints")), f"steps {s.get('first_step')} … {s.get('last_step')}")]
    if by_step:
        a, b = by_step[0], by_step[-1]
        out.append(("mean α", f"{num(a.get('mean_alpha'))} → {num(b.get('mean_alpha'))}", "first → last checkpoint"))
        out.append(("mean effective-rank ratio",
                    f"{num(a.get('mean_effective_rank_ratio'))} → {num(b.get('mean_effective_rank_ratio'))}",
                    "first → last checkpoint"))  # fmt: skip
        if b.get("intruders") is not None:
            out.append((f"intruders at the last step (ε = {s.get('epsilon')})", num(b.get("intruders")),
                        f"mean ‖ΔW‖/‖W₀‖ {num(b.get('mean_relative_delta'))}"))  # fmt: skip
    return out


def figures(env: Env) -> list[Figure]:
    from spectra_cli.report import plots

    rows = env["rows"]
    todo: list[tuple[str, Any]] = []
    for key, label in STEP_METRICS:
        if any(isinstance(r.get(key), int | float) for r in rows):
            todo.append((f"{label} against the step, by module kind (median and range)",
                         partial(plot_vs_step, rows, key, label)))  # fmt: skip
    for key, label in (("alpha", "α"), ("effective_rank_ratio", "effective-rank ratio"), ("intruders", "intruders")):
        if any(isinstance(r.get(key), int | float) for r in rows):
            todo.append((f"{label}: depth × step (mean over the module kinds)",
                         partial(plot_depth_step, rows, key, label)))  # fmt: skip
    return plots.draw_figures(todo)


def _steps(rows: list[Row]) -> list[tuple[str, Any]]:
    """(checkpoint, x) in the rows' order: x the step, or the checkpoint's index when a step is missing."""
    seen = list(dict.fromkeys(r["checkpoint"] for r in rows))
    steps = {r["checkpoint"]: r.get("step") for r in rows}
    if all(steps[c] is not None for c in seen):
        return [(c, steps[c]) for c in seen]
    return [(c, i) for i, c in enumerate(seen)]


def plot_vs_step(rows: list[Row], key: str, label: str, path: Path) -> bool:
    """One line per module kind: the median over its matrices at each step, the band from min to max."""
    from spectra_cli.report.plots import DPI, pyplot

    xs = _steps(rows)
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        v = r.get(key)
        if r.get("status") == "ok" and isinstance(v, int | float) and math.isfinite(v):
            per[str(r.get("kind"))][r["checkpoint"]].append(float(v))
    if not per:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=DPI)
    for kind, by_ck in sorted(per.items()):
        pts = [(x, by_ck[c]) for c, x in xs if by_ck.get(c)]
        if not pts:
            continue
        x = [p[0] for p in pts]
        line = ax.plot(x, [float(np.median(v)) for _, v in pts], marker="o", ms=3, label=kind)[0]
        ax.fill_between(x, [min(v) for _, v in pts], [max(v) for _, v in pts], color=line.get_color(), alpha=0.15)
    if key == "alpha":
        ax.axhline(2.0, color="#C44E52", ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_title(f"{label} by step")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_depth_step(rows: list[Row], key: str, label: str, path: Path) -> bool:
    """A depth × step heatmap of ``key`` (mean over the module kinds at each depth)."""
    from spectra_cli.report.plots import DPI, annotate_cells, pyplot

    ok = [r for r in rows if r.get("status") == "ok" and r.get("depth") is not None]
    if not ok:
        return False
    xs = _steps(ok)
    depths = sorted({r["depth"] for r in ok})
    col = {c: j for j, (c, _) in enumerate(xs)}
    acc: dict[tuple[int, int], list[float]] = defaultdict(list)
    for r in ok:
        v = r.get(key)
        if isinstance(v, int | float) and math.isfinite(v):
            acc[(depths.index(r["depth"]), col[r["checkpoint"]])].append(float(v))
    grid = np.full((len(depths), len(xs)), np.nan)
    for (i, j), vs in acc.items():
        grid[i, j] = float(np.sum(vs)) if key == "intruders" else float(np.mean(vs))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(xs) + 3), max(3.5, 0.3 * len(depths) + 1.8)), dpi=DPI)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", origin="lower")
    ax.set_xticks(range(len(xs)), [str(x) for _, x in xs], fontsize=7, rotation=45)
    ax.set_yticks(range(len(depths)), [str(d) for d in depths], fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("block depth")
    ax.set_title(f"{label} by depth and step" + (" (sum over kinds)" if key == "intruders" else ""))
    fig.colorbar(im, ax=ax, label=label)
    if grid.size <= 300 and np.isfinite(grid).any():
        annotate_cells(ax, im, grid, ".0f" if key == "intruders" else ".2f")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
