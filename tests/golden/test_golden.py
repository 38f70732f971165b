"""Behaviour is unchanged: every command of the README's examples, run on the real MiniLM checkpoint with
``--format json``, gives the rows and summaries recorded in ``tests/golden/*.json`` (timings aside).

The record was taken before the redesign moved any code (``python scripts/golden.py record``); a deliberate
change of output re-records it and says why in CHANGELOG.md."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers (dev extra)")
def test_every_command_gives_the_recorded_rows_and_summaries() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "golden.py"), "check"], capture_output=True,
                          text=True, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("same ") == len(list((ROOT / "tests" / "golden").glob("*.json")))
