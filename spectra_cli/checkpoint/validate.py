"""Guards shared by every reader of an input file: regular files only, bounded JSON, typed fields.

Each guard raises one :class:`~spectra_cli.errors.SpectraError` (``CheckpointError`` unless the caller names
another class) whose one-line message names the file, says what is wrong and what to do, so that a hostile or
damaged input ends in one ``Error:`` line, never a traceback or a hang:

- :func:`open_regular` / :func:`require_regular_file` refuse FIFOs, devices, sockets, folders and symlink
  loops *before* anything reads from them (opening a FIFO for reading blocks until a writer comes);
- :func:`parse_json` / :func:`load_json` turn invalid UTF-8, invalid JSON and absurd nesting (``RecursionError``
  in the parser, or any depth beyond :data:`MAX_DEPTH` that a later recursive walk would trip over) into one
  error;
- :class:`Fields` reads the members of a parsed JSON object with their types and ranges checked.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, NoReturn

from spectra_cli.errors import CheckpointError, SpectraError

#: the deepest nesting of arrays/objects accepted in a JSON input (spectra's own files nest fewer than 10
#: levels; Hugging Face configs fewer than 6)
MAX_DEPTH = 64

ErrorType = type[SpectraError]

_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _os_problem(path: Path | str, e: OSError, what: str) -> str:
    if isinstance(e, FileNotFoundError):
        return f"{path}: no such {what}"
    if e.errno == errno.ELOOP:
        return f"{path}: a symlink loop (the link points back at itself); give the real {what}"
    if isinstance(e, PermissionError):
        return f"{path}: permission denied; make the {what} readable"
    return f"{path}: cannot read the {what} ({e.strerror or e})"


def _kind_problem(path: Path | str, mode: int, what: str) -> str | None:
    if stat.S_ISREG(mode):
        return None
    kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return f"{path}: is {kind}, not a regular file; give the {what} itself"


def require_regular_file(path: Path | str, what: str = "file", error: ErrorType = CheckpointError) -> int:
    """Raise unless ``path`` (after symlinks) is a regular file; return its size in bytes. Nothing is
    opened, so a FIFO or a device is refused without blocking on it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(_os_problem(path, e, what)) from None
    problem = _kind_problem(path, st.st_mode, what)
    if problem:
        raise error(problem)
    return st.st_size


def open_regular(path: Path | str, what: str = "file", error: ErrorType = CheckpointError) -> IO[bytes]:
    """Open ``path`` for binary reading, refusing anything but a regular file. The file is opened
    non-blocking and checked with ``fstat`` on the open descriptor, so a FIFO never blocks and a path swapped
    between a check and the open cannot slip through."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise error(_os_problem(path, e, what)) from None
    try:
        problem = _kind_problem(path, os.fstat(fd).st_mode, what)
        if problem:
            raise error(problem)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path | str, what: str = "file", error: ErrorType = CheckpointError,
               limit: int | None = None) -> bytes:  # fmt: skip
    """The bytes of a regular file (see :func:`open_regular`); an error beyond ``limit`` bytes."""
    with open_regular(path, what, error) as f:
        try:
            data = f.read() if limit is None else f.read(limit + 1)
        except OSError as e:
            raise error(_os_problem(path, e, what)) from None
    if limit is not None and len(data) > limit:
        raise error(f"{path}: the {what} is larger than {limit} bytes; it cannot be a {what}")
    return data


def json_depth(obj: Any, stop: int | None = None) -> int:
    """The nesting depth of a parsed JSON value (a scalar is 0, ``[]`` is 1), without recursion; stops
    counting past ``stop``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if stop is not None and deepest > stop:
                return deepest
            stack.extend((v, depth) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


class JSONProblem(ValueError):
    """Why a text is not acceptable JSON: ``str(e)`` reads "not valid JSON (…)", "nested more than 64 levels deep" …"""


def decode_json(data: bytes | str, max_depth: int = MAX_DEPTH, unique_keys: bool = False) -> Any:
    """``json.loads`` that raises only :class:`JSONProblem` (invalid UTF-8, invalid JSON, nesting deeper than
    ``max_depth``, and with ``unique_keys`` an object that names a key twice)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            seen: set[str] = set()
            twice = next(k for k, _ in items if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise JSONProblem(f"the key {twice!r} appears twice")
        return out

    try:
        obj = json.loads(data, object_pairs_hook=pairs if unique_keys else None)
    except JSONProblem:
        raise
    except UnicodeDecodeError as e:
        raise JSONProblem(f"not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise JSONProblem(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise JSONProblem(f"nested more than {max_depth} levels deep") from None
    except ValueError as e:  # e.g. an integer literal of more digits than Python converts
        raise JSONProblem(f"not valid JSON ({first_line(e, 120)})") from None
    if json_depth(obj, max_depth) > max_depth:
        raise JSONProblem(f"nested more than {max_depth} levels deep")
    return obj


def parse_json(data: bytes | str, source: str, what: str = "JSON file", hint: str = "",
               error: ErrorType = CheckpointError, max_depth: int = MAX_DEPTH) -> Any:  # fmt: skip
    """Parse JSON text read from ``source``; any :class:`JSONProblem` becomes one ``error`` naming ``source``,
    the ``what`` and the ``hint`` (what to do)."""
    try:
        return decode_json(data, max_depth)
    except JSONProblem as e:
        raise error(f"{source}: the {what} is {e}" + (f"; {hint}" if hint else "")) from None


def load_json(path: Path | str, what: str = "JSON file", hint: str = "", error: ErrorType = CheckpointError,
              max_depth: int = MAX_DEPTH, limit: int | None = None) -> Any:  # fmt: skip
    """Read and parse a JSON file: a regular file only (:func:`open_regular`), then :func:`parse_json`."""
    return parse_json(read_bytes(path, what, error, limit), str(path), what, hint, error, max_depth)


# ---- typed values ----------------------------------------------------------------------------------------


def is_int(value: Any) -> bool:
    """A JSON integer (``bool`` is not one, although Python says it is an ``int``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite JSON number (not a bool, NaN or ±Infinity)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))


def type_name(value: Any) -> str:
    """How a JSON value is called in messages: ``a string``, ``a list``, ``true``, ``Infinity`` …"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, int) and value.bit_length() > 64:
        return "a huge number"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    names: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


_REQUIRED: Any = object()


class Fields:
    """Typed reads of the members of a parsed JSON object.

    ``Fields(obj, "adapter_config.json", hint="re-save the adapter with PEFT")`` raises at once unless ``obj``
    is an object; each getter returns the member with its type (and range) checked, ``default`` when it is
    absent (or null, with ``null_ok``), and otherwise raises one ``error``:
    ``<source>: <where>'r' must be a whole number ≥ 1, not a string; <hint>``.
    """

    def __init__(self, obj: Any, source: str, hint: str = "", error: ErrorType = CheckpointError,
                 where: str = "", what: str = "the file") -> None:  # fmt: skip
        self.source, self.hint, self.error, self.where = source, hint, error, where
        if not isinstance(obj, dict):
            self.fail(f"{what} must be a JSON object, not {type_name(obj)}", key=None)
        self.obj: dict[str, Any] = obj

    def fail(self, message: str, key: str | None = None) -> NoReturn:
        at = f"{self.where}{key!r} " if key is not None else self.where
        tail = f"; {self.hint}" if self.hint else ""
        raise self.error(f"{self.source}: {at}{message}{tail}")

    def _get(self, key: str, default: Any) -> tuple[bool, Any]:
        if key not in self.obj or (self.obj[key] is None and default is not _REQUIRED):
            if default is _REQUIRED:
                self.fail("is missing", key)
            return False, default
        return True, self.obj[key]

    def text(self, key: str, default: Any = _REQUIRED, choices: tuple[str, ...] = ()) -> Any:
        present, v = self._get(key, default)
        if present:
            if not isinstance(v, str):
                self.fail(f"must be a string, not {type_name(v)}", key)
            if choices and v not in choices:
                self.fail(f"must be one of {', '.join(choices)}, not {v!r}", key)
        return v

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int | None = None,
                maximum: int | None = None) -> Any:  # fmt: skip
        present, v = self._get(key, default)
        if present:
            check_int(v, lambda m: self.fail(m, key), minimum, maximum)
        return v

    def number(self, key: str, default: Any = _REQUIRED, minimum: float | None = None,
               positive: bool = False) -> Any:  # fmt: skip
        present, v = self._get(key, default)
        if present:
            check_number(v, lambda m: self.fail(m, key), minimum, positive)
        return float(v) if present else v

    def flag(self, key: str, default: Any = _REQUIRED) -> Any:
        present, v = self._get(key, default)
        if present and not isinstance(v, bool):
            self.fail(f"must be true or false, not {type_name(v)}", key)
        return v

    def mapping(self, key: str, default: Any = _REQUIRED) -> Any:
        present, v = self._get(key, default)
        if present and not isinstance(v, dict):
            self.fail(f"must be an object, not {type_name(v)}", key)
        return v

    def sequence(self, key: str, default: Any = _REQUIRED) -> Any:
        present, v = self._get(key, default)
        if present and not isinstance(v, list):
            self.fail(f"must be a list, not {type_name(v)}", key)
        return v

    def child(self, key: str, obj: Any, what: str) -> Fields:
        """The fields of a nested object (``where`` prefixes every message)."""
        return Fields(obj, self.source, self.hint, self.error, f"{self.where}{what}: ", f"{what}")


def check_int(value: Any, fail: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a whole number in [minimum, maximum], else ``fail(message)`` (which raises)."""
    lo = f" ≥ {minimum}" if minimum is not None else ""
    if not is_int(value):
        fail(f"must be a whole number{lo}, not {type_name(value)}")
    if minimum is not None and value < minimum:
        fail(f"must be a whole number{lo}, not {value}")
    if maximum is not None and value > maximum:
        fail(f"must be at most {maximum}, not {value}")
    return int(value)


def check_number(value: Any, fail: Any, minimum: float | None = None, positive: bool = False) -> float:
    """``value`` as a finite number (positive, or ≥ minimum), else ``fail(message)`` (which raises)."""
    if not is_number(value):
        fail(f"must be a finite number, not {type_name(value)}")
    if positive and value <= 0:
        fail(f"must be positive, not {value!r}")
    if minimum is not None and value < minimum:
        fail(f"must be at least {minimum:g}, not {value!r}")
    return float(value)


def str_map(value: Any) -> bool:
    """Whether ``value`` is a JSON object of strings (``{"key": "value", …}``)."""
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def safe_member_name(name: Any) -> str | None:
    """Why ``name`` cannot be a file inside a checkpoint folder (``None`` when it can): only a plain file name
    (no folder part, no ``..``, not absolute, no NUL) stays inside the folder whatever the file system."""
    if not isinstance(name, str):
        return f"is {type_name(name)}, not a file name"
    if not name or name in (".", ".."):
        return "is not a file name"
    if "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
        return "is not a plain file name in the checkpoint's folder (no folders, no absolute paths)"
    return None


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's text (its type name when it has none), at most ``limit`` characters."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


__all__ = [
    "MAX_DEPTH", "Fields", "JSONProblem", "check_int", "check_number", "decode_json", "first_line", "is_int",
    "is_number", "json_depth", "load_json", "open_regular", "parse_json", "read_bytes", "require_regular_file",
    "safe_member_name", "str_map", "type_name",
]  # fmt: skip
