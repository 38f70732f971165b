"""The one output writer (checkpoint/output.py): never replace what a path points at, only its contents.

Regular files are replaced atomically (mode kept, no temporary file left, the old file intact on failure);
symlinks keep pointing at their target, which is what gets replaced; devices and FIFOs are written in place,
never renamed over or unlinked; ``-`` is stdout for text and refused for binary outputs; every OSError
becomes one SpectraError naming the user's path. The device nodes are made with mknod in tmp_path (never the
machine's own /dev/null: on this very machine it was once turned into a regular file by a rename over it).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from spectra_cli.checkpoint import output
from spectra_cli.checkpoint.output import open_output, write_bytes, write_text
from spectra_cli.checkpoint.safetensors_io import read_header, write_safetensors
from spectra_cli.errors import SpectraError
from spectra_cli.report import render

NULL = os.makedev(1, 3)  # Linux's null device
FULL = os.makedev(1, 7)  # Linux's full device: every write fails with ENOSPC


def _node(path: Path, dev: int) -> Path:
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, dev)
    except PermissionError:
        pytest.skip("mknod is not permitted here (needs root or CAP_MKNOD)")
    return path


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = os.lstat(path)
    return st.st_mode, st.st_rdev, st.st_ino, st.st_dev


def _others(folder: Path, *keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ---- regular files -------------------------------------------------------------------------------------


def test_a_regular_file_is_replaced_atomically_keeping_its_mode(tmp_path: Path) -> None:
    p = tmp_path / "report.json"
    p.write_text("old")
    p.chmod(0o640)
    ino = p.stat().st_ino
    write_text(p, "new ✓")
    assert p.read_text(encoding="utf-8") == "new ✓"
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
    assert p.stat().st_ino != ino  # a new file renamed over the old one, not the old one truncated
    assert _others(tmp_path, "report.json") == []


def test_a_new_file_gets_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_bytes(tmp_path / "x.bin", b"\x00\x01")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.bin").stat().st_mode) == 0o640
    assert (tmp_path / "x.bin").read_bytes() == b"\x00\x01"


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(KeyboardInterrupt), open_output(p) as f:
        f.write(b"half of the new")
        raise KeyboardInterrupt
    assert p.read_text() == "old"
    assert _others(tmp_path, "a.txt") == []


def test_disk_full_becomes_one_error_naming_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError without a file name (ENOSPC from fsync) must not escape: SpectraError naming the path."""
    p = tmp_path / "a.txt"
    p.write_text("old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(output.os, "fsync", full)
    with pytest.raises(
        SpectraError, match=r"a\.txt: cannot write \(No space left on device\); free some space"
    ):
        write_text(p, "new")
    assert p.read_text() == "old"
    assert _others(tmp_path, "a.txt") == []


@pytest.mark.parametrize(
    ("err", "hint"), [(errno.EROFS, "read-only"), (errno.EACCES, "may write to")], ids=["read-only", "denied"]
)
def test_an_unwritable_folder_becomes_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int,
                                                hint: str) -> None:  # fmt: skip
    real_open = os.open

    def refuse(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_CREAT:
            raise OSError(err, os.strerror(err), path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(output.os, "open", refuse)
    with pytest.raises(SpectraError) as e:
        write_text(tmp_path / "out.json", "{}")
    assert str(e.value).startswith(f"{tmp_path / 'out.json'}: cannot write") and hint in str(e.value)
    assert ".tmp-" not in str(e.value)  # the user's name, not the staging name


def test_a_read_only_file_is_not_replaced_by_a_user_who_could_not_write_it(
    tmp_path: Path, monkeypatch
) -> None:
    p = tmp_path / "locked.txt"
    p.write_text("keep")
    monkeypatch.setattr(output.os, "access", lambda path, mode: False)  # as a non-root user on a 0444 file
    with pytest.raises(SpectraError, match="Permission denied"):
        write_text(p, "new")
    assert p.read_text() == "keep"


def test_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpectraError, match="is a folder"):
        write_text(tmp_path, "x")


# ---- symlinks ------------------------------------------------------------------------------------------


def test_a_symlink_keeps_pointing_at_its_target_which_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "t.json"
    target.write_text("old")
    target.chmod(0o600)
    link = tmp_path / "link.json"
    link.symlink_to(Path("real") / "t.json")
    write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == os.path.join("real", "t.json")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert _others(tmp_path / "real", "t.json") == [] and _others(tmp_path, "real", "link.json") == []


def test_a_dangling_symlink_creates_its_target(tmp_path: Path) -> None:
    link = tmp_path / "link.json"
    link.symlink_to("made.json")
    write_text(link, "x")
    assert link.is_symlink() and (tmp_path / "made.json").read_text() == "x"


def test_a_symlink_loop_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(SpectraError, match="a: cannot write"):
        write_text(tmp_path / "a", "x")


def test_render_write_text_is_the_one_writer(tmp_path: Path) -> None:
    """report.render.write_text (--output, --html, --junit, --markdown, --update-baseline) keeps its name and
    goes through the one writer: a symlink stays a symlink."""
    (tmp_path / "t.md").write_text("old")
    (tmp_path / "l.md").symlink_to("t.md")
    render.write_text(tmp_path / "l.md", "new")
    assert (tmp_path / "l.md").is_symlink() and (tmp_path / "t.md").read_text() == "new"


# ---- devices and FIFOs ---------------------------------------------------------------------------------


def test_a_device_node_is_written_in_place_never_replaced(tmp_path: Path) -> None:
    null = _node(tmp_path / "null", NULL)
    before = _identity(null)
    write_text(null, "discarded")
    write_bytes(null, b"discarded")
    write_safetensors(null, {"w": np.ones((2, 2), np.float32)}, {})
    assert _identity(null) == before
    assert stat.S_ISCHR(os.lstat(null).st_mode) and _others(tmp_path, "null") == []


def test_a_symlink_to_a_device_writes_the_device(tmp_path: Path) -> None:
    null = _node(tmp_path / "null", NULL)
    before = _identity(null)
    (tmp_path / "link").symlink_to("null")
    write_text(tmp_path / "link", "x")
    assert _identity(null) == before and (tmp_path / "link").is_symlink()


def test_a_failing_device_is_one_error_and_is_never_unlinked(tmp_path: Path) -> None:
    full = _node(tmp_path / "full", FULL)
    before = _identity(full)
    with pytest.raises(SpectraError, match=r"full: cannot write \(No space left on device\)"):
        write_text(full, "x" * 100_000)
    assert _identity(full) == before


def test_a_fifo_is_written_in_place_for_its_reader(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    write_text(fifo, "through the pipe\n")
    reader.join(10)
    assert got == [b"through the pipe\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and _others(tmp_path, "pipe") == []


def test_dev_stdout_onto_a_file_appends_in_place(tmp_path: Path) -> None:
    """`-o /dev/stdout >> log` keeps the log's start; `> file` gets the output (the file is not renamed over)."""
    log = tmp_path / "log.txt"
    log.write_text("before\n")
    ino = log.stat().st_ino
    code = "import sys; from spectra_cli.checkpoint.output import write_text; write_text(sys.argv[1], 'after\\n')"
    for name in ("/dev/stdout", "/dev/fd/1"):
        with open(log, "ab") as f:
            subprocess.run([sys.executable, "-c", code, name], stdout=f, check=True, env=_env())
    assert log.read_text() == "before\nafter\nafter\n" and log.stat().st_ino == ino


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), *sys.path])}


# ---- stdout ------------------------------------------------------------------------------------------


def test_dash_is_stdout_for_text(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_text("-", "to stdout\n")
    write_text(Path("-"), "again\n")
    assert capsys.readouterr().out == "to stdout\nagain\n"
    assert list(tmp_path.iterdir()) == []  # no file named "-"


def test_dash_is_refused_for_binary_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpectraError, match="binary and cannot go to stdout"):
        write_bytes("-", b"\x00")
    with pytest.raises(SpectraError, match="binary"):
        write_safetensors(Path("-"), {"w": np.ones(2, np.float32)}, {})
    assert list(tmp_path.iterdir()) == []


def test_write_safetensors_replaces_a_symlinks_target(tmp_path: Path) -> None:
    (tmp_path / "t.safetensors").write_bytes(b"old")
    (tmp_path / "l.safetensors").symlink_to("t.safetensors")
    write_safetensors(tmp_path / "l.safetensors", {"w": np.ones((2, 3), np.float32)}, {"k": "v"})
    assert (tmp_path / "l.safetensors").is_symlink()
    infos, meta = read_header(tmp_path / "t.safetensors")
    assert [(t.name, t.shape) for t in infos] == [("w", (2, 3))] and meta == {"k": "v"}


# ---- identities ----------------------------------------------------------------------------------------


def test_output_identity_sees_through_symlinks_and_dots(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "x.json").write_text("")
    (tmp_path / "l.json").symlink_to("x.json")
    ident = output.output_identity
    assert (
        ident(tmp_path / "x.json") == ident(tmp_path / "l.json") == ident(tmp_path / "sub" / ".." / "x.json")
    )
    assert ident(tmp_path / "new.json") == ident(tmp_path / "sub" / ".." / "new.json")
    assert ident(tmp_path / "new.json") != ident(tmp_path / "x.json")


def test_the_null_device_is_recognised_under_any_name(tmp_path: Path) -> None:
    null = _node(tmp_path / "n", NULL)
    assert output.is_null_device(null)
    assert not output.is_null_device(_node(tmp_path / "f", FULL))
    assert not output.is_null_device(tmp_path)
