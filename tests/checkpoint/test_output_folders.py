"""Output folders (checkpoint/writers.py prepare_output / commit_output) and their lock (checkpoint/output.py).

Only a folder is ever replaced (a file, device or FIFO at --out is refused, even with --force); a symlinked
--out keeps its link and gets its target replaced; one run at a time writes a folder, and a run killed with
SIGKILL leaves no lock that blocks the next.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from spectra_cli.checkpoint.output import held_lock, lock_output, release_locks
from spectra_cli.checkpoint.writers import commit_output, discard_output, prepare_output
from spectra_cli.errors import SpectraError


@pytest.fixture(autouse=True)
def _no_locks_left():
    yield
    release_locks()


def _stage_and_commit(out: Path, force: bool = False, content: str = "new") -> None:
    stage = prepare_output(out, force, [])
    (stage / "f.txt").write_text(content)
    commit_output(stage, out)


def test_a_folder_is_staged_and_renamed_leaving_nothing_beside_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _stage_and_commit(out)
    assert (out / "f.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no stage, no lock file
    with pytest.raises(SpectraError, match="already exists; choose another --out or pass --force"):
        prepare_output(out, False, [])
    _stage_and_commit(out, force=True, content="newer")
    assert (out / "f.txt").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_symlinked_out_keeps_its_link_and_replaces_its_target(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "old.txt").write_text("old")
    (tmp_path / "link").symlink_to("real")
    _stage_and_commit(tmp_path / "link", force=True)
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == "real"
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["f.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


@pytest.mark.parametrize("kind", ["device", "fifo", "file", "symlink to a file"])
def test_only_a_folder_is_replaced_even_with_force(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out"
    if kind == "device":
        try:
            os.mknod(out, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("mknod is not permitted here")
    elif kind == "fifo":
        os.mkfifo(out)
    elif kind == "file":
        out.write_text("precious")
    else:
        (tmp_path / "precious.txt").write_text("precious")
        out.symlink_to("precious.txt")
    before = os.lstat(out)
    with pytest.raises(SpectraError, match="--out writes a folder"):
        prepare_output(out, True, [])
    after = os.lstat(out)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out"] + (["precious.txt"] if "symlink" in kind else [])
    )


def test_dash_is_refused_for_an_output_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpectraError, match="cannot go to stdout"):
        prepare_output(Path("-"), True, [])
    assert list(tmp_path.iterdir()) == []


def test_a_second_run_into_the_same_folder_fails_until_the_first_ends(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stage = prepare_output(out, False, [])
    with pytest.raises(SpectraError, match="another run in this process is writing it"):
        prepare_output(out, False, [])
    discard_output(stage, out)
    assert list(tmp_path.iterdir()) == [] and held_lock(out) is None
    _stage_and_commit(out)


def test_two_threads_racing_for_one_folder_one_wins(tmp_path: Path) -> None:
    out = tmp_path / "out"
    barrier, refused = threading.Barrier(2), threading.Event()
    results: list[str] = []

    def run() -> None:
        barrier.wait()
        try:
            stage = prepare_output(out, False, [])
        except SpectraError as e:
            results.append(f"refused: {e}")
            refused.set()
            return
        results.append("won")
        refused.wait(10)  # hold the folder until the other thread has tried
        (stage / "f.txt").write_text("x")
        commit_output(stage, out)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r.split(":")[0] for r in results) == ["refused", "won"]
    assert (out / "f.txt").read_text() == "x"


def test_a_run_that_failed_without_discarding_its_stage_does_not_block_the_next(tmp_path: Path) -> None:
    """Flows remove their stage with shutil.rmtree on error: the lock of a vanished stage is stale."""
    import shutil

    out = tmp_path / "out"
    stage = prepare_output(out, False, [])
    shutil.rmtree(stage)
    _stage_and_commit(out)
    assert (out / "f.txt").exists()


_HOLD = """
import sys, time
from spectra_cli.checkpoint.output import lock_output
lock_output(sys.argv[1], "--out")
print("LOCKED", flush=True)
time.sleep(60)
"""


def _holder(out: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), *sys.path])}
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None and p.stdout.readline().strip() == "LOCKED"
    return p


def test_another_process_holding_the_folder_is_named_by_its_pid(tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = _holder(out)
    try:
        with pytest.raises(SpectraError, match=rf"another spectra run \(pid {p.pid}\) is writing it"):
            prepare_output(out, False, [])
        assert not out.exists()
    finally:
        p.kill()
        p.wait()


def test_a_lock_left_by_a_killed_run_is_stale(tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = _holder(out)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (tmp_path / ".out.spectra-lock").exists()  # SIGKILL leaves the file, but not the lock
    lock = lock_output(out)
    assert lock.held
    lock.release()
    assert list(tmp_path.iterdir()) == []
