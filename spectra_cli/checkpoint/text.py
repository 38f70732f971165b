"""Text data for ``capture`` and ``rankme --model``: one example per non-empty line of a UTF-8 text file, or
the ``text_field`` of every object of a JSONL file, read lazily (the file may be larger than memory)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from spectra_cli.errors import SpectraError


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise SpectraError(f"{path}: no such data file" if not path.exists() else f"{path}: not a regular file")
    try:
        with path.open(encoding="utf-8") as f:
            yield from enumerate(f, 1)
    except UnicodeDecodeError as e:
        raise SpectraError(f"{path}: not UTF-8 text ({e.reason}); give a UTF-8 file, one text per line") from None
    except OSError as e:
        raise SpectraError(f"{path}: cannot read ({e.strerror})") from None


def iter_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """Examples from a text file (one per non-empty line) or a JSONL file (``text_field`` of every object),
    read lazily line by line (the file may be larger than memory)."""
    path = Path(path)
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    for i, line in _lines(path):
        if not line.strip():
            continue
        if not jsonl:
            yield line.rstrip("\r\n")
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise SpectraError(f"{path}:{i}: not a JSON line ({msg}); use one JSON object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise SpectraError(f"{path}:{i}: no string field {text_field!r}; name the field with --text-field")
        yield obj[text_field]


def read_texts(path: Path, text_field: str = "text") -> list[str]:
    """All examples of :func:`iter_texts`, stripped; an error for a file that holds none."""
    texts = [t.strip() for t in iter_texts(path, text_field) if t.strip()]
    if not texts:
        raise SpectraError(f"{path}: holds no text; give one text per line")
    return texts
