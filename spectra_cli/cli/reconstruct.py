"""``spectra reconstruct BUNDLE --task NAME``: rebuild one task of an rmm bundle written by ``spectra merge``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from spectra_cli.cli import options as o
from spectra_cli.cli.emit import emit
from spectra_cli.cli.errors import handle_errors
from spectra_cli.cli.outputs import check_outputs
from spectra_cli.cli.progress import progress_bar, warn

EPILOG = """\
Examples:

  spectra reconstruct bundle/ --task math --out math-rebuilt/

  spectra reconstruct bundle/ --task code --base /models/base --out code-rebuilt/ --format json
"""


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
    html: o.HtmlOpt = None,
    columns: o.ColumnsOpt = None,
    wide: o.WideOpt = False,
    quiet: o.QuietOpt = False,
) -> None:
    """Rebuild one task of an rmm bundle: a full checkpoint, or a PEFT LoRA adapter when it came in as one."""
    from spectra_cli.flows.reconstruct import run_reconstruct
    from spectra_cli.report.render import envelope

    check_outputs([bundle, base], {"--output": output, "--html": html}, folders={"--out": out})
    with progress_bar("reconstructing", quiet) as update:
        result = run_reconstruct(bundle, task, out, base, force=force, argv=sys.argv, progress=update)
    s = result.summary
    kind = "PEFT LoRA adapter" if s.kind == "adapter" else "checkpoint"
    warn(f"wrote {task} as a {kind} to {out}", quiet)
    env = envelope("reconstruct", result.inputs, result.rows, s, result.options)
    emit(env, fmt, output, html=html, quiet=quiet, columns=columns, wide=wide)


def register(app: typer.Typer) -> None:
    app.command("reconstruct", epilog=EPILOG)(handle_errors(reconstruct_cmd))
