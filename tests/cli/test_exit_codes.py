"""The one error table (cli/errors.py): exit codes and what reaches stderr.

SpectraError / OSError → one `Error:` line, exit 1 (check: 2); check exits 2 for any error, an unexpected
exception included ("internal error … please report", the traceback only with SPECTRA_DEBUG=1); bad flags 2;
Ctrl-C → "Interrupted." and 130 (a real process and a real SIGINT); a closed stdout is quiet; no warning
precedes an `Error:` line; control characters never reach the terminal in an `Error:` line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

import spectra_cli.flows.analyze as analyze_flow
import spectra_cli.flows.check as check_flow
from fixtures import checkpoints as fx
from spectra_cli.cli.app import app

runner = CliRunner()
ROOT = Path(__file__).parents[2]


def run(*args: str | Path, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=True, env=env)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), **extra}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> fx.Generated:
    return fx.single_safetensors(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("policy") / "spectra.toml"
    p.write_text("[rules]\nno_nonfinite = true\n")
    return p


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


# ---- check: 2 for any error ----------------------------------------------------------------------------


def test_check_exits_2_on_an_unexpected_exception_with_one_line(tiny, policy, monkeypatch) -> None:
    """It exited 1 ("a rule failed") with a traceback: CI could not tell a broken gate from a bad model."""
    monkeypatch.setattr(check_flow, "run_check", _boom)
    monkeypatch.delenv("SPECTRA_DEBUG", raising=False)
    r = run("check", tiny.path, "--policy", policy, "-q")
    assert r.exit_code == 2
    assert r.stderr.startswith("Error: internal error (RuntimeError: boom); please report it")
    assert "SPECTRA_DEBUG=1" in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_check_shows_the_traceback_only_with_spectra_debug(tiny, policy, monkeypatch) -> None:
    monkeypatch.setattr(check_flow, "run_check", _boom)
    r = run("check", tiny.path, "--policy", policy, "-q", env={"SPECTRA_DEBUG": "1"})
    assert r.exit_code == 2
    assert "Traceback (most recent call last)" in r.stderr and "RuntimeError: boom" in r.stderr
    assert r.stderr.rstrip("\n").splitlines()[-1].startswith("Error: internal error (RuntimeError: boom)")


def test_check_exits_2_on_an_input_error_and_1_on_a_failed_rule(tiny, policy, tmp_path) -> None:
    r = run("check", tmp_path / "missing.safetensors", "--policy", policy, "-q")
    assert r.exit_code == 2 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
    nonfinite = fx.nonfinite(tmp_path / "nf")
    r = run("check", nonfinite.path, "--policy", policy, "-q")
    assert r.exit_code == 1, r.stderr


def test_check_exits_2_on_a_bad_flag(tiny, policy) -> None:
    assert run("check", tiny.path, "--policy", policy, "--no-such-flag").exit_code == 2


# ---- the other commands --------------------------------------------------------------------------------


def test_an_input_error_is_one_line_and_exit_1(tmp_path: Path) -> None:
    r = run("analyze", tmp_path / "missing.safetensors")
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1


def test_an_os_error_without_a_file_name_is_one_line_not_a_traceback(tiny, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(analyze_flow, "run_analyze", full)
    r = run("analyze", tiny.path, "-q")
    assert (r.exit_code, r.stderr) == (1, "Error: No space left on device\n")


def test_a_bug_in_another_command_keeps_its_traceback(tiny, monkeypatch) -> None:
    monkeypatch.setattr(analyze_flow, "run_analyze", _boom)
    r = run("analyze", tiny.path, "-q")
    assert isinstance(r.exception, RuntimeError)


_WARN_THEN_FAIL = """
import sys, warnings
import spectra_cli.flows.analyze as fa
from spectra_cli.errors import CheckpointError
def warn_then_fail(*args, **kwargs):
    warnings.warn("Sparse CSR tensor support is in beta state", UserWarning)
    raise CheckpointError("m.pt: holds a sparse tensor")
fa.run_analyze = warn_then_fail
from spectra_cli.cli.app import main
sys.argv = ["spectra", *sys.argv[1:]]
main()
"""


def test_no_warning_precedes_an_error_line(tiny) -> None:
    """A torch UserWarning (loading a sparse CSR tensor warns) came before the `Error:` line; a real process,
    so that Python's own warning display (not pytest's capture) is what is tested."""
    env = {k: v for k, v in _env().items() if k not in ("SPECTRA_DEBUG", "PYTHONWARNINGS")}
    r = subprocess.run([sys.executable, "-c", _WARN_THEN_FAIL, "analyze", str(tiny.path)], env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (r.returncode, r.stderr) == (1, "Error: m.pt: holds a sparse tensor\n")


def test_warnings_of_a_successful_run_are_shown_once_each_on_one_line(tiny, monkeypatch) -> None:
    real = analyze_flow.run_analyze

    def warn_twice(*args, **kwargs):
        for _ in range(3):
            warnings.warn("overflow\nencountered \x1b[2J", RuntimeWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(analyze_flow, "run_analyze", warn_twice)
    monkeypatch.delenv("SPECTRA_DEBUG", raising=False)
    r = run("analyze", tiny.path, "-f", "json")
    assert r.exit_code == 0
    assert r.stderr.count("spectra: RuntimeWarning: overflow encountered \\x1b[2J\n") == 1
    assert "\x1b" not in r.stderr
    r = run("analyze", tiny.path, "-f", "json", "-q")
    assert r.stderr == ""


def test_control_characters_in_an_error_line_are_escaped(tmp_path: Path) -> None:
    bad = tmp_path / "m\x1b]0;pwned\x07.safetensors"
    bad.write_bytes(b"\x01\x02")
    r = run("analyze", bad)
    assert r.exit_code == 1 and "\x1b" not in r.stderr and "\x07" not in r.stderr
    assert "m\\x1b]0;pwned\\x07.safetensors" in r.stderr and r.stderr.count("\n") == 1


# ---- real processes: Ctrl-C and a closed stdout ----------------------------------------------------------

_SLOW = """
import sys, time
import spectra_cli.flows.analyze as fa
def slow(*args, **kwargs):
    print("READY", file=sys.stderr, flush=True)
    time.sleep(60)
    raise SystemExit("not interrupted")
fa.run_analyze = slow
from spectra_cli.cli.app import main
sys.argv = ["spectra", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("command", ["analyze", "check"])
def test_ctrl_c_prints_interrupted_and_exits_130(tiny, policy, command: str) -> None:
    """typer turned a KeyboardInterrupt into exit 130 silently; the README promises "Interrupted."."""
    code = _SLOW.replace("flows.analyze", "flows.check").replace("run_analyze", "run_check") \
        if command == "check" else _SLOW  # fmt: skip
    args = (
        ["check", str(tiny.path), "--policy", str(policy)]
        if command == "check"
        else ["analyze", str(tiny.path)]
    )
    p = subprocess.Popen([sys.executable, "-c", code, *args], env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stderr is not None and p.stderr.readline().strip() == "READY"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert (p.returncode, err) == (130, "Interrupted.\n")


def test_a_closed_stdout_is_quiet(tiny) -> None:
    p = subprocess.Popen([sys.executable, "-m", "spectra_cli", "analyze", str(tiny.path), "-f", "json", "-q"],
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # the reader is gone before the first write: EPIPE
    err = p.stderr.read()
    p.wait(60)
    assert (p.returncode, err) == (0, b"")
