"""`spectra check`: every rule passing and failing on synthetic checkpoints with known answers (computed here with
NumPy, never by spectra), overrides, baselines, policy errors naming the line, exit codes, JUnit / Markdown /
GitHub / JSON outputs, `--init`, `[tool.spectra]`, and the CI recipes of docs/ci.md run for real."""

from __future__ import annotations

import json
import math
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fixtures import gate as fg
from fixtures.checkpoints import Generated
from spectra_cli.cli.app import app
from spectra_cli.errors import PolicyError
from spectra_cli.gate.policy import EXAMPLE_POLICY, key_lines, load_policy
from spectra_cli.spectral.metrics import compute_metrics

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
ALL = [fg.EMBED, fg.Q0, fg.UP0, fg.Q1, fg.UP1]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Generated]:
    return fg.gate_models(tmp_path_factory.mktemp("gate"))


def run(*args: str | Path) -> Any:
    return runner.invoke(app, ["check", *(str(a) for a in args)], catch_exceptions=False)


def policy(tmp_path: Path, text: str, name: str = "spectra.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def verdicts(
    tmp_path: Path, text: str, ckpt: Path, *extra: str | Path, code: int | None = None
) -> dict[str, Any]:
    """Run with ``--format json`` and return the envelope (asserting the exit code when given)."""
    r = run(ckpt, "--policy", policy(tmp_path, text), "-f", "json", "-q", *extra)
    assert r.exit_code in (0, 1), r.stderr
    if code is not None:
        assert r.exit_code == code, r.stdout
    env = json.loads(r.stdout)
    assert env["summary"]["ok"] == (r.exit_code == 0)
    return env


def by(env: dict[str, Any], rule: str) -> dict[str, dict[str, Any]]:
    return {v["module"]: v for v in env["rows"] if v["rule"] == rule}


def sigma1(w: np.ndarray) -> float:
    return float(np.linalg.norm(w, 2))


# ---- each rule passing and failing -------------------------------------------------------------------------


def test_no_nonfinite(models: dict[str, Generated], tmp_path: Path) -> None:
    env = verdicts(tmp_path, "[rules]\nno_nonfinite = true\n", models["healthy"].path, code=0)
    assert set(by(env, "no_nonfinite")) == set(ALL)
    env = verdicts(tmp_path, "[rules]\nno_nonfinite = true\n", models["nonfinite"].path, code=1)
    rows = by(env, "no_nonfinite")
    assert [m for m, v in rows.items() if v["status"] == "fail"] == [fg.UP0]
    assert rows[fg.UP0]["value"] == fg.NONFINITE_COUNT


def test_max_spectral_norm(models: dict[str, Generated], tmp_path: Path) -> None:
    w = models["intruders"].matrices
    top = max(sigma1(x) for x in w.values())  # Q0 after its update
    env = verdicts(
        tmp_path, f"[rules]\nmax_spectral_norm = {top * 1.001}\n", models["intruders"].path, code=0
    )
    for name, v in by(env, "max_spectral_norm").items():
        assert v["value"] == pytest.approx(sigma1(w[name]), rel=1e-5)
    env = verdicts(
        tmp_path, f"[rules]\nmax_spectral_norm = {top * 0.999}\n", models["intruders"].path, code=1
    )
    assert [m for m, v in by(env, "max_spectral_norm").items() if v["status"] == "fail"] == [fg.Q0]


def test_alpha_range(models: dict[str, Generated], tmp_path: Path) -> None:
    # σᵢ ∝ i^(−e) gives α ≈ 1 + 1/(2e): 3 for e = 1/4, 4 for e = 1/6, 1.5 for the over-trained e = 1
    env = verdicts(tmp_path, "[rules]\nalpha_range = [2.0, 6.0]\n", models["healthy"].path, code=0)
    for name, v in by(env, "alpha_range").items():
        e = fg.GATE_BASE[name][2]
        assert v["value"] == pytest.approx(1 + 1 / (2 * e), rel=0.1)
    w = models["overtrained"].matrices[fg.UP1]
    expected = compute_metrics(np.linalg.svd(w, compute_uv=False), w.shape).alpha
    env = verdicts(tmp_path, "[rules]\nalpha_range = [2.0, 6.0]\n", models["overtrained"].path, code=1)
    rows = by(env, "alpha_range")
    assert [m for m, v in rows.items() if v["status"] == "fail"] == [fg.UP1]
    assert rows[fg.UP1]["value"] == pytest.approx(expected, rel=1e-4)
    assert rows[fg.UP1]["value"] == pytest.approx(1 + 1 / (2 * fg.OVERTRAINED_EXPONENT), rel=0.1)


def test_max_intruders_total_against_base(models: dict[str, Generated], tmp_path: Path) -> None:
    base, tuned = models["base"], models["intruders"]
    expected = sum(fg.intruder_count(base.matrices[n], tuned.matrices[n]) for n in ALL)
    assert expected == len(fg.INTRUDER_SIGMAS)
    env = verdicts(
        tmp_path, f"[rules]\nmax_intruders = {expected}\n", tuned.path, "--base", base.path, code=0
    )
    assert by(env, "max_intruders")["(model)"]["value"] == expected
    env = verdicts(
        tmp_path, f"[rules]\nmax_intruders = {expected - 1}\n", tuned.path, "--base", base.path, code=1
    )
    assert by(env, "max_intruders")["(model)"]["status"] == "fail"
    env = verdicts(
        tmp_path, "[rules]\nmax_intruders = 0\n", models["healthy"].path, "--base", base.path, code=0
    )
    assert by(env, "max_intruders")["(model)"]["value"] == 0


def test_intruder_parameters(models: dict[str, Generated], tmp_path: Path) -> None:
    base, tuned = models["base"], models["intruders"]
    for eps, k in ((0.5, 1), (0.9, 10), (0.05, 10)):
        expected = sum(fg.intruder_count(base.matrices[n], tuned.matrices[n], eps, k) for n in ALL)
        text = f"[rules]\nmax_intruders = 100\nintruder_epsilon = {eps}\nintruder_top_k = {k}\n"
        env = verdicts(tmp_path, text, tuned.path, "--base", base.path, code=0)
        assert by(env, "max_intruders")["(model)"]["value"] == expected, (eps, k)
        assert env["options"]["params"] == {"intruder_epsilon": eps, "intruder_top_k": k}


def test_max_relative_delta(models: dict[str, Generated], tmp_path: Path) -> None:
    base, tuned = models["base"], models["scaled"]
    for name, v in by(
        verdicts(tmp_path, "[rules]\nmax_relative_delta = 0.25\n", tuned.path, "--base", base.path, code=0),
        "max_relative_delta",
    ).items():
        w0, wt = base.matrices[name], tuned.matrices[name]
        assert v["value"] == pytest.approx(np.linalg.norm(wt - w0) / np.linalg.norm(w0), rel=1e-5)
        assert v["value"] == pytest.approx(fg.SCALE - 1, rel=1e-4)
    env = verdicts(tmp_path, "[rules]\nmax_relative_delta = 0.15\n", tuned.path, "--base", base.path, code=1)
    assert {v["status"] for v in by(env, "max_relative_delta").values()} == {"fail"}


@pytest.mark.parametrize("source", ["--base", "--base-spectra"])
def test_min_effective_rank_ratio(models: dict[str, Generated], tmp_path: Path, source: str) -> None:
    base, tuned = models["base"], models["overtrained"]
    ref = base.path
    if source == "--base-spectra":
        ref = tmp_path / "base.spectra.safetensors"
        r = runner.invoke(app, ["analyze", str(base.path), "--save-spectra", str(ref), "-q", "-f", "json"])
        assert r.exit_code == 0, r.stderr
    ratio = {n: fg.effective_rank(tuned.matrices[n]) / fg.effective_rank(base.matrices[n]) for n in ALL}
    assert ratio[fg.UP1] < 0.7 and min(v for n, v in ratio.items() if n != fg.UP1) > 0.99
    env = verdicts(tmp_path, "[rules]\nmin_effective_rank_ratio = 0.9\n", tuned.path, source, ref, code=1)
    rows = by(env, "min_effective_rank_ratio")
    assert [m for m, v in rows.items() if v["status"] == "fail"] == [fg.UP1]
    for name, v in rows.items():
        assert v["value"] == pytest.approx(ratio[name], rel=1e-4)
    verdicts(tmp_path, f"[rules]\nmin_effective_rank_ratio = {ratio[fg.UP1] * 0.99}\n", tuned.path, source, ref,
             code=0)  # fmt: skip


def test_max_drift_pct_with_update_baseline(models: dict[str, Generated], tmp_path: Path) -> None:
    base_file = tmp_path / "baseline.json"
    r = run(models["base"].path, "--policy", policy(tmp_path, "[rules]\nmax_drift_pct = 25\n"),
            "--update-baseline", base_file, "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    data = json.loads(base_file.read_text())
    assert data["format"] == "spectra-baseline" and data["metrics"] == [
        "spectral_norm",
        "effective_rank",
        "alpha",
    ]
    assert set(data["modules"]) == set(ALL)
    for n in ALL:
        assert data["modules"][n]["spectral_norm"] == pytest.approx(
            sigma1(models["base"].matrices[n]), rel=1e-5
        )
        assert data["modules"][n]["effective_rank"] == pytest.approx(
            fg.effective_rank(models["base"].matrices[n]), rel=1e-4
        )
    # scaling W by 1.2 moves σ₁ by 20 % and leaves the effective rank and α (scale-free) where they were
    text = f'baseline = "{base_file.name}"\n[rules]\nmax_drift_pct = 25\n'
    env = verdicts(tmp_path, text, models["scaled"].path, code=0)
    for v in by(env, "max_drift_pct").values():
        assert v["value"] == pytest.approx(100 * (fg.SCALE - 1), rel=1e-3)
        assert "spectral_norm" in v["message"]
    env = verdicts(
        tmp_path, "[rules]\nmax_drift_pct = 15\n", models["scaled"].path, "--baseline", base_file, code=1
    )
    assert {v["status"] for v in by(env, "max_drift_pct").values()} == {"fail"}
    env = verdicts(
        tmp_path, "[rules]\nmax_drift_pct = 0.01\n", models["base"].path, "--baseline", base_file, code=0
    )


def test_drift_without_a_baseline_is_a_usage_error(models: dict[str, Generated], tmp_path: Path) -> None:
    p = policy(tmp_path, "[rules]\nno_nonfinite = true\nmax_drift_pct = 5\n")
    r = run(models["base"].path, "--policy", p)
    assert (
        r.exit_code == 2 and "max_drift_pct (spectra.toml:3)" in r.stderr and "--update-baseline" in r.stderr
    )
    r = run(models["base"].path, "--policy", p, "--baseline", tmp_path / "nope.json")
    assert r.exit_code == 2 and "not found" in r.stderr


# ---- overrides ---------------------------------------------------------------------------------------------


def test_override_forbids_intruders_in_some_modules(models: dict[str, Generated], tmp_path: Path) -> None:
    base, tuned = models["base"], models["intruders"]
    text = """
[rules]
max_intruders = 10

[[overrides]]
modules = "*.self_attn.q_proj.*"
max_intruders = 0
"""
    env = verdicts(tmp_path, text, tuned.path, "--base", base.path, code=1)
    rows = by(env, "max_intruders")
    assert set(rows) == {"(model)", fg.Q0, fg.Q1}  # the per-module limit applies only where the glob matches
    assert rows["(model)"]["status"] == "pass" and rows[fg.Q1]["status"] == "pass"
    assert rows[fg.Q0]["status"] == "fail" and rows[fg.Q0]["value"] == 2 and rows[fg.Q0]["line"] == 7


def test_override_false_exempts_and_later_override_wins(models: dict[str, Generated], tmp_path: Path) -> None:
    text = """
[rules]
alpha_range = [2.0, 6.0]
max_intruders = 0

[[overrides]]
modules = ["*.layers.1.*", "*embed*"]
alpha_range = [0.5, 1.0]

[[overrides]]
modules = "*.layers.1.mlp.*"
alpha_range = false

[[overrides]]
modules = "*.layers.0.self_attn.*"
max_intruders = false
"""
    env = verdicts(tmp_path, text, models["intruders"].path, "--base", models["base"].path, code=1)
    rows = by(env, "alpha_range")
    assert fg.UP1 not in rows  # turned off by the later override
    assert {m for m, v in rows.items() if v["status"] == "fail"} == {
        fg.Q1,
        fg.EMBED,
    }  # α ≈ 4 and 3 ∉ [0.5, 1]
    assert rows[fg.Q1]["limit"] == [0.5, 1.0] and rows[fg.Q0]["limit"] == [2.0, 6.0]
    total = by(env, "max_intruders")["(model)"]
    assert total["status"] == "pass" and total["value"] == 0  # Q0, the one with intruders, is exempt


def test_selection_options_apply(models: dict[str, Generated], tmp_path: Path) -> None:
    env = verdicts(
        tmp_path, "[rules]\nno_nonfinite = true\n", models["nonfinite"].path, "--kinds", "q_proj", code=0
    )
    assert set(by(env, "no_nonfinite")) == {fg.Q0, fg.Q1}
    env = verdicts(tmp_path, "[rules]\nmax_relative_delta = 0.01\n", models["scaled"].path, "--base",
                   models["base"].path, "--include", "*.layers.0.*", "--exclude", "*up_proj*", code=1)  # fmt: skip
    assert set(by(env, "max_relative_delta")) == {fg.Q0}


def test_adapter_is_checked_as_merged_weights(models: dict[str, Generated], tmp_path: Path) -> None:
    base = models["base"]
    adapter, tuned = fg.gate_adapter(tmp_path / "adapter", base)
    text = "[rules]\nno_nonfinite = true\nmax_intruders = 100\nmax_spectral_norm = 1000\n"
    env = verdicts(tmp_path, text, adapter, "--base", base.path, code=0)
    assert set(by(env, "no_nonfinite")) == {fg.Q0, fg.UP0}
    expected = sum(fg.intruder_count(base.matrices[n], tuned[n]) for n in tuned)
    assert by(env, "max_intruders")["(model)"]["value"] == expected > 0
    for name, v in by(env, "max_spectral_norm").items():
        assert v["value"] == pytest.approx(sigma1(tuned[name]), rel=1e-4)
    r = run(adapter, "--policy", policy(tmp_path, "[rules]\nno_nonfinite = true\n"))
    assert r.exit_code == 2 and "PEFT adapter" in r.stderr and "--base" in r.stderr


# ---- exit codes and policy errors --------------------------------------------------------------------------


def test_exit_codes(models: dict[str, Generated], tmp_path: Path) -> None:
    p = policy(tmp_path, "[rules]\nno_nonfinite = true\n")
    assert run(models["healthy"].path, "--policy", p).exit_code == 0
    assert run(models["nonfinite"].path, "--policy", p).exit_code == 1
    r = run(tmp_path / "missing.safetensors", "--policy", p)
    assert r.exit_code == 2 and r.stderr.startswith("Error: ")
    assert run(models["healthy"].path, "--policy", p, "--format", "yaml").exit_code == 2
    assert run("--policy", p).exit_code == 2


def test_rule_without_its_input_says_which_flag(models: dict[str, Generated], tmp_path: Path) -> None:
    p = policy(tmp_path, "[rules]\nno_nonfinite = true\nmax_intruders = 3\nmax_relative_delta = 0.1\n")
    r = run(models["healthy"].path, "--policy", p)
    assert r.exit_code == 2
    assert "max_intruders (spectra.toml:3)" in r.stderr and "max_relative_delta (spectra.toml:4)" in r.stderr
    assert "pass --base" in r.stderr and "Traceback" not in r.stderr
    p = policy(tmp_path, "[rules]\nmin_effective_rank_ratio = 0.9\n")
    r = run(models["healthy"].path, "--policy", p)
    assert r.exit_code == 2 and "--base-spectra" in r.stderr
    spectra = tmp_path / "b.safetensors"
    assert (
        runner.invoke(
            app, ["analyze", str(models["base"].path), "--save-spectra", str(spectra), "-q"]
        ).exit_code
        == 0
    )
    p = policy(tmp_path, "[rules]\nmax_intruders = 3\n")
    r = run(models["healthy"].path, "--policy", p, "--base", spectra)
    assert r.exit_code == 2 and "spectra file" in r.stderr and "--base-spectra" in r.stderr


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (
            "[rules]\nno_nonfinite = true\nmax_intruder = 3\n",
            3,
            "unknown rule 'max_intruder' (did you mean 'max_intruders'?)",
        ),
        ('[rules]\n\nmax_intruders = "three"\n', 3, "max_intruders must be a whole number"),
        ("[rules]\nmax_intruders = -1\n", 2, "max_intruders must be a whole number ≥ 0"),
        ("[rules]\nmax_intruders = true\n", 2, "whole number"),
        ("[rules]\nalpha_range = [6.0, 2.0]\n", 2, "lo < hi"),
        ("[rules]\nalpha_range = [2.0]\n", 2, "a pair [lo, hi]"),
        ("[rules]\nalpha_range = 3\n", 2, "a pair [lo, hi]"),
        ("[rules]\nno_nonfinite = 1\n", 2, "true or false"),
        ("[rules]\nmax_spectral_norm = 0\n", 2, "must be positive"),
        ("[rules]\nno_nonfinite = true\nintruder_epsilon = 1.5\n", 3, "intruder_epsilon must be in (0, 1]"),
        (
            "[rules]\nno_nonfinite = true\n[[overrides]]\nmodules = '*'\nalpha_rnge = [1, 2]\n",
            5,
            "unknown rule 'alpha_rnge'",
        ),
        (
            "[rules]\nno_nonfinite = true\n[[overrides]]\nmodules = '*'\n[[overrides]]\nmodules = 'x'\nmax_intruders = 'a'\n",
            7,
            "max_intruders must be",
        ),
        ("[rules]\nno_nonfinite = true\n\n[[overrides]]\nmax_intruders = 0\n", 4, "needs modules"),
        (
            "[rules]\nno_nonfinite = true\n[[overrides]]\nmodules = '*'\nintruder_top_k = 3\n",
            5,
            "set it in [rules]",
        ),
        ("max_intruders = 3\n", 1, "rules go under [rules]"),
        ("[rules]\nno_nonfinite = true\nbad toml here\n", 3, "invalid TOML"),
        ("[rules]\n", None, "has no rules"),
    ],
)
def test_policy_errors_name_the_line(models: dict[str, Generated], tmp_path: Path, text: str, line: int | None,
                                     fragment: str) -> None:  # fmt: skip
    p = policy(tmp_path, text)
    r = run(models["healthy"].path, "--policy", p)
    assert r.exit_code == 2, r.stdout
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: ")
    where = f"{p}:{line}:" if line else f"{p}:"
    assert where in r.stderr and fragment in r.stderr, r.stderr


def test_default_policy_discovery_and_pyproject(models: dict[str, Generated], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    r = run(models["healthy"].path)
    assert r.exit_code == 2 and "no policy" in r.stderr
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.spectra.rules]\nno_nonfinite = true\nalpha_range = [2.0, 6.0]\n\n'
        '[[tool.spectra.overrides]]\nmodules = "*.layers.1.mlp.*"\nalpha_range = [0.1, 0.2]\n'
    )
    r = run(models["healthy"].path, "-f", "json")
    assert r.exit_code == 1
    env = json.loads(r.stdout)
    assert env["inputs"]["policy"].endswith("pyproject.toml")
    fail = [v for v in env["rows"] if v["status"] == "fail"]
    assert [(v["module"], v["line"]) for v in fail] == [(fg.UP1, 10)]
    (tmp_path / "pyproject.toml").write_text('[tool.spectra.rules]\nmax_intruders = "x"\n')
    r = run(models["healthy"].path)
    assert r.exit_code == 2 and "pyproject.toml:2:" in r.stderr
    (tmp_path / "spectra.toml").write_text("[rules]\nno_nonfinite = true\n")  # spectra.toml comes first
    r = run(models["healthy"].path, "-f", "json")
    assert r.exit_code == 0 and json.loads(r.stdout)["inputs"]["policy"].endswith("spectra.toml")


@settings(max_examples=30, deadline=None)
@given(
    st.permutations(
        ["no_nonfinite = true", "max_intruders = 2", "alpha_range = [2.0, 6.0]", "max_spectral_norm = 9.5"]
    ),
    st.lists(st.sampled_from(["", "# a comment", "  "]), min_size=4, max_size=4),
)
def test_key_lines_find_every_rule(lines: list[str], pads: list[str]) -> None:
    text = "# policy\n[rules]\n" + "".join(f"{pad}\n{line}\n" for pad, line in zip(pads, lines, strict=True))
    found = key_lines(text)
    for line in lines:
        key = line.split(" =")[0]
        assert text.splitlines()[found[("rules", key)] - 1] == line


# ---- outputs -----------------------------------------------------------------------------------------------


def _outputs(models: dict[str, Generated], tmp_path: Path, *extra: str) -> tuple[Any, Path, Path]:
    text = """[rules]
no_nonfinite = true
max_intruders = 0
alpha_range = [2.0, 6.0]

[[overrides]]
modules = "*embed*"
alpha_range = false
"""
    junit, md = tmp_path / "junit.xml", tmp_path / "summary.md"
    r = run(models["intruders"].path, "--base", models["base"].path, "--policy", policy(tmp_path, text),
            "--junit", junit, "--markdown", md, *extra)  # fmt: skip
    return r, junit, md


def test_junit_xml_is_what_ci_reads(models: dict[str, Generated], tmp_path: Path) -> None:
    r, junit, _ = _outputs(models, tmp_path, "-q")
    assert r.exit_code == 1
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["no_nonfinite", "max_intruders", "alpha_range"]
    cases = root.findall("testsuite/testcase")
    assert int(root.get("tests")) == len(cases) == 5 + 1 + 4  # alpha_range off for the embedding
    assert int(root.get("failures")) == len(root.findall(".//failure")) == 1
    assert root.get("errors") == "0" and int(root.get("skipped")) == len(root.findall(".//skipped")) == 0
    for s in suites:
        assert int(s.get("tests")) == len(s.findall("testcase"))
        assert int(s.get("failures")) == len(s.findall("testcase/failure"))
        assert float(s.get("time")) >= 0 and s.get("timestamp")
        for c in s.findall("testcase"):
            assert c.get("classname") == f"spectra.{s.get('name')}" and c.get("name") and c.get("time")
    pairs = [(c.get("classname"), c.get("name")) for c in cases]
    assert len(set(pairs)) == len(pairs)  # one testcase per rule × module
    (fail,) = root.findall(".//failure")
    assert fail.get("type") == "max_intruders" and "2 intruder dimensions" in fail.get("message", "")
    assert "policy line 3" in (fail.text or "")


def test_junit_skipped_when_alpha_cannot_be_fitted(tmp_path: Path) -> None:
    from fixtures.checkpoints import write_safetensors

    rng = np.random.default_rng(0)
    ckpt = write_safetensors(
        tmp_path / "tiny.safetensors",
        {"layers.0.mlp.up_proj.weight": rng.standard_normal((4, 3)).astype(np.float32)},
    )
    junit = tmp_path / "j.xml"
    # a rule evaluated on no module fails the gate unless the policy allows it (then one more, model-level skip)
    text = "allow_unevaluated = true\n[rules]\nalpha_range = [2.0, 6.0]\n"
    r = run(ckpt, "--policy", policy(tmp_path, text), "--junit", junit)
    assert r.exit_code == 0
    root = ET.parse(junit).getroot()
    assert root.get("skipped") == "2" and "could not be fitted" in root.find(".//skipped").get("message")  # type: ignore[union-attr]


def test_markdown_summary_table(models: dict[str, Generated], tmp_path: Path) -> None:
    r, _, md = _outputs(models, tmp_path, "-q")
    text = md.read_text()
    assert text.startswith("## ❌ spectra check failed")
    table = [ln for ln in text.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["rule", "limit", "checks", "passed", "failed", "skipped"]
    rows = {
        c[0].strip(" `❌"): c for c in ([x.strip() for x in ln.strip("|").split("|")] for ln in table[2:5])
    }
    assert rows["no_nonfinite"][1:] == ["True", "5", "5", "0", "0"]
    assert rows["max_intruders"][1:] == ["0", "1", "0", "1", "0"]
    assert rows["alpha_range"][1:] == ["[2, 6]", "4", "4", "0", "0"]
    assert "| `max_intruders` | `(model)` | 2 | 0 |" in text
    r = run(
        models["healthy"].path,
        "--policy",
        policy(tmp_path, "[rules]\nno_nonfinite = true\n"),
        "-f",
        "markdown",
    )
    assert r.exit_code == 0 and r.stdout.startswith("## ✅ spectra check passed")


def test_github_annotations(
    models: dict[str, Generated], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    r, _, _ = _outputs(models, tmp_path, "--github", "-q")
    notes = [ln for ln in r.stdout.splitlines() if ln.startswith("::")]
    assert notes == [
        "::error file=spectra.toml,line=3,title=spectra check%3A max_intruders::(model): "
        "2 intruder dimensions in 1 matrix > 0"
    ]
    r, _, _ = _outputs(
        models, tmp_path, "--github", "-q", "-f", "json"
    )  # data on stdout: annotations on stderr
    json.loads(r.stdout)
    assert any(ln.startswith("::error ") for ln in r.stderr.splitlines())


def test_json_envelope_and_table(models: dict[str, Generated], tmp_path: Path) -> None:
    r, _, _ = _outputs(models, tmp_path, "-q", "-f", "json")
    env = json.loads(r.stdout)
    assert env["command"] == "check" and env["schema_version"] == 1
    assert set(env["rows"][0]) == {"rule", "module", "kind", "status", "value", "limit", "message", "line"}
    s = env["summary"]
    assert (s["checks"], s["passed"], s["failed"], s["skipped"], s["ok"]) == (10, 9, 1, 0, False)
    assert s["by_rule"]["max_intruders"]["first_failure"]["module"] == "(model)"
    r, _, _ = _outputs(models, tmp_path)
    assert (
        "FAILED: 1 failed, 9 passed, 0 skipped (10 checks on 5 modules" in r.stdout
        and "✗ max_intruders · (model)" in r.stdout
    )
    r = run(
        models["healthy"].path,
        "--policy",
        policy(tmp_path, "[rules]\nno_nonfinite = true\n"),
        "--all",
        "-f",
        "csv",
    )
    assert r.exit_code == 0 and r.stdout.splitlines()[0].startswith("rule,module,kind,status")


# ---- --init ------------------------------------------------------------------------------------------------


def test_init_writes_a_policy_that_passes_a_healthy_checkpoint(models: dict[str, Generated], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    r = run("--init")
    assert r.exit_code == 0 and (tmp_path / "spectra.toml").read_text() == EXAMPLE_POLICY
    pol = load_policy(tmp_path / "spectra.toml")
    assert pol.active() == ["no_nonfinite", "alpha_range", "max_spectral_norm"]
    assert run(models["healthy"].path).exit_code == 0
    assert run(models["overtrained"].path).exit_code == 1
    r = run("--init")
    assert r.exit_code == 2 and "already exists" in r.stderr
    assert run("--init", "--force").exit_code == 0
    assert run("--init", "other.toml").exit_code == 0 and (tmp_path / "other.toml").is_file()
    # every commented-out rule of the example is valid once uncommented
    text = re.sub(r"^# (\w+ = |\[\[overrides\]\])", r"\1", EXAMPLE_POLICY, flags=re.M)
    text = text.replace('baseline = "spectra-baseline.json"', "")
    pol = load_policy(policy(tmp_path, text, "all.toml"))
    assert set(pol.active()) == {"no_nonfinite", "alpha_range", "max_spectral_norm", "max_intruders",
                                 "max_relative_delta", "min_effective_rank_ratio", "max_drift_pct"}  # fmt: skip


def test_policy_error_class() -> None:
    with pytest.raises(PolicyError, match="no such policy file"):
        load_policy("/nonexistent/spectra.toml")


# ---- docs/ci.md ------------------------------------------------------------------------------------------


def _blocks(lang: str) -> list[str]:
    text = (ROOT / "docs" / "ci.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _spectra_commands(script: str) -> list[str]:
    out = []
    for line in script.splitlines():
        m = re.search(r"(?:^|\|\|\s*|&&\s*)spectra\s+(.+)$", line.strip())
        if m:
            out.append(m.group(1))
    return out


def test_ci_docs_yaml_parses_and_its_commands_run(models: dict[str, Generated], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    yaml = pytest.importorskip("yaml")
    gh, gl = (yaml.safe_load(b) for b in _blocks("yaml"))
    steps = gh["jobs"]["spectra-check"]["steps"]
    uses = [s.get("uses", "") for s in steps]
    # actions/cache@ saves in its post step only when the job succeeds: a failing gate would never keep the
    # base spectra. restore + save (right after computing them) keeps them whatever the gate says.
    assert not any(u.startswith("actions/cache@") for u in uses)
    cache = steps[uses.index("actions/cache/restore@v4")]
    assert cache["with"]["path"] == ".spectra-cache" and "key" in cache["with"]
    miss = next(s for s in steps if "save-spectra" in s.get("run", ""))
    assert miss["if"] == f"steps.{cache['id']}.outputs.cache-hit != 'true'"
    save = steps[uses.index("actions/cache/save@v4")]
    assert save["if"] == miss["if"] and save["with"]["path"] == cache["with"]["path"]
    assert save["with"]["key"] == f"${{{{ steps.{cache['id']}.outputs.cache-primary-key }}}}"
    check_at = next(i for i, s in enumerate(steps) if "spectra check" in s.get("run", ""))
    assert steps.index(miss) < steps.index(save) < check_at
    summary = next(s for s in steps if "GITHUB_STEP_SUMMARY" in s.get("run", ""))
    assert (
        summary["if"] == "always()" and "-f spectra-summary.md" in summary["run"]
    )  # no summary after exit 2
    job = gl["spectra-check"]
    assert job["artifacts"]["reports"]["junit"] == "spectra-junit.xml" and job["cache"]["paths"] == [
        ".spectra-cache/"
    ]
    assert job["cache"]["when"] == "always"  # GitLab too saves caches only on success by default
    # run every spectra command of both recipes, in order, on the fixtures
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spectra.toml").write_text(_blocks("toml")[0])
    for recipe in (gh["jobs"]["spectra-check"]["env"], gl["spectra-check"]["variables"]):
        env = {**recipe, "BASE": str(models["base"].path), "TUNED": str(models["healthy"].path)}
        scripts = (
            [s["run"] for s in steps if "run" in s]
            if recipe is gh["jobs"]["spectra-check"]["env"]
            else job["script"]
        )
        commands = [c for s in scripts for c in _spectra_commands(s)]
        assert [c.split()[0] for c in commands] == ["analyze", "check"]
        (tmp_path / ".spectra-cache").mkdir(exist_ok=True)
        for cmd in commands:
            args = [re.sub(r"\$(\w+)", lambda m, env=env: env[m.group(1)], a) for a in shlex.split(cmd)]
            r = runner.invoke(app, args, catch_exceptions=False)
            assert r.exit_code == 0, (cmd, r.stderr)
        root = ET.parse(tmp_path / "spectra-junit.xml").getroot()
        assert root.get("failures") == "0" and int(root.get("tests")) > 0
        assert (tmp_path / "spectra-summary.md").read_text().startswith("## ✅")
        (tmp_path / env["BASE_SPECTRA"]).unlink()


def test_saved_spectra_as_ckpt_give_the_same_verdicts(models: dict[str, Generated], tmp_path: Path) -> None:
    saved = tmp_path / "tuned.spectra.safetensors"
    r = runner.invoke(app, ["analyze", str(models["overtrained"].path), "--save-spectra", str(saved), "-q"])
    assert r.exit_code == 0, r.stderr
    text = "[rules]\nalpha_range = [2.0, 6.0]\nmax_spectral_norm = 2.5\n"
    direct = verdicts(tmp_path, text, models["overtrained"].path, code=1)["rows"]
    again = verdicts(tmp_path, text, saved, code=1)["rows"]
    assert [(v["rule"], v["module"], v["status"]) for v in again] == [
        (v["rule"], v["module"], v["status"]) for v in direct
    ]
    for a, b in zip(again, direct, strict=True):
        assert a["value"] == pytest.approx(b["value"], rel=1e-9)
    r = run(
        saved,
        "--policy",
        policy(tmp_path, "[rules]\nmax_relative_delta = 1\n"),
        "--base",
        models["base"].path,
    )
    assert r.exit_code == 2 and "spectra file" in r.stderr


def test_update_baseline_over_the_compared_file_skips_drift(
    models: dict[str, Generated], tmp_path: Path
) -> None:
    b = tmp_path / "baseline.json"
    p = policy(tmp_path, f'baseline = "{b.name}"\n[rules]\nmax_drift_pct = 5\n')
    assert run(models["base"].path, "--policy", p, "--update-baseline", b, "-q").exit_code == 0
    assert run(models["scaled"].path, "--policy", p, "-q").exit_code == 1  # 20 % > 5 %
    r = run(models["scaled"].path, "--policy", p, "--update-baseline", b, "-q", "-f", "json")
    assert r.exit_code == 0  # accepting the new state: nothing to compare against
    assert {v["status"] for v in json.loads(r.stdout)["rows"]} == {"skip"}
    assert run(models["scaled"].path, "--policy", p, "-q").exit_code == 0  # the new baseline holds


def test_allow_missing_with_a_partial_checkpoint(models: dict[str, Generated], tmp_path: Path) -> None:
    from fixtures.checkpoints import write_safetensors

    part = write_safetensors(tmp_path / "part.safetensors",
                             {fg.Q0: np.asarray(models["scaled"].matrices[fg.Q0], dtype=np.float32)})  # fmt: skip
    p = policy(tmp_path, "[rules]\nmax_relative_delta = 0.25\n")
    r = run(part, "--policy", p, "--base", models["base"].path)
    assert r.exit_code == 2 and "missing" in r.stderr
    env = verdicts(tmp_path, "[rules]\nmax_relative_delta = 0.25\n", part, "--base", models["base"].path,
                   "--allow-missing", code=0)  # fmt: skip
    assert set(by(env, "max_relative_delta")) == {fg.Q0}


def test_real_minilm_against_itself(tmp_path: Path) -> None:
    """End to end on the real all-MiniLM-L6-v2: against itself there is no intruder and ΔW = 0; α outside
    [2, 6] fails exactly the matrices `analyze` reports outside it."""
    from fixtures.real import minilm_dir

    model = minilm_dir()
    text = "[rules]\nno_nonfinite = true\nmax_intruders = 0\nmax_relative_delta = 0.0\nalpha_range = [2.0, 6.0]\n"
    r = run(
        model,
        "--base",
        model,
        "--kinds",
        "query,value",
        "--policy",
        policy(tmp_path, text),
        "-q",
        "-f",
        "json",
    )
    assert r.exit_code in (0, 1), r.stderr
    env = json.loads(r.stdout)
    assert by(env, "max_intruders")["(model)"]["value"] == 0
    deltas = by(env, "max_relative_delta")
    assert len(deltas) == 12 and all(v["value"] == 0.0 and v["status"] == "pass" for v in deltas.values())
    a = runner.invoke(app, ["analyze", str(model), "--kinds", "query,value", "-f", "json", "-q"])
    outside = {row["name"] for row in json.loads(a.stdout)["rows"] if not 2.0 <= row["alpha"] <= 6.0}
    assert {m for m, v in by(env, "alpha_range").items() if v["status"] == "fail"} == outside
    assert r.exit_code == (1 if outside else 0)


def test_help_has_examples_and_exit_codes() -> None:
    r = runner.invoke(app, ["check", "--help"], env={"COLUMNS": "160"})
    assert r.exit_code == 0
    assert "spectra check --init" in r.stdout and "Exit codes: 0" in r.stdout and "[tool.spectra]" in r.stdout


def test_nonfinite_base_side(models: dict[str, Generated], tmp_path: Path) -> None:
    """A base with NaN/Inf in UP0: the finite tuned UP0 passes no_nonfinite, but nothing against the base can be
    measured there, so ΔW fails (and the model's intruder total is unknown, a failure); α is skipped."""
    text = "[rules]\nno_nonfinite = true\nmax_intruders = 10\nmax_relative_delta = 1.0\nalpha_range = [2.0, 6.0]\n"
    env = verdicts(tmp_path, text, models["healthy"].path, "--base", models["nonfinite"].path, code=1)
    assert by(env, "no_nonfinite")[fg.UP0]["status"] == "pass"
    delta = by(env, "max_relative_delta")[fg.UP0]
    assert delta["status"] == "fail" and f"base {fg.NONFINITE_COUNT}, tuned 0" in delta["message"]
    assert by(env, "alpha_range")[fg.UP0]["status"] == "skip"
    total = by(env, "max_intruders")["(model)"]
    assert total["status"] == "fail" and "unknown" in total["message"]
    assert [v["module"] for v in env["rows"] if v["status"] == "fail"] == ["(model)", fg.UP0]


# ---- review of issue #7 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--junit", "--markdown", "--output", "--update-baseline", "--html"])
def test_output_in_a_missing_folder_fails_before_the_run(
    models: dict[str, Generated], tmp_path: Path, flag: str
) -> None:
    p = policy(tmp_path, "[rules]\nno_nonfinite = true\n")
    target = tmp_path / "no" / "such" / "out.txt"
    r = run(models["healthy"].path, "--policy", p, flag, target, "-q")
    assert r.exit_code == 2, r.stderr
    assert r.stderr.strip() == f"Error: {target.parent}: no such folder; create it first (for {flag})"
    assert r.stdout == ""  # nothing was checked


def test_unwritable_output_is_one_line_exit_2(
    models: dict[str, Generated], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spectra_cli.gate import markdown

    def refuse(path: Path, text: str) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(markdown, "write_text", refuse)
    p = policy(tmp_path, "[rules]\nno_nonfinite = true\n")
    r = run(models["healthy"].path, "--policy", p, "--markdown", tmp_path / "s.md", "-q")
    assert r.exit_code == 2 and r.stderr.strip() == f"Error: {tmp_path / 's.md'}: Permission denied"


def test_a_tensor_name_twice_is_not_checked_once(models: dict[str, Generated], tmp_path: Path) -> None:
    """A folder of two unrelated checkpoints lists every name twice: the NaN of one copy must not be hidden by
    the other (the gate refuses to run rather than pass)."""
    import shutil

    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copy(models["nonfinite"].path, folder / "a.safetensors")
    shutil.copy(models["healthy"].path, folder / "b.safetensors")
    p = policy(tmp_path, "[rules]\nno_nonfinite = true\n")
    r = run(folder, "--policy", p, "-q")
    assert r.exit_code != 0
    if r.exit_code == 2:
        assert "is in both" in r.stderr, r.stderr


def test_override_matching_no_module_is_noted(models: dict[str, Generated], tmp_path: Path) -> None:
    """A glob with a typo (q_proj on a BERT model, say) would silently exempt nothing: the summary says so."""
    text = '[rules]\nno_nonfinite = true\n\n[[overrides]]\nmodules = ["*query*", "*key*"]\nno_nonfinite = false\n'
    env = verdicts(tmp_path, text, models["healthy"].path, code=0)
    assert (
        'override #1 (spectra.toml:4) matches no checked module: "*query*", "*key*"'
        in env["summary"]["notes"]
    )
    text = text.replace('"*query*"', '"*q_proj*"')
    env = verdicts(tmp_path, text, models["healthy"].path, code=0)
    assert not any("override" in n for n in env["summary"]["notes"])


def test_baseline_under_rules_says_where_it_goes(models: dict[str, Generated], tmp_path: Path) -> None:
    r = run(models["healthy"].path, "--policy", policy(tmp_path, '[rules]\nbaseline = "b.json"\n'))
    assert r.exit_code == 2 and "spectra.toml:2" in r.stderr and "top level, above [rules]" in r.stderr


def test_init_into_a_missing_folder_names_the_file(tmp_path: Path) -> None:
    r = run("--init", tmp_path / "nodir" / "spectra.toml")
    assert r.exit_code == 2
    assert r.stderr.strip() == (
        f"Error: {tmp_path / 'nodir' / 'spectra.toml'}: cannot write (No such file or directory); "
        "its folder does not exist; create it first"
    )


def test_rmt_rules_end_to_end(models: dict[str, Generated], tmp_path: Path) -> None:
    text = "[rules]\nmax_spikes_ratio = 1.0\nmax_correlation_traps = 1000\n"
    env = verdicts(tmp_path, text, models["healthy"].path, code=0)
    assert set(by(env, "max_spikes_ratio")) == set(ALL) and set(by(env, "max_correlation_traps")) == set(ALL)
    assert all(v["status"] == "pass" for v in env["rows"])
    env = verdicts(tmp_path, "[rules]\nmax_spikes_ratio = 0.0\n", models["intruders"].path)
    spiked = [m for m, v in by(env, "max_spikes_ratio").items() if v["value"] > 0]
    assert all(by(env, "max_spikes_ratio")[m]["status"] == "fail" for m in spiked)


def test_reliable_alpha_end_to_end(models: dict[str, Generated], tmp_path: Path) -> None:
    from spectra_cli.spectral.fits import KS_CRIT

    env = verdicts(tmp_path, "[rules]\nreliable_alpha = true\n", models["healthy"].path, code=None)
    got = by(env, "reliable_alpha")
    assert set(got) == set(ALL)
    for v in got.values():  # the verdict follows the written-out reading of each module's α fit
        if v["status"] == "skip":
            continue
        n = int(v["message"].split(": ")[1].split(" tail")[0])
        ok = n >= 50 and v["value"] <= KS_CRIT / math.sqrt(n)
        assert v["status"] == ("pass" if ok else "fail"), v
