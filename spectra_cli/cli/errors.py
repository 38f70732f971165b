"""Mapping core errors to the CLI's contract: one ``Error: …`` line on stderr and exit code 1."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from spectra_cli.errors import SpectraError

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(func: F) -> F:
    """Wrap a command so a :class:`SpectraError` becomes ``Error: msg`` and exit 1 (traceback with
    ``SPECTRA_DEBUG=1``). Other exceptions propagate with their traceback: they are bugs."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SpectraError as e:
            if os.environ.get("SPECTRA_DEBUG") == "1":
                raise
            print(f"Error: {e}", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
