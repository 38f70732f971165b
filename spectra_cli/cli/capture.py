"""``spectra capture MODEL_DIR --data FILE --out ACTS.safetensors``: input statistics for CorDA and EVA."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from spectra_cli.cli import options as o
from spectra_cli.cli.errors import handle_errors
from spectra_cli.cli.progress import progress_bar, warn
from spectra_cli.errors import SpectraError
from spectra_cli.results import summary_dict

EPILOG = """\
Examples:

  spectra capture model/ --data calib.txt --out acts.safetensors

  spectra capture model/ --data train.jsonl --text-field prompt --max-tokens 200000 --kinds q_proj,v_proj --out acts.safetensors

  spectra capture model/ --data calib.txt --stats both --components 64 --out acts.safetensors

  spectra init-adapter model/ --method eva --activations acts.safetensors --rank 16 --out eva/
"""


class Stats(str, Enum):
    pca = "pca"
    covariance = "covariance"
    both = "both"


def _columns() -> list[Any]:
    from spectra_cli.report.render import Column, fmt_num

    return [
        Column("name", "module", str, "left"),
        Column("in_features", "in"),
        Column("tokens", "tokens"),
        Column("alias_of", "shares input with", lambda x: x or "-", "left"),
        Column("components", "k"),
        Column("explained_variance", "expl. var (k)", fmt_num),
        Column("top_ratio", "top ratio", fmt_num),
        Column("converged", "converged", lambda x: "-" if x is None else str(x)),
    ]


def _notes(result: Any) -> list[str]:
    s = summary_dict(result.summary)
    lines = [
        f"{s['modules']} modules ({s['unique_inputs']} distinct inputs) over {s['tokens']} tokens from "
        f"{s['examples']} examples, written to {s['out']}"
    ]
    if s["not_converged"]:
        lines.append(
            f"{len(s['not_converged'])} inputs have components whose last update moved them (cosine < τ = "
            f"{s['tau']:g}); more data (--max-tokens) makes the PCA steadier"
        )
    lines.append(f"{s['seconds']:.2f} s")
    return lines


def capture_cmd(
    model_dir: Annotated[
        Path,
        typer.Argument(
            metavar="MODEL_DIR", help="A local Hugging Face model folder (config.json + weights)."
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            metavar="FILE",
            help="Text file (one example per line) or JSONL (see --text-field).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            metavar="ACTS.safetensors",
            help="The activations file to write.",
            dir_okay=False,
            show_default=False,
        ),
    ],
    text_field: Annotated[
        str, typer.Option("--text-field", metavar="NAME", help="JSONL field holding the text.")
    ] = "text",
    max_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-tokens", min=1, metavar="N", help="Stop after N (non-padding) tokens.", show_default=False
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, metavar="N", help="Examples per forward.")
    ] = 8,
    max_length: Annotated[
        int, typer.Option("--max-length", min=1, metavar="N", help="Truncate each example to N tokens.")
    ] = 512,
    stats: Annotated[
        Stats,
        typer.Option(
            "--stats",
            help="pca: incremental PCA (EVA); covariance: the in×in second moment (CorDA; "
            "EVA then takes an exact PCA); both.",
        ),
    ] = Stats.pca,
    components: Annotated[
        int,
        typer.Option(
            "--components",
            min=1,
            metavar="K",
            help="Principal directions kept per input (EVA needs ρ·r, 2r by default).",
        ),
    ] = 32,
    tau: Annotated[
        float,
        typer.Option(
            "--tau",
            min=0.0,
            max=1.0,
            help="Convergence threshold on the cosine of consecutive "
            "PCA estimates (recorded, not used to stop).",
        ),
    ] = 0.99,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer", metavar="DIR", help="Tokenizer folder (default: MODEL_DIR).", show_default=False
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    include: o.IncludeOpt = None,
    exclude: o.ExcludeOpt = None,
    kinds: o.KindsOpt = None,
    device: o.DeviceOpt = "auto",
    fmt: o.FormatOpt = o.Format.table,
    output: o.OutputOpt = None,
    quiet: o.QuietOpt = False,
) -> None:
    """Run a Hugging Face model over text and write per-module input statistics (CorDA, EVA).

    The statistics stream: activations are never stored. q/k/v (and gate/up) projections that share their
    input are computed once. Needs transformers (pip install 'spectra-cli[hf]').
    """  # fmt: skip
    from spectra_cli.cli.outputs import check_outputs
    from spectra_cli.flows.capture import CaptureOptions, run_capture

    # before the --force check: an output in the model folder must never be offered --force
    check_outputs(
        [model_dir, data, Path(tokenizer) if tokenizer else None], {"--out": out, "--output": output}
    )
    if output is not None and output.resolve() == out.resolve():
        raise SpectraError(f"{output}: the report and the activations file (--out) must differ")
    if out.exists() and not force:
        raise SpectraError(f"{out} exists; pass --force to replace it")
    if out.suffix != ".safetensors":
        raise typer.BadParameter(f"{out}: the activations file must end in .safetensors", param_hint="--out")
    opts = CaptureOptions(
        include=o.split_csv(include), exclude=o.split_csv(exclude), kinds=o.split_csv(kinds),
        text_field=text_field, max_tokens=max_tokens, batch_size=batch_size, max_length=max_length,
        components=components, stats=stats.value, tau=tau, device=device,
        tokenizer=str(tokenizer) if tokenizer else None,
    )  # fmt: skip
    with progress_bar("capturing", quiet) as update:
        result = run_capture(model_dir, data, out, opts, progress=update, argv=sys.argv)
    if max_tokens is not None and result.summary.tokens < max_tokens:
        warn(f"the data gave only {result.summary.tokens} tokens (--max-tokens {max_tokens})", quiet)
    from spectra_cli.report.render import envelope, render

    env = envelope("capture", result.inputs, result.rows, result.summary, result.options)
    render(env, fmt.value, _columns(), f"spectra capture {model_dir}", _notes(result), output)


def register(app: typer.Typer) -> None:
    app.command("capture", epilog=EPILOG)(handle_errors(capture_cmd))
