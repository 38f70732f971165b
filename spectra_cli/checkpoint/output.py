"""The one writer of every output a user names, and the lock that keeps two runs out of one output folder.

Writing never replaces what a path points at, only its contents:

* a regular file (or a path that does not exist yet) is written to a temporary name in the same folder,
  fsync-ed and renamed over the path (atomic: readers see the old file or the new one, never half of one;
  an interrupted run leaves the old file and no temporary file); the old file's permission bits (and, as
  root, its owner) are kept;
* a symlink is followed: its target is replaced atomically, the link stays a link;
* a character or block device or a FIFO (``/dev/null``, ``/dev/stdout``, a named pipe) is opened and written
  in place: never renamed over, never unlinked (a FIFO's open waits for its reader, as the shell's ``>`` does);
  ``/dev/stdout`` or ``/dev/fd/N`` naming a regular file is appended to in place (``>`` and ``>>`` both
  keep their meaning);
* ``-`` is stdout for text; a binary output refuses it.

Every ``OSError`` (disk full, permission denied, read-only file system) becomes a :class:`SpectraError`
naming the user's path. Output folders are staged and renamed by ``checkpoint.writers``; the exclusive lock
(:func:`lock_output`) that keeps a second run out of a folder while the first writes it lives here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from spectra_cli.errors import SpectraError

STDOUT = "-"

Kind = Literal["stdout", "replace", "in_place"]


def is_stdout(path: str | os.PathLike[str] | None) -> bool:
    """``-``: the standard output."""
    return path is not None and os.fspath(path) == STDOUT


def _hint(e: OSError) -> str:
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return "free some space or choose another path"
    if e.errno == errno.EROFS:
        return "the file system is read-only; choose another path"
    if e.errno == errno.ENOENT:
        return "its folder does not exist; create it first"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "choose a path you may write to"
    return "choose another path"


def write_error(path: str | os.PathLike[str], e: OSError) -> SpectraError:
    """The one-line error for a failed write of ``path`` (the user's name for it, never a staging name)."""
    why = e.strerror or str(e) or type(e).__name__
    return SpectraError(f"{os.fspath(path)}: cannot write ({why}); {_hint(e)}")


@dataclass(frozen=True)
class Target:
    """Where and how an output goes: ``kind`` ``stdout``, ``replace`` (``real`` is the regular file, existing
    or not, whose folder receives the temporary file; ``st`` the existing file's stat) or ``in_place``
    (``real`` is opened for writing as it is; ``append`` for a regular file reached through ``/proc``)."""

    path: str
    kind: Kind
    real: str
    st: os.stat_result | None = None
    append: bool = False


def resolve_target(path: str | os.PathLike[str]) -> Target:
    """Decide how ``path`` is written (see the module docstring). Raises :class:`SpectraError` for a folder,
    a socket or a path that cannot be examined (symlink loop, permission denied)."""
    name = os.fspath(path)
    if name == STDOUT:
        return Target(name, "stdout", name)
    try:
        st: os.stat_result | None = os.stat(name)  # follows symlinks
    except FileNotFoundError:
        st = None  # a new file, or a symlink whose target does not exist yet (created, like the shell's >)
    except OSError as e:
        raise SpectraError(f"{name}: cannot write ({e.strerror or e}); choose another path") from e
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise SpectraError(f"{name}: is a folder; give a file name")
        if stat.S_ISSOCK(st.st_mode):
            raise SpectraError(f"{name}: is a socket; give a file name")
        if not stat.S_ISREG(st.st_mode):  # a character/block device or a FIFO: written through
            return Target(name, "in_place", name, st)
    if _through_proc(name):
        # /dev/stdout, /dev/fd/N onto a regular file: the shell's open file, written through
        return Target(name, "in_place", name, st, append=True)
    return Target(name, "replace", os.path.realpath(name), st)


def _through_proc(name: str) -> bool:
    """``name`` reaches its file through ``/proc`` (``/dev/stdout`` → ``/proc/self/fd/1``): a descriptor's
    magic link, not a folder entry that a rename could replace."""
    p = os.path.abspath(name)
    for _ in range(40):
        parent = os.path.realpath(os.path.dirname(p))
        if parent == "/proc" or parent.startswith("/proc/"):
            return True
        if not os.path.islink(p):
            return False
        p = os.path.join(os.path.dirname(p), os.readlink(p))
    return False


@contextlib.contextmanager
def open_output(path: str | os.PathLike[str], binary: bool = True) -> Iterator[IO[bytes]]:
    """A binary file object to write the output ``path`` through (see the module docstring). The write is
    committed (renamed into place) when the block ends without an exception; an exception leaves what was
    there before, and no temporary file. ``-`` (stdout) is refused unless ``binary`` is False."""
    target = resolve_target(path)
    if target.kind == "stdout":
        if binary:
            raise SpectraError("-: this output is binary and cannot go to stdout; give a file name")
        out = sys.stdout
        out.flush()
        buf = getattr(out, "buffer", None)
        if buf is None:  # a text-only stream (a test's capture): collect bytes, write them as text
            import io

            collected = io.BytesIO()
            yield collected
            out.write(collected.getvalue().decode("utf-8"))
        else:
            yield buf
            buf.flush()
        out.flush()
        return
    if target.kind == "in_place":
        with _in_place(target) as f:
            yield f
        return
    with _replacing(target) as f:
        yield f


@contextlib.contextmanager
def _in_place(target: Target) -> Iterator[IO[bytes]]:
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()  # what we printed to a redirected stdout comes first
    flags = os.O_WRONLY | (os.O_APPEND if target.append else 0)
    try:
        fd = os.open(target.real, flags)
    except OSError as e:
        raise write_error(target.path, e) from e
    f = os.fdopen(fd, "wb")
    try:
        yield f
        f.flush()
    except OSError as e:
        raise write_error(target.path, e) from e
    finally:
        with contextlib.suppress(OSError):
            f.close()


@contextlib.contextmanager
def _replacing(target: Target) -> Iterator[IO[bytes]]:
    real = target.real
    st = target.st
    if st is not None and not os.access(real, os.W_OK):  # the shell's > would fail too (root passes)
        raise write_error(target.path, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
    folder, name = os.path.split(real)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, as a new file gets
    except OSError as e:
        raise write_error(target.path, e) from e
    done = False
    try:
        f = os.fdopen(fd, "wb")
        with f:
            if st is not None:
                os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
                if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
                    with contextlib.suppress(OSError):
                        os.fchown(f.fileno(), st.st_uid, st.st_gid)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
        done = True
        _sync_folder(folder)
    except OSError as e:
        raise write_error(target.path, e) from e
    finally:
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _sync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to the output ``path`` (never stdout)."""
    with open_output(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to the output ``path``; ``-`` writes it to stdout."""
    if is_stdout(path):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with open_output(path) as f:
        f.write(text.encode("utf-8"))


# ---- identity of outputs: two outputs of one run may not share one --------------------------------------


def output_identity(path: str | os.PathLike[str]) -> tuple[object, ...]:
    """What ``path`` names, for telling whether two outputs are the same: the device and inode of an existing
    file or folder (after symlinks; ``/dev/stdout`` is the stream it is), the resolved path of one that does
    not exist yet, and stdout's stream for ``-``."""
    name = os.fspath(path)
    if name == STDOUT:
        try:
            st = os.fstat(sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            return ("stdout",)
        return ("inode", st.st_dev, st.st_ino)
    try:
        st = os.stat(name)
    except OSError:
        return ("path", os.path.realpath(name))
    return ("inode", st.st_dev, st.st_ino)


def is_null_device(path: str | os.PathLike[str]) -> bool:
    """``path`` is the null device (under any name): any number of outputs may go there."""
    if is_stdout(path):
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISCHR(st.st_mode):
        return False
    if sys.platform.startswith("linux") and st.st_rdev == os.makedev(1, 3):  # even where /dev/null was broken
        return True
    try:
        null = os.stat(os.devnull)
    except OSError:
        return False
    return stat.S_ISCHR(null.st_mode) and st.st_rdev == null.st_rdev


# ---- the lock of an output folder ----------------------------------------------------------------------


class OutputLock:
    """An exclusive lock on an output path, held by this process until :meth:`release`: ``fcntl.flock`` on
    ``.NAME.spectra-lock`` beside the destination (inside it when its folder may not be written but the
    destination is a folder that may). The kernel drops the lock when the process dies, so a run killed
    with SIGKILL never leaves a lock that blocks; the file holds the holder's pid, for the message."""

    def __init__(self, path: Path, lock_file: Path, fd: int) -> None:
        self.path, self.lock_file = path, lock_file
        self._fd: int | None = fd
        self.stage: Path | None = None  # the staging folder of the run that holds it (checkpoint.writers)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlink the lock file (while still holding it, so a waiter re-checks) and drop the lock."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.lock_file)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None
        _HELD.pop(_key(self.path), None)


_HELD: dict[str, OutputLock] = {}


def _key(path: Path) -> str:
    return os.path.realpath(path)


def _lock_file(real: Path) -> Path:
    beside = real.parent / f".{real.name}.spectra-lock"
    if os.access(real.parent, os.W_OK) or not real.is_dir():
        return beside
    return real / ".spectra-lock"


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip() or "0")
        if pid > 0:
            return f"another spectra run (pid {pid})"
    return "another spectra run"


def lock_output(path: str | os.PathLike[str], flag: str = "--out") -> OutputLock:
    """Take the exclusive lock on the output ``path`` (a folder written by ``flag``) for this process, or raise
    :class:`SpectraError` saying that another run is writing it. Release with :meth:`OutputLock.release` or
    :func:`release_locks`."""
    user = os.fspath(path)
    real = Path(_key(Path(user)))
    held = _HELD.get(str(real))
    if held is not None and held.held:
        raise SpectraError(
            f"{user}: another run in this process is writing it ({flag}); wait for it or choose another path"
        )
    try:
        real.parent.mkdir(parents=True, exist_ok=True)  # the run would create it anyway; the lock lives there
    except OSError as e:
        raise write_error(user, e) from e
    lock_file = _lock_file(real)
    for _ in range(100):
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(user, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            who = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SpectraError(
                    f"{user}: {who} is writing it ({flag}); wait for it to finish or choose another path"
                ) from None
            raise write_error(user, e) from e
        try:  # the file we locked must still be the one at lock_file (a releasing holder unlinks it)
            same = os.path.samestat(os.fstat(fd), os.stat(lock_file))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            lock = OutputLock(real, lock_file, fd)
            _HELD[str(real)] = lock
            return lock
        os.close(fd)
    raise SpectraError(f"{user}: could not lock it ({flag}); another run keeps replacing its lock")


def held_lock(path: str | os.PathLike[str]) -> OutputLock | None:
    """This process's lock on ``path``, if it holds one."""
    return _HELD.get(_key(Path(os.fspath(path))))


def release_locks() -> None:
    """Release every output lock this process holds (the CLI calls it when a command ends, however it ends)."""
    for lock in list(_HELD.values()):
        lock.release()
