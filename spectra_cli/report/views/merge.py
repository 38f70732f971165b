"""``merge``: per module × task, the update's norm and how well the merge keeps it; the page's cards; the
interference between tasks and the rmm sweep (from the summary), and the ``--plots`` figures."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from spectra_cli.report.render import Column, fmt_num, plural
from spectra_cli.report.views import generic
from spectra_cli.report.views.common import Card, Env, dash, num

if TYPE_CHECKING:
    import numpy as np

    from spectra_cli.report.plots import Figure


def title(env: Env) -> str:
    return f"spectra merge {env['inputs']['base']} ({env['options']['method']})"


def columns(env: Env) -> list[Column]:
    """The rmm columns (basis size p, storage) only for ``--method rmm``."""
    cols = [
        Column("module", "module", str, "left", shorten=True),
        Column("task", "task", str, "left"),
        Column("shape", "shape"),
        Column("source", "source", str, "left", default=False),
    ]
    if env["options"]["method"] == "rmm":
        cols += [Column("p", "p", dash), Column("storage", "storage", fmt_num)]
    cols += [
        Column("delta_norm", "‖ΔW‖", fmt_num, default=False),
        Column("rel_error", "rel. error", fmt_num),
        Column("kept", "kept", fmt_num),
        Column("energy_kept", "energy kept", fmt_num),
        Column("max_cos", "max |cos|", fmt_num),
        Column("mean_overlap", "overlap@k", fmt_num, default=False),
    ]
    if env["options"].get("to_adapter"):
        cols += [Column("adapter_rank", "adapter r", dash), Column("adapter_error", "adapter error", fmt_num)]
    return cols


def notes(env: Env) -> list[str]:
    s = env["summary"]
    lines = [f"method {s['method']} ({s['reference']}); {plural(s['modules'], 'module', 'modules')} × "
             f"{plural(len(s['tasks']), 'task', 'tasks')}"]  # fmt: skip
    errs = ", ".join(f"{t} {'-' if v is None else f'{v:.3g}'}" for t, v in s["mean_rel_error"].items())
    lines.append(f"mean relative error per task: {errs}")
    if "storage" in s and s["storage"] is not None:
        n = len(s["tasks"])
        lines.append(
            f"storage: the bundle holds {s['stored_numbers']:,} numbers, {s['storage']:.3g}× the "
            f"{s['raw_numbers']:,} of the {n} inputs (the merged matrices alone: {s['matrix_storage']:.3g}×) and "
            f"{s['storage_vs_dense']:.3g}× the {n} dense updates; overall relative error {s['overall_error']:.3g}"
        )
    off = _off_diagonal(s["cosine"])
    if off:
        lines.append(
            f"interference: mean |cos| between task updates {sum(off) / len(off):.3g}, max {max(off):.3g}"
        )
    if "sweep" in s:
        sw = s["sweep"]
        pts = "; ".join(
            f"p={p}: err {e:.3g}, storage {st:.3g}"
            for p, e, st in zip(sw["p"], sw["error"], sw["storage"], strict=True)
        )
        lines.append(f"sweep (merged matrices): {pts}")
    if s.get("adapter"):
        a = s["adapter"]
        r = a.get("adapter_ranks") or {}
        lines.append(
            f"adapter: rank {a['adapter_rank'] or 'exact'} (per module {r.get('min')}–{r.get('max')}, "
            f"{r.get('total')} in all); largest relative error of a module {a['adapter_max_error']:.3g}"
        )
    if s.get("tensors_not_in_adapter"):
        lines.append(f"{s['tensors_not_in_adapter']} changed tensors outside the matrices are not in the adapter")
    lines.append(f"wrote {s['output_kind']} {s['output']} in {s['seconds']:.2f} s")
    return lines


def _off_diagonal(cos: list[list[Any]]) -> list[float]:
    n = len(cos)
    return [abs(cos[i][j]) for i in range(n) for j in range(n) if i != j]


def cards(env: Env) -> list[Card]:
    s = env["summary"]
    tasks = s.get("tasks") or []
    errors = [v for v in (s.get("mean_rel_error") or {}).values() if isinstance(v, int | float)]
    off = _off_diagonal(s.get("cosine") or [])
    out: list[Card] = [
        ("method", str(s.get("method") or "-"), str(s.get("reference") or "")[:120]),
        ("modules × tasks", f"{num(s.get('modules'))} × {len(tasks)}", ", ".join(map(str, tasks))[:120]),
        ("mean rel. error", num(sum(errors) / len(errors)) if errors else "-", "over the tasks: ‖merged − ΔWᵢ‖/‖ΔWᵢ‖"),
        ("interference", num(sum(off) / len(off)) if off else "-", "mean |cos| between task updates"),
    ]  # fmt: skip
    if s.get("storage") is not None:
        out.append(("storage", num(s["storage"]), f"of the {len(tasks)} inputs; overall error "
                    f"{num(s.get('overall_error'))}"))  # fmt: skip
    out.append((f"written ({s.get('output_kind', 'output')})", str(s.get("output") or "-"), ""))
    return out


def figures(env: Env) -> list[Figure]:
    """The rows against depth (one line per kind and task), the tasks' interference and, with ``--sweep``, the
    rmm storage/error trade-off: all from the envelope."""
    import numpy as np

    from spectra_cli.report import plots

    s = env["summary"]
    out = generic.figures(env)
    tasks, cos, ov = s.get("tasks"), s.get("cosine"), s.get("overlap")
    todo = []
    if tasks and cos and ov and len(tasks) == len(cos) == len(ov):
        cosine, overlap = np.asarray(cos, dtype=float), np.asarray(ov, dtype=float)
        todo.append(("Interference between the task updates (mean over modules)",
                     lambda p: plot_interference([str(t) for t in tasks], cosine, overlap, p)))  # fmt: skip
    sweep = s.get("sweep")
    if isinstance(sweep, dict) and all(k in sweep for k in ("p", "error", "storage", "modules")):
        todo.append(("rmm basis size p: storage against error, and each module's error",
                     lambda p: plot_sweep(sweep, p, s.get("matrix_storage"), s.get("overall_error"))))  # fmt: skip
    return out + plots.draw_figures(todo)


# ---- figures -----------------------------------------------------------------------------------------------


def plot_interference(tasks: list[str], cosine: np.ndarray, overlap: np.ndarray, path: Path) -> None:
    """Mean cosine between task updates and mean top-k subspace overlap (n×n heatmaps, annotated)."""
    import numpy as np

    from spectra_cli.report.plots import DPI, annotate_cells, pyplot

    plt = pyplot()
    n = len(tasks)
    size = max(4.0, 0.8 * n + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.5, size), dpi=DPI)
    for ax, mat, title, (lo, hi), cmap in (
        (axes[0], cosine, "cosine ⟨ΔWᵢ, ΔWⱼ⟩ / ‖ΔWᵢ‖‖ΔWⱼ‖", (-1, 1), "RdBu_r"),
        (axes[1], overlap, "top-k subspace overlap", (0, 1), "viridis"),
    ):
        im = ax.imshow(mat, vmin=lo, vmax=hi, cmap=cmap)
        ax.set_xticks(range(n), tasks, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), tasks, fontsize=8)
        ax.set_xlabel("task j")
        ax.set_ylabel("task i")
        annotate_cells(ax, im, np.asarray(mat, dtype=float), ".2f", fontsize=8)
        ax.set_title(title + "\n(mean over modules)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep(sweep: dict[str, Any], path: Path, chosen_storage: float | None = None,
               chosen_error: float | None = None) -> None:  # fmt: skip
    """Left: error vs storage for p = 1..n (points labelled by p; the bundle written, when given, as a star).
    Right: each module's error vs p."""
    from spectra_cli.report.plots import DPI, pyplot

    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=DPI)
    st, err = sweep["storage"], sweep["error"]
    a1.plot(st, err, marker="o", color="#4C72B0")
    for p, x, y in zip(sweep["p"], st, err, strict=True):
        a1.annotate(f"p={p}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if chosen_storage is not None and chosen_error is not None:
        a1.plot(
            [chosen_storage], [chosen_error], marker="*", ms=14, color="#C44E52", ls="none", label="written"
        )
        a1.legend(fontsize=8)
    a1.axvline(1.0, color="grey", ls=":", lw=1)
    a1.set_xlabel("storage (fraction of the n inputs' numbers)")
    a1.set_ylabel("relative reconstruction error (all tasks)")
    a1.set_title("storage / error trade-off of the rmm basis", fontsize=10)
    mods = sweep["modules"]
    for errs in list(mods.values())[:40]:
        a2.plot(sweep["p"], errs, lw=1, alpha=0.6)
    a2.set_xlabel("basis size p")
    a2.set_ylabel("relative error per module")
    a2.set_xticks(sweep["p"])
    a2.set_title(f"per module ({min(len(mods), 40)} of {len(mods)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def merge_plots(result: Any, out: Path) -> list[Path]:
    """Write the figures of one merge result into ``out`` (``interference.png``; ``sweep.png`` with
    ``--sweep``); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if result.cosine is not None and result.overlap is not None:
        p = out / "interference.png"
        plot_interference(result.tasks, result.cosine, result.overlap, p)
        paths.append(p)
    if result.sweep is not None:
        p = out / "sweep.png"
        s = result.summary.rmm
        plot_sweep(result.sweep, p, s.matrix_storage if s else None, s.overall_error if s else None)
        paths.append(p)
    return paths
