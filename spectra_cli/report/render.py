"""The one renderer: an envelope of rows + summary → rich table, JSON, CSV or Markdown.

Data goes to stdout (``--output -`` too) or ``--output FILE`` (through the one output writer,
``checkpoint.output``); nothing here writes to stderr. Text from files is escaped for the terminal
(``report.terminal``) in tables, notes and Markdown. JSON has the envelope described in docs/architecture.md;
non-finite floats become ``null`` so that ``jq`` can read it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from spectra_cli import __version__
from spectra_cli.report.terminal import terminal_safe
from spectra_cli.results import summary_dict

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

SCHEMA_VERSION = 1
FORMATS = ("table", "json", "csv", "markdown")


@dataclass(frozen=True)
class Column:
    """A column of the human-readable views: row key, header, and a formatter."""

    key: str
    header: str
    fmt: Callable[[Any], str] = str
    justify: str = "right"


def envelope(command: str, inputs: dict[str, Any], rows: list[dict[str, Any]],
             summary: DataclassInstance | Mapping[str, Any],
             options: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The JSON envelope shared by every command (a typed summary is written as :func:`summary_dict` gives it)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "spectra_version": __version__,
        "inputs": inputs,
        "options": options or {},
        "rows": rows,
        "summary": summary_dict(summary),
    }


def json_safe(x: Any) -> Any:
    """``x`` as JSON can hold it: NaN/Inf → None, tuples → lists, NumPy scalars → Python numbers."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return json_safe(x.item())
    return x


def fmt_num(x: Any, digits: int = 3) -> str:
    """Compact number formatting for tables: '-' for missing/NaN, 'inf', ``digits`` decimals with trailing
    zeros dropped, scientific notation below 1e-3 and from 1e6."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10000 else str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
            return f"{x:.2e}"
        text = f"{x:.{digits}f}"
        return (text.rstrip("0").rstrip(".") if "." in text else text) or "0"
    return str(x)


def _to_json(env: dict[str, Any]) -> str:
    return json.dumps(json_safe(env), indent=2, allow_nan=False) + "\n"


def _to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(
            {k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in r.items()}
        )
    return buf.getvalue()


def _md_escape(s: str) -> str:
    return terminal_safe(s, newlines=False).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> list[str]:
    """The lines of a GitHub-flavoured Markdown table: a header, the alignment row (``---:`` for right-justified
    columns), one line per row with each cell formatted by its column and ``|`` escaped."""
    out = ["| " + " | ".join(c.header for c in columns) + " |"]
    out.append("| " + " | ".join("---:" if c.justify == "right" else ":---" for c in columns) + " |")
    for r in rows:
        out.append("| " + " | ".join(_md_escape(c.fmt(r.get(c.key))) for c in columns) + " |")
    return out


def _to_markdown(rows: list[dict[str, Any]], columns: Sequence[Column], title: str, notes: list[str]) -> str:
    out = [f"## {terminal_safe(title, newlines=False)}", "", *markdown_table(rows, columns)]
    if notes:
        out.append("")
        out.extend(f"- {_md_escape(n)}" for n in notes)
    return "\n".join(out) + "\n"


def _to_table(rows: list[dict[str, Any]], columns: Sequence[Column], title: str, notes: list[str], file: IO[str],
              width: int | None) -> None:  # fmt: skip
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # cells, title and notes come from files (tensor names, paths): Text, so Rich never parses them as markup,
    # and control characters escaped, so none reaches the terminal
    is_tty = hasattr(file, "isatty") and file.isatty()
    console = Console(file=file, width=width or (None if is_tty else 200), no_color=not is_tty,
                      highlight=False, soft_wrap=False)  # fmt: skip
    table = Table(title=Text(terminal_safe(title, newlines=False)), title_justify="left", show_edge=False,
                  pad_edge=False, header_style="bold")  # fmt: skip
    for c in columns:
        table.add_column(Text(terminal_safe(c.header, newlines=False)), justify=c.justify,  # type: ignore[arg-type]
                         overflow="fold")  # fmt: skip
    for r in rows:
        style = "red" if r.get("status") not in (None, "ok") else None
        table.add_row(*(Text(terminal_safe(c.fmt(r.get(c.key)), newlines=False)) for c in columns), style=style)
    console.print(table)
    for n in notes:
        console.print(Text(terminal_safe(n)))


def render(env: dict[str, Any], fmt: str, columns: Sequence[Column], title: str, notes: list[str],
           output: Path | None = None, width: int | None = None) -> None:  # fmt: skip
    """Render ``env`` as ``fmt`` to ``output`` (atomically) or stdout."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}")
    rows = env["rows"]
    if output is None or str(output) == "-":
        _emit(sys.stdout, env, rows, fmt, columns, title, notes, width)
        sys.stdout.flush()
        return
    buf = io.StringIO()
    _emit(buf, env, rows, fmt, columns, title, notes, width)
    write_text(output, buf.getvalue())


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to the output ``path`` through the one output writer
    (:func:`spectra_cli.checkpoint.output.write_text`): a regular file atomically (temporary name beside it,
    then renamed), a symlink's target, a device or FIFO in place, ``-`` to stdout."""
    from spectra_cli.checkpoint.output import write_text as write_output

    write_output(path, text)


def _emit(f: IO[str], env: dict[str, Any], rows: list[dict[str, Any]], fmt: str, columns: Sequence[Column],
          title: str, notes: list[str], width: int | None) -> None:  # fmt: skip
    if fmt == "json":
        f.write(_to_json(env))  # json.dumps escapes every control and non-ASCII character
    elif fmt == "csv":
        text = _to_csv(rows)
        if hasattr(f, "isatty") and f.isatty():  # data for programs, but not raw escapes on a terminal
            text = terminal_safe(text)
        f.write(text)
    elif fmt == "markdown":
        f.write(_to_markdown(rows, columns, title, notes))
    else:
        _to_table(rows, columns, title, notes, f, width)
