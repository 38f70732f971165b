"""One self-contained HTML page from a results envelope (the ``--format json`` output of any command).

Pure rendering: ``render_html(envelope) -> str``; :func:`html_page` is what ``--html FILE`` and ``spectra
report`` write. What the page shows of a command (title, table columns, notes, cards, figures) is the
command's view (:mod:`spectra_cli.report.views`). The page needs no network: CSS and a small table sorter are
inline, figures are PNGs drawn with matplotlib into memory and embedded as ``data:`` URIs, and a
Content-Security-Policy forbids every other source. Every value taken from the envelope is escaped with
:func:`html.escape`.

Figures come from the envelope alone, so a page made later from a CI artifact equals the one the run wrote:
figures that need more than the envelope holds (``analyze``'s eigenvalue histograms need the singular values,
``compare``'s base-vs-tuned spectra the decompositions) are not on the page; ``--plots DIR`` draws them.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from spectra_cli import __version__
from spectra_cli.errors import SpectraError
from spectra_cli.report.render import SCHEMA_VERSION, Column, json_safe
from spectra_cli.report.views import GENERIC, UNREADABLE, Card, View, readable_view
from spectra_cli.report.views.common import fmt_value, is_good
from spectra_cli.report.views.generic import PROVENANCE_KEYS, generic_columns

if TYPE_CHECKING:
    from spectra_cli.report.plots import Figure

#: envelope keys that are shown in their own sections (anything else goes under "other fields")
_ENVELOPE_KEYS = ("schema_version", "command", "spectra_version", "inputs", "options", "rows", "summary")


# ---- envelope ------------------------------------------------------------------------------------------


def normalise(env: dict[str, Any]) -> dict[str, Any]:
    """The envelope exactly as ``--format json`` writes it and ``json.load`` reads it back (NaN/Inf → None,
    NumPy scalars → Python, tuples → lists), so a page made from a run equals one made from its JSON."""
    return cast(dict[str, Any], json.loads(json.dumps(json_safe(env), allow_nan=False)))


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


# ---- cells ---------------------------------------------------------------------------------------------


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


def _figures(view: View, env: dict[str, Any]) -> list[Figure]:
    """The view's figures; the generic ones when the view cannot draw this envelope (one it can read only
    in part, e.g. from another spectra version)."""
    try:
        return view.figures(env)
    except UNREADABLE:
        return GENERIC.figures(env)


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
    notes: Sequence[str] | None = None,
    plots: bool = True,
) -> str:
    """The whole page for ``env`` (an envelope as :func:`check_envelope` accepts; run :func:`normalise` on
    one built in memory first), as the command's view shows it (:func:`readable_view`).

    ``title``, ``columns`` (the table's leading columns: every other row field follows, hidden until 'all
    fields' is ticked) and ``notes`` replace the view's. ``plots=False`` leaves out the figures (no
    matplotlib import)."""
    env = check_envelope(env)
    rows: list[dict[str, Any]] = env["rows"]
    command = env["command"]
    view = readable_view(env)
    title = title or view.title(env)
    summary = env["summary"]
    cols = list(columns) if columns is not None else view.columns(env)
    notes = list(notes) if notes is not None else view.notes(env)
    cards = view.cards(env)
    details = {k: v for k, v in summary.items() if k not in PROVENANCE_KEYS}
    timings = {k: summary[k] for k in PROVENANCE_KEYS if k in summary}
    other = {k: v for k, v in env.items() if k not in _ENVELOPE_KEYS}
    figs = _figures(view, env) if plots and rows else []
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
        f'<p class="sub"><code>spectra {_e(command)}</code> · {len(rows)} {"row" if len(rows) == 1 else "rows"}'
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


def html_page(env: dict[str, Any], title: str | None = None) -> str:
    """The page of an envelope, in memory or read back from its JSON: both give the same page (what
    ``--html FILE`` writes and ``spectra report`` makes later)."""
    return render_html(check_envelope(normalise(env)), title=title)


def write_html(env: dict[str, Any], path: Path, title: str | None = None) -> None:
    """Write :func:`html_page` to ``path`` atomically (a temporary name beside it, then a rename)."""
    from spectra_cli.report.render import write_text

    write_text(path, html_page(env, title))


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
