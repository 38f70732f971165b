"""``capture``: the input statistics written per module (tokens, principal components, convergence)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spectra_cli.report.render import Column, fmt_num, plural
from spectra_cli.report.views import generic
from spectra_cli.report.views.common import Card, Env, dash, num

if TYPE_CHECKING:
    from spectra_cli.report.plots import Figure


def title(env: Env) -> str:
    return f"spectra capture {env['inputs']['model']}"


def columns(env: Env) -> list[Column]:
    return [
        Column("name", "module", str, "left", shorten=True),
        Column("in_features", "in"),
        Column("tokens", "tokens", lambda x: f"{x:,}" if isinstance(x, int) else dash(x)),
        Column("alias_of", "shares input with", lambda x: x or "-", "left", shorten=True),
        Column("components", "k"),
        Column("explained_variance", "expl. var (k)", fmt_num),
        Column("top_ratio", "top ratio", fmt_num, default=False),
        Column("converged", "converged", dash),
    ]


def notes(env: Env) -> list[str]:
    s = env["summary"]
    lines = [
        f"{plural(s['modules'], 'module', 'modules')} ({plural(s['unique_inputs'], 'distinct input', 'distinct inputs')})"
        f" over {plural(s['tokens'], 'token', 'tokens')} from {plural(s['examples'], 'example', 'examples')}, "
        f"written to {s['out']}"
    ]
    if s["not_converged"]:
        lines.append(
            f"{plural(len(s['not_converged']), 'input has', 'inputs have')} components whose last update moved them "
            "(cosine < τ = "
            f"{s['tau']:g}); more data (--max-tokens) makes the PCA steadier"
        )
    lines.append(f"{s['seconds']:.2f} s")
    return lines


def cards(env: Env) -> list[Card]:
    s = env["summary"]
    return [
        ("modules", num(s.get("modules")), f"{num(s.get('unique_inputs'))} distinct inputs"),
        ("tokens", num(s.get("tokens")), f"from {num(s.get('examples'))} examples"),
        ("not converged", str(len(s.get("not_converged") or [])),
         f"inputs whose components still moved (cosine < τ = {num(s.get('tau'))})"),
        ("written to", str(s.get("out") or "-"), "the activations file"),
    ]  # fmt: skip


def figures(env: Env) -> list[Figure]:
    return generic.figures(env)
