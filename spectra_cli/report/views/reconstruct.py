"""``reconstruct``: the error of each rebuilt module of one task of an rmm bundle."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spectra_cli.report.render import Column, fmt_num, plural
from spectra_cli.report.views import generic
from spectra_cli.report.views.common import Card, Env, dash, num

if TYPE_CHECKING:
    from spectra_cli.report.plots import Figure


def title(env: Env) -> str:
    return f"spectra reconstruct {env['inputs']['bundle']} --task {env['inputs']['task']}"


def columns(env: Env) -> list[Column]:
    return [
        Column("module", "module", str, "left", shorten=True),
        Column("shape", "shape"),
        Column("p", "p"),
        Column("rel_error", "rel. error", fmt_num),
        Column("storage", "storage", fmt_num),
        Column("lora_rank", "rank", dash),
    ]


def notes(env: Env) -> list[str]:
    s = env["summary"]
    return [
        f"task {s['task']} ({s['kind']}): {plural(s['modules'], 'module', 'modules')}, mean relative error "
        f"{fmt_num(s['mean_rel_error'])}, max {fmt_num(s['max_rel_error'])}; bundle storage {fmt_num(s['storage'])}",
        f"wrote {s['output']} in {s['seconds']:.2f} s",
    ]


def cards(env: Env) -> list[Card]:
    s = env["summary"]
    kind = "PEFT LoRA adapter" if s.get("kind") == "adapter" else "checkpoint"
    return [
        ("task", str(s.get("task") or "-"), f"rebuilt as a {kind}"),
        ("modules", num(s.get("modules")), ""),
        ("mean rel. error", num(s.get("mean_rel_error")), f"max {num(s.get('max_rel_error'))}"),
        ("bundle storage", num(s.get("storage")), "fraction of the inputs' numbers"),
        ("written to", str(s.get("output") or "-"), ""),
    ]


def figures(env: Env) -> list[Figure]:
    return generic.figures(env)
