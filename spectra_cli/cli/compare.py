"""``spectra compare BASE TUNED…``: intruder dimensions and what fine-tuning did to the weights."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from spectra_cli.cli import options as o
from spectra_cli.cli.emit import emit
from spectra_cli.cli.errors import handle_errors
from spectra_cli.cli.outputs import check_outputs, figures_written
from spectra_cli.cli.progress import progress_bar, warn

EPILOG = """\
Examples:

  spectra compare base/ tuned/

  spectra compare base/ lora-r8/ lora-r64/ full-ft/ --epsilon 0.3,0.5,0.7 --plots plots/

  spectra compare base/ run=checkpoints/step-1000 --kinds q_proj,v_proj --format json

  spectra compare base/ adapter/ --remove-intruders 0.75 --out adapter-mitigated/

  spectra compare base/ lora/ full-ft/ --html drift.html   # one self-contained page (see spectra report)
"""






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
        typer.Option("--top-k", metavar="K", help="Top tuned singular vectors checked for intruders (K ≥ 1)."),
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
    roles: o.RolesOpt = None,
    min_dim: o.MinDimOpt = 1,
    device: o.DeviceOpt = "auto",
    precision: o.PrecisionOpt = o.Precision.float32,
    backend: o.BackendOpt = o.Backend.auto,
    max_memory: o.MaxMemoryOpt = None,
    fmt: o.FormatOpt = o.Format.table,
    output: o.OutputOpt = None,
    html: o.HtmlOpt = None,
    plots: o.PlotsOpt = None,
    columns: o.ColumnsOpt = None,
    wide: o.WideOpt = False,
    quiet: o.QuietOpt = False,
) -> None:
    """Intruder dimensions, drift and subspace overlap of each tuned model against the base."""
    from spectra_cli.checkpoint.tuned import default_name
    from spectra_cli.flows.compare import CompareOptions, IntruderRemover, run_compare

    pairs = o.named_paths(tuned, "TUNED", default_name)
    opts = o.build(CompareOptions, o.selection(include, exclude, kinds, min_dim, roles=roles),
                   o.compute(device, precision, backend, max_memory), top_k=top_k, allow_missing=allow_missing,
                   epsilons=o.numbers(epsilon, "--epsilon", "0.5 or 0.3,0.5,0.7") or (0.5,))  # fmt: skip
    eps = opts.epsilons
    check_outputs([base, *(Path(p) for _, p in pairs)], {"--output": output, "--html": html},
                  folders={"--out": out, "--plots": plots})
    if remove_intruders is not None and not (0.0 <= remove_intruders <= 1.0):
        raise typer.BadParameter(
            f"{remove_intruders}: λ must be in [0, 1] (0 removes the intruders, 1 keeps them)",
            param_hint="--remove-intruders",
        )
    if remove_intruders is not None and out is None:
        raise typer.BadParameter("--remove-intruders needs --out DIR", param_hint="--out")
    if out is not None and remove_intruders is None:
        raise typer.BadParameter("--out is only used with --remove-intruders", param_hint="--out")
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
                    f"wrote {name} with intruders removed from {n} {'matrix' if n == 1 else 'matrices'} "
                    f"(λ = {remove_intruders:g}) to {path}",
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
        from spectra_cli.report.views.compare import compare_plots

        figures_written("compare", plots, compare_plots(result, plots), result, quiet)
    from spectra_cli.report.render import envelope

    env = envelope("compare", result.inputs, result.rows, result.summary, result.options)
    emit(env, fmt, output, html=html, quiet=quiet, columns=columns, wide=wide)


def register(app: typer.Typer) -> None:
    app.command("compare", epilog=EPILOG)(handle_errors(compare_cmd))
