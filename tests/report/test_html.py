"""`spectra report` and `--html`: one self-contained page from a results envelope.

The page is checked by parsing it with the standard library's HTMLParser (never by spectra's own code):
every tag and attribute, the text of every table cell, and the embedded PNGs decoded back to images.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fixtures import checkpoints as fx
from fixtures.report_pages import report_model
from spectra_cli.cli.app import app
from spectra_cli.errors import SpectraError
from spectra_cli.report.html import check_envelope, render_html
from tests.report.page import Page, assert_self_contained, png_size

runner = CliRunner()


def run(*args: str | Path, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return report_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, fx.Generated]:
    return fx.intruder_cases(tmp_path_factory.mktemp("intruder_cases"))


@pytest.fixture(scope="module")
def analyzed(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One analyze run writing both its JSON and its page."""
    d = tmp_path_factory.mktemp("analyzed")
    r = run("analyze", model, "-f", "json", "-o", d / "r.json", "--html", d / "run.html", "-q")
    assert r.exit_code == 0, r.stderr
    return {"json": d / "r.json", "html": d / "run.html", "dir": d}


# ---- round trip: the run's page equals the page made later from its JSON --------------------------------


def test_analyze_html_equals_report_of_its_json(analyzed: dict[str, Path]) -> None:
    out = analyzed["dir"] / "later.html"
    r = run("report", analyzed["json"], "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "wrote analyze report" in r.stderr and r.stdout == ""
    assert out.read_bytes() == analyzed["html"].read_bytes()

    page = out.read_text()
    assert_self_contained(page)
    doc = Page(page)
    env = json.loads(analyzed["json"].read_text())
    assert doc.title == f"spectra analyze {env['inputs']['checkpoint']}"
    # the CLI table's headers first, then every other field of the rows
    assert doc.head[:7] == ["name", "kind", "depth", "shape", "dtype", "σ₁", "stable rank"]
    assert "frobenius_norm" in doc.head and "alpha_xmin" in doc.head
    assert [row[0] for row in doc.rows] == [r["name"] for r in env["rows"]] and len(doc.rows) == 10
    by_name = {row[0]: dict(zip(doc.head, row, strict=True)) for row in doc.rows}
    for row in env["rows"]:
        cells = by_name[row["name"]]
        if row["status"] == "ok":
            assert float(cells["σ₁"]) == pytest.approx(row["spectral_norm"], rel=1e-3)
            assert float(cells["α"]) == pytest.approx(row["alpha"], rel=1e-3)
        else:  # the NaN matrix: marked, its missing numbers shown as '-'
            assert cells["σ₁"] == cells["r90"] == "-" and row.get("spectral_norm") is None
        assert cells["status"] == row["status"]
    assert len([a for a in doc.all("tr") if a.get("class") == "bad"]) == 1
    # key figures and the CLI's notes
    assert "9 / 10" in page and "9 of 10 matrices analysed" in page
    assert "NaN/Inf found in 1 matrix (" in page
    # four figures from the rows, all real PNGs with a size
    imgs = doc.all("img")
    assert len(imgs) == 4
    for img in imgs:
        w, h = png_size(img["src"] or "")
        assert w > 300 and h > 200
    # inputs and options are on the page
    assert env["inputs"]["checkpoint"] in page and "max_memory" in page and "decompose_seconds" in page


def test_compare_html_equals_report_of_its_json(cases: dict[str, fx.Generated], tmp_path: Path) -> None:
    base, a, b = (cases[k].path for k in ("base", "intruders", "noise"))
    r = run("compare", base, a, b, "-e", "0.3,0.5", "-f", "json", "-o", tmp_path / "c.json",
            "--html", tmp_path / "run.html", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    r = run("report", tmp_path / "c.json", "-q")  # default name: c.html beside the JSON
    assert r.exit_code == 0, r.stderr
    page = (tmp_path / "c.html").read_text()
    assert page == (tmp_path / "run.html").read_text()
    assert_self_contained(page)
    doc = Page(page)
    env = json.loads((tmp_path / "c.json").read_text())
    assert doc.head[:7] == ["tuned", "name", "kind", "depth", "shape", "intr@0.3", "intr@0.5"]
    assert len(doc.rows) == len(env["rows"]) == 8
    for cells, row in zip(doc.rows, env["rows"], strict=True):
        assert cells[:2] == [row["tuned"], row["name"]]
        assert cells[5:7] == [str(row["intruders@0.3"]), str(row["intruders@0.5"])]
    totals = env["summary"]["tuned"]["intruders"]["total_intruders"]
    assert f"intruder dimensions 6 at ε=0.3, {totals['0.5']} at ε=0.5" in page  # the CLI's note
    # per tuned model: heatmap, cosine profile, drift by depth; and totals across models
    assert len(doc.all("img")) == 3 * 2 + 1
    for img in doc.all("img"):
        assert min(png_size(img["src"] or "")) > 100


SMALL = json.dumps({"schema_version": 1, "command": "check", "rows": [{"rule": "alpha<6", "passed": True}]})


def test_report_from_stdin_and_title(tmp_path: Path) -> None:
    out = tmp_path / "x.html"
    r = run("report", "-", "-o", out, "--title", "nightly <drift> & co", input=SMALL)
    assert r.exit_code == 0, r.stderr
    doc = Page(out.read_text())
    assert doc.title == "nightly <drift> & co"
    assert "nightly &lt;drift&gt; &amp; co" in out.read_text()


# ---- escaping ------------------------------------------------------------------------------------------

EVIL = '<script>alert("x")</script>'
EVIL_ATTR = '"><img src=x onerror=alert(1)>'


def evil_envelope() -> dict[str, Any]:
    return {
        "schema_version": 1,
        "command": "rankme",
        "spectra_version": "0.1.0",
        "inputs": {"path": EVIL_ATTR, EVIL: [EVIL, {"k": EVIL_ATTR}]},
        "options": {"title": "</title><script>alert(2)</script>"},
        "rows": [
            {"name": EVIL, "value": 1.5, "note": EVIL_ATTR},
            {"name": "plain & simple", "value": None, "note": "'quoted'"},
        ],
        "summary": {EVIL: EVIL_ATTR, "best": EVIL, "seconds": 0.1},
        EVIL: {"extra": EVIL},
    }


def test_every_value_is_escaped() -> None:
    page = render_html(evil_envelope(), notes=[EVIL], plots=False)
    doc = Page(page)
    assert len(doc.all("script")) == 1  # ours, inline
    assert all((a.get("src") or "").startswith("data:") for a in doc.all("img"))
    assert not any(k.startswith("on") for _, attrs in doc.tags for k in attrs)
    assert EVIL not in page and EVIL_ATTR not in page and "<img src=x" not in page
    assert sorted(r[0] for r in doc.rows) == sorted([EVIL, "plain & simple"])
    assert [r[2] for r in doc.rows] == [EVIL_ATTR, "'quoted'"]
    assert doc.title == f"spectra rankme {EVIL_ATTR}"
    assert_self_contained(page)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=30).map(str.strip).filter(bool), min_size=1, max_size=6))
def test_cell_text_survives_any_string(names: list[str]) -> None:
    """Whatever the strings, the browser-visible text of each cell is the string itself."""
    env = {"schema_version": 1, "command": "x", "rows": [{"name": n, "i": i} for i, n in enumerate(names)]}
    doc = Page(render_html(env, plots=False))
    assert doc.head == ["name", "i"]
    assert [r[0] for r in doc.rows] == names
    assert [r[1] for r in doc.rows] == [str(i) for i in range(len(names))]


# ---- other commands' rows: the generic view -------------------------------------------------------------


def test_generic_view_shows_every_field_and_sort_keys() -> None:
    rows = [
        {"name": "b", "depth": 1, "kind": "q", "status": "ok", "score": 0.25, "ranks": [1, 2]},
        {"name": "a", "depth": 0, "kind": "q", "status": "failed", "score": float("nan"), "ranks": []},
        {"name": "c", "depth": 0, "kind": "v", "status": "ok", "score": 1e-5, "ranks": [3]},
    ]
    env = {"schema_version": 1, "command": "allocate", "rows": rows, "summary": {"budget": 1000, "ok": True}}
    page = render_html(env)
    doc = Page(page)
    assert doc.head == ["name", "depth", "kind", "status", "score", "ranks"]
    assert [r[4] for r in doc.rows] == ["0.25", "-", "1.00e-05"]
    assert [r[5] for r in doc.rows] == ["1, 2", "-", "3"]
    tds = [a for a in doc.all("td") if a.get("data-v") is not None]
    # numbers keep full precision for sorting; NaN/None sort as missing
    assert {"0.25", "", "1e-05"} <= {a["data-v"] for a in tds}
    trs = [a for a in doc.all("tr") if a.get("class") == "bad"]
    assert len(trs) == 1  # the failed row is marked
    assert "budget" in page and "1000" in page
    # rows with depth/kind/status: their float fields by depth, one figure
    assert len(doc.all("img")) == 1
    assert_self_contained(page)


def test_pass_fail_statuses_and_rows_without_status() -> None:
    rows = [
        {"rule": "alpha", "module": f"layers.{d}.q", "depth": d, "kind": "q", "status": s, "value": v}
        for d, s, v in ((0, "pass", 2.5), (1, "fail", 1.5), (2, "skip", None), (3, "FAIL", 7.0))
    ]
    doc = Page(render_html({"schema_version": 1, "command": "check", "rows": rows}, plots=False))
    marked = [
        i for i, (t, a) in enumerate(x for x in doc.tags if x[0] == "tr" and x[1].get("class") == "bad")
    ]
    assert len(marked) == 2
    page = render_html({"schema_version": 1, "command": "check", "rows": rows}, plots=False)
    assert "2 not ok" in page
    # allocate-like rows: depth and kind but no status; integer fields that vary are drawn
    alloc = [
        {"name": f"l{d}.{k}", "depth": d, "kind": k, "rank": d + len(k), "rows": 8}
        for d in range(3)
        for k in "ab"
    ]
    page = render_html({"schema_version": 1, "command": "allocate", "rows": alloc})
    imgs = Page(page).all("img")
    assert len(imgs) == 1 and min(png_size(imgs[0]["src"] or "")) > 100


def test_envelope_without_depths_has_no_figures_and_no_rows_is_fine() -> None:
    env = {"schema_version": 1, "command": "check", "rows": [{"rule": "alpha<6", "passed": False}]}
    doc = Page(render_html(env))
    assert doc.all("img") == [] and doc.rows == [["alpha<6", "False"]]
    page = render_html({"schema_version": 1, "command": "check", "rows": []})
    assert "No rows." in page


# ---- bad inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("{not json", "not JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
        ("[1, 2]", "not a spectra results envelope (no schema_version)"),
        ('{"command": "analyze", "rows": []}', "no schema_version"),
        ('{"schema_version": 2, "command": "analyze", "rows": []}', "schema_version 2 is not supported"),
        ('{"schema_version": 1, "command": "analyze"}', "the envelope has no 'rows'"),
        ('{"schema_version": 1, "rows": []}', "the envelope has no 'command'"),
        ('{"schema_version": 1, "command": "analyze", "rows": [1]}', "'rows' must be a list of objects"),
        ('{"schema_version": 1, "command": "a", "rows": [], "summary": []}', "'summary' must be an object"),
    ],
)
def test_bad_results_file(tmp_path: Path, content: str, message: str) -> None:
    src = tmp_path / "r.json"
    src.write_text(content)
    r = run("report", src)
    assert r.exit_code == 1
    assert r.stderr.startswith(f"Error: {src}: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # nothing written


def test_missing_binary_and_folder_inputs(tmp_path: Path) -> None:
    r = run("report", tmp_path / "nope.json")
    assert r.exit_code == 1 and "no such file" in r.stderr
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00\x81")
    r = run("report", tmp_path / "bin.json")
    assert r.exit_code == 1 and "not JSON (not UTF-8 text)" in r.stderr
    (tmp_path / "d.json").mkdir()
    r = run("report", tmp_path / "d.json", "-o", tmp_path / "d.html")
    assert r.exit_code == 1 and "is a folder" in r.stderr


def test_output_rules(tmp_path: Path) -> None:
    src = tmp_path / "r.json"
    src.write_text(SMALL)
    out = tmp_path / "r.html"
    out.write_text("keep me")
    r = run("report", src)
    assert r.exit_code == 1 and "already exists; pass --force" in r.stderr
    assert out.read_text() == "keep me"
    assert run("report", src, "--force", "-q").exit_code == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    r = run("report", src, "-o", src, "--force")
    assert r.exit_code == 1 and "refusing to write over the results file" in r.stderr
    r = run("report", src, "-o", tmp_path / "no" / "such" / "x.html")
    assert r.exit_code == 1 and "no such folder" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.json"]  # no temporary files left
    assert run("report", src, "--no-such-flag").exit_code == 2


def test_html_flag_fails_before_the_run(model: Path, cases: dict[str, fx.Generated], tmp_path: Path) -> None:
    r = run("analyze", model, "--html", tmp_path / "missing" / "r.html", "-q")
    assert r.exit_code == 1 and "no such folder" in r.stderr and r.stdout == ""
    r = run("compare", cases["base"].path, cases["noise"].path, "--html", cases["base"].path, "-q")
    assert r.exit_code == 1 and "refusing to write over an input" in r.stderr and r.stdout == ""
    r = run("analyze", model, "--html", tmp_path, "-q")
    assert r.exit_code == 2  # a folder where a file is expected: typer's usage error


def test_check_envelope_defaults_and_errors() -> None:
    env = check_envelope({"schema_version": 1, "command": "merge", "rows": []})
    assert env["inputs"] == env["options"] == env["summary"] == {}
    with pytest.raises(SpectraError, match="schema_version '1' is not supported"):
        check_envelope({"schema_version": "1", "command": "merge", "rows": []})


# ---- figures drawn with the right labels (review of issue #7) ---------------------------------------------


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every matplotlib figure saved during the test, captured before the plot function closes it."""
    from matplotlib.figure import Figure

    figures: list[Any] = []
    real = Figure.savefig

    def capture(self: Any, *args: Any, **kwargs: Any) -> None:
        self.canvas.draw()
        figures.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    return figures


def _heat_rows() -> list[dict[str, Any]]:
    return [{"name": f"layers.{d}.{k}", "kind": k, "depth": d, "status": "ok", "intruders": (d + i) % 3,
             "rank": 8 * (d + 1), "ratio": 0.123 * (d + 1)}
            for d in range(4) for i, k in enumerate(("q", "v"))]  # fmt: skip


def test_heatmap_cells_use_the_format(drawn: list[Any]) -> None:
    from spectra_cli.report.plots import plot_heatmap

    assert plot_heatmap(_heat_rows(), "intruders", "intruders", io.BytesIO(), fmt=".0f")  # type: ignore[arg-type]
    cells = {t.get_text() for t in drawn[-1].axes[0].texts}
    assert cells == {"0", "1", "2"}
    # integer counts need no decimals even without an explicit format; fractions keep two
    assert plot_heatmap(_heat_rows(), "rank", "rank", io.BytesIO())  # type: ignore[arg-type]
    assert {t.get_text() for t in drawn[-1].axes[0].texts} == {"8", "16", "24", "32"}
    assert plot_heatmap(_heat_rows(), "ratio", "ratio", io.BytesIO())  # type: ignore[arg-type]
    assert {t.get_text() for t in drawn[-1].axes[0].texts} == {"0.12", "0.25", "0.37", "0.49"}


def test_depth_axes_have_integer_ticks(drawn: list[Any]) -> None:
    from spectra_cli.report.plots import plot_by_depth

    rows = [r for r in _heat_rows() if r["depth"] < 3]
    metrics = (("rank", "rank"), ("ratio", "ratio"))
    assert plot_by_depth(rows, io.BytesIO(), metrics, "t")  # type: ignore[arg-type]
    for ax in drawn[-1].axes[:2]:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    # values that differ only in the 8th digit (a subspace overlap of 0.9999999): plain tick labels, no
    # '1e-7+1' offset above the axis that a reader has to decode
    near_one = [{**r, "ratio": 1 - 1e-8 * r["depth"]} for r in rows]
    assert plot_by_depth(near_one, io.BytesIO(), metrics, "t")  # type: ignore[arg-type]
    assert drawn[-1].axes[1].yaxis.get_major_formatter().get_offset() == ""


def test_analyze_table_shows_dash_for_missing_r90(model: Path) -> None:
    r = run("analyze", model, "-f", "markdown", "-q")
    assert r.exit_code == 0, r.stderr
    nan_row = next(line for line in r.stdout.splitlines() if "o_proj" in line)
    assert "None" not in nan_row and "| - |" in nan_row


def test_check_html_equals_report_of_its_json(tmp_path: Path) -> None:
    from fixtures.gate import gate_models

    models = gate_models(tmp_path / "gate")
    pol = tmp_path / "p.toml"
    pol.write_text("[rules]\nno_nonfinite = true\nmax_spectral_norm = 100.0\n")
    args = ("check", models["nonfinite"].path, "--policy", pol, "-q")
    r = run(*args, "-f", "json", "-o", tmp_path / "c.json", "--html", tmp_path / "run.html")
    assert r.exit_code == 1, r.stderr  # the page is written although the gate failed
    assert run("report", tmp_path / "c.json", "-q").exit_code == 0
    page = (tmp_path / "c.html").read_text()
    assert page == (tmp_path / "run.html").read_text()
    assert_self_contained(page)
    doc = Page(page)
    assert doc.head[:6] == ["rule", "module", "value", "limit", "status", "why"]
    env = json.loads((tmp_path / "c.json").read_text())
    assert len(doc.rows) == len(env["rows"]) == 10
    assert len([a for a in doc.all("tr") if a.get("class") == "bad"]) == 2  # NaN: both rules fail there
    assert (
        ">FAILED<" in page
        and "exit code 1: a rule failed" in page
        and "rules: no_nonfinite, max_spectral_norm" in page
    )
    assert "FAILED: 2 failed, 8 passed, 0 skipped" in page  # the CLI's verdict line
    r = run(*args[:2], "--policy", pol, "-q", "--html", tmp_path / "ok.html", "-i", "*q_proj*")
    assert r.exit_code == 0 and ">PASSED<" in (tmp_path / "ok.html").read_text()


def test_generic_figure_draws_one_line_per_kind_and_task(drawn: list[Any]) -> None:
    """merge rows come per module × task: a line per kind alone would zigzag between the tasks' values."""
    from spectra_cli.report.views.merge import figures

    rows = [{"module": f"l.{d}.{k}", "kind": k, "depth": d, "task": t, "delta_norm": (1.0 if t == "a" else 60.0) + d,
             "energy_kept": 1.0 - 1e-13 * ((d + len(t)) % 2)}
            for d in range(3) for k in ("q", "v") for t in ("a", "b")]  # fmt: skip
    env = {"schema_version": 1, "command": "merge", "rows": rows, "summary": {}, "inputs": {}, "options": {}}
    assert len(figures(env)) == 1
    fig = drawn[-1]
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["delta norm"]  # energy_kept differs only by rounding: not a metric that varies
    labels = sorted(t.get_text() for legend in fig.legends for t in legend.get_texts())
    assert labels == ["q · a", "q · b", "v · a", "v · b"]
    ax = fig.axes[0]
    for line in ax.get_lines():  # each line is monotone in depth: no zigzag between tasks
        ys = list(line.get_ydata())
        assert ys == sorted(ys)
