"""``spectra compare BASE TUNED…``: intruder dimensions and what fine-tuning did to the weights."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from spectra_cli.cli import options as o
from spectra_cli.cli.errors import handle_errors
from spectra_cli.cli.outputs import check_outputs, figures_written
from spectra_cli.cli.progress import progress_bar, warn
from spectra_cli.results import summary_dict

EPILOG = """\
Examples:

  spectra compare base/ tuned/

  spectra compare base/ lora-r8/ lora-r64/ full-ft/ --epsilon 0.3,0.5,0.7 --plots plots/

  spectra compare base/ run=checkpoints/step-1000 --kinds q_proj,v_proj --format json

  spectra compare base/ adapter/ --remove-intruders 0.75 --out adapter-mitigated/

  spectra compare base/ lora/ full-ft/ --html drift.html   # one self-contained page (see spectra report)
"""


def _parse_tuned(items: list[str]) -> list[tuple[str, Path]]:
    from spectra_cli.checkpoint.tuned import default_name

    out: list[tuple[str, Path]] = []
    for item in items:
        if "=" in item and not Path(item).exists():
            name, _, path = item.partition("=")
            if not name or not path:
                raise typer.BadParameter(f"{item!r}: use PATH or NAME=PATH", param_hint="TUNED")
            out.append((name, Path(path)))
        else:
            out.append((default_name(Path(item)), Path(item)))
    return out


def _epsilons(values: list[str] | None) -> tuple[float, ...]:
    raw = o.split_csv(values) or ("0.5",)
    try:
        eps = tuple(float(v) for v in raw)
    except ValueError:
        raise typer.BadParameter(f"{','.join(raw)}: expected numbers such as 0.5 or 0.3,0.5,0.7") from None
    if any(not 0 < e <= 1 for e in eps):
        raise typer.BadParameter("every epsilon must be in (0, 1]")
    return eps


def _columns(eps: tuple[float, ...]) -> list[Any]:
    from spectra_cli.report.render import Column, fmt_num

    cols = [
        Column("tuned", "tuned", str, "left"),
        Column("name", "name", str, "left"),
        Column("kind", "kind", str, "left"),
        Column("depth", "depth", lambda x: "-" if x is None else str(x)),
        Column("shape", "shape"),
    ]
    cols += [Column(f"intruders@{e:g}", f"intr@{e:g}", lambda x: "-" if x is None else str(x)) for e in eps]
    cols += [
        Column("intruder_ranks", "ranks", lambda x: ",".join(map(str, x)) if x else "-", "left"),
        Column("min_max_cos", "min max|cos|", fmt_num),
        Column("relative_delta", "‖ΔW‖/‖W‖", fmt_num),
        Column("delta_effective_rank", "erank ΔW", fmt_num),
        Column("subspace_overlap", "overlap@k", fmt_num),
        Column("effective_rank_change", "Δ erank", fmt_num),
        Column("status", "status", lambda x: x or "-", "left"),
    ]
    return cols


def _notes(result: Any) -> list[str]:
    s = summary_dict(result.summary)
    lines = []
    for name, t in s["tuned"].items():
        totals = ", ".join(f"{v} at ε={k}" for k, v in t["total_intruders"].items())
        rel = t["mean_relative_delta"]
        lines.append(
            f"{name} ({t['source']}): {totals} intruder dimensions; {t['matrices_with_intruders']} of "
            f"{t['matrices']} matrices have any; mean ‖ΔW‖/‖W‖ " + ("-" if rel is None else f"{rel:.3g}")
        )
        worst = [w for w in t["worst_modules"] if w["intruders"] > 0][:3]
        if worst:
            lines.append("  most intruders: " + "; ".join(f"{w['name']} ({w['intruders']})" for w in worst))
        if t["missing"]:
            lines.append(f"  skipped (not in the other model): {len(t['missing'])}")
        if t["nonfinite"]:
            lines.append(f"  {t['nonfinite']} matrices with NaN/Inf were not compared")
    lines.append(f"{s['seconds']:.2f} s")
    return lines


def compare_cmd(
    base: Annotated[
        Path, typer.Argument(metavar="BASE", help="The base checkpoint (any format analyze reads).")
    ],
    tuned: Annotated[
        list[str],
        typer.Argument(
            metavar="TUNED...",
            help="Tuned checkpoints or PEFT LoRA adapter folders, as PATH or NAME=PATH.",
            show_default=False,
        ),
    ],
    top_k: Annotated[
        int,
        typer.Option("--top-k", min=1, metavar="K", help="Top tuned singular vectors checked for intruders."),
    ] = 10,
    epsilon: Annotated[
        list[str] | None,
        typer.Option(
            "--epsilon",
            "-e",
            metavar="EPS,…",
            help="Intruder threshold(s) on max |cos| (default 0.5); the first is primary.",
        ),
    ] = None,
    allow_missing: Annotated[
        bool,
        typer.Option(
            "--allow-missing", help="Skip (and list) tensors or adapter modules missing from the other side."
        ),
    ] = False,
    remove_intruders: Annotated[
        float | None,
        typer.Option(
            "--remove-intruders",
            metavar="LAMBDA",
            help="Write W′ = W_t + (λ−1)·Σ σⱼuⱼvⱼᵀ over the intruders (PEFT's helper uses 0.75) to --out.",
            rich_help_panel="Output",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", metavar="DIR", help="Folder for --remove-intruders output.", rich_help_panel="Output"
        ),
    ] = None,
    force: o.ForceOutOpt = False,
    include: o.IncludeOpt = None,
    exclude: o.ExcludeOpt = None,
    kinds: o.KindsOpt = None,
    min_dim: o.MinDimOpt = 1,
    device: o.DeviceOpt = "auto",
    precision: o.PrecisionOpt = o.Precision.float32,
    backend: o.BackendOpt = o.Backend.auto,
    max_memory: o.MaxMemoryOpt = None,
    fmt: o.FormatOpt = o.Format.table,
    output: o.OutputOpt = None,
    html: o.HtmlOpt = None,
    plots: o.PlotsOpt = None,
    quiet: o.QuietOpt = False,
) -> None:
    """Intruder dimensions, drift and subspace overlap of each tuned model against the base."""
    from spectra_cli.flows.compare import CompareOptions, IntruderRemover, run_compare

    pairs = _parse_tuned(tuned)
    eps = _epsilons(epsilon)
    check_outputs([base, *(Path(p) for _, p in pairs)], {"--output": output, "--html": html})
    if remove_intruders is not None and not (0.0 <= remove_intruders <= 1.0):
        raise typer.BadParameter(
            f"{remove_intruders}: λ must be in [0, 1] (0 removes the intruders, 1 keeps them)",
            param_hint="--remove-intruders",
        )
    if remove_intruders is not None and out is None:
        raise typer.BadParameter("--remove-intruders needs --out DIR", param_hint="--out")
    if out is not None and remove_intruders is None:
        raise typer.BadParameter("--out is only used with --remove-intruders", param_hint="--out")
    opts = CompareOptions(
        include=o.split_csv(include), exclude=o.split_csv(exclude), kinds=o.split_csv(kinds), min_dim=min_dim,
        top_k=top_k, epsilons=eps, precision=precision.value, allow_missing=allow_missing, device=device,
        backend=backend.value, max_memory=max_memory,
    )  # fmt: skip
    remover = (
        IntruderRemover(out, remove_intruders, eps[0], force)
        if out is not None and remove_intruders is not None
        else None
    )
    try:
        with progress_bar("comparing", quiet) as update:
            result = run_compare(
                base, pairs, opts, progress=update, keep_modules=plots is not None,
                on_module=remover, on_open=remover.open if remover else None,
            )  # fmt: skip
        if remover is not None:
            written = remover.commit(sys.argv, result.inputs, result.options)
            for name, path in written.items():
                n = len(remover.changed.get(name, []))
                warn(
                    f"wrote {name} with intruders removed from {n} matrices (λ = {remove_intruders:g}) to {path}",
                    quiet,
                )
    except BaseException:
        if remover is not None:
            remover.abort()
        raise
    for name, t in result.summary.tuned.items():
        if t["missing"]:
            warn(
                f"{name}: {len(t['missing'])} tensors/modules missing on one side were skipped (--allow-missing)",
                quiet,
            )
    if plots:
        from spectra_cli.report.compare_plots import compare_plots

        figures_written("compare", plots, compare_plots(result, plots), result, quiet)
    from spectra_cli.report.render import envelope, render

    env = envelope("compare", result.inputs, result.rows, result.summary, result.options)
    render(env, fmt.value, _columns(eps), f"spectra compare {base}", _notes(result), output)
    if html:
        from spectra_cli.cli.report import write_html

        write_html(env, html)
        warn(f"wrote the HTML report to {html}", quiet)


def register(app: typer.Typer) -> None:
    app.command("compare", epilog=EPILOG)(handle_errors(compare_cmd))
