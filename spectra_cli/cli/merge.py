"""``spectra merge BASE NAME=TUNED…`` and ``spectra reconstruct BUNDLE --task NAME``."""

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

MERGE_EPILOG = """\
Examples:

  spectra merge base/ math=ft-math/ code=ft-code/ --method task-arithmetic --scale 0.5 --out merged/

  spectra merge base/ a=lora-a/ b=lora-b/ c=lora-c/ --method tsv --weights 1,1,0.5 --out merged/

  spectra merge base/ a=lora-a/ b=lora-b/ --method knots --param combine=linear --out merged/

  spectra merge base/ a=ft-a/ b=ft-b/ c=ft-c/ d=ft-d/ --method rmm --basis 2 --sweep --plots plots/ --out bundle/

  spectra reconstruct bundle/ --task b --out ft-b-rebuilt/
"""

RECONSTRUCT_EPILOG = """\
Examples:

  spectra reconstruct bundle/ --task math --out math-rebuilt/

  spectra reconstruct bundle/ --task code --base /models/base --out code-rebuilt/ --format json
"""


def _method_help() -> str:
    from spectra_cli.flows.merge import method_names

    return f"Merge method: {', '.join(method_names())} (each described below, with its paper)."


def _epilog() -> str:
    """The examples, then one paragraph per method from the registry (name, summary, parameters, reference)."""
    from spectra_cli.flows.merge import method_lines

    return MERGE_EPILOG + "\nMethods:\n\n" + "\n\n".join(f"  {line}" for line in method_lines()) + "\n"


def _weights(values: list[str] | None) -> tuple[float, ...] | None:
    raw = o.split_csv(values)
    if not raw:
        return None
    try:
        return tuple(float(v) for v in raw)
    except ValueError:
        raise typer.BadParameter(
            f"{','.join(raw)}: expected numbers such as 0.5,1", param_hint="--weights"
        ) from None


def _params(
    values: list[str] | None, scale: float | None, density: float | None
) -> tuple[tuple[str, Any], ...]:
    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r}: use KEY=VALUE, e.g. combine=linear", param_hint="--param")
        out[key.strip()] = value.strip()
    if scale is not None:
        out["scale"] = scale
    if density is not None:
        out["density"] = density
    return tuple(out.items())


def _columns(rmm: bool) -> list[Any]:
    from spectra_cli.report.render import Column, fmt_num

    cols = [
        Column("module", "module", str, "left"),
        Column("task", "task", str, "left"),
        Column("shape", "shape"),
        Column("source", "source", str, "left"),
    ]
    if rmm:
        cols += [
            Column("p", "p", lambda x: "-" if x is None else str(x)),
            Column("storage", "storage", fmt_num),
        ]
    cols += [
        Column("delta_norm", "‖ΔW‖", fmt_num),
        Column("rel_error", "rel. error", fmt_num),
        Column("kept", "kept", fmt_num),
        Column("energy_kept", "energy kept", fmt_num),
        Column("max_cos", "max |cos|", fmt_num),
        Column("mean_overlap", "overlap@k", fmt_num),
    ]
    return cols


def _notes(result: Any) -> list[str]:
    s = summary_dict(result.summary)
    lines = [f"method {s['method']} ({s['reference']}); {s['modules']} modules × {len(s['tasks'])} tasks"]
    errs = ", ".join(f"{t} {'-' if v is None else f'{v:.3g}'}" for t, v in s["mean_rel_error"].items())
    lines.append(f"mean relative error per task: {errs}")
    if "storage" in s and s["storage"] is not None:
        lines.append(
            f"storage: {s['storage']:.3g} of the {len(s['tasks'])} inputs ({s['stored_numbers']:,} of "
            f"{s['raw_numbers']:,} numbers; merged matrices alone {s['matrix_storage']:.3g}; "
            f"{s['storage_vs_dense']:.3g} of n dense updates); overall relative error {s['overall_error']:.3g}"
        )
    cos = s["cosine"]
    n = len(cos)
    off = [abs(cos[i][j]) for i in range(n) for j in range(n) if i != j]
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
    lines.append(f"wrote {s['output_kind']} {s['output']} in {s['seconds']:.2f} s")
    return lines


def merge_cmd(
    base: Annotated[Path, typer.Argument(metavar="BASE", help="The base checkpoint the tuned models share.")],
    tuned: Annotated[
        list[str],
        typer.Argument(
            metavar="TUNED...",
            show_default=False,
            help="Two or more tuned checkpoints or PEFT LoRA adapter folders, as NAME=PATH or PATH "
            "(the name is then the folder's).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Output folder: merged checkpoint, or rmm bundle.",
            rich_help_panel="Output",
            show_default=False,
        ),
    ],
    method: Annotated[
        str, typer.Option("--method", "-m", metavar="METHOD", help=_method_help())
    ] = "task-arithmetic",
    weights: Annotated[
        list[str] | None,
        typer.Option("--weights", "-w", metavar="W,…", help="One weight per tuned model (default 1 each)."),
    ] = None,
    scale: Annotated[
        float | None,
        typer.Option(
            "--scale",
            metavar="λ",
            help="The method's scale (λ for task-arithmetic/ties/knots, α for tsv).",
            show_default=False,
        ),
    ] = None,
    density: Annotated[
        float | None,
        typer.Option(
            "--density",
            metavar="D",
            help="ties/knots: fraction of entries kept by magnitude.",
            show_default=False,
        ),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", metavar="KEY=VALUE", help="Any other method parameter, e.g. combine=linear (knots)."
        ),
    ] = None,
    basis: Annotated[
        int | None,
        typer.Option(
            "--basis", "-p", metavar="P", help="rmm: basis size per module (1 ≤ p ≤ n).", show_default=False
        ),
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            "--energy",
            metavar="τ",
            show_default=False,
            help="rmm: per module the smallest basis keeping this fraction of the (centred) energy. "
            "Without --basis/--energy every direction is kept (exact).",
        ),
    ] = None,
    center: Annotated[
        bool,
        typer.Option("--center/--no-center", help="rmm: fit the basis around the tasks' mean (stored too)."),
    ] = True,
    sweep: Annotated[
        bool,
        typer.Option(
            "--sweep", help="Also report error and storage of an rmm basis for p = 1..n (and plot it)."
        ),
    ] = False,
    interference_k: Annotated[
        int,
        typer.Option("--interference-k", min=1, metavar="K", help="Top-k subspaces compared between tasks."),
    ] = 8,
    force: o.ForceOutOpt = False,
    include: o.IncludeOpt = None,
    exclude: o.ExcludeOpt = None,
    kinds: o.KindsOpt = None,
    min_dim: o.MinDimOpt = 1,
    precision: o.PrecisionOpt = o.Precision.float32,
    fmt: o.FormatOpt = o.Format.table,
    output: o.OutputOpt = None,
    plots: o.PlotsOpt = None,
    quiet: o.QuietOpt = False,
) -> None:
    """Merge fine-tunes of one base (full checkpoints or LoRA adapters), or store them reversibly (rmm)."""
    from spectra_cli.cli.compare import _parse_tuned
    from spectra_cli.flows.merge import MergeOptions, method_names, run_merge

    if method not in method_names():
        raise typer.BadParameter(
            f"{method!r} is not one of {', '.join(method_names())}", param_hint="--method"
        )
    pairs = _parse_tuned(tuned)
    check_outputs([base, *(Path(p) for _, p in pairs), out], {"--output": output})
    if method != "rmm" and (basis is not None or energy is not None):
        raise typer.BadParameter("--basis/--energy apply to --method rmm only", param_hint="--basis")
    opts = MergeOptions(
        include=o.split_csv(include),
        exclude=o.split_csv(exclude),
        kinds=o.split_csv(kinds),
        min_dim=min_dim,
        method=method,
        weights=_weights(weights),
        params=_params(param, scale, density),
        basis=basis,
        energy=energy,
        center=center,
        sweep=sweep,
        interference_k=interference_k,
        precision=precision.value,
    )
    with progress_bar("merging", quiet) as update:
        result = run_merge(base, pairs, out, opts, force=force, argv=sys.argv, progress=update)
    if result.summary.adapter_base_names is not None:
        names = ", ".join(result.summary.adapter_base_names)
        warn(
            f"the adapters name different base models ({names}); they fit BASE's shapes, check they belong together",
            quiet,
        )
    s = result.summary.rmm
    if method == "rmm" and opts.weights is not None:
        warn(
            "--weights do not change an rmm bundle (every task is rebuilt as it came in); they are only recorded",
            quiet,
        )
    if s is not None and s.storage is not None and s.stored_numbers > s.raw_numbers:
        why = (
            "every basis element of adapters has about their summed rank, so rmm on adapters gives a shared basis, "
            "not a saving; the adapters themselves are the smaller store"
            if any(t["kind"] == "adapter" for t in result.inputs["tuned"])
            else "choose --basis P below the number of tasks, or --energy τ < 1, to trade error for space"
        )
        warn(
            f"the bundle is {s.storage:.2f}× the size of the inputs, larger than the inputs: {why}", quiet
        )
    for name, skipped in (result.summary.adapter_tensors_not_merged or {}).items():
        warn(f"{name}: {len(skipped)} non-LoRA adapter tensors (e.g. {skipped[0]}) were not merged", quiet)
    if plots:
        from spectra_cli.report.merge_plots import merge_plots

        figures_written("merge", plots, merge_plots(result, plots), result, quiet)
    from spectra_cli.report.render import envelope, render

    env = envelope("merge", result.inputs, result.rows, result.summary, result.options)
    render(
        env, fmt.value, _columns(method == "rmm"), f"spectra merge {base} ({method})", _notes(result), output
    )


def reconstruct_cmd(
    bundle: Annotated[
        Path, typer.Argument(metavar="BUNDLE", help="A bundle written by `spectra merge --method rmm`.")
    ],
    task: Annotated[
        str, typer.Option("--task", "-t", metavar="NAME", help="The task to rebuild.", show_default=False)
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Output folder (checkpoint or adapter).",
            rich_help_panel="Output",
            show_default=False,
        ),
    ],
    base: Annotated[
        Path | None,
        typer.Option(
            "--base",
            metavar="PATH",
            help="The base checkpoint (default: the path recorded in the bundle).",
            show_default=False,
        ),
    ] = None,
    force: o.ForceOutOpt = False,
    fmt: o.FormatOpt = o.Format.table,
    output: o.OutputOpt = None,
    quiet: o.QuietOpt = False,
) -> None:
    """Rebuild one task of an rmm bundle: a full checkpoint, or a PEFT LoRA adapter when it came in as one."""
    from spectra_cli.flows.reconstruct import run_reconstruct
    from spectra_cli.report.render import Column, envelope, fmt_num, render

    check_outputs([bundle, base, out], {"--output": output})
    with progress_bar("reconstructing", quiet) as update:
        result = run_reconstruct(bundle, task, out, base, force=force, argv=sys.argv, progress=update)
    s = summary_dict(result.summary)
    kind = "PEFT LoRA adapter" if s["kind"] == "adapter" else "checkpoint"
    warn(f"wrote {task} as a {kind} to {out}", quiet)
    cols = [
        Column("module", "module", str, "left"),
        Column("shape", "shape"),
        Column("p", "p"),
        Column("rel_error", "rel. error", fmt_num),
        Column("storage", "storage", fmt_num),
        Column("lora_rank", "rank", lambda x: "-" if x is None else str(x)),
    ]
    notes = [
        f"task {task} ({s['kind']}): {s['modules']} modules, mean relative error "
        f"{fmt_num(s['mean_rel_error'])}, max {fmt_num(s['max_rel_error'])}; bundle storage {fmt_num(s['storage'])}",
        f"wrote {out} in {s['seconds']:.2f} s",
    ]
    env = envelope("reconstruct", result.inputs, result.rows, s, result.options)
    render(env, fmt.value, cols, f"spectra reconstruct {bundle} --task {task}", notes, output)


def register(app: typer.Typer) -> None:
    app.command("merge", epilog=_epilog())(handle_errors(merge_cmd))
    app.command("reconstruct", epilog=RECONSTRUCT_EPILOG)(handle_errors(reconstruct_cmd))
