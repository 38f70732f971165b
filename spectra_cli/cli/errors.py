"""The one error table of the CLI: how a command's end becomes stderr lines and an exit code.

=====================================  ===========================================  ==================
what ended the command                 stderr                                       exit code
=====================================  ===========================================  ==================
success                                warnings collected during the run, one line  0 (check: 0 / 1)
                                       each (``spectra: UserWarning: …``)
a :class:`SpectraError`                ``Error: <message>``                         1 (check: 2)
an ``OSError`` (disk full, permission  ``Error: <file>: <reason>``                  1 (check: 2)
denied, read-only file system)
bad flags (typer usage errors)         typer's usage message                        2
Ctrl-C (``KeyboardInterrupt``)         ``Interrupted.``                             130
stdout closed early (``| head``)       nothing                                      0 (check: 2)
any other exception (a bug)            the traceback                                1
  … in ``check``                       ``Error: internal error (…); please report…``  2
=====================================  ===========================================  ==================

``SPECTRA_DEBUG=1`` adds the traceback before the ``Error:`` line (same exit code) and shows warnings as
Python prints them, when they happen. Otherwise warnings are held until the command ends: on success they are
shown (once each, unless ``--quiet``), after an error they are dropped, so nothing precedes the ``Error:`` line.
Every line is escaped for the terminal (no control character from a file reaches it). Output locks
(``--out``, ``--plots``) are released however the command ends.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from spectra_cli.checkpoint.output import release_locks
from spectra_cli.errors import SpectraError
from spectra_cli.report.terminal import terminal_safe

F = TypeVar("F", bound=Callable[..., Any])

INTERRUPTED = 130
REPORT_TO = "the spectra issue tracker"

_state = {"interrupt_reported": False}


def debug() -> bool:
    return os.environ.get("SPECTRA_DEBUG") == "1"


def _line(text: str) -> str:
    """One terminal-safe line: newlines (and the blanks around them) become one space, controls are escaped."""
    return terminal_safe(re.sub(r"\s*\n\s*", " ", text.strip()), newlines=False)


def error_line(message: str) -> None:
    print(f"Error: {_line(message)}", file=sys.stderr)


def _os_message(e: OSError) -> str:
    reason = e.strerror or str(e) or type(e).__name__
    if e.filename is not None:
        where = f"{os.fsdecode(e.filename)}"
        if getattr(e, "filename2", None) is not None:
            where += f" → {os.fsdecode(e.filename2)}"
        return f"{where}: {reason}"
    return reason


def _quiet_stdout() -> None:
    """stdout was closed by its reader: point it at /dev/null so that the flush at exit does not fail."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def exit_code(e: BaseException, code: int = 1, catch_all: bool = False) -> int:
    """Print what the table above says for ``e`` and return the exit code; re-raise ``e`` when it is a bug
    and ``catch_all`` is False. ``code`` is the command's exit code for an error (``check``: 2)."""
    if isinstance(e, KeyboardInterrupt):
        print("Interrupted.", file=sys.stderr)
        _state["interrupt_reported"] = True
        return INTERRUPTED
    if isinstance(e, BrokenPipeError):
        _quiet_stdout()
        return 0 if code == 1 else code
    if isinstance(e, SpectraError | OSError):
        if debug():
            traceback.print_exception(e)
        error_line(str(e) if isinstance(e, SpectraError) else _os_message(e))
        return code
    if not catch_all or not isinstance(e, Exception):
        raise e
    if debug():
        traceback.print_exception(e)
    what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    error_line(
        f"internal error ({what}); please report it to {REPORT_TO} with the traceback that "
        "SPECTRA_DEBUG=1 shows"
    )
    return code


def _show_warnings(caught: list[warnings.WarningMessage], quiet: bool) -> None:
    if quiet:
        return
    seen: set[tuple[str, str]] = set()
    for w in caught:
        key = (w.category.__name__, str(w.message))
        if key in seen:
            continue
        seen.add(key)
        # spectra's own notices are UserWarnings: said plainly; another category (a library's FutureWarning) is named
        what = "" if w.category is UserWarning else f"{key[0]}: "
        print(f"spectra: {what}{_line(key[1])}", file=sys.stderr)


def handle_errors(func: F, code: int = 1, catch_all: bool = False) -> F:
    """Wrap a command in the error table above: ``code`` is its exit code for an error; ``catch_all`` turns
    an unexpected exception into ``Error: internal error …`` and ``code`` too (``check``: CI must tell "a rule
    failed", 1, from "the gate could not run", 2)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet = kwargs.get("quiet") is True
        with warnings.catch_warnings(record=not debug()) as caught:
            try:
                try:
                    result = func(*args, **kwargs)
                finally:
                    release_locks()
            except typer.Exit:
                _show_warnings(caught or [], quiet)
                raise
            except (typer.Abort, typer.TyperException, SystemExit):
                raise  # bad flags: typer prints its usage message (exit 2)
            except BaseException as e:
                raise typer.Exit(exit_code(e, code, catch_all)) from None
            _show_warnings(caught or [], quiet)
            return result

    return wrapper  # type: ignore[return-value]


def interrupt_reported() -> bool:
    """Whether ``Interrupted.`` was printed already (typer turns a Ctrl-C outside a command into exit 130
    silently; ``main()`` says it then)."""
    return _state["interrupt_reported"]
