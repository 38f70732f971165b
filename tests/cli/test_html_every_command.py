"""``--html FILE`` on every command that writes rows: the page's table leads with the command's own columns
(those of its CLI table), and it is byte for byte the page ``spectra report`` makes later from the same run's
``--format json`` (tests/report/test_html.py checks the page itself in depth for analyze, compare and check)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures import merge_cases as mc
from fixtures.embeddings import known_spectrum
from fixtures.report_pages import report_model
from spectra_cli.cli.app import app
from tests.report.page import Page, assert_self_contained

runner = CliRunner()
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def run(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("every-command")
    lora = mc.lora_case(d / "lora", n=3)
    emb = {}
    for name, spectrum in (("flat", np.ones(12)), ("decay", np.arange(1, 13) ** -1.0)):
        emb[name] = d / f"{name}.npy"
        np.save(emb[name], known_spectrum(spectrum, 200, 12, seed=len(name)).astype(np.float32))
    policy = d / "gate.toml"
    policy.write_text("[rules]\nno_nonfinite = true\nmax_spectral_norm = 100.0\n")
    work: dict[str, Any] = {"dir": d, "lora": lora, "model": report_model(d / "model"), "emb": emb,
                            "policy": policy}  # fmt: skip
    if HAS_TRANSFORMERS:
        from fixtures.capture_data import text_file, tiny_bert

        work["bert"] = tiny_bert(d / "bert")
        work["text"] = text_file(d / "text.txt")
    return work


def arguments(command: str, w: dict[str, Any]) -> list[str | Path]:
    """A small run of ``command`` on the module's inputs (reconstruct needs merge's bundle first)."""
    d, lora = w["dir"], w["lora"]
    tuned = [f"{k}={v}" for k, v in lora.paths.items()]
    return {
        "analyze": [w["model"]],
        "compare": [lora.base_path, tuned[0], tuned[2]],
        "rankme": [w["emb"]["decay"], w["emb"]["flat"]],
        "allocate": [lora.base_path, "--budget-rank", "2", "--kinds", "q_proj,v_proj"],
        "init-adapter": [lora.base_path, "--method", "pissa", "--rank", "2", "--kinds", "q_proj", "--out",
                         d / "pissa"],
        "capture": [w.get("bert", d), "--data", w.get("text", d), "--components", "4", "--out",
                    d / "acts.safetensors"],
        "merge": [lora.base_path, *tuned, "--method", "rmm", "--basis", "2", "--sweep", "--out", d / "bundle"],
        "reconstruct": [d / "bundle", "--task", "a1", "--out", d / "a1"],
        "check": [w["model"], "--policy", w["policy"]],
    }[command]  # fmt: skip


# command → the leading headers of its table (as its CLI table has them), and its page title
HEADERS: dict[str, list[str]] = {
    "analyze": ["name", "kind", "depth", "shape", "dtype", "σ₁", "stable rank", "eff. rank", "r90", "α"],
    "compare": ["tuned", "name", "kind", "depth", "shape", "intr@0.5", "ranks", "min max|cos|", "‖ΔW‖/‖W‖"],
    "rankme": ["input", "N", "K", "RankMe", "RankMe/min(N,K)", "erank", "stable rank", "PR", "α-ReQ"],
    "allocate": ["module", "kind", "shape", "rank", "params", "α", "energy", "uniform r", "uniform energy"],
    "init-adapter": ["module", "shape", "rank", "alpha", "energy", "σ_r"],
    "capture": [
        "module",
        "in",
        "tokens",
        "shares input with",
        "k",
        "expl. var (k)",
        "top ratio",
        "converged",
    ],
    "merge": ["module", "task", "shape", "source", "p", "storage", "‖ΔW‖", "rel. error", "kept"],
    "reconstruct": ["module", "shape", "p", "rel. error", "storage", "rank"],
    "check": ["rule", "module", "value", "limit", "status", "why"],
}


def titles(w: dict[str, Any]) -> dict[str, str]:
    lora = w["lora"]
    return {
        "analyze": f"spectra analyze {w['model']}",
        "compare": f"spectra compare {lora.base_path}",
        "rankme": "spectra rankme",
        "allocate": f"spectra allocate {lora.base_path} (energy)",
        "init-adapter": f"spectra init-adapter {lora.base_path} --method pissa",
        "capture": f"spectra capture {w.get('bert')}",
        "merge": f"spectra merge {lora.base_path} (rmm)",
        "reconstruct": f"spectra reconstruct {w['dir'] / 'bundle'} --task a1",
        "check": f"spectra check {w['model']}",
    }


@pytest.fixture(scope="module")
def pages(work: dict[str, Any]) -> dict[str, dict[str, Path]]:
    """Each command run once with ``-f json -o CMD.json --html CMD.html``, in the order reconstruct needs."""
    d = work["dir"]
    out: dict[str, dict[str, Path]] = {}
    for command in HEADERS:
        if command == "capture" and not HAS_TRANSFORMERS:
            continue
        files = {"json": d / f"{command}.json", "html": d / f"{command}.html"}
        r = run(
            command,
            *arguments(command, work),
            "-f",
            "json",
            "-o",
            files["json"],
            "--html",
            files["html"],
            "-q",
        )
        assert r.exit_code == (1 if command == "check" else 0), (
            command,
            r.stderr,
        )  # check: a NaN fails the gate
        out[command] = files
    return out


def _needs(command: str) -> None:
    if command == "capture" and not HAS_TRANSFORMERS:
        pytest.skip("capture needs transformers (the hf extra)")


@pytest.mark.parametrize("command", list(HEADERS))
def test_html_page_equals_report_of_the_runs_json(command: str, pages: dict[str, dict[str, Path]]) -> None:
    _needs(command)
    files = pages[command]
    later = files["html"].with_name(f"{command}-later.html")  # spectra CMD -f json | spectra report -
    r = runner.invoke(app, ["report", "-", "-o", str(later)], input=files["json"].read_text())
    assert r.exit_code == 0, r.stderr
    assert f"wrote {command} report" in r.stderr
    assert later.read_bytes() == files["html"].read_bytes()


@pytest.mark.parametrize("command", list(HEADERS))
def test_html_table_leads_with_the_commands_columns(
    command: str, work: dict[str, Any], pages: dict[str, dict[str, Path]]
) -> None:
    _needs(command)
    page = pages[command]["html"].read_text()
    assert_self_contained(page)
    doc = Page(page)
    env = json.loads(pages[command]["json"].read_text())
    assert doc.title == titles(work)[command]
    assert doc.head[: len(HEADERS[command])] == HEADERS[command]
    assert len(doc.rows) == len(env["rows"]) > 0
    assert 'class="cards"' in page  # key figures from the summary


def test_pages_carry_the_figures_their_envelopes_allow(pages: dict[str, dict[str, Path]]) -> None:
    imgs = {c: len(Page(f["html"].read_text()).all("img")) for c, f in pages.items()}
    assert imgs["rankme"] == 1  # RankMe per input
    assert imgs["allocate"] == 3  # ranks by depth, rank heatmap, ranks per module
    assert imgs["merge"] == 3  # rows by depth, interference, the --sweep trade-off
    assert imgs["reconstruct"] == 0  # its rows have no depth to draw against


@pytest.mark.parametrize(
    ("command", "code"),
    [("analyze", 1), ("compare", 1), ("rankme", 1), ("allocate", 1), ("init-adapter", 1), ("capture", 1),
     ("merge", 1), ("reconstruct", 1), ("check", 2)],
)  # fmt: skip
def test_html_target_is_checked_before_the_run(command: str, code: int, work: dict[str, Any]) -> None:
    d = work["dir"]
    missing = d / "no-such-folder" / "page.html"
    r = run(command, *arguments(command, work), "--html", missing, "-q")
    assert r.exit_code == code and "no such folder" in r.stderr and r.stdout == "", r.stderr
    assert not missing.parent.exists()


def test_html_may_not_overwrite_an_input(work: dict[str, Any]) -> None:
    emb = work["emb"]["flat"]
    before = emb.read_bytes()
    r = run("rankme", emb, "--html", emb, "-q")
    assert r.exit_code == 1 and "refusing to write over an input" in r.stderr
    assert emb.read_bytes() == before
