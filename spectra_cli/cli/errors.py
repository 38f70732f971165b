"""Mapping core errors to the CLI's contract: one ``Error: …`` line on stderr and a non-zero exit code."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from spectra_cli.errors import SpectraError

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(func: F, code: int = 1) -> F:
    """Wrap a command so a :class:`SpectraError`, or an ``OSError`` about a named file (permission denied, disk
    full), becomes ``Error: msg`` and exit ``code`` (traceback with ``SPECTRA_DEBUG=1``). Other exceptions
    propagate with their traceback: they are bugs."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (SpectraError, OSError) as e:
            if os.environ.get("SPECTRA_DEBUG") == "1" or (isinstance(e, OSError) and e.filename is None):
                raise
            msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) else str(e)
            print(f"Error: {msg}", file=sys.stderr)
            raise typer.Exit(code) from None

    return wrapper  # type: ignore[return-value]
