"""``init-adapter``: the rank, α and the method's own measures of each adapted module, and the page's cards.

The envelope does not record the ``--out`` folder, so the notes name the adapter and residual relative to it;
the live table names them in full through :func:`with_out`."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from spectra_cli.report.render import Column, fmt_num, plural
from spectra_cli.report.views import generic
from spectra_cli.report.views.common import Card, Env, View, num

if TYPE_CHECKING:
    from spectra_cli.report.plots import Figure

_KNOWN = {"name", "kind", "depth", "shape", "dtype", "rank", "alpha", "scale", "seconds"}
_HEADERS = {
    "energy": "energy",
    "relative_error": "rel. error",
    "sigma_r": "σ_r",
    "explained_variance": "expl. var.",
    "relative_residual": "residual ‖W_res‖/‖W‖",
    "damping": "damping λ",
    "quant_error": "quant. error",
    "first_error": "error (step 1)",
    "recovered": "recovered (act.)",
    "weight_recovered": "recovered (‖ΔW‖)",
}


def title(env: Env) -> str:
    return f"spectra init-adapter {env['inputs']['checkpoint']} --method {env['options']['method']}"


def columns(env: Env) -> list[Column]:
    """module, shape, rank, alpha, then every other field the method adds to the rows."""
    cols = [
        Column("name", "module", str, "left", shorten=True),
        Column("shape", "shape"),
        Column("rank", "rank"),
        Column("alpha", "alpha", lambda x: "-" if x is None else fmt_num(x)),
    ]
    extra: list[str] = []
    for r in env["rows"]:
        extra += [k for k in r if k not in _KNOWN and k not in extra]
    cols += [Column(k, _HEADERS.get(k, k), lambda x: "-" if x is None else fmt_num(x)) for k in extra]
    return cols


def notes(env: Env, out: str | Path | None = None) -> list[str]:
    """The run in lines; ``out`` is the --out folder (the envelope does not hold it: without it the adapter
    and residual are named relative to it)."""
    s = env["summary"]
    folder = str(out) if out is not None else "<--out>"
    ranks = ", ".join(f"r={k}: {v}" for k, v in s["ranks"].items())
    lines = [
        f"{s['method']}: {plural(s['modules'], 'module', 'modules')} ({ranks}), "
        f"{plural(s['adapter_parameters'], 'adapter parameter', 'adapter parameters')}",
        f"adapter: {folder}/adapter"
        + (f"; residual: {folder}/residual ({s['residual_dtype']})" if s["residual"] else ""),
    ]
    if s["dropped"]:
        lines.append(f"modules without adapter (rank 0): {len(s['dropped'])}")
    if "max_relative_error" in s:
        what = "‖W − Q − sBA‖/‖W‖" if s["method"] == "loftq" else "‖ΔW − sBA‖/‖ΔW‖"
        lines.append(f"max relative reconstruction error {what}: {s['max_relative_error']:.3g}")
    lines.append(f"{s['seconds']:.2f} s on {s['device']}, peak RSS {s['peak_rss_mb']:.0f} MB")
    return lines


def cards(env: Env) -> list[Card]:
    s = env["summary"]
    ranks = s.get("ranks") or {}
    out: list[Card] = [
        ("method", str(s.get("method") or "-"), str(s.get("reference") or "")[:120]),
        ("modules", num(s.get("modules")), ", ".join(f"r={k}: {v}" for k, v in ranks.items())),
        ("adapter parameters", num(s.get("adapter_parameters")), "trainable LoRA parameters"),
        ("residual", "yes" if s.get("residual") else "no",
         f"dtype {s['residual_dtype']}" if s.get("residual") else "the base model is used as is"),
        ("without adapter", str(len(s.get("dropped") or [])), "modules that got rank 0"),
    ]  # fmt: skip
    if "max_relative_error" in s:
        out.append(("max rel. error", num(s["max_relative_error"]), "‖ΔW − sBA‖/‖ΔW‖ over the modules"))
    return out


def figures(env: Env) -> list[Figure]:
    return generic.figures(env)


def with_out(view: View, out: str | Path) -> View:
    """``view`` whose notes name the adapter and residual inside ``out`` (what the live table shows)."""
    return dataclasses.replace(view, notes=partial(notes, out=out))
