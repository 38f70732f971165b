"""Each command's presentation, in one home: ``views/<command>.py`` holds its table columns, the note lines
under the table, its title, the HTML page's cards and figures (all functions of the results envelope, so a
live run and ``spectra report results.json`` share them), and its ``--plots DIR`` figure writers.

:data:`VIEWS` maps a command's name to its :class:`View`; a command with none gets :data:`GENERIC` (every
row field, the summary's scalars). To add a view: write ``views/<command>.py`` with ``title``, ``columns``,
``notes``, ``cards`` and ``figures`` of the envelope, and register it below.
"""

from __future__ import annotations

from types import ModuleType

from spectra_cli.report.views import (
    allocate,
    analyze,
    capture,
    check,
    compare,
    generic,
    init_adapter,
    merge,
    rankme,
    reconstruct,
    track,
)
from spectra_cli.report.views.common import Card, Env, View


def _of(module: ModuleType) -> View:
    return View(title=module.title, columns=module.columns, notes=module.notes, cards=module.cards,
                figures=module.figures)  # fmt: skip


GENERIC = _of(generic)

#: command name (as typed after ``spectra``) → its view
VIEWS: dict[str, View] = {
    "analyze": _of(analyze),
    "compare": _of(compare),
    "track": _of(track),
    "rankme": _of(rankme),
    "allocate": _of(allocate),
    "init-adapter": _of(init_adapter),
    "capture": _of(capture),
    "merge": _of(merge),
    "reconstruct": _of(reconstruct),
    "check": _of(check),
}

#: what a view raises on an envelope that lacks a field it reads (one from another spectra version, or a
#: hand-made one): the page then falls back to :data:`GENERIC`
UNREADABLE = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def view_for(command: str) -> View:
    """The view of ``command``; :data:`GENERIC` for a command without one."""
    return VIEWS.get(command, GENERIC)


def readable_view(env: Env) -> View:
    """The view of ``env['command']`` when it can read ``env`` (title, columns, notes and cards all build),
    else :data:`GENERIC`: a results file from another spectra version still gets a page."""
    view = view_for(env["command"])
    try:
        view.title(env), view.columns(env), view.notes(env), view.cards(env)
    except UNREADABLE:
        return GENERIC
    return view


__all__ = ["GENERIC", "UNREADABLE", "VIEWS", "Card", "Env", "View", "readable_view", "view_for"]
