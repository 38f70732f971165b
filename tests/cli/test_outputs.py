"""Output paths through the CLI: devices, FIFOs, symlinks and `-`; two outputs of one run naming the same path;
two runs into one --out / --plots folder; names from files printed safely on the terminal."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import spectra_cli.flows.analyze as analyze_flow
from fixtures import checkpoints as fx
from spectra_cli.checkpoint.output import release_locks
from spectra_cli.cli.app import app

runner = CliRunner()
ROOT = Path(__file__).parents[2]


def run(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> fx.Generated:
    return fx.single_safetensors(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _no_locks_left():
    yield
    release_locks()


def _null(path: Path) -> Path:
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod is not permitted here")
    return path


def _identity(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_mode, st.st_rdev, st.st_ino


# ---- devices, FIFOs, symlinks, - ------------------------------------------------------------------------


def test_every_file_output_to_a_device_node_leaves_it_a_device(tiny: fx.Generated, tmp_path: Path) -> None:
    """As root, `-o /dev/null` used to turn the machine's /dev/null into a regular file (a rename over it)."""
    null = _null(tmp_path / "null")
    before = _identity(null)
    r = run("analyze", tiny.path, "-f", "json", "-o", null, "--html", null, "--save-spectra", null, "-q")
    assert r.exit_code == 0, r.stderr
    assert _identity(null) == before and sorted(p.name for p in tmp_path.iterdir()) == ["null"]


def test_a_fifo_output_is_written_for_its_reader(tiny: fx.Generated, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    r = run("analyze", tiny.path, "-f", "json", "-o", fifo, "-q")
    reader.join(20)
    assert r.exit_code == 0, r.stderr
    assert json.loads(got[0])["command"] == "analyze" and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_symlinked_output_replaces_its_target(tiny: fx.Generated, tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text("{}")
    (tmp_path / "l.json").symlink_to("t.json")
    r = run("analyze", tiny.path, "-f", "json", "-o", tmp_path / "l.json", "-q")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "l.json").is_symlink() and json.loads((tmp_path / "t.json").read_text())["rows"]


def test_dash_means_stdout_for_text_outputs(tiny: fx.Generated, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = run("analyze", tiny.path, "-f", "json", "-o", "-", "-q")
    assert r.exit_code == 0 and json.loads(r.stdout)["command"] == "analyze"
    r = run("analyze", tiny.path, "-f", "json", "-o", "a.json", "--html", "-", "-q")
    assert r.exit_code == 0 and r.stdout.startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no file named "-"


@pytest.mark.parametrize(
    "args",
    [("--save-spectra", "-"), ("--plots", "-"), ("--html", "-")],
    ids=["binary", "folder", "second-to-stdout"],
)
def test_dash_is_refused_where_it_cannot_mean_stdout(tiny: fx.Generated, tmp_path: Path, monkeypatch,
                                                     args: tuple[str, str]) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    r = run("analyze", tiny.path, *args, "-q")
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_init_adapter_out_on_a_device_is_refused_even_with_force(tiny: fx.Generated, tmp_path: Path) -> None:
    null = _null(tmp_path / "null")
    before = _identity(null)
    r = run("init-adapter", tiny.path, "--out", null, "--rank", "2", "--force", "-q")
    assert r.exit_code == 1 and "--out writes a folder" in r.stderr
    assert _identity(null) == before and sorted(p.name for p in tmp_path.iterdir()) == ["null"]


# ---- two outputs of one run naming the same path -------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("the run started although its outputs collide")

    monkeypatch.setattr(analyze_flow, "run_analyze", never)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("-o", "{d}/x.json", "--html", "{d}/x.json"), "--html and --output name the same output"),
        (("-o", "{d}/sub/../x.json", "--html", "{d}/x.json"), "--html and --output name the same output"),
        (("-o", "{d}/link.json", "--save-spectra", "{d}/x.json"), "--save-spectra and --output"),
        (("--plots", "{d}/x.json", "-o", "{d}/x.json"), "--plots and --output"),
        (("--html", "-"), "--html and the data (no --output) name the same output"),
    ],
    ids=["same", "dotdot", "symlink", "folder-and-file", "stdout-twice"],
)
def test_outputs_of_one_run_naming_the_same_path_are_refused_before_any_work(
    tiny: fx.Generated, tmp_path: Path, no_work: None, flags: tuple[str, ...], message: str
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.json").symlink_to("x.json")
    r = run("analyze", tiny.path, *(f.format(d=tmp_path) for f in flags), "-q")
    assert r.exit_code == 1, r.stderr
    assert r.stderr.startswith("Error: ") and message in r.stderr and r.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "sub"]


def test_out_and_plots_naming_one_folder_are_refused(tiny: fx.Generated, tmp_path: Path) -> None:
    r = run("merge", tiny.path, f"a={tiny.path}", "--out", tmp_path / "d", "--plots", tmp_path / "d", "-q")
    assert r.exit_code == 1 and "--plots and --out name the same output" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_null_device_may_take_several_outputs(tiny: fx.Generated, tmp_path: Path) -> None:
    null = _null(tmp_path / "null")
    r = run("analyze", tiny.path, "-o", null, "--html", null, "-q")
    assert r.exit_code == 0, r.stderr


# ---- concurrent runs into one folder -------------------------------------------------------------------

_WAITING = """
import os, sys, time
from pathlib import Path
go = Path(sys.argv[1])
def wait(*args):
    print("READY", file=sys.stderr, flush=True)
    for _ in range(600):
        if go.exists():
            return
        time.sleep(0.05)
if sys.argv[2] == "out":
    import spectra_cli.checkpoint.writers as w
    real = w.prepare_output
    def prepare_output(*a, **k):
        stage = real(*a, **k)
        wait()
        return stage
    w.prepare_output = prepare_output
else:
    import spectra_cli.flows.analyze as fa
    real = fa.run_analyze
    def run_analyze(*a, **k):
        wait()
        return real(*a, **k)
    fa.run_analyze = run_analyze
from spectra_cli.cli.app import main
sys.argv = ["spectra", *sys.argv[3:]]
main()
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}


@pytest.mark.parametrize("kind", ["out", "plots"])
def test_two_runs_into_one_folder_exactly_one_wins(tiny: fx.Generated, tmp_path: Path, kind: str) -> None:
    """The first run holds the folder (paused just after taking it); the second fails at once with one line
    naming the first's pid; the first then completes. Before the lock both printed "wrote"."""
    folder = tmp_path / "d"
    go = tmp_path / "go"
    cmd = (["init-adapter", str(tiny.path), "--out", str(folder), "--rank", "2"] if kind == "out"
           else ["analyze", str(tiny.path), "--plots", str(folder), "-f", "json"])  # fmt: skip
    first = subprocess.Popen([sys.executable, "-c", _WAITING, str(go), kind, *cmd], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert first.stderr is not None and first.stderr.readline().strip() == "READY"
        second = subprocess.run([sys.executable, "-m", "spectra_cli", *cmd], env=_env(), capture_output=True,
                                text=True, timeout=120)  # fmt: skip
    finally:
        go.touch()
        _, err = first.communicate(timeout=120)
    assert second.returncode == 1, second.stderr
    assert second.stderr == (
        f"Error: {folder}: another spectra run (pid {first.pid}) is writing it (--{kind}); wait for it to "
        "finish or choose another path\n"
    )
    assert first.returncode == 0, err
    if kind == "plots":
        assert "wrote" in err
    done = folder / ("adapter/adapter_config.json" if kind == "out" else "spectra_run.json")
    assert done.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "go"]  # no stage, no lock file left


# ---- names from files on the terminal ------------------------------------------------------------------

HOSTILE = {
    "[bold]markup[/bold].weight": "[bold]markup[/bold].weight",
    "close[/].weight": "close[/].weight",
    "title\x1b]0;pwned\x07.weight": "title\\x1b]0;pwned\\x07.weight",
    "clear\x1b[2J.weight": "clear\\x1b[2J.weight",
    "over\rwrite\b.weight": "over\\x0dwrite\\x08.weight",
    "bidi\u202egnp.weight": "bidi\\u202egnp.weight",
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal((6, 4)).astype(np.float32) for name in HOSTILE}
    return fx.write_safetensors(tmp_path_factory.mktemp("hostile") / "m.safetensors", tensors)


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_names_with_markup_and_escapes_are_printed_literally_and_escaped(hostile: Path, fmt: str) -> None:
    """Rich used to parse `[/]` in a tensor name (MarkupError: a crash) and pass ESC sequences raw."""
    r = run("analyze", hostile, "-f", fmt, "-q", "--columns", "name,status")  # whole names, not shortened
    assert r.exit_code == 0, r.stderr
    for raw, shown in HOSTILE.items():
        assert shown in r.stdout, shown
        if raw != shown:
            assert raw not in r.stdout
    assert not any(c in r.stdout for c in "\x1b\x07\r\b\u202e")


def test_json_keeps_names_exact(hostile: Path) -> None:
    r = run("analyze", hostile, "-f", "json", "-q")
    assert {row["name"] for row in json.loads(r.stdout)["rows"]} == set(HOSTILE)
    assert "\x1b" not in r.stdout  # JSON escapes it as \\u001b


def test_warnings_quoting_names_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    from spectra_cli.cli.progress import warn

    warn("tensor \x1b[2Jclear[/] skipped")
    assert capsys.readouterr().err == "spectra: tensor \\x1b[2Jclear[/] skipped\n"


def test_progress_bar_shows_hostile_names_without_crashing_or_escapes(monkeypatch) -> None:
    """The bar formats the name into a "[dim]…" markup template: `[/]` crashed it, ESC reached the terminal."""
    import pty

    from spectra_cli.cli.progress import progress_bar

    master, slave = pty.openpty()
    tty = os.fdopen(slave, "w", encoding="utf-8")
    monkeypatch.setattr(sys, "stderr", tty)
    with progress_bar("reading \x1b]0;t\x07", False) as update:
        for i, name in enumerate(HOSTILE, 1):
            update(i, len(HOSTILE), name)
            time.sleep(0.02)
    tty.flush()
    os.set_blocking(master, False)
    shown = b""
    try:
        while chunk := os.read(master, 65536):
            shown += chunk
    except (BlockingIOError, OSError):
        pass
    tty.close()
    os.close(master)
    text = shown.decode("utf-8", "replace")
    for payload in ("\x1b]0;pwned", "\x1b[2J", "\x1b]0;t", "\u202e"):
        assert payload not in text
