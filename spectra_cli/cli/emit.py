"""The last step of every command: its results envelope → the table / JSON / CSV / Markdown (stdout or
``--output``) and, with ``--html FILE``, the page; both as the command's view shows them
(:mod:`spectra_cli.report.views`)."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from spectra_cli.cli import options as o
from spectra_cli.cli.progress import warn

if TYPE_CHECKING:
    from spectra_cli.report.views import View


def emit(env: dict[str, Any], fmt: str | Enum, output: Path | None = None, *, html: Path | None = None,
         quiet: bool = False, view: View | None = None, columns: list[str] | None = None,
         wide: bool = False) -> None:  # fmt: skip
    """Render ``env`` as ``fmt`` to ``output`` (atomically) or stdout, then write the HTML page to ``html``.

    ``view`` replaces the command's registered view for the table, its notes and Markdown (``check``'s
    one-row-per-rule table, ``init-adapter``'s notes naming its --out folder); the page always uses the
    registered view, so it equals ``spectra report`` of the run's ``--format json``.

    ``columns`` (``--columns``, parsed) and ``wide`` (``--wide``) choose the table's columns; an unknown column
    name is a usage error (exit 2) listing the valid ones."""
    from spectra_cli.report.render import render, write_text
    from spectra_cli.report.views import view_for

    name = str(fmt.value if isinstance(fmt, Enum) else fmt)
    shown = view or view_for(env["command"])
    if name == "markdown" and shown.markdown is not None:
        text = shown.markdown(env)
        if output is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            write_text(output, text)
    else:
        rows = shown.rows if name in ("table", "markdown") else None  # JSON and CSV hold the envelope's rows
        table_env = env if rows is None else {**env, "rows": rows(env)}
        chosen = o.split_csv(columns) or None
        try:
            render(table_env, name, shown.columns(env), shown.title(env), shown.notes(env), output, chosen=chosen,
                   wide=wide)  # fmt: skip
        except ValueError as e:
            if not chosen:
                raise
            raise typer.BadParameter(str(e), param_hint="--columns") from None
    if html is not None:
        from spectra_cli.report.html import write_html

        write_html(env, html)
        warn(f"wrote the HTML report to {html}", quiet)
