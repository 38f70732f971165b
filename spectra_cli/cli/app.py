"""The ``spectra`` entry point: the typer app, and ``main()``.

Exit codes and messages follow the one error table in :mod:`spectra_cli.cli.errors` (every command is
wrapped in its ``handle_errors``): 0 success; 1 a :class:`SpectraError` or ``OSError`` (one ``Error: …`` line
on stderr; ``check``: 2 for any error); 2 bad flags; 130 interrupted (``Interrupted.``).
"""

from __future__ import annotations

import sys

import typer

from spectra_cli import __version__

app = typer.Typer(
    name="spectra",
    help="Spectral analysis of neural-network weights: spectra, heavy tails, effective ranks, what "
    "fine-tuning did to them, LoRA ranks and SVD initialisations, merges, and a gate for CI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"spectra {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version.", metavar=""
    ),
) -> None:
    """spectra: spectral analysis of neural-network weights."""


def _register() -> None:
    from spectra_cli.cli import (
        allocate,
        analyze,
        capture,
        check,
        compare,
        init_adapter,
        merge,
        rankme,
        reconstruct,
        report,
        track,
    )

    # the order of `spectra --help`: look, compare, follow a run, choose ranks, initialise, merge (and rebuild), gate, report
    for command in (analyze, compare, track, rankme, allocate, init_adapter, capture, merge, reconstruct, check, report):
        command.register(app)
    from spectra_cli.cli.options import Command, tidy_help

    for info in app.registered_commands:
        info.cls = Command
        if info.callback is not None:
            tidy_help(info.callback)


_register()


def main() -> None:
    """Console-script entry point. The commands map their own errors (:mod:`spectra_cli.cli.errors`); this
    catches what ends the run outside a command: a Ctrl-C while typer parses (typer exits 130 silently: say
    ``Interrupted.``), an error from an option callback."""
    from spectra_cli.cli import errors

    try:
        app()
    except SystemExit as e:
        if e.code == errors.INTERRUPTED and not errors.interrupt_reported():
            print("Interrupted.", file=sys.stderr)
        raise
    except BaseException as e:  # the table decides (it re-raises bugs)
        sys.exit(errors.exit_code(e))
