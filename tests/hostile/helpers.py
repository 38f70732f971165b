"""Shared pieces of the hostile-input suite: running the real CLI and asserting the error contract.

The contract (README "Guarantees", docs/ci.md): a bad input ends in exactly one ``Error: …`` line on stderr,
no traceback, and the documented exit code: 1 for every command, 2 for ``check`` (the gate could not run).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from spectra_cli.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
#: the click command of the real app, built once: ``CliRunner.invoke`` rebuilds it from the typer app on every
#: call (~0.2 s, most of a refused run), which would make a few hundred fuzz runs take minutes
_COMMAND = typer.main.get_command(app)

#: the settings of every fuzz test here: few examples each, so that the whole suite stays under 30 s on one core
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None


def cli(*args: str | Path, stdin: str | None = None) -> Result:
    """Run the real ``spectra`` app in-process as ``CliRunner.invoke`` does (isolated stdin/stdout/stderr, the
    exit code of ``SystemExit``; any other exception kept on the result), with its command built once."""
    exception: BaseException | None = None
    with runner.isolation(input=stdin) as (out, err, _):
        try:
            _COMMAND.main(args=[str(a) for a in args], prog_name="spectra")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception as e:  # a bug: the assertion below shows its traceback
            exception, code = e, 1
        except Blocked as e:
            exception, code = e, 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return Result(code, stdout, stderr, exception)


def assert_refused(result: Any, code: int = 1, *fragments: str) -> str:
    """Exactly one ``Error:`` line on stderr, no traceback, exit ``code``; the line holds every fragment.
    Returns the line."""
    exc = result.exception
    if exc is not None:
        tb = "".join(traceback.format_exception(exc))
        raise AssertionError(f"an exception escaped instead of one Error: line:\n{tb}")
    err = result.stderr
    lines = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, f"expected one Error: line, got stderr:\n{err}"
    assert "Traceback" not in err, err
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}; stderr:\n{err}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


class Blocked(BaseException):
    """Raised in the main thread when a run blocks (a BaseException, so that no reader's ``except OSError``
    or ``except Exception`` can swallow it)."""


@contextlib.contextmanager
def no_hang(seconds: float = 20) -> Iterator[None]:
    """Fail (:class:`Blocked`) instead of waiting forever: opening a FIFO waits for a writer that never comes.
    SIGALRM interrupts the blocked system call in this (the main) thread, every ``seconds`` until the block
    ends."""

    def expire(signum: int, frame: Any) -> None:
        raise Blocked(f"blocked for more than {seconds} s (waiting on a FIFO?)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_module(
    *args: str | Path, timeout: float = 60, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m spectra_cli ARGS`` in a subprocess (the real entry point, ``main()``), with a timeout so
    that a hang fails the test instead of stalling the suite."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPECTRA_DEBUG": "0"}
    return subprocess.run(
        [sys.executable, "-m", "spectra_cli", *(str(a) for a in args)],
        capture_output=True, text=True, timeout=timeout, env=env, input=stdin, cwd=ROOT,
    )  # fmt: skip


def assert_process_refused(proc: subprocess.CompletedProcess[str], code: int = 1, *fragments: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---- hand-made files -------------------------------------------------------------------------------------------


def safetensors_raw(header: Any, data: bytes = b"", raw: bytes | None = None) -> bytes:
    """A safetensors file from a header given as a JSON value (or as ``raw`` bytes), padded like the format."""
    head = raw if raw is not None else json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


def deep_json(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


# ---- JSON values -------------------------------------------------------------------------------------------

_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)  # fmt: skip
#: any JSON value (NaN and ±Infinity included, as Python's json reads them)
json_values = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)


def dumps(value: Any) -> str:
    """JSON text of a generated value (NaN/Infinity written as Python's json writes them)."""
    return json.dumps(value)
