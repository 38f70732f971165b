"""The HTML report in a real browser: headless Chromium (Debian ``chromium`` + ``chromedriver``) via selenium.

One browser session for the module. The page must load with no console errors and no network requests, its
tables must sort (numbers as numbers, missing values last both ways), every figure must decode and take up
space, and a screenshot of the figures must show something drawn.

Without Chromium these tests skip on a developer machine and FAIL under CI (``CI`` set): `.ci/run` installs it.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures import checkpoints as fx
from fixtures.report_pages import report_model
from spectra_cli.cli.app import app

CHROMIUM = os.environ.get("SPECTRA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (
    os.environ.get("SPECTRA_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)


def _unavailable() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} not found (apt-get install chromium chromium-driver; .ci/run does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An analyze page (with a NaN matrix) and a compare page, made by the CLI."""
    d = tmp_path_factory.mktemp("pages")
    runner = CliRunner()
    model = report_model(d / "model")
    r = runner.invoke(app, ["analyze", str(model), "--html", str(d / "analyze.html"), "-q", "-f", "json"])
    assert r.exit_code == 0, r.stderr
    cases = fx.intruder_cases(d / "cases")
    args = [str(cases[k].path) for k in ("base", "intruders")]
    r = runner.invoke(app, ["compare", *args, "--html", str(d / "compare.html"), "-q", "-f", "json"])
    assert r.exit_code == 0, r.stderr
    return {"analyze": d / "analyze.html", "compare": d / "compare.html", "dir": d}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _unavailable()
    if reason:
        _skip_or_fail(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="spectra-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def opened(browser: Any, pages: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    """Open each page once; return the browser's console log of each."""
    logs: dict[str, list[dict[str, Any]]] = {}
    for name in ("compare", "analyze"):  # analyze stays open for the tests below
        browser.get(pages[name].as_uri())
        browser.execute_script("return document.readyState")
        logs[name] = browser.get_log("browser")
        logs[name + ":resources"] = browser.execute_script(
            "return performance.getEntriesByType('resource').map(function(e){return e.name;})"
        )
        logs[name + ":images"] = _images(browser)
    return logs


def _images(browser: Any) -> list[dict[str, Any]]:
    return browser.execute_script(
        """return Array.prototype.map.call(document.querySelectorAll('#plots img, #plots svg'), function(im){
             im.scrollIntoView(); var r = im.getBoundingClientRect();
             return {complete: im.complete === undefined ? true : im.complete,
                     natural: im.naturalWidth === undefined ? r.width : im.naturalWidth,
                     width: r.width, height: r.height};});"""
    )


def _column(browser: Any, header: str) -> tuple[Any, list[str]]:
    """The <th> whose text is ``header`` in the rows table, and the data-v of that column's cells, in
    display order."""
    from selenium.webdriver.common.by import By

    heads = browser.find_elements(By.CSS_SELECTOR, "#rows-table thead th")
    texts = [h.get_attribute("textContent").strip() for h in heads]
    i = texts.index(header)
    values = browser.execute_script(
        "return Array.prototype.map.call(document.querySelectorAll('#rows-table tbody tr'),"
        " function(r){return r.cells[arguments[0]].getAttribute('data-v');});".replace("arguments[0]", str(i))
    )
    return heads[i], values


def test_pages_load_without_console_errors_or_network(opened: dict[str, Any]) -> None:
    for name in ("analyze", "compare"):
        severe = [e for e in opened[name] if e.get("level") == "SEVERE"]
        assert severe == [], (name, severe)
        assert opened[name + ":resources"] == [], name  # nothing fetched: everything is inline


def test_every_figure_renders(opened: dict[str, Any]) -> None:
    assert len(opened["analyze:images"]) == 4
    assert len(opened["compare:images"]) == 3
    for name in ("analyze", "compare"):
        for im in opened[name + ":images"]:
            assert im["complete"] and im["natural"] > 0, (name, im)
            assert im["width"] > 200 and im["height"] > 100, (name, im)


def test_numeric_column_sorts_both_ways_missing_last(browser: Any, opened: dict[str, Any]) -> None:
    th, before = _column(browser, "σ₁")
    assert "" in before  # the NaN matrix has no σ₁
    th.click()
    assert th.get_attribute("aria-sort") == "ascending"
    _, up = _column(browser, "σ₁")
    nums = [float(v) for v in up if v != ""]
    assert up[-1] == "" and nums == sorted(nums) and len(set(nums)) > 3
    th.click()
    assert th.get_attribute("aria-sort") == "descending"
    _, down = _column(browser, "σ₁")
    assert down[-1] == "" and [float(v) for v in down if v != ""] == sorted(nums, reverse=True)
    # numbers sort as numbers, not as text: '10' after '9'
    th, _ = _column(browser, "r90")
    th.click()
    _, r90 = _column(browser, "r90")
    ints = [int(v) for v in r90 if v != ""]
    assert ints == sorted(ints) and ints != sorted(ints, key=str)


def test_text_column_sorts_naturally(browser: Any, opened: dict[str, Any]) -> None:
    th, _ = _column(browser, "name")
    th.click()
    _, names = _column(browser, "name")
    layer = [int(n.split(".")[2]) for n in names]
    assert layer == sorted(layer) and names != sorted(names, reverse=True)
    other, _ = _column(browser, "kind")
    other.click()
    assert th.get_attribute("aria-sort") is None and other.get_attribute("aria-sort") == "ascending"


def test_filter_and_all_fields(browser: Any, opened: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    visible = "return Array.prototype.filter.call(document.querySelectorAll('#rows-table tbody tr'), function(r){return r.offsetParent !== null;}).length"
    assert browser.execute_script(visible) == 10
    box = browser.find_element(By.ID, "filter")
    box.send_keys("up_proj")
    assert browser.execute_script(visible) == 3
    browser.execute_script(
        "var f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('input'));"
    )
    assert browser.execute_script(visible) == 10
    extra = "return document.querySelector('#rows-table thead th.x').getBoundingClientRect().width"
    assert browser.execute_script(extra) == 0
    browser.find_element(By.ID, "allcols").click()
    assert browser.execute_script(extra) > 0


def test_header_stays_visible_when_the_table_scrolls(browser: Any, opened: dict[str, Any]) -> None:
    browser.set_window_size(1400, 500)  # the table's box (75vh) is now shorter than its rows
    try:
        tops = browser.execute_script(
            """var wrap = document.querySelector('.table-wrap'); wrap.scrollIntoView();
               wrap.scrollTop = wrap.scrollHeight;
               var th = document.querySelector('#rows-table thead th');
               return [wrap.scrollTop, wrap.getBoundingClientRect().top, th.getBoundingClientRect().top];"""
        )
    finally:
        browser.set_window_size(1400, 1000)
    scrolled, wrap_top, th_top = tops
    assert scrolled > 0 and abs(th_top - wrap_top) <= 2, tops


def test_screenshot_shows_the_figures(browser: Any, opened: dict[str, Any], pages: dict[str, Path]) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By

    browser.execute_script("document.getElementById('plots').scrollIntoView()")
    whole = pages["dir"] / "screenshot.png"
    assert browser.save_screenshot(str(whole))
    figure = browser.find_element(By.CSS_SELECTOR, "#plots figure")
    png = figure.screenshot_as_png
    (pages["dir"] / "figure.png").write_bytes(png)
    with Image.open(io.BytesIO(png)) as im:
        rgb = im.convert("RGB")
        w, h = rgb.size
        assert w > 400 and h > 200
        px = np.asarray(rgb, dtype=np.int32).reshape(-1, 3)
    colours = len(np.unique(px, axis=0))
    ink = float(np.mean(px.sum(axis=1) < 600))  # not white/near-white
    r, g, b = px.T
    blue = float(np.mean((b > r + 40) & (b > g + 20)))  # the plotted lines and bars
    assert colours > 100 and ink > 0.03 and blue > 0.001, (colours, ink, blue)
    with Image.open(whole) as im:
        assert len(np.unique(np.asarray(im.convert("L")))) > 50  # the page itself is not blank


def test_check_and_generic_pages_in_the_browser(browser: Any, pages: dict[str, Path]) -> None:
    """The pages of commands without figures of their own: check (a failing gate, failures marked, sortable
    value column) and a merge-shaped envelope (rows per module × task: one figure, a line per kind and task)."""
    import json

    from fixtures.gate import gate_models

    d = pages["dir"]
    models = gate_models(d / "gate")
    (d / "p.toml").write_text("[rules]\nno_nonfinite = true\nmax_spectral_norm = 100.0\n")
    r = CliRunner().invoke(app, ["check", str(models["nonfinite"].path), "--policy", str(d / "p.toml"), "-q",
                                 "--html", str(d / "check.html")])  # fmt: skip
    assert r.exit_code == 1, r.stderr
    rows = [{"module": f"l.{k}.{i}", "kind": k, "depth": i, "task": t, "delta_norm": 1.0 + i + (t == "b")}
            for i in range(3) for k in ("q", "v") for t in ("a", "b")]  # fmt: skip
    env = {"schema_version": 1, "command": "merge", "rows": rows, "summary": {"method": "tsv"}}
    (d / "merge.json").write_text(json.dumps(env))
    assert CliRunner().invoke(app, ["report", str(d / "merge.json"), "-q"]).exit_code == 0
    for name, n_images in (("check", 0), ("merge", 1)):
        browser.get((d / f"{name}.html").as_uri())
        log = browser.get_log("browser")
        assert [e for e in log if e.get("level") == "SEVERE"] == [], (name, log)
        fetched = browser.execute_script("return performance.getEntriesByType('resource').length")
        assert fetched == 0, name
        images = _images(browser)
        assert len(images) == n_images and all(im["natural"] > 0 and im["width"] > 200 for im in images)
    browser.get((d / "check.html").as_uri())
    bad = browser.execute_script("return document.querySelectorAll('#rows-table tbody tr.bad').length")
    assert bad == 2  # UP0's NaN fails both rules
    th, _ = _column(browser, "value")
    th.click()
    _, values = _column(browser, "value")
    nums = [float(v) for v in values if v != ""]
    assert nums == sorted(nums) and values[-1] == ""  # the NaN matrix has no σ₁: last


# ---- .ci/run: installs the browser when it can, never breaks where it cannot ------------------------------


@pytest.fixture
def ci_tree(tmp_path: Path) -> dict[str, Any]:
    """A copy of .ci/run beside a stub scripts/test.sh that prints CI, and a PATH of stubs only."""
    root = Path(__file__).resolve().parents[2]
    (tmp_path / ".ci").mkdir()
    shutil.copy(root / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "test.sh").write_text('echo "tests ran: CI=${CI:-unset} args=$*"\n')
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("bash", "dirname", "touch", "chmod"):
        (bin_ / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    return {"dir": tmp_path, "bin": bin_, "chromium": tmp_path / "opt" / "chromium",
            "driver": tmp_path / "opt" / "chromedriver"}  # fmt: skip


def _stub(bin_: Path, name: str, body: str) -> None:
    (bin_ / name).write_text(f"#!{shutil.which('bash')}\n{body}\n")
    (bin_ / name).chmod(0o755)


def _ci_run(tree: dict[str, Any], **env: str) -> Any:
    import subprocess

    full = {"PATH": str(tree["bin"]), "SPECTRA_CHROMIUM": str(tree["chromium"]),
            "SPECTRA_CHROMEDRIVER": str(tree["driver"]), **env}  # fmt: skip
    bash = shutil.which("bash") or "/bin/bash"
    return subprocess.run([bash, str(tree["dir"] / ".ci" / "run"), "-k", "x"], env=full, capture_output=True,
                          text=True, timeout=30)  # fmt: skip


def test_ci_run_without_apt_outside_ci_runs_the_tests_and_skips_the_browser(ci_tree: dict[str, Any]) -> None:
    _stub(ci_tree["bin"], "id", "echo 0")
    r = _ci_run(ci_tree)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "tests ran: CI=unset args=-k x"
    assert "apt-get not found" in r.stderr and "will be skipped" in r.stderr
    r = _ci_run(ci_tree, CI="1")  # CI says so: the browser tests must fail, not skip
    assert r.returncode == 0 and "CI=1" in r.stdout and "will fail" in r.stderr


def test_ci_run_as_root_installs_with_apt(ci_tree: dict[str, Any]) -> None:
    _stub(ci_tree["bin"], "id", "echo 0")
    log = ci_tree["dir"] / "apt.log"
    c, d = ci_tree["chromium"], ci_tree["driver"]
    _stub(ci_tree["bin"], "apt-get",
          f'echo "$*" >> {log}; [ "$1" = install ] && mkdir -p {c.parent} && touch {c} {d} && chmod +x {c} {d}; true')  # fmt: skip
    (ci_tree["bin"] / "mkdir").symlink_to(shutil.which("mkdir") or "/bin/mkdir")
    r = _ci_run(ci_tree)
    assert r.returncode == 0, r.stderr
    assert "CI=true" in r.stdout
    calls = log.read_text().splitlines()
    assert calls[0] == "update -qq" and calls[1].startswith("install -y -qq --no-install-recommends chromium")
    r = _ci_run(ci_tree)  # present now: no second install
    assert r.returncode == 0 and len(log.read_text().splitlines()) == 2


def test_ci_run_not_root_without_sudo_or_when_apt_fails(ci_tree: dict[str, Any]) -> None:
    _stub(ci_tree["bin"], "apt-get", "exit 100")
    _stub(ci_tree["bin"], "id", "echo 1000")
    r = _ci_run(ci_tree)
    assert r.returncode == 0 and "no passwordless sudo" in r.stderr and "CI=unset" in r.stdout
    _stub(ci_tree["bin"], "id", "echo 0")
    r = _ci_run(ci_tree)
    assert r.returncode == 0 and "installing chromium failed" in r.stderr and "CI=unset" in r.stdout
