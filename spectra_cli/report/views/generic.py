"""The view of a command that brings none of its own (or of an envelope its view cannot read, e.g. one from
another spectra version): every row field as a column, the summary's scalars as cards, and its rows' numeric
fields against depth as one figure."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from spectra_cli.report.render import Column
from spectra_cli.report.views.common import Card, Env, Row, fmt_value, is_good, is_number

if TYPE_CHECKING:
    from spectra_cli.report.plots import Figure

#: summary keys that are timings or the compute engine: shown with the provenance, not with the results
PROVENANCE_KEYS = ("seconds", "decompose_seconds", "engine", "timings")


def title(env: Env) -> str:
    """``spectra <command> <main input>``, as the command's table title reads."""
    inputs = env.get("inputs") or {}
    main = next((inputs[k] for k in ("checkpoint", "base", "path") if isinstance(inputs.get(k), str)), None)
    return f"spectra {env['command']}" + (f" {main}" if main else "")


def generic_columns(rows: list[Row]) -> list[Column]:
    """One column per key, in first-seen order; right-justified when every value is a number or missing."""
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    out = []
    for k in keys:
        numeric = all(isinstance(r.get(k), int | float) or r.get(k) is None for r in rows)
        out.append(Column(k, k, fmt_value, "right" if numeric else "left"))
    return out


def columns(env: Env) -> list[Column]:
    return generic_columns(env["rows"])


def notes(env: Env) -> list[str]:
    return []


def cards(env: Env) -> list[Card]:
    """Up to twelve scalar summary fields (short strings, numbers, booleans), timings left out."""
    s = env["summary"]
    return [
        (k.replace("_", " "), fmt_value(v), "")
        for k, v in s.items()
        if k not in PROVENANCE_KEYS
        and (v is None or isinstance(v, int | float | bool) or (isinstance(v, str) and len(v) <= 24))
    ][:12]


_NOT_METRICS = {"depth", "rows", "cols", "line", "index", "seconds"}  # timings are not spectra


def figures(env: Env) -> list[Figure]:
    """Rows with a depth and a kind: up to six of their numeric fields that vary, against depth."""
    from spectra_cli.report import plots

    rows = [r for r in env["rows"] if is_good(r.get("status"))]
    if not rows or not all(isinstance(r.get("depth"), int) and "kind" in r for r in rows):
        return []
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k, v in r.items() if is_number(v) and k not in keys and k not in _NOT_METRICS)
    varying = [k for k in keys if _varies([r[k] for r in rows if is_number(r.get(k))])]
    metrics = tuple((k, k.replace("_", " ")) for k in varying[:6])
    if not metrics:
        return []
    split = _series_field(rows)

    def series(r: Row) -> str:
        return f"{r['kind']} · {r[split]}" if split else str(r["kind"])

    flat = [{"depth": r["depth"], "kind": series(r), "status": "ok", **{k: r.get(k) for k in varying}}
            for r in rows]  # fmt: skip
    caption = f"spectra {env['command']}: by depth, one line per module kind" + (
        f" and {split}" if split else ""
    )
    return plots.draw_figures([(caption, partial(plots.plot_by_depth, flat, metrics=metrics, title=caption))])


def _varies(values: list[Any]) -> bool:
    """More than one value, beyond rounding (1e-9 relative): a constant drawn with an offset axis says nothing."""
    if len(values) < 2:
        return False
    lo, hi = min(values), max(values)
    return bool(hi - lo > 1e-9 * max(abs(lo), abs(hi)))


def _series_field(rows: list[Row]) -> str | None:
    """When several rows share a depth and kind (merge: one row per module × task; rows per tuned model or
    input), the field that tells them apart with the fewest values, so each gets its own line; else None."""
    if len({(r["depth"], r["kind"]) for r in rows}) == len(rows):
        return None
    best: tuple[int, str] | None = None
    for k in rows[0]:
        if k in ("depth", "kind") or not all(isinstance(r.get(k), str) for r in rows):
            continue
        if len({(r["depth"], r["kind"], r[k]) for r in rows}) != len(rows):
            continue
        n = len({r[k] for r in rows})
        if n <= 12 and (best is None or n < best[0]):
            best = (n, k)
    return best[1] if best else None
