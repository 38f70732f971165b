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
import os
import re
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


#: table width when stdout is not a terminal and $COLUMNS is unset
DEFAULT_WIDTH = 100
ELLIPSIS = "…"


@dataclass(frozen=True)
class Column:
    """A column of the human-readable views: row key, header, a formatter and its justification.

    ``default``: shown in the table without ``--wide``/``--columns`` (each view's default set fits 100
    columns). ``shorten``: a name column, shortened in the middle (:func:`shorten_name`) to fit the terminal
    instead of wrapping. Right-justified (numeric) cells never wrap."""

    key: str
    header: str
    fmt: Callable[[Any], str] = str
    justify: str = "right"
    default: bool = True
    shorten: bool = False


def plural(n: int, one: str, many: str) -> str:
    """``1 matrix``, ``2 matrices``: ``n`` with the word that fits it."""
    return f"{n:,} {one if n == 1 else many}"


def table_width(file: IO[str] | None = None) -> int:
    """The width tables are laid out for: the terminal's when ``file`` is one, else ``$COLUMNS``, else 100."""
    if file is not None and hasattr(file, "isatty") and file.isatty():
        import shutil

        return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    try:
        width = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        return DEFAULT_WIDTH
    return width if width > 0 else DEFAULT_WIDTH


def shorten_name(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters, shortened in the middle with an ellipsis: the dotted parts up to
    the first number (the layer) and as many trailing parts (the module kind) as fit stay whole —
    ``encoder.layer.3.attention.self.value.weight`` → ``encoder.layer.3.…self.value``, or ``…layer.3.…self.value``
    when dropping the head's leading parts keeps more of the kind (a trailing ``weight`` or ``bias`` goes first,
    without an ellipsis, when space is short); a name with no such shape keeps its first and last characters."""
    if len(name) <= width:
        return name
    width = max(width, 5)
    parts = name.split(".")
    if len(parts) > 2 and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
        if len(".".join(parts)) <= width:
            return ".".join(parts)
    layer = next((i for i, p in enumerate(parts) if re.fullmatch(r"\d+", p)), None)
    if layer is not None and layer < len(parts) - 1:
        # candidates: the whole head (``encoder.layer.3.``), then heads without their leading parts
        # (``…layer.3.``); each keeps as many trailing parts (the kind) as fit; the one keeping most of the kind
        # wins, the whole head on a tie
        best: tuple[int, str] | None = None
        for k in range(max(layer, 1)):  # keep the part before the number (``layer.3``)
            head = ("" if k == 0 else ELLIPSIS) + ".".join(parts[k : layer + 1]) + "."
            rest = parts[layer + 1 :]
            kept = 0
            while kept < len(rest):
                tail = ".".join(rest[len(rest) - kept - 1 :])
                gap = "" if kept + 1 == len(rest) else ELLIPSIS
                if len(head) + len(gap) + len(tail) > width:
                    break
                kept += 1
            if kept:
                gap = "" if kept == len(rest) else ELLIPSIS
                cand = head + gap + ".".join(rest[len(rest) - kept :])
                if best is None or kept > best[0]:
                    best = (kept, cand)
        if best is not None:
            return best[1]
    left = (width - 1) // 2
    return name[:left] + ELLIPSIS + name[len(name) - (width - 1 - left) :]


def select_columns(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]], chosen: Sequence[str] | None,
                   wide: bool = False) -> list[Column]:  # fmt: skip
    """The table's columns: ``chosen`` keys in that order (a key of the rows with no column of its own gets a
    plain one), else every column with ``wide``, else the view's default set. An unknown key raises
    ``ValueError`` naming the valid ones."""
    if chosen:
        by_key = {c.key: c for c in columns}
        valid = list(by_key)
        for r in rows:
            valid.extend(k for k in r if k not in valid)
        unknown = [k for k in chosen if k not in valid]
        if unknown:
            raise ValueError(f"unknown column {', '.join(unknown)}; choose from {', '.join(valid)}")
        return [
            by_key.get(k) or Column(k, k, _cell, "right" if _numeric(rows, k) else "left") for k in chosen
        ]
    return list(columns) if wide else [c for c in columns if c.default]


def _cell(x: Any) -> str:
    if isinstance(x, list):
        return ", ".join(_cell(v) for v in x) if x else "-"
    if isinstance(x, dict):
        return json.dumps(x, separators=(", ", ": "))
    return fmt_num(x)


def _numeric(rows: Sequence[Mapping[str, Any]], key: str) -> bool:
    return any(isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool) for r in rows)


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
    width = width or table_width(file)
    console = Console(file=file, width=width, no_color=not is_tty, highlight=False, soft_wrap=False)
    # the title on its own line: as the table's title Rich would wrap it to the table's width
    console.print(Text(terminal_safe(title, newlines=False)), soft_wrap=True)
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    cells = [[terminal_safe(c.fmt(r.get(c.key)), newlines=False) for c in columns] for r in rows]
    widths = [max([len(c.header)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    # names are shortened in the middle to what the other columns leave (each column costs 3 more: padding
    # and the rule), never below 20 characters; numbers and other cells never wrap
    short = [i for i, c in enumerate(columns) if c.shorten]
    if short:
        others = sum(w + 3 for i, w in enumerate(widths) if i not in short)
        room = max(20, (width - others) // len(short) - 3)
        for row in cells:
            for i in short:
                row[i] = shorten_name(row[i], room)
    for c in columns:
        table.add_column(Text(terminal_safe(c.header, newlines=False)), justify=c.justify,  # type: ignore[arg-type]
                         no_wrap=c.justify == "right" or c.shorten, overflow="fold" if c.justify == "left"
                         and not c.shorten else "ellipsis")  # fmt: skip
    for r, row in zip(rows, cells, strict=True):
        style = "red" if r.get("status") not in (None, "ok") else None
        table.add_row(*(Text(cell) for cell in row), style=style)
    console.print(table)
    for n in notes:  # whole lines, never wrapped: they are read and grepped
        console.print(Text(terminal_safe(n)), soft_wrap=True)


def render(env: dict[str, Any], fmt: str, columns: Sequence[Column], title: str, notes: list[str],
           output: Path | None = None, width: int | None = None, chosen: Sequence[str] | None = None,
           wide: bool = False) -> None:  # fmt: skip
    """Render ``env`` as ``fmt`` to ``output`` (atomically) or stdout. The table shows ``chosen`` columns, all
    with ``wide``, else the view's default set (:func:`select_columns`); Markdown shows every column unless
    ``chosen``; JSON and CSV always hold every row field."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}")
    rows = env["rows"]
    columns = select_columns(columns, rows, chosen, wide=wide or fmt == "markdown")
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
