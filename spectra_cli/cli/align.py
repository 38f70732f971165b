"""``spectra align A B --out DIR``: permute B's hidden units and attention heads to match A (weight matching,
Git Re-Basin), write the permuted B (the same function) and report the distance and the singular vectors'
agreement before and after."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from spectra_cli.cli import options as o
from spectra_cli.cli.emit import emit
from spectra_cli.cli.errors import handle_errors
from spectra_cli.cli.outputs import check_outputs, figures_written
from spectra_cli.cli.progress import progress_bar, warn

EPILOG = """\
Examples:

  spectra align seed0/ seed1/ --out seed1-aligned/

  spectra align seed0/ seed1/ --out seed1-aligned/ --top-k 16 --html align.html --plots plots/

  spectra align seed0/ seed1/ --residual --max-iter 20 --seed 1 --out seed1-aligned/

  spectra align a.safetensors b.safetensors --heads 12 --out b-aligned/ --format json

Supported: BERT (MiniLM naming), LLaMA-like (gate/up/down_proj, q/k/v/o_proj, grouped-query attention, rotary
positions: q/k dimensions are not permuted) and GPT-2 (Conv1D, fused c_attn). Permuted: each layer's MLP
hidden units (with their biases) and attention heads (key/value groups, query heads within a group, and the
dimensions inside a head: q/k jointly where the positions allow, v/o jointly). The residual stream is not
permuted unless --residual, so the model's outputs, hidden states included, are unchanged; with --residual
its logits are unchanged and the hidden states it returns come out permuted. [Ainsworth, Hayase & Srinivasa
2023, Git Re-Basin: Merging Models modulo Permutation Symmetries, ICLR: weight matching]
"""


def align_cmd(
    a: Annotated[Path, typer.Argument(metavar="A", help="The reference model (not changed).")],
    b: Annotated[Path, typer.Argument(metavar="B", help="The model to permute: same architecture and sizes as A.")],
    out: Annotated[
        Path,
        typer.Option("--out", metavar="DIR", help="Output folder: the permuted B (safetensors, B's names and "
                     "dtypes, config and tokenizer files copied).", rich_help_panel="Output", show_default=False),
    ],
    max_iter: Annotated[
        int, typer.Option("--max-iter", metavar="N", help="Sweeps of the coordinate descent at most (N ≥ 1).")
    ] = 10,
    seed: Annotated[int, typer.Option("--seed", metavar="S", help="Seed of the order the layers are visited.")] = 0,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", metavar="K", help="Singular vectors compared per matrix (K ≥ 1).")
    ] = 8,
    heads: Annotated[
        int | None,
        typer.Option("--heads", metavar="N", help="Attention heads (default: config.json's).", show_default=False),
    ] = None,
    kv_heads: Annotated[
        int | None,
        typer.Option("--kv-heads", metavar="N", show_default=False,
                     help="Key/value heads for grouped-query attention (default: config.json's, else --heads)."),
    ] = None,
    within_head: Annotated[
        bool,
        typer.Option("--within-head/--no-within-head",
                     help="Also permute the dimensions inside each head (q/k jointly where allowed, v/o jointly)."),
    ] = True,
    residual: Annotated[
        bool,
        typer.Option("--residual", help="Also permute the residual stream (embeddings, every norm, LM head): all layers "
                     "then match in one basis; the hidden states B returns come out permuted, its logits do not."),
    ] = False,
    force: o.ForceOutOpt = False,
    fmt: o.FormatOpt = o.Format.table,
    output: o.OutputOpt = None,
    html: o.HtmlOpt = None,
    plots: o.PlotsOpt = None,
    columns: o.ColumnsOpt = None,
    wide: o.WideOpt = False,
    quiet: o.QuietOpt = False,
) -> None:
    """Align model B to model A by weight matching (Git Re-Basin) and write the permuted B: same function."""
    from spectra_cli.flows.align import AlignOptions, run_align
    from spectra_cli.report.render import envelope

    opts = o.build(AlignOptions, max_iter=max_iter, seed=seed, top_k=top_k, heads=heads, kv_heads=kv_heads,
                   within_head=within_head, residual=residual)  # fmt: skip
    check_outputs([a, b], {"--output": output, "--html": html}, folders={"--out": out, "--plots": plots})
    with progress_bar("aligning", quiet) as update:
        result = run_align(a, b, out, opts, force=force, argv=sys.argv, progress=update)
    warn(f"wrote the permuted B to {out}", quiet)
    env = envelope("align", result.inputs, result.rows, result.summary, result.options)
    if plots:
        from spectra_cli.report.views.align import align_plots

        figures_written("align", plots, align_plots(env, plots), result, quiet)
    emit(env, fmt, output, html=html, quiet=quiet, columns=columns, wide=wide)


def register(app: typer.Typer) -> None:
    app.command("align", epilog=EPILOG)(handle_errors(align_cmd))
