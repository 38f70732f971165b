"""``spectra report RESULTS.json``: one self-contained HTML page from any command's ``--format json`` output.

Every command that writes rows also takes ``--html FILE``: both build the page with
:func:`spectra_cli.report.html.html_page` from the same envelope and the command's view, so ``spectra report``
on a run's JSON gives the page that run would have written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from spectra_cli.cli.errors import handle_errors
from spectra_cli.cli.outputs import check_outputs
from spectra_cli.cli.progress import warn
from spectra_cli.errors import SpectraError

EPILOG = """\
Examples:

  spectra analyze model.safetensors --format json -o results.json
  spectra report results.json                    # writes results.html beside it

  spectra compare base/ tuned/ -f json | spectra report - -o compare.html --title "nightly drift"

  spectra analyze model.safetensors --html report.html   # the same page, straight from the run

  spectra check tuned/ --base base/ --html gate.html     # the gate's verdicts (also: --format json, then report)

  spectra allocate model/ --budget-rank 8 --html ranks.html   # any command that writes rows takes --html

The page is one file with everything inline (figures as PNG, no network): open it in any browser or keep it as a CI artifact.

Columns sort on click; 'all fields' shows every field of the rows.
"""


def check_target(path: Path) -> None:
    """Fail early (before reading the results) when the page could not be written to ``path``."""
    check_outputs([], {"--html": path})


def load_envelope(source: Path) -> dict[str, Any]:
    """Read and validate a results file (``-`` reads stdin). Raises :class:`SpectraError` with one line."""
    from spectra_cli.report.html import check_envelope

    name = "stdin" if str(source) == "-" else str(source)
    hint = "give the output of `spectra <command> --format json`"
    try:
        text = sys.stdin.read() if str(source) == "-" else source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpectraError(f"{name}: no such file; {hint}") from None
    except IsADirectoryError:
        raise SpectraError(f"{name}: is a folder, not a results file; {hint}") from None
    except UnicodeDecodeError:
        raise SpectraError(f"{name}: not JSON (not UTF-8 text); {hint}") from None
    if not text.strip():
        raise SpectraError(f"{name}: is empty; {hint}")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpectraError(
            f"{name}: not JSON ({e.msg} at line {e.lineno} column {e.colno}); {hint}"
        ) from None
    except (RecursionError, ValueError) as e:  # nested past the parser's limit; an over-long integer
        what = "nested too deeply" if isinstance(e, RecursionError) else "not JSON"
        raise SpectraError(f"{name}: {what} to be a results file; {hint}") from None
    return check_envelope(obj, name)


def default_output(results: Path) -> Path:
    """``results.json`` → ``results.html`` beside it; stdin → ``spectra-report.html``."""
    if str(results) == "-":
        return Path("spectra-report.html")
    return (
        results.with_suffix(".html")
        if results.suffix.lower() == ".json"
        else results.with_name(results.name + ".html")
    )


def report_cmd(
    results: Annotated[
        Path,
        typer.Argument(
            metavar="RESULTS.json",
            help="The --format json output of any spectra command ('-' reads stdin).",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            dir_okay=False,
            help="Where to write the page (default: RESULTS with .html).",
            show_default=False,
        ),
    ] = None,
    title: Annotated[
        str | None,
        typer.Option(
            "--title", "-t", metavar="TEXT", help="Page title (default: the command and its input)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No message on stderr.")] = False,
) -> None:
    """One self-contained HTML page (summary, sortable tables, figures, inputs and provenance) from results JSON."""
    out = output or default_output(results)
    if str(results) != "-" and results.exists() and out.resolve() == results.resolve():
        raise SpectraError(f"{out}: refusing to write over the results file; choose another -o")
    if out.exists() and not force:
        raise SpectraError(f"{out}: already exists; pass --force to replace it or choose another -o")
    check_target(out)
    env = load_envelope(results)
    from spectra_cli.report.html import write_html

    write_html(env, out, title)
    rows = len(env["rows"])
    warn(f"wrote {env['command']} report ({rows} {'row' if rows == 1 else 'rows'}) to {out}", quiet)


def register(app: typer.Typer) -> None:
    app.command("report", epilog=EPILOG)(handle_errors(report_cmd))
