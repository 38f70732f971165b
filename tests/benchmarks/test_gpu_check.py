"""benchmarks/gpu_check.sh cannot rot: its ``--cpu --small`` mode runs every step on a tiny checkpoint (PyTorch
on the CPU against NumPy) and its JSON must hold every check and every timed command, all passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("analyze", "compare", "init-adapter", "merge", "rankme")


def test_gpu_check_cpu_small_runs_every_step_and_passes(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--small", "--work", str(tmp_path / "data"),
         "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(out.read_text())
    assert got["passed"] is True
    assert got["mode"] == {"device": "cpu", "backend": "torch", "small": True}
    # every command checked against the CPU, each check within its stated tolerance
    assert {c["command"] for c in got["checks"]} == {*COMMANDS, "allocate"}
    for c in got["checks"]:
        assert c["passed"] and c["measured"] <= c["tolerance"], c
    # compare and merge prove their device route ran (cosines and merge calls on torch tensors)
    routes = {c["command"] for c in got["checks"] if c["what"].startswith("device route")}
    assert routes == {"compare", "merge"}
    assert {c["what"].split(" of ")[0] for c in got["checks"] if c["command"] == "merge" and "route" not in c["what"]} \
        == {"tsv", "ties"}
    values = [c for c in got["checks"] if c["command"] == "analyze"]
    assert len(values) == 2 and values[0]["tolerance"] == 1e-9
    # every step timed as its own process, and it succeeded
    assert set(got["timings"]) == set(COMMANDS)
    for name, t in got["timings"].items():
        assert t["rc"] == 0 and t["seconds"] > 0, name
        assert "--device" in t["argv"] and "cpu" in t["argv"]
    assert got["timings"]["analyze"]["target_s"] == 30.0
    assert all(v is None for v in got["targets_met"].values())  # no targets for the tiny checkpoint
    # the table names every command
    for name in COMMANDS:
        assert name in proc.stdout


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(_cuda(), reason="on a GPU machine the real (7B) check would start")
def test_gpu_check_without_cuda_says_how_to_run_on_the_cpu(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--work", str(tmp_path / "data")],
        capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--cpu" in proc.stderr
    assert not (tmp_path / "data").exists()
