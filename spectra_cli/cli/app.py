"""The ``spectra`` entry point: the typer app, and ``main()`` which maps errors to exit codes.

Exit codes: 0 success; 1 a :class:`SpectraError` (printed as one ``Error: …`` line on stderr); 2 bad flags
(typer/click usage errors); 130 interrupted. ``SPECTRA_DEBUG=1`` shows the traceback of any error.
Unknown exceptions keep their traceback: they are bugs.
"""

from __future__ import annotations

import os
import sys

import typer

from spectra_cli import __version__
from spectra_cli.errors import SpectraError

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
        False, "--version", callback=_version, is_eager=True, help="Show the version."
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
    )

    # the order of `spectra --help`: look, compare, choose ranks, initialise, merge (and rebuild), gate, report
    for command in (analyze, compare, rankme, allocate, init_adapter, capture, merge, reconstruct, check, report):
        command.register(app)


_register()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SpectraError as e:
        if os.environ.get("SPECTRA_DEBUG") == "1":
            raise
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # stdout closed early (e.g. `| head`): not an error; silence the flush at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
