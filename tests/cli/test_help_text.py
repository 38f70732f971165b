"""Every command's --help is free of typer's artefacts: no ``<bool>``/``<int>``/``<path>`` type tags, no number
ranges such as ``[x>=1]``, no braces in the usage line, one style for choices (``[a|b|c]``); a bad choice is
one readable line and exit 2."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from spectra_cli.cli.app import app

COMMANDS = ["analyze", "compare", "rankme", "allocate", "init-adapter", "capture", "merge", "reconstruct",
            "check", "report"]  # fmt: skip
runner = CliRunner()


def _help(command: str) -> str:
    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "120"})
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_no_typer_artefacts(command: str) -> None:
    text = _help(command)
    assert not re.search(r"<[a-z_\[\]|.-]+>", text), re.findall(r"<[^>]+>", text)
    assert not re.search(r"\[x\s*[<>]=?", text)
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage and "......" not in usage, usage
    # choices in one style: [a|b|c]
    for choices in re.findall(r"\S*\|\S*", text):
        if re.fullmatch(r"[\w.-]+(\|[\w.-]+)+", choices.strip("[]│")):
            assert choices.startswith("[") or "[" in choices, choices


def test_method_paragraphs_keep_their_indentation() -> None:
    text = _help("init-adapter")
    methods = text[text.index("Methods:") :].splitlines()
    body = [ln for ln in methods[1:] if ln.strip()]
    assert body and all(ln.startswith("   ") for ln in body), body[:4]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["analyze", "--demo", "--format", "yaml"], "Error: --format yaml: choose one of table, json, csv, markdown"),
        (["analyze", "--demo", "--precision", "float16"], "Error: --precision float16: choose one of float32, float64"),
    ],
)
def test_a_bad_choice_is_one_line_and_exit_2(args: list[str], line: str) -> None:
    r = subprocess.run([sys.executable, "-m", "spectra_cli", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == line
