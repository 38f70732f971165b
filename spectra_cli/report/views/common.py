"""What every view is made of: the :class:`View` record, the envelope type, and the small formatters the views
share. A view reads the results envelope (a dict, as ``--format json`` writes it) and nothing else, so one
function serves a live run and ``spectra report results.json``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spectra_cli.report.render import Column, fmt_num

if TYPE_CHECKING:
    from spectra_cli.report.plots import Figure

Env = dict[str, Any]  # the envelope: schema_version, command, spectra_version, inputs, options, rows, summary
Card = tuple[str, str, str]  # an HTML summary card: (label, value, detail)
Row = dict[str, Any]


@dataclass(frozen=True)
class View:
    """How one command's results are shown, each part a function of the envelope.

    ``title``, ``columns`` and ``notes`` make the table (and its Markdown); the HTML page adds ``cards`` (key
    figures) and ``figures`` (PNGs drawn from the rows). ``rows``, when set, gives the rows the table and
    Markdown show instead of the envelope's (``--format json``/``csv`` always hold the envelope's rows);
    ``markdown``, when set, gives the whole ``--format markdown`` document instead of the table."""

    title: Callable[[Env], str]
    columns: Callable[[Env], list[Column]]
    notes: Callable[[Env], list[str]]
    cards: Callable[[Env], list[Card]]
    figures: Callable[[Env], list[Figure]]
    rows: Callable[[Env], list[Row]] | None = None
    markdown: Callable[[Env], str] | None = None


def num(x: Any, digits: int = 3) -> str:
    """A card value: :func:`fmt_num`, '-' when missing."""
    return fmt_num(x, digits) if x is not None else "-"


def fmt_value(x: Any) -> str:
    """Any JSON value as table text: numbers by :func:`fmt_num`, lists comma-joined, objects as JSON."""
    if isinstance(x, list):
        return ", ".join(fmt_value(v) for v in x) if x else "-"
    if isinstance(x, dict):
        return json.dumps(x, separators=(", ", ": "))
    if x == "":
        return ""
    return fmt_num(x)


def dash(x: Any) -> str:
    """A whole number or text cell: '-' when missing."""
    return "-" if x is None else str(x)


def number(digits: int = 3) -> Callable[[Any], str]:
    """A number cell with ``digits`` decimals ('-' when missing)."""
    return lambda x: fmt_num(x, digits)


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


_GOOD_STATUS = {"", "ok", "pass", "passed", "skip", "skipped", "n/a"}


def is_good(status: Any) -> bool:
    """Whether a row's status reads as fine (``ok``, ``pass``) or neutral (``skip``): not highlighted."""
    return status is None or str(status).lower() in _GOOD_STATUS
