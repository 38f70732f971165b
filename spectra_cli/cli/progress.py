"""Progress bars and warnings: always on stderr, never mixed into data on stdout.

What they show may quote files (tensor names, paths): control characters are escaped
(:func:`~spectra_cli.report.terminal.terminal_safe`) and Rich never parses it as markup.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from spectra_cli.report.terminal import terminal_safe


def warn(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"spectra: {terminal_safe(message)}", file=sys.stderr)


@contextmanager
def progress_bar(label: str, quiet: bool = False) -> Iterator[Callable[[int, int, str], None]]:
    """Yield an update(done, total, name) callback; draws a rich bar on stderr when it is a terminal."""
    if quiet or not sys.stderr.isatty():
        yield lambda done, total, name: None
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("[dim]{task.fields[name]}"), console=Console(stderr=True), transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(terminal_safe(label, newlines=False), total=None, name="")

        def update(done: int, total: int, name: str) -> None:
            # the name is formatted into the "[dim]…" markup template: escape its markup, and its controls
            bar.update(
                task, completed=done, total=total, name=escape(terminal_safe(name[-60:], newlines=False))
            )

        yield update
