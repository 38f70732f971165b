"""``spectra capture MODEL_DIR --data FILE --out ACTS.safetensors``: input statistics for CorDA and EVA."""

from __future__ import annotations

import dataclasses
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from spectra_cli.cli import options as o
from spectra_cli.cli.emit import emit
from spectra_cli.cli.errors import handle_errors
from spectra_cli.cli.progress import progress_bar, warn
from spectra_cli.errors import SpectraError
from spectra_cli.report.render import plural

EPILOG = """\
Examples:

  spectra capture model/ --data calib.txt --out acts.safetensors

  spectra capture model/ --data train.jsonl --text-field prompt --max-tokens 200000 --kinds q_proj,v_proj --out acts.safetensors

  spectra capture model/ --data calib.txt --stats both --components 64 --out acts.safetensors

  spectra init-adapter model/ --method eva --activations acts.safetensors --rank 16 --out eva/

  spectra capture model/ --data train.txt --gradients --batches 8 --kinds q_proj,v_proj --out grads/

  spectra init-adapter model/ --method lora-ga --gradients grads/ --rank 8 --kinds q_proj,v_proj --out lora-ga/

  spectra capture bert-mlm/ --data train.txt --gradients --batches 8 --seed 0 --kinds query,value --out grads/
"""


class Stats(str, Enum):
    pca = "pca"
    covariance = "covariance"
    both = "both"


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
            help="The activations file to write (with --gradients: a new folder).",
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
            "--max-tokens", metavar="N", help="Stop after N (non-padding) tokens.", show_default=False
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", metavar="N", help="Examples per forward.")
    ] = 8,
    max_length: Annotated[
        int, typer.Option("--max-length", metavar="N", help="Truncate each example to N tokens.")
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
            metavar="K",
            help="Principal directions kept per input (EVA needs ρ·r, 2r by default).",
        ),
    ] = 32,
    tau: Annotated[
        float,
        typer.Option(
            "--tau",
            help="Convergence threshold in [0, 1] on the cosine of consecutive "
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
    gradients: Annotated[
        bool,
        typer.Option(
            "--gradients",
            help="Instead of input statistics, write each selected weight's mean gradient of the model's LM loss "
            "(causal LM, or masked LM with BERT's 15% masking) over --batches batches into the folder --out, "
            "streamed in groups of modules (for init-adapter --method lora-ga --gradients).",
        ),
    ] = False,
    batches: Annotated[
        int, typer.Option("--batches", metavar="N", help="--gradients: batches of --batch-size examples.")
    ] = 1,
    seed: Annotated[
        int, typer.Option("--seed", metavar="N", help="--gradients on a masked LM: the seed of the masking.")
    ] = 0,
    include: o.IncludeOpt = None,
    exclude: o.ExcludeOpt = None,
    kinds: o.KindsOpt = None,
    roles: o.RolesOpt = None,
    min_dim: o.MinDimOpt = 1,
    device: o.DeviceOpt = "auto",
    precision: Annotated[o.Precision, o.precision_option("No effect yet for capture: the statistics are always "
                                                         "accumulated in float64.")] = o.Precision.float32,
    backend: Annotated[o.Backend, o.backend_option("The model always runs in PyTorch (on --device); --backend picks where the PCA's "
                                                   "eigensolve runs.")
                       ] = o.Backend.auto,
    max_memory: Annotated[int | None, o.max_memory_option(
        "Not used yet by capture's statistics: their memory follows --batch-size, --max-length and --components. "
        "With --gradients: the MB of gradients held at once (default 1024).")] = None,
    fmt: o.FormatOpt = o.Format.table,
    output: o.OutputOpt = None,
    html: o.HtmlOpt = None,
    columns: o.ColumnsOpt = None,
    wide: o.WideOpt = False,
    quiet: o.QuietOpt = False,
) -> None:
    """Run a Hugging Face model over text and write per-module input statistics (CorDA, EVA, EoRA),
    or with --gradients each weight's gradient of the model's LM loss (LoRA-GA).

    The statistics stream: activations are never stored. q/k/v (and gate/up) projections that
    share their input are computed once. Gradients: the causal-LM loss for a …ForCausalLM, BERT's
    masked-LM loss (15% of the tokens, drawn from --seed) for a …ForMaskedLM; a model without an
    LM head is refused. Needs transformers (pip install 'spectra-cli\\[hf]').
    """  # fmt: skip
    from spectra_cli.cli.outputs import check_outputs
    from spectra_cli.flows.capture import CaptureOptions, run_capture
    from spectra_cli.flows.capture_grad import run_capture_gradients

    opts = o.build(
        CaptureOptions, o.selection(include, exclude, kinds, min_dim, roles=roles), o.compute(device, precision, backend, max_memory),
        text_field=text_field, max_tokens=max_tokens, batch_size=batch_size, max_length=max_length,
        components=components, stats=stats.value, tau=tau, tokenizer=str(tokenizer) if tokenizer else None,
    )  # fmt: skip
    if gradients:
        check_outputs([model_dir, data], {"--output": output, "--html": html}, folders={"--out": out})
        with progress_bar("gradients", quiet) as update:
            g = run_capture_gradients(model_dir, data, out, opts, batches, max_memory, progress=update, seed=seed)
        if fmt == o.Format.json:
            typer.echo(json.dumps({"command": "capture", "summary": dataclasses.asdict(g)}))
        if g.batches < batches:
            warn(f"only {g.batches} of the {batches} batches were used: the data ran out"
                 + (", or a batch's masking drew no target" if g.loss == "masked-lm" else ""), quiet)
        targets = "masked tokens" if g.loss == "masked-lm" else "tokens"
        warn(f"wrote {plural(g.modules, 'gradient', 'gradients')} of the {g.loss} loss "
             f"({plural(g.batches, 'batch', 'batches')}, {g.tokens:,} {targets}, "
             f"{plural(g.groups, 'group', 'groups')}) to {out} in {g.seconds:.2f} s, "
             f"peak RSS {g.peak_rss_mb:.0f} MB", quiet)  # fmt: skip
        return
    # before the --force check: an output in the model folder must never be offered --force
    check_outputs(
        [model_dir, data, Path(tokenizer) if tokenizer else None],
        {"--output": output, "--html": html}, binary={"--out": out},
    )
    if output is not None and output.resolve() == out.resolve():
        raise SpectraError(f"{output}: the report and the activations file (--out) must differ")
    if out.exists() and not force:
        raise SpectraError(f"{out} exists; pass --force to replace it")
    if out.suffix != ".safetensors":
        raise typer.BadParameter(f"{out}: the activations file must end in .safetensors", param_hint="--out")
    with progress_bar("capturing", quiet) as update:
        result = run_capture(model_dir, data, out, opts, progress=update, argv=sys.argv)
    if max_tokens is not None and result.summary.tokens < max_tokens:
        warn(f"the data gave only {result.summary.tokens} tokens (--max-tokens {max_tokens})", quiet)
    from spectra_cli.report.render import envelope

    env = envelope("capture", result.inputs, result.rows, result.summary, result.options)
    emit(env, fmt, output, html=html, quiet=quiet, columns=columns, wide=wide)


def register(app: typer.Typer) -> None:
    app.command("capture", epilog=EPILOG)(handle_errors(capture_cmd))
