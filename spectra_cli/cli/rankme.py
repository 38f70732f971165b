"""``spectra rankme EMB…``: RankMe and other ranks of embedding matrices; the best of several inputs."""

from __future__ import annotations

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

  spectra rankme embeddings.npy

  spectra rankme ckpt-1000.npy ckpt-2000.npy ckpt-3000.npy --plots rankme-plots/

  spectra rankme lr1e-3=runs/a/emb.pt lr3e-4=runs/b/emb.pt --key embeddings --format json

  spectra rankme big.npy --chunk-rows 65536

  spectra rankme --model ./all-MiniLM-L6-v2 --texts sentences.txt

  spectra rankme --model base=./base --model tuned=./tuned --texts sentences.txt

Inputs, one row per sample: .npy (memory-mapped), .npz, .pt/.pth/.bin (a tensor or a dict: --key), .safetensors (--key when it holds several tensors), .csv/.tsv/.parquet (numeric columns, or --key COLUMN of vectors).
"""






def rankme_cmd(
    embeddings: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="EMB...",
            help="Embedding matrices (N samples × K features) as PATH or NAME=PATH.",
            show_default=False,
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            metavar="NAME",
            help="The tensor (or table column of vectors) to score in files that hold several.",
        ),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            metavar="DIR",
            rich_help_panel="Embed texts (hf extra)",
            help="A local Hugging Face model folder (as DIR or NAME=DIR, repeatable): embed --texts with it "
            "(mean pooling) and score the embeddings.",
        ),
    ] = None,
    texts: Annotated[
        Path | None,
        typer.Option(
            "--texts",
            metavar="FILE",
            dir_okay=False,
            rich_help_panel="Embed texts (hf extra)",
            help="Texts to embed with --model, one per line.",
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            metavar="N",
            rich_help_panel="Embed texts (hf extra)",
            help="Texts per forward pass.",
        ),
    ] = 32,
    max_length: Annotated[
        int | None,
        typer.Option(
            "--max-length",
            metavar="TOKENS",
            rich_help_panel="Embed texts (hf extra)",
            help="Truncate texts to this many tokens (default: the model's limit, at most 512).",
        ),
    ] = None,
    normalize: Annotated[
        bool,
        typer.Option(
            "--normalize",
            rich_help_panel="Embed texts (hf extra)",
            help="L2-normalise each embedding (as sentence-transformers' Normalize module).",
        ),
    ] = False,
    chunk_rows: Annotated[
        int | None,
        typer.Option(
            "--chunk-rows",
            metavar="ROWS",
            rich_help_panel="Compute",
            help="Rows read per chunk (default: as many as fit --max-memory, or 256MB).",
        ),
    ] = None,
    device: o.DeviceOpt = "auto",
    precision: Annotated[o.Precision, o.precision_option("No effect yet for rankme: it always accumulates in float64.")
                         ] = o.Precision.float32,
    backend: o.BackendOpt = o.Backend.auto,
    max_memory: o.MaxMemoryOpt = None,
    fmt: o.FormatOpt = o.Format.table,
    output: o.OutputOpt = None,
    html: o.HtmlOpt = None,
    plots: o.PlotsOpt = None,
    columns: o.ColumnsOpt = None,
    wide: o.WideOpt = False,
    quiet: o.QuietOpt = False,
) -> None:
    """RankMe, effective rank, stable rank, participation ratio, α-ReQ and numerical rank of embeddings;
    with several inputs, rows sorted by RankMe and the best one named (label-free model selection)."""
    from spectra_cli.flows.rankme import RankmeOptions, run_rankme

    inputs = o.named_paths(embeddings or [], "EMB")
    models = o.named_paths(model or [], "--model")
    opts = o.build(RankmeOptions, o.compute(device, precision, backend, max_memory), key=key, chunk_rows=chunk_rows,
                   texts=texts, batch_size=batch_size, max_length=max_length, normalize=normalize)  # fmt: skip
    if not inputs and not models:
        raise typer.BadParameter("give embedding files, or --model DIR with --texts FILE", param_hint="EMB")
    if models and texts is None:
        raise typer.BadParameter("--model needs --texts FILE (one text per line)", param_hint="--texts")
    if texts is not None and not models:
        raise typer.BadParameter("--texts is only used with --model DIR", param_hint="--texts")
    check_outputs([p for _, p in inputs], {"--output": output, "--html": html}, folders={"--plots": plots})
    with progress_bar("rankme", quiet) as update:
        result = run_rankme(inputs, opts, models, progress=update)
    for w in result.summary.warnings:
        warn(w, quiet)
    if plots:
        from spectra_cli.report.views.rankme import rankme_plots

        figures_written("rankme", plots, rankme_plots(result.rows, result.spectra, plots), result, quiet)
    from spectra_cli.report.render import envelope

    env = envelope("rankme", result.inputs, result.rows, result.summary, result.options)
    emit(env, fmt, output, html=html, quiet=quiet, columns=columns, wide=wide)


def register(app: typer.Typer) -> None:
    app.command("rankme", epilog=EPILOG)(handle_errors(rankme_cmd))
