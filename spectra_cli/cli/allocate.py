"""``spectra allocate CKPT --budget-rank R``: which LoRA rank should each module get?"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from spectra_cli.cli import options as o
from spectra_cli.cli.emit import emit
from spectra_cli.cli.errors import handle_errors
from spectra_cli.cli.outputs import check_outputs, figures_written
from spectra_cli.cli.progress import progress_bar, warn
from spectra_cli.errors import SpectraError
from spectra_cli.spectral.allocation import STRATEGIES

EPILOG = """\
Examples:

  spectra allocate ./Llama-3.2-1B --kinds q_proj,v_proj --budget-rank 8 --peft-config lora.json

  spectra allocate model/ --budget-params 2M --strategy welore --multiple-of 8 --allow-zero

  spectra allocate spectra.safetensors --budget-rank 16 --strategy effective-rank   # saved spectra, no SVD

  spectra allocate model/ --kinds q_proj,k_proj,v_proj,o_proj --budget-rank 8 --strategy eva \\
      --activations acts.safetensors --peft-config lora.json --alpha 2r

  spectra allocate model/ --budget-rank 8 --format json | jq '.rows[] | {name, rank}'

Strategies:

""" + "\n\n".join(f"  {s.name}: {s.summary}. [{s.reference}]" for s in STRATEGIES.values())

StrategyName = Enum("StrategyName", {name: name for name in STRATEGIES}, type=str)  # type: ignore[misc]


class AlphaPolicy(str, Enum):
    scale = "scale"
    fixed = "fixed"
    two_r = "2r"


_COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}


def parse_count(text: str) -> int:
    """'2M', '1.5K', '350000', '3e6' → an integer count (decimal units). Text that is not a count exits 2; whether
    the count is allowed is :class:`~spectra_cli.flows.allocate.AllocateOptions`' rule."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]?)\s*", str(text))
    if not m or m.group(2).upper() not in _COUNT_UNITS:
        raise typer.BadParameter(f"{text!r} is not a count; use e.g. 2M, 350K or 350000")
    return int(float(m.group(1)) * _COUNT_UNITS[m.group(2).upper()])


def allocate_cmd(
    ckpt: Annotated[
        Path,
        typer.Argument(
            metavar="CKPT",
            help="Checkpoint (.safetensors file, sharded or HF folder, .bin/.pt) or a spectra file from "
            "`spectra analyze --save-spectra` (no SVD redone).",
            show_default=False,
        ),
    ],
    budget_rank: Annotated[
        float | None,
        typer.Option(
            "--budget-rank",
            "-r",
            metavar="R",
            help="Average rank R over the target modules (total R × number of modules).",
            rich_help_panel="Budget",
            show_default=False,
        ),
    ] = None,
    budget_params: Annotated[
        int | None,
        typer.Option(
            "--budget-params",
            "-p",
            metavar="P",
            parser=parse_count,
            help="Trainable parameters Σ r·(in+out), e.g. 2M.",
            rich_help_panel="Budget",
            show_default=False,
        ),
    ] = None,
    strategy: Annotated[
        StrategyName,
        typer.Option("--strategy", "-s", help="Allocation strategy (see below).", rich_help_panel="Budget"),
    ] = StrategyName("energy"),
    min_rank: Annotated[
        int,
        typer.Option(
            "--min-rank", help="Smallest rank of an adapted module (≥ 1).", rich_help_panel="Budget"
        ),
    ] = 1,
    max_rank: Annotated[
        int | None,
        typer.Option(
            "--max-rank",
            help="Largest rank of any module.",
            rich_help_panel="Budget",
            show_default=False,
        ),
    ] = None,
    multiple_of: Annotated[
        int,
        typer.Option(
            "--multiple-of",
            metavar="Q",
            help="Ranks are multiples of Q (e.g. 8).",
            rich_help_panel="Budget",
        ),
    ] = 1,
    allow_zero: Annotated[
        bool,
        typer.Option("--allow-zero", help="Let modules get rank 0 (no adapter).", rich_help_panel="Budget"),
    ] = False,
    activations: Annotated[
        Path | None,
        typer.Option(
            "--activations",
            metavar="FILE",
            dir_okay=False,
            help="Activations file (spectra capture) for --strategy eva.",
            rich_help_panel="Budget",
        ),
    ] = None,
    rho: Annotated[
        float,
        typer.Option(
            "--rho",
            help="EVA: look at the top round(ρ·R) components of every module (ρ ≥ 1; 1 = no redistribution).",
            rich_help_panel="Budget",
        ),
    ] = 2.0,
    alpha: Annotated[
        AlphaPolicy,
        typer.Option(
            "--alpha",
            help="α per module: scale keeps α/r constant, fixed keeps α, 2r sets α = 2r.",
            rich_help_panel="PEFT config",
        ),
    ] = AlphaPolicy.scale,
    lora_alpha: Annotated[
        float | None,
        typer.Option(
            "--lora-alpha",
            metavar="A",
            help="Base α (default: the reference rank R, i.e. α/r = 1).",
            rich_help_panel="PEFT config",
            show_default=False,
        ),
    ] = None,
    peft_config: Annotated[
        Path | None,
        typer.Option(
            "--peft-config",
            metavar="FILE",
            dir_okay=False,
            help="Write LoraConfig keyword arguments (r, lora_alpha, target_modules, rank_pattern, "
            "alpha_pattern) as JSON.",
            rich_help_panel="PEFT config",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace an existing --peft-config file.", rich_help_panel="PEFT config"
        ),
    ] = False,
    include: o.IncludeOpt = None,
    exclude: o.ExcludeOpt = None,
    kinds: o.KindsOpt = None,
    roles: o.RolesOpt = None,
    min_dim: o.MinDimOpt = 1,
    device: o.DeviceOpt = "auto",
    precision: o.PrecisionOpt = o.Precision.float32,
    method: o.MethodOpt = o.Method.auto,
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
    """LoRA rank per module under a budget (rank or parameters), and a PEFT config with rank_pattern."""
    from spectra_cli.flows.allocate import AllocateOptions, run_allocate

    opts = o.build(
        AllocateOptions, o.selection(include, exclude, kinds, min_dim, roles=roles),
        o.engine(device, precision, backend, max_memory, method), strategy=strategy.value, budget_rank=budget_rank,
        budget_params=budget_params, min_rank=min_rank, max_rank=max_rank, multiple_of=multiple_of,
        allow_zero=allow_zero, alpha_policy=alpha.value, lora_alpha=lora_alpha, activations=activations, rho=rho,
    )  # fmt: skip
    check_outputs([ckpt, activations], {"--output": output, "--peft-config": peft_config, "--html": html},
                  folders={"--plots": plots})
    if peft_config is not None and peft_config.exists() and not force:
        raise SpectraError(f"{peft_config} already exists; choose another --peft-config or pass --force")
    with progress_bar("singular values", quiet) as update:
        result = run_allocate(ckpt, opts, progress=update)
    s = result.summary
    if s.dropped:
        warn(f"{len(s.dropped)} {'module gets' if len(s.dropped) == 1 else 'modules get'} rank 0 and no adapter",
             quiet)  # fmt: skip
    if peft_config:
        result.write_peft_config(peft_config)
        warn(f"wrote the PEFT config ({s.adapted} target modules) to {peft_config}", quiet)
    if plots:
        from spectra_cli.report.views.allocate import allocate_plots

        figures_written("allocate", plots, allocate_plots(result.rows, plots, s.strategy), result, quiet,
                        {"peft_config": result.peft_config()})  # fmt: skip
    from spectra_cli.report.render import envelope

    env = envelope("allocate", result.inputs, result.rows, result.summary, result.options)
    emit(env, fmt, output, html=html, quiet=quiet, columns=columns, wide=wide)


def register(app: typer.Typer) -> None:
    app.command("allocate", epilog=EPILOG, no_args_is_help=True)(handle_errors(allocate_cmd))
