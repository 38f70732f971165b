"""Each command's view (spectra_cli/report/views/<command>.py) on a recorded envelope: tests/golden/*.json are
real ``--format json`` outputs of every command on MiniLM. The expected titles, headers and note lines are the
table text those runs printed before the views existed (timings set to 2.50 s here, as the record drops them).
The record sorts object keys, so where a view follows the rows' key order (init-adapter's method columns) or a
summary's (check's rules), the expected order here is the sorted one; the CLI tests cover the run's own order.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from spectra_cli.report.render import render
from spectra_cli.report.views import GENERIC, VIEWS, readable_view, view_for
from spectra_cli.report.views.check import by_rule
from spectra_cli.report.views.init_adapter import with_out

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"


def recorded(case: str) -> dict[str, Any]:
    """The recorded envelope of ``case`` with the volatile fields the record drops put back."""
    env = json.loads((GOLDEN / f"{case}.json").read_text())
    env.pop("exit_code")
    s = env["summary"]
    s["seconds"] = 2.5
    if env["command"] == "init-adapter":
        s["peak_rss_mb"] = 321.0
    if env["command"] == "allocate":  # --budget-rank 8 over 12 modules
        s["budget"], s["budget_kind"] = 96.0, "rank"
    return env


COMPARE = ["tuned", "name", "kind", "depth", "shape"]
COMPARE_TAIL = ["ranks", "min max|cos|", "‖ΔW‖/‖W‖", "erank ΔW", "overlap@k", "Δ erank", "status"]
ANALYZE = ["name", "kind", "depth", "shape", "dtype", "σ₁", "stable rank", "eff. rank", "r90", "α", "tail",
           "α reading", "entropy", "status"]  # fmt: skip
ALLOCATE = ["module", "kind", "shape", "rank", "params", "α", "energy", "uniform r", "uniform energy"]
MERGE_HEAD = ["module", "task", "shape", "source"]
MERGE_TAIL = ["‖ΔW‖", "rel. error", "kept", "energy kept", "max |cos|", "overlap@k"]
RULES = ["rule", "limit", "checks", "passed", "failed", "skipped", "status"]

# case → (title, table headers, notes under the table)
TABLES: dict[str, tuple[str, list[str], list[str]]] = {
    "analyze": ("spectra analyze minilm", ANALYZE, [
        "40 of 40 matrices analysed, 22,682,112 parameters; 64 non-matrix tensors skipped",
        "α: mean 4.12, 1 below 2 (over-trained), 0 above 6 (under-trained), 20 fitted on fewer than 50 tail "
        "eigenvalues (small-tail: α not read)",
        "lowest α 1.55 in embeddings.position_embeddings.weight; highest α 12.35 in pooler.dense.weight",
        "no NaN/Inf weights", "2.50 s on cpu (numpy, gram, float32)"]),
    "analyze-kinds": ("spectra analyze minilm", ANALYZE, [
        "12 of 12 matrices analysed, 1,769,472 parameters",
        "α: mean 4.19, 0 below 2 (over-trained), 0 above 6 (under-trained), 7 fitted on fewer than 50 tail "
        "eigenvalues (small-tail: α not read)",
        "lowest α 2.46 in encoder.layer.0.attention.self.query.weight; highest α 8.44 in "
        "encoder.layer.4.attention.self.value.weight", "no NaN/Inf weights", "2.50 s on cpu (numpy, svd, float64)"]),
    "compare": ("spectra compare minilm", [*COMPARE, "intr@0.5", *COMPARE_TAIL], [
        "lora-a (adapter): intruder dimensions 0 at ε=0.5; 0 of 12 matrices have any; mean ‖ΔW‖/‖W‖ 0.05",
        "2.50 s"]),
    "compare-eps": ("spectra compare minilm", [*COMPARE, "intr@0.3", "intr@0.5", "intr@0.7", *COMPARE_TAIL], [
        "lora-a (adapter): intruder dimensions 0 at ε=0.3, 0 at ε=0.5, 0 at ε=0.7; 0 of 6 matrices have any; "
        "mean ‖ΔW‖/‖W‖ 0.05",
        "lora-b (adapter): intruder dimensions 0 at ε=0.3, 0 at ε=0.5, 0 at ε=0.7; 0 of 6 matrices have any; "
        "mean ‖ΔW‖/‖W‖ 0.05", "2.50 s"]),
    "rankme-layers": ("spectra rankme", ["input", "N", "K", "RankMe", "RankMe/min(N,K)", "erank", "stable rank",
                                         "PR", "α-ReQ", "num. rank"], [
        "best: inputs/layer6.npy (RankMe 238.9, 62.2% of the maximum min(N, K)); higher RankMe = richer "
        "representation (compare within one method)", "2.50 s"]),
    "allocate": ("spectra allocate minilm (energy)", ALLOCATE, [
        "strategy energy: 12 of 12 modules adapted, budget 96 ranks, used 96 (73,728 trainable parameters; "
        "uniform rank 8 uses 73,728)", "mean energy captured 14.7% vs 14.4% for uniform",
        "PEFT config: r = 8 (the most common rank; the others in rank_pattern), lora_alpha = 8 (scale); 2.50 s"]),
    "allocate-welore": ("spectra allocate minilm (welore)", [*ALLOCATE, "pruned (σ̃ < t)"], [
        "strategy welore: 12 of 12 modules adapted, budget 96 ranks, used 96 (73,728 trainable parameters; "
        "uniform rank 8 uses 73,728)", "mean energy captured 13.9% vs 14.4% for uniform",
        "WeLore threshold t = 0.8014 (reduction ratio 0.979; 12 low-rank components, more than half their rank "
        "below t)", "PEFT config: r = 11 (the most common rank; the others in rank_pattern), lora_alpha = 11 (scale); 2.50 s"]),
    "capture": ("spectra capture minilm", ["module", "in", "tokens", "shares input with", "k", "expl. var (k)",
                                           "top ratio", "converged"], [
        "18 modules (6 distinct inputs) over 9100 tokens from 600 examples, written to acts.safetensors",
        "6 inputs have components whose last update moved them (cosine < τ = 0.99); more data (--max-tokens) "
        "makes the PCA steadier", "2.50 s"]),
    "init-pissa": ("spectra init-adapter minilm --method pissa", ["module", "shape", "rank", "alpha", "energy",
                                                                  "σ_r"], [
        "pissa: 12 modules (r=8: 12), 73,728 adapter parameters",
        "adapter: <--out>/adapter; residual: <--out>/residual (as stored)", "2.50 s on cpu, peak RSS 321 MB"]),
    "init-eva": ("spectra init-adapter minilm --method eva", ["module", "shape", "rank", "alpha",
                                                              "expl. var."], [
        "eva: 18 modules (r=6: 3, r=8: 9, r=9: 6), 110,592 adapter parameters", "adapter: <--out>/adapter",
        "2.50 s on cpu, peak RSS 321 MB"]),
    "init-corda": ("spectra init-adapter minilm --method corda", ["module", "shape", "rank", "alpha",
                                                                  "damping λ", "mode", "residual ‖W_res‖/‖W‖"], [
        "corda: 12 modules (r=8: 12), 73,728 adapter parameters",
        "adapter: <--out>/adapter; residual: <--out>/residual (as stored)", "2.50 s on cpu, peak RSS 321 MB"]),
    "init-extract": ("spectra init-adapter minilm --method extract", ["module", "shape", "rank", "alpha",
                                                                      "energy", "rel. error"], [
        "extract: 12 modules (r=21: 12), 193,536 adapter parameters", "adapter: <--out>/adapter",
        "max relative reconstruction error ‖ΔW − sBA‖/‖ΔW‖: 0.304", "2.50 s on cpu, peak RSS 321 MB"]),
    "merge-ties": ("spectra merge minilm (ties)", [*MERGE_HEAD, *MERGE_TAIL], [
        "method ties (Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models (NeurIPS); as "
        "mergekit); 12 modules × 2 tasks", "mean relative error per task: a 0.997, b 1",
        "interference: mean |cos| between task updates 0.000277, max 0.000277",
        "wrote checkpoint merged-ties in 2.50 s"]),
    "merge-rmm": ("spectra merge minilm (rmm)", [*MERGE_HEAD, "p", "storage", *MERGE_TAIL], [
        "method rmm (Reversible Model Merging (RMM), 2025: a shared per-module basis with per-task coefficients); "
        "12 modules × 3 tasks", "mean relative error per task: a 4.14e-09, b 4.14e-09, c 4.14e-09",
        "storage: the bundle holds 663,624 numbers, 3× the 221,184 of the 3 inputs (the merged matrices alone: 3×) "
        "and 0.125× 3 dense updates; overall relative error 6.74e-09",
        "interference: mean |cos| between task updates 0.000426, max 0.00068",
        "sweep (merged matrices): p=1: err 0.576, storage 2; p=2: err 6.74e-09, storage 3; p=3: err 0, storage 3",
        "wrote bundle bundle in 2.50 s"]),
    "reconstruct": ("spectra reconstruct bundle --task b", ["module", "shape", "p", "rel. error", "storage",
                                                            "rank"], [
        "task b (adapter): 12 modules, mean relative error 4.14e-09, max 1.26e-08; bundle storage 3",
        "wrote b-rebuilt in 2.50 s"]),
    "check-pass": ("spectra check inputs/lora-a", ["rule", "module", "value", "limit", "status", "why"], [
        "PASSED: 0 failed, 37 passed, 0 skipped (37 checks on 12 modules, policy gate.toml, 2.50 s)"]),
}  # fmt: skip


def markdown(env: dict[str, Any], view: Any, tmp_path: Path) -> list[str]:
    out = tmp_path / "t.md"
    render(env, "markdown", view.columns(env), view.title(env), view.notes(env), out)
    return out.read_text().splitlines()


@pytest.mark.parametrize("case", sorted(TABLES))
def test_view_renders_the_recorded_envelope_as_the_table_did(case: str, tmp_path: Path) -> None:
    env = recorded(case)
    title, headers, notes = TABLES[case]
    view = view_for(env["command"])
    assert view is VIEWS[env["command"]] and view is not GENERIC
    assert view.title(env) == title
    assert [c.header for c in view.columns(env)] == headers
    assert view.notes(env) == notes
    lines = markdown(env, view, tmp_path)
    assert lines[0] == f"## {title}"
    assert lines[2] == "| " + " | ".join(headers) + " |"
    assert len([ln for ln in lines if ln.startswith("| ")]) == 2 + len(env["rows"])
    assert lines[-len(notes) :] == [f"- {n.replace('|', chr(92) + '|')}" for n in notes]
    # the page's key figures read the same envelope
    cards = view.cards(env)
    assert cards and all(isinstance(v, str) and v for _, v, _ in cards)


def test_init_adapter_notes_name_the_out_folder_when_the_run_knows_it() -> None:
    env = recorded("init-pissa")
    live = with_out(VIEWS["init-adapter"], "pissa-r8")
    assert live.notes(env)[1] == "adapter: pissa-r8/adapter; residual: pissa-r8/residual (as stored)"
    assert live.notes(env)[0] == VIEWS["init-adapter"].notes(env)[0]
    assert [c.header for c in live.columns(env)] == ["module", "shape", "rank", "alpha", "energy", "σ_r"]


def test_check_by_rule_view_has_one_row_per_rule_and_the_failures_under_it(tmp_path: Path) -> None:
    env = recorded("check-fail")
    view = by_rule(VIEWS["check"])
    rows = view.rows(env) if view.rows else []
    assert [(r["rule"], r["checks"], r["failed"], r["status"]) for r in rows] == [
        ("max_intruders", 1, 1, "FAIL"), ("max_relative_delta", 12, 12, "FAIL"),
        ("max_spectral_norm", 12, 1, "FAIL"), ("no_nonfinite", 12, 1, "FAIL"),
    ]  # fmt: skip
    assert [c.header for c in view.columns(env)] == RULES
    limit = view.columns(env)[1]
    assert [limit.fmt(r["limit"]) for r in rows] == [
        "0", "0.2", "100", "True",
    ]  # fmt: skip
    notes = view.notes(env)
    assert len(notes) == 16
    assert notes[0] == "✗ no_nonfinite · encoder.layer.3.attention.self.value.weight: 1 NaN/Inf weights"
    assert notes[-1] == (
        "FAILED: 15 failed, 22 passed, 0 skipped (37 checks on 12 modules, policy gate.toml, 2.50 s)"
    )
    assert by_rule(VIEWS["check"], "# doc\n").markdown is not None
    assert view.markdown is None


def test_cards_say_what_the_summary_says() -> None:
    cards = {label: (value, detail) for label, value, detail in VIEWS["check"].cards(recorded("check-fail"))}
    assert cards["gate"] == ("FAILED", "exit code 1: a rule failed")
    assert cards["failed"][0] == "15" and "max_relative_delta" in cards["failed"][1]
    cards = {label: value for label, value, _ in VIEWS["allocate"].cards(recorded("allocate"))}
    assert cards["modules adapted"] == "12 / 12" and cards["mean energy captured"] == "14.7%"
    cards = {label: value for label, value, _ in VIEWS["merge"].cards(recorded("merge-rmm"))}
    assert cards["modules × tasks"] == "12 × 3" and cards["storage"] == "3"
    cards = {label: value for label, value, _ in VIEWS["rankme"].cards(recorded("rankme-layers"))}
    assert cards["best"] == "inputs/layer6.npy" and cards["inputs"] == "4"


def test_an_envelope_the_view_cannot_read_gets_the_generic_view() -> None:
    env = recorded("allocate")
    del env["summary"]["strategy"]  # e.g. written by another spectra version
    assert readable_view(env) is GENERIC
    assert readable_view(recorded("allocate")) is VIEWS["allocate"]
    assert view_for("no-such-command") is GENERIC
    assert [c.header for c in GENERIC.columns({"rows": [{"a": 1, "b": "x"}, {"c": None}]})] == ["a", "b", "c"]


def test_every_command_that_writes_rows_has_a_view() -> None:
    from spectra_cli.cli.app import app

    commands = {c.name for c in app.registered_commands} - {"report"}
    assert commands == set(VIEWS)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_report_command_imports_no_other_command_and_report_no_cli() -> None:
    pkg = ROOT / "spectra_cli"
    commands = {p.stem for p in (pkg / "cli").glob("*.py")} & {v.replace("-", "_") for v in VIEWS}
    assert len(commands) == 10  # one module per command (reconstruct has its own)
    cli_report = _imports(pkg / "cli" / "report.py")
    assert not {f"spectra_cli.cli.{c}" for c in commands} & cli_report
    for f in (pkg / "report").rglob("*.py"):
        assert not any(m.startswith("spectra_cli.cli") for m in _imports(f)), f
    for f in (pkg / "cli").glob("*.py"):
        text = f.read_text()
        assert "def _columns(" not in text and "def _notes(" not in text, f  # one home: the views
