"""`spectra check --init` writes a policy that passes the healthy demo model (all-MiniLM-L6-v2) and fails the
broken example fine-tune of scripts/make_examples.py (a NaN, a 150% random update with intruders), and
explains every active rule in a comment."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

from spectra_cli.cli.app import app
from spectra_cli.gate.policy import EXAMPLE_POLICY

ROOT = Path(__file__).parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def demo() -> Path:
    from spectra_cli.checkpoint.demo import demo_checkpoint

    try:
        return Path(demo_checkpoint())
    except Exception as e:  # the demo package is a dependency; say so if it is missing
        pytest.fail(f"the demo checkpoint is not installed: {e}")


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("init") / "spectra.toml"
    res = runner.invoke(app, ["check", "--init", str(path)])
    assert res.exit_code == 0, res.output
    return path


def _check(args: list[str]) -> tuple[int, dict]:
    res = runner.invoke(app, ["check", *args, "--format", "json", "--quiet"])
    return res.exit_code, json.loads(res.stdout)


def test_every_active_rule_has_its_explanation_above_it() -> None:
    rules = tomllib.loads(EXAMPLE_POLICY)["rules"]
    lines = EXAMPLE_POLICY.splitlines()
    for name in rules:
        i = next(i for i, ln in enumerate(lines) if ln.startswith(f"{name} ="))
        assert lines[i - 1].startswith("# "), f"{name} has no comment above it"


def test_the_init_policy_passes_the_demo_model(policy: Path, demo: Path) -> None:
    code, env = _check([str(demo), "--policy", str(policy)])
    assert code == 0, [r for r in env["rows"] if r["status"] == "fail"]
    alpha = {r["module"]: r for r in env["rows"] if r["rule"] == "alpha_range"}
    # the four α > 6 of MiniLM (fits on 9–16 tail eigenvalues: small-tail) pass under the template's upper bound
    assert alpha["pooler.dense.weight"]["status"] == "pass" and alpha["pooler.dense.weight"]["value"] > 6


def test_the_init_policy_fails_the_broken_example_fine_tune(policy: Path, demo: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_examples", ROOT / "scripts" / "make_examples.py")
    assert spec and spec.loader
    examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(examples)
    examples.adapters(tmp_path, demo)
    code, env = _check([str(tmp_path / "lora-broken"), "--base", str(demo), "--policy", str(policy)])
    assert code == 1
    failed = {r["rule"] for r in env["rows"] if r["status"] == "fail"}
    assert {"no_nonfinite", "alpha_range"} <= failed
    code, env = _check([str(tmp_path / "lora-a"), "--base", str(demo), "--policy", str(policy)])
    assert code == 0, [r for r in env["rows"] if r["status"] == "fail"]
