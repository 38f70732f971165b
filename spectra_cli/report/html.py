"""One self-contained HTML page from a results envelope (the ``--format json`` output of any command).

Pure rendering: ``render_html(envelope) -> str``. The page needs no network: CSS and a small table sorter are
inline, figures are PNGs drawn with matplotlib from the envelope's rows (the functions of
:mod:`spectra_cli.report.plots` and :mod:`spectra_cli.report.compare_plots`, into memory) and embedded as
``data:`` URIs, and a Content-Security-Policy forbids every other source. Every value taken from the envelope
is escaped with :func:`html.escape`.

Figures come from the rows alone, so a page made later from a CI artifact equals the one the run wrote:
figures that need more than the rows hold (``analyze``'s eigenvalue histograms need the singular values,
``compare``'s base-vs-tuned spectra the decompositions) are not on the page; ``--plots DIR`` draws them.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable, Sequence
from functools import partial
from html import escape
from pathlib import Path
from typing import Any, cast

from spectra_cli import __version__
from spectra_cli.errors import SpectraError
from spectra_cli.report.render import SCHEMA_VERSION, Column, _clean, fmt_num

Figure = tuple[str, bytes]  # (caption, PNG bytes)

#: envelope keys that are shown in their own sections (anything else goes under "other fields")
_ENVELOPE_KEYS = ("schema_version", "command", "spectra_version", "inputs", "options", "rows", "summary")
#: summary keys that are timings or the compute engine: shown with the provenance, not with the results
_PROVENANCE_KEYS = ("seconds", "decompose_seconds", "engine", "timings")


# ---- envelope ------------------------------------------------------------------------------------------


def normalise(env: dict[str, Any]) -> dict[str, Any]:
    """The envelope exactly as ``--format json`` writes it and ``json.load`` reads it back (NaN/Inf → None,
    NumPy scalars → Python, tuples → lists), so a page made from a run equals one made from its JSON."""
    return cast(dict[str, Any], json.loads(json.dumps(_clean(env), allow_nan=False)))


def check_envelope(obj: Any, source: str = "results") -> dict[str, Any]:
    """Validate a parsed results file; return it with ``inputs``/``options``/``summary`` defaulted to ``{}``.

    Raises :class:`SpectraError` (one line, naming ``source``) unless ``obj`` is an envelope of schema
    version :data:`SCHEMA_VERSION` with a ``command`` string and a list of ``rows`` objects."""
    from spectra_cli.checkpoint.validate import MAX_DEPTH, json_depth, type_name

    hint = "give the output of `spectra <command> --format json`"
    if not isinstance(obj, dict) or "schema_version" not in obj:
        raise SpectraError(f"{source}: not a spectra results envelope (no schema_version); {hint}")
    if json_depth(obj, MAX_DEPTH) > MAX_DEPTH:
        raise SpectraError(
            f"{source}: nested more than {MAX_DEPTH} levels deep, not a results envelope; {hint}"
        )
    version = obj["schema_version"]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        shown = (
            repr(version)
            if isinstance(version, int | float | str) and len(repr(version)) < 40
            else type_name(version)
        )
        raise SpectraError(
            f"{source}: schema_version {shown} is not supported (spectra {__version__} reads "
            f"{SCHEMA_VERSION}); render it with the spectra version that wrote it"
        )
    if not isinstance(obj.get("command"), str) or not obj["command"]:
        raise SpectraError(f"{source}: the envelope has no 'command'; {hint}")
    if not isinstance(obj.get("spectra_version", ""), str):
        raise SpectraError(f"{source}: 'spectra_version' must be a string; {hint}")
    if "rows" not in obj:
        raise SpectraError(f"{source}: the envelope has no 'rows'; {hint}")
    rows = obj["rows"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SpectraError(f"{source}: 'rows' must be a list of objects (one per matrix); {hint}")
    env = dict(obj)
    for key in ("inputs", "options", "summary"):
        value = env.get(key)
        if value is None:
            env[key] = {}
        elif not isinstance(value, dict):
            raise SpectraError(f"{source}: '{key}' must be an object, not {type(value).__name__}; {hint}")
    from spectra_cli.report.schema import envelope_problem

    problem = envelope_problem(env["command"], rows, env["summary"], env["options"])
    if problem:
        raise SpectraError(f"{source}: {problem}; {hint}")
    return env


def default_title(env: dict[str, Any]) -> str:
    """``spectra <command> <main input>``, as the command's table title reads."""
    inputs = env.get("inputs") or {}
    main = next((inputs[k] for k in ("checkpoint", "base", "path") if isinstance(inputs.get(k), str)), None)
    return f"spectra {env['command']}" + (f" {main}" if main else "")


# ---- cells ---------------------------------------------------------------------------------------------


def fmt_value(x: Any) -> str:
    """Any JSON value as table text: numbers by :func:`fmt_num`, lists comma-joined, objects as JSON."""
    if isinstance(x, list):
        return ", ".join(fmt_value(v) for v in x) if x else "-"
    if isinstance(x, dict):
        return json.dumps(x, separators=(", ", ": "))
    if x == "":
        return ""
    return fmt_num(x)


def _sort_key(x: Any) -> str:
    """The ``data-v`` attribute the sorter reads: full-precision numbers, '' for missing/NaN."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int | float):
        return repr(x)
    if isinstance(x, list):
        return ",".join(_sort_key(v) for v in x)
    if isinstance(x, dict):
        return json.dumps(x)
    return str(x)


def generic_columns(rows: list[dict[str, Any]]) -> list[Column]:
    """One column per key, in first-seen order: the view of a command that brings no columns of its own."""
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    out = []
    for k in keys:
        numeric = all(isinstance(r.get(k), int | float) or r.get(k) is None for r in rows)
        out.append(Column(k, k, fmt_value, "right" if numeric else "left"))
    return out


# ---- figures -------------------------------------------------------------------------------------------


def _png(draw: Callable[[Any], object]) -> bytes | None:
    """Run a plot function of report/plots.py on an in-memory file; None when it drew nothing."""
    buf = io.BytesIO()
    # the plot functions take a path for fig.savefig, which takes a binary file object just as well
    drawn = draw(cast(Path, buf))
    data = buf.getvalue()
    return data if data and drawn is not False else None


def _alpha_histogram(rows: list[dict[str, Any]], path: Any) -> bool:
    """Histogram of the fitted α over all matrices, with the 2 and 6 reading thresholds."""
    from spectra_cli.report.plots import _plt

    alphas = [
        r["alpha"] for r in rows if isinstance(r.get("alpha"), int | float) and math.isfinite(r["alpha"])
    ]
    if not alphas:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    ax.hist(alphas, bins=min(40, max(8, len(alphas) // 3)), color="#4C72B0", alpha=0.85)
    ax.axvline(2.0, color="#C44E52", ls="--", lw=1, label="α = 2 (below: over-trained)")
    ax.axvline(6.0, color="#DD8452", ls="--", lw=1, label="α = 6 (above: under-trained)")
    ax.legend(fontsize=8)
    ax.set_xlabel("power-law α of the ESD tail")
    ax.set_ylabel("matrices")
    ax.set_title(f"α over {len(alphas)} matrices")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _analyze_figures(env: dict[str, Any]) -> list[Figure]:
    from spectra_cli.report import plots

    rows = env["rows"]
    todo: list[tuple[str, Callable[[Any], object]]] = [
        ("Spectral metrics by depth, one line per module kind", lambda p: plots.plot_by_depth(rows, p)),
        ("Distribution of the heavy-tail exponent α", lambda p: _alpha_histogram(rows, p)),
    ]
    for key, label in (("effective_rank_ratio", "effective rank / min(m, n)"), ("alpha", "power-law α")):
        if not any(isinstance(r.get(key), int | float) and math.isfinite(r[key]) for r in rows):
            continue  # an empty heatmap says nothing
        todo.append((f"{label} by depth and kind", partial(plots.plot_heatmap, rows, key, label)))
    return _draw(todo)


def _compare_figures(env: dict[str, Any]) -> list[Figure]:
    from spectra_cli.report import compare_plots as cp
    from spectra_cli.report import plots

    summary = env["summary"]
    eps = [float(e) for e in summary.get("epsilons") or env["options"].get("epsilons") or [0.5]]
    names = list(dict.fromkeys(r.get("tuned") for r in env["rows"] if r.get("tuned") is not None))
    todo: list[tuple[str, Callable[[Any], object]]] = []
    for name in names:
        rows = [r for r in env["rows"] if r.get("tuned") == name]
        label = f"intruders (ε = {eps[0]:g}) — {name}"
        todo.append((f"{name}: intruder dimensions (ε = {eps[0]:g}) by depth and kind",
                     partial(plots.plot_heatmap, rows, "intruders", label, fmt=".0f")))  # fmt: skip
        if any(isinstance(r.get("max_cos"), list) and r["max_cos"] for r in rows):
            title = f"{name}: best match of each top tuned singular vector in the base"
            todo.append((title, partial(cp.plot_cosine_profile, rows, eps, title)))
        title = f"{name}: drift by depth, one line per module kind"
        todo.append((title, partial(plots.plot_by_depth, rows, metrics=cp.DRIFT_METRICS, title=title)))
    tuned = summary.get("tuned") or {}
    if len(names) > 1 and all(isinstance(tuned.get(n), dict) for n in names):
        key = f"{eps[0]:g}"
        totals = {str(n): int(tuned[n].get("total_intruders", {}).get(key) or 0) for n in names}
        todo.append(("Intruder dimensions per tuned model", lambda p: cp.plot_totals(totals, eps[0], p)))
    return _draw(todo)


def _generic_figures(env: dict[str, Any]) -> list[Figure]:
    """Rows with a depth and a kind: up to six of their numeric fields that vary, against depth."""
    from spectra_cli.report import plots

    rows = [r for r in env["rows"] if is_good(r.get("status"))]
    if not rows or not all(isinstance(r.get("depth"), int) and "kind" in r for r in rows):
        return []
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k, v in r.items() if _is_number(v) and k not in keys and k not in _NOT_METRICS)
    varying = [k for k in keys if _varies([r[k] for r in rows if _is_number(r.get(k))])]
    metrics = tuple((k, k.replace("_", " ")) for k in varying[:6])
    if not metrics:
        return []
    split = _series_field(rows)

    def series(r: dict[str, Any]) -> str:
        return f"{r['kind']} · {r[split]}" if split else str(r["kind"])

    flat = [{"depth": r["depth"], "kind": series(r), "status": "ok", **{k: r.get(k) for k in varying}}
            for r in rows]  # fmt: skip
    title = f"spectra {env['command']}: by depth, one line per module kind" + (
        f" and {split}" if split else ""
    )
    return _draw([(title, partial(plots.plot_by_depth, flat, metrics=metrics, title=title))])


_NOT_METRICS = {"depth", "rows", "cols", "line", "index", "seconds"}  # timings are not spectra


def _varies(values: list[float]) -> bool:
    """More than one value, beyond rounding (1e-9 relative): a constant drawn with an offset axis says nothing."""
    if len(values) < 2:
        return False
    lo, hi = min(values), max(values)
    return hi - lo > 1e-9 * max(abs(lo), abs(hi))


def _series_field(rows: list[dict[str, Any]]) -> str | None:
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


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def is_good(status: Any) -> bool:
    """Whether a row's status reads as fine (``ok``, ``pass``) or neutral (``skip``): not highlighted."""
    return status is None or str(status).lower() in _GOOD_STATUS


_GOOD_STATUS = {"", "ok", "pass", "passed", "skip", "skipped", "n/a"}


def _draw(todo: list[tuple[str, Callable[[Any], object]]]) -> list[Figure]:
    out: list[Figure] = []
    for caption, draw in todo:
        png = _png(draw)
        if png is not None:
            out.append((caption, png))
    return out


FIGURES: dict[str, Callable[[dict[str, Any]], list[Figure]]] = {
    "analyze": _analyze_figures,
    "compare": _compare_figures,
}


def figures(env: dict[str, Any]) -> list[Figure]:
    """The figures of the page: the command's own, or metrics by depth for rows that have a depth."""
    return FIGURES.get(env["command"], _generic_figures)(env)


# ---- key figures ---------------------------------------------------------------------------------------

Card = tuple[str, str, str]  # (label, value, detail)


def _num(x: Any, digits: int = 3) -> str:
    return fmt_num(x, digits) if x is not None else "-"


def _analyze_cards(env: dict[str, Any]) -> list[Card]:
    s = env["summary"]
    cards: list[Card] = [
        ("matrices analysed", f"{_num(s.get('analysed'))} / {_num(s.get('matrices'))}",
         f"{s['skipped_tensors']} non-matrix tensors skipped" if s.get("skipped_tensors") else ""),
        ("parameters", f"{s['params']:,}" if isinstance(s.get("params"), int) else "-", "in the analysed matrices"),
        ("mean α", _num(s.get("mean_alpha"), 2), "heavy-tail exponent; WeightWatcher reads 2–6 as well trained"),
        ("α < 2", _num(s.get("over_trained")), "over-trained matrices"),
        ("α > 6", _num(s.get("under_trained")), "under-trained matrices"),
        ("mean eff. rank ratio", _num(s.get("mean_effective_rank_ratio")), "effective rank / min(m, n)"),
        ("NaN/Inf matrices", str(len(s.get("nonfinite") or [])), "not decomposed"),
    ]  # fmt: skip
    return cards


def _compare_cards(env: dict[str, Any]) -> list[Card]:
    s = env["summary"]
    eps = s.get("epsilons") or [0.5]
    key = f"{float(eps[0]):g}"
    cards: list[Card] = []
    for name, t in (s.get("tuned") or {}).items():
        if not isinstance(t, dict):
            continue
        cards.append((f"{name}: intruders (ε = {key})", _num((t.get("total_intruders") or {}).get(key)),
                      f"{_num(t.get('matrices_with_intruders'))} of {_num(t.get('matrices'))} matrices have any"))  # fmt: skip
        cards.append((f"{name}: mean ‖ΔW‖/‖W‖", _num(t.get("mean_relative_delta")),
                      f"mean top-k subspace overlap {_num(t.get('mean_subspace_overlap'))}"))  # fmt: skip
    return cards


def _check_cards(env: dict[str, Any]) -> list[Card]:
    s = env["summary"]
    by_rule = s.get("by_rule") if isinstance(s.get("by_rule"), dict) else {}
    broken = [k for k, r in by_rule.items() if isinstance(r, dict) and r.get("failed")]
    ok = s.get("ok")
    verdict = "PASSED" if ok is True else "FAILED" if ok is False else "-"
    code = {"PASSED": "exit code 0: every rule holds", "FAILED": "exit code 1: a rule failed"}.get(
        verdict, ""
    )
    return [
        ("gate", verdict, code),
        ("failed", _num(s.get("failed")), ("rules: " + ", ".join(broken)) if broken else "no rule broken"),
        ("passed", _num(s.get("passed")), ""),
        ("skipped", _num(s.get("skipped")), "a rule could not apply (e.g. α not fitted)"),
        ("checks", _num(s.get("checks")), f"{len(by_rule)} rules, each on the modules it applies to"),
        ("modules", _num(s.get("modules")), "matrices checked"),
    ]


def _generic_cards(env: dict[str, Any]) -> list[Card]:
    s = env["summary"]
    return [
        (k.replace("_", " "), fmt_value(v), "")
        for k, v in s.items()
        if k not in _PROVENANCE_KEYS
        and (v is None or isinstance(v, int | float | bool) or (isinstance(v, str) and len(v) <= 24))
    ][:12]


CARDS: dict[str, Callable[[dict[str, Any]], list[Card]]] = {
    "analyze": _analyze_cards,
    "compare": _compare_cards,
    "check": _check_cards,
}


# ---- HTML pieces ---------------------------------------------------------------------------------------


def _e(x: Any) -> str:
    return escape(str(x), quote=True)


def _kv(data: Any, depth: int = 0) -> str:
    """A nested JSON value as nested tables: objects → key/value rows; lists of objects with scalar values →
    one table; other lists comma-joined."""
    if isinstance(data, dict):
        if not data:
            return '<span class="muted">(none)</span>'
        if len(data) > 1 and all(isinstance(v, dict) and v and _flat(v) for v in data.values()):
            return _records([{"": k, **v} for k, v in data.items()])
        body = "".join(f"<tr><th>{_e(k)}</th><td>{_kv(v, depth + 1)}</td></tr>" for k, v in data.items())
        return f'<table class="kv">{body}</table>'
    if isinstance(data, list):
        if data and all(isinstance(v, dict) and _flat(v) for v in data):
            return _records(data)
        if any(isinstance(v, dict | list) for v in data):
            return "<ol>" + "".join(f"<li>{_kv(v, depth + 1)}</li>" for v in data) + "</ol>"
        return _e(fmt_value(data)) if data else '<span class="muted">(none)</span>'
    if isinstance(data, str):
        return f"<code>{_e(data)}</code>" if data else '<span class="muted">""</span>'
    return _e(fmt_value(data))


def _flat(d: dict[str, Any]) -> bool:
    return all(not isinstance(v, dict) for v in d.values())


def _records(records: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for r in records:
        keys.extend(k for k in r if k not in keys)
    head = "".join(f"<th>{_e(k)}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f'<td data-v="{_e(_sort_key(r.get(k)))}">{_e(fmt_value(r.get(k)))}</td>' for k in keys)
        + "</tr>"
        for r in records
    )  # fmt: skip
    return f'<table class="records sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _rows_table(rows: list[dict[str, Any]], columns: Sequence[Column]) -> str:
    """The command's columns first, then every other field of the rows (hidden until 'all fields')."""
    main = [c for c in columns]
    shown = {c.key for c in main}
    extra = [c for c in generic_columns(rows) if c.key not in shown]
    head = "".join(
        f'<th class="{"num" if c.justify == "right" else "txt"}" title="{_e(c.key)}">{_e(c.header)}</th>'
        for c in main
    ) + "".join(
        f'<th class="x {"num" if c.justify == "right" else "txt"}">{_e(c.header)}</th>' for c in extra
    )
    body: list[str] = []
    for r in rows:
        status = r.get("status")
        cls = "" if is_good(status) else ' class="bad"'
        cells = [_cell(c, r, "") for c in main] + [_cell(c, r, "x") for c in extra]
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (
        f'<table id="rows-table" class="rows sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _cell(c: Column, r: dict[str, Any], cls: str) -> str:
    v = r.get(c.key)
    text = c.fmt(v) if v is not None else "-"
    classes = " ".join(x for x in (cls, "num" if c.justify == "right" else "txt") if x)
    return f'<td class="{classes}" data-v="{_e(_sort_key(v))}">{_e(text)}</td>'


def _cards(cards: list[Card]) -> str:
    if not cards:
        return ""
    items = "".join(
        f'<div class="card"><div class="label">{_e(label)}</div><div class="value">{_e(value)}</div>'
        + (f'<div class="detail">{_e(detail)}</div>' if detail else "")
        + "</div>"
        for label, value, detail in cards
    )
    return f'<div class="cards">{items}</div>'


def _png_width(png: bytes) -> int:
    """Pixel width from the PNG header (IHDR); multi-panel figures get a whole row of the grid."""
    return int.from_bytes(png[16:20], "big") if png[:8] == b"\x89PNG\r\n\x1a\n" else 0


def _figures_html(figs: list[Figure]) -> str:
    if not figs:
        return '<p class="muted">No figures: the rows carry nothing to draw.</p>'
    items = "".join(
        f'<figure class="plot{" wide" if _png_width(png) >= 1000 else ""}"><img alt="{_e(caption)}" '
        f'src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}"><figcaption>{_e(caption)}</figcaption></figure>'
        for caption, png in figs
    )
    return f'<div class="plots">{items}</div>'


# ---- the page ------------------------------------------------------------------------------------------


def render_html(
    env: dict[str, Any],
    *,
    title: str | None = None,
    columns: Sequence[Column] | None = None,
    notes: Sequence[str] = (),
    plots: bool = True,
) -> str:
    """The whole page for ``env`` (an envelope as :func:`check_envelope` accepts; run :func:`normalise` on
    one built in memory first).

    ``columns``: the table's leading columns, as the command's CLI table has them (every other row field
    follows, hidden until 'all fields' is ticked); default: every field. ``notes``: the CLI's note lines.
    ``plots=False`` leaves out the figures (no matplotlib import)."""
    env = check_envelope(env)
    rows: list[dict[str, Any]] = env["rows"]
    command = env["command"]
    title = title or default_title(env)
    summary = env["summary"]
    cols = list(columns) if columns is not None else generic_columns(rows)
    cards = CARDS.get(command, _generic_cards)(env)
    details = {k: v for k, v in summary.items() if k not in _PROVENANCE_KEYS}
    timings = {k: summary[k] for k in _PROVENANCE_KEYS if k in summary}
    other = {k: v for k, v in env.items() if k not in _ENVELOPE_KEYS}
    figs = figures(env) if plots and rows else []
    bad = sum(1 for r in rows if not is_good(r.get("status")))

    provenance: dict[str, Any] = {
        "command": command,
        "schema_version": env["schema_version"],
        "written by": f"spectra {env.get('spectra_version', '?')}",
        "page rendered by": f"spectra {__version__}",
        **timings,
        **other,
    }
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
        f'<meta name="generator" content="spectra {_e(__version__)}">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        '<header><div class="wrap">',
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub"><code>spectra {_e(command)}</code> · {len(rows)} rows'
        + (f' · <span class="badtext">{bad} not ok</span>' if bad else "")
        + f" · spectra {_e(env.get('spectra_version', '?'))}</p>",
        '<nav><a href="#summary">Summary</a><a href="#rows">Rows</a><a href="#plots">Figures</a>'
        '<a href="#provenance">Inputs &amp; provenance</a></nav>',
        '</div></header><main class="wrap">',
        '<section id="summary"><h2>Summary</h2>',
        _cards(cards),
    ]
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    if details:
        parts.append(f"<details><summary>All summary fields</summary>{_kv(details)}</details>")
    parts += [
        "</section>",
        f'<section id="rows"><h2>Rows <span class="count">({len(rows)})</span></h2>',
        '<div class="tools"><input id="filter" type="search" placeholder="filter rows…" aria-label="filter rows">'
        '<label><input id="allcols" type="checkbox"> all fields</label>'
        '<span class="muted">click a header to sort; click again to reverse</span></div>',
        f'<div class="table-wrap">{_rows_table(rows, cols)}</div>'
        if rows
        else '<p class="muted">No rows.</p>',
        "</section>",
        f'<section id="plots"><h2>Figures</h2>{_figures_html(figs)}</section>',
        '<section id="provenance"><h2>Inputs &amp; provenance</h2>',
        f"<h3>Inputs</h3>{_kv(env['inputs'])}",
        f"<h3>Options</h3>{_kv(env['options'])}",
        f"<h3>Run</h3>{_kv(provenance)}",
        "</section></main>",
        f'<footer class="wrap">Made by spectra {_e(__version__)} from a schema-{_e(env["schema_version"])} '
        "results envelope; self-contained, no network.</footer>",
        f"<script>{_JS}</script></body></html>",
    ]
    return "\n".join(parts) + "\n"


_CSS = """
:root{--fg:#1d2430;--muted:#667085;--bg:#ffffff;--panel:#f6f8fa;--line:#d8dee4;--accent:#2f6fb0;--bad:#b42318;
--badbg:#fef3f2;font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
@media (prefers-color-scheme:dark){:root{--fg:#e6e9ee;--muted:#9aa4b2;--bg:#0f1318;--panel:#171c23;
--line:#2b333d;--accent:#7fb0e8;--bad:#ff8a80;--badbg:#2a1615}.plot img{background:#fff}}
*{box-sizing:border-box}
body{margin:0;color:var(--fg);background:var(--bg);font-size:15px;line-height:1.5}
.wrap{max-width:1400px;margin:0 auto;padding:0 24px}
header{background:var(--panel);border-bottom:1px solid var(--line);padding:18px 0 6px}
h1{font-size:1.45rem;margin:0 0 4px;word-break:break-all}
h2{font-size:1.15rem;margin:30px 0 12px;padding-bottom:4px;border-bottom:1px solid var(--line)}
h3{font-size:1rem;margin:18px 0 6px;color:var(--muted)}
.sub{margin:0;color:var(--muted)}
nav{margin-top:10px}nav a{margin-right:18px;color:var(--accent);text-decoration:none;font-weight:500}
nav a:hover{text-decoration:underline}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em}
.muted,.count{color:var(--muted);font-weight:normal}
.badtext{color:var(--bad);font-weight:600}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px}
.card{background:var(--panel);border:1px solid var(--line);border-radius:8px;padding:10px 14px}
.card .label{color:var(--muted);font-size:.85rem}
.card .value{font-size:1.5rem;font-weight:600;font-variant-numeric:tabular-nums}
.card .detail{color:var(--muted);font-size:.82rem}
ul.notes{background:var(--panel);border-left:3px solid var(--accent);padding:8px 8px 8px 30px;
margin:16px 0;white-space:pre-wrap}
details{margin:12px 0}summary{cursor:pointer;color:var(--accent)}
.tools{display:flex;gap:18px;align-items:center;flex-wrap:wrap;margin-bottom:8px}
.tools input[type=search]{padding:5px 8px;border:1px solid var(--line);border-radius:6px;min-width:260px;
background:var(--bg);color:var(--fg)}
.table-wrap{max-height:75vh;overflow:auto;border:1px solid var(--line);border-radius:8px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
table.rows{width:100%;font-size:13.5px}
table.rows th,table.rows td{padding:4px 10px;border-bottom:1px solid var(--line);white-space:nowrap}
table.rows thead th{position:sticky;top:0;z-index:1;background:var(--panel);box-shadow:0 1px 0 var(--line)}
th{text-align:left;font-weight:600}
.num{text-align:right}.txt{text-align:left}
table.rows tbody tr:nth-child(even){background:color-mix(in srgb,var(--panel) 60%,transparent)}
table.rows tbody tr:hover{background:color-mix(in srgb,var(--accent) 12%,transparent)}
tr.bad td{color:var(--bad);background:var(--badbg)}
table.sortable thead th{cursor:pointer;user-select:none}
table.sortable thead th::after{content:"";display:inline-block;width:1em;color:var(--muted)}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
table.rows .x{display:none}table.rows.all .x{display:table-cell}
table.kv,table.records{font-size:13.5px;margin:2px 0}
table.kv th,table.kv td,table.records th,table.records td{padding:2px 10px 2px 0;vertical-align:top;
border-bottom:1px solid var(--line)}
table.kv th{color:var(--muted);font-weight:500}
table.records thead th{border-bottom:2px solid var(--line)}
ol{margin:0;padding-left:20px}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:16px}
figure.plot{margin:0;background:var(--panel);border:1px solid var(--line);border-radius:8px;padding:10px;
cursor:zoom-in}
figure.plot.wide{grid-column:1/-1;cursor:zoom-out}
figure.plot img{display:block;width:100%;height:auto}
figcaption{color:var(--muted);font-size:.85rem;margin-top:6px}
footer{color:var(--muted);font-size:.8rem;margin:40px auto 24px}
"""

_JS = """
(function(){
"use strict";
function cellKey(td){var v=td.getAttribute("data-v");return v===null?td.textContent:v;}
function isNum(s){return s!==""&&isFinite(Number(s));}
function sortTable(table,col,th){
  var body=table.tBodies[0];if(!body){return;}
  var rows=Array.prototype.slice.call(body.rows);
  var dir=th.getAttribute("aria-sort")==="ascending"?"descending":"ascending";
  var heads=table.tHead.rows[0].cells;
  for(var i=0;i<heads.length;i++){heads[i].removeAttribute("aria-sort");}
  th.setAttribute("aria-sort",dir);
  var keys=rows.map(function(r,i){return {r:r,i:i,k:cellKey(r.cells[col])};});
  var numeric=keys.every(function(x){return x.k===""||isNum(x.k);});
  var sign=dir==="ascending"?1:-1;
  keys.sort(function(a,b){
    var ea=a.k==="",eb=b.k==="";
    if(ea||eb){return ea&&eb?a.i-b.i:(ea?1:-1);}
    var c=numeric?Number(a.k)-Number(b.k):a.k.localeCompare(b.k,undefined,{numeric:true,sensitivity:"base"});
    return c!==0?sign*c:a.i-b.i;
  });
  var frag=document.createDocumentFragment();
  keys.forEach(function(x){frag.appendChild(x.r);});
  body.appendChild(frag);
}
Array.prototype.forEach.call(document.querySelectorAll("table.sortable"),function(table){
  if(!table.tHead){return;}
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,col){
    th.addEventListener("click",function(){sortTable(table,col,th);});
  });
});
var filter=document.getElementById("filter"),table=document.getElementById("rows-table");
if(filter&&table){filter.addEventListener("input",function(){
  var q=filter.value.toLowerCase();
  Array.prototype.forEach.call(table.tBodies[0].rows,function(r){
    r.style.display=!q||r.textContent.toLowerCase().indexOf(q)>=0?"":"none";});
});}
var all=document.getElementById("allcols");
if(all&&table){all.addEventListener("change",function(){table.classList.toggle("all",all.checked);});}
Array.prototype.forEach.call(document.querySelectorAll("figure.plot"),function(f){
  f.addEventListener("click",function(){f.classList.toggle("wide");});
});
})();
"""
