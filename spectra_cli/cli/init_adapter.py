"""``spectra init-adapter CKPT``: export an initialised PEFT LoRA adapter (+ the residual base it needs)."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from spectra_cli.cli import options as o
from spectra_cli.cli.emit import emit
from spectra_cli.cli.errors import handle_errors
from spectra_cli.cli.progress import progress_bar, warn
from spectra_cli.spectral.init import methods  # metadata only: no PyTorch import

EPILOG = """\
Examples:

  spectra init-adapter model/ --method pissa --rank 16 --kinds q_proj,v_proj --out pissa-r16/

  spectra init-adapter model/ --method pissa --rank 64 --fast 4 --out pissa-fast/

  spectra init-adapter model/ --method milora --ranks ranks.json --out milora/

  spectra init-adapter model/ --method olora --allocate energy --budget-rank 16 --out olora/

  spectra init-adapter model/ --method corda --rank 16 --activations acts.safetensors --out corda/

  spectra init-adapter base/ --method extract --tuned finetuned/ --energy 0.9 --out extracted/

  spectra init-adapter model/ --method mica --rank 8 --out mica/

  spectra init-adapter model/ --method loftq --bits 4 --loftq-iter 5 --rank 16 --out loftq/

  spectra init-adapter model/ --method eora --compressed model-4bit/ --activations acts.safetensors --rank 16 --out eora/

Writes OUT/adapter/ (load with peft.PeftModel.from_pretrained), OUT/residual/ for methods that change the
base (use it in place of the original model), OUT/README.md and OUT/spectra_run.json.
`spectra init-adapter --list-methods` lists the methods with their papers.
"""

_METHOD_NAMES = sorted(methods())
_METHOD_HELP = f"Initialisation method: {', '.join(_METHOD_NAMES)} (see Methods below, or --list-methods)."


def _method_lines() -> list[str]:
    lines = []
    for name, m in sorted(methods().items()):
        needs = [w for w, f in (("--activations", m.needs_activations), ("--tuned", m.needs_tuned),
                                 ("--compressed", m.needs_compressed), ("--gradients", m.needs_gradients)) if f]  # fmt: skip
        extra = f" (needs {', '.join(needs)})" if needs else ""  # not [..]: rich would read it as markup
        params = f" Parameters: {m.parameters}." if m.parameters else ""
        lines.append(f"{name}: {m.summary.rstrip('. ')}{extra}.{params} {m.reference}")
    return lines


class CordaMode(str, Enum):
    ipm = "ipm"
    kpm = "kpm"


def _list_methods(value: bool) -> None:
    if value:
        for line in _method_lines():
            typer.echo(line)
        raise typer.Exit()


def init_adapter_cmd(
    ckpt: Annotated[
        Path, typer.Argument(metavar="CKPT", help="The base checkpoint (safetensors file or model folder).")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Output folder (adapter/, residual/, README.md).",
            rich_help_panel="Output",
        ),
    ],
    method: Annotated[
        str,
        typer.Option(
            "--method",
            "-m",
            metavar="METHOD",
            help=_METHOD_HELP,
        ),
    ] = "pissa",
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            "-r",
            metavar="R",
            help="The same rank for every module (R ≥ 1).",
            rich_help_panel="Ranks",
        ),
    ] = None,
    ranks: Annotated[
        Path | None,
        typer.Option(
            "--ranks",
            metavar="FILE",
            exists=True,
            dir_okay=False,
            help="PEFT-style JSON (r, lora_alpha, rank_pattern, alpha_pattern), e.g. from "
            "`spectra allocate --peft-config`.",
            rich_help_panel="Ranks",
        ),
    ] = None,
    allocate: Annotated[
        str | None,
        typer.Option(
            "--allocate",
            metavar="STRATEGY",
            help="Allocate ranks as `spectra allocate --strategy` does (with --budget-rank).",
            rich_help_panel="Ranks",
        ),
    ] = None,
    budget_rank: Annotated[
        float | None,
        typer.Option(
            "--budget-rank",
            metavar="R",
            help="Average rank over the modules for --allocate.",
            rich_help_panel="Ranks",
        ),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            "--alpha",
            metavar="ALPHA",
            help="LoRA α (default: the rank, i.e. scale s = α/r = 1; √r with --rslora). PEFT's own "
            "default is 8.",
            rich_help_panel="Ranks",
            show_default=False,
        ),
    ] = None,
    rslora: Annotated[
        bool, typer.Option("--rslora", help="Scale s = α/√r (PEFT use_rslora).", rich_help_panel="Ranks")
    ] = False,
    tuned: Annotated[
        Path | None,
        typer.Option(
            "--tuned", metavar="TUNED", help="extract: the fine-tuned checkpoint.", rich_help_panel="Method"
        ),
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            "--energy",
            metavar="TAU",
            help="extract: per module, the smallest rank keeping this share of ‖ΔW‖² (capped by --rank).",
            rich_help_panel="Method",
        ),
    ] = None,
    fast: Annotated[
        int | None,
        typer.Option(
            "--fast",
            metavar="N",
            help="Randomized SVD with N power iterations (PEFT's pissa_niter_N; pissa, extract).",
            rich_help_panel="Method",
        ),
    ] = None,
    activations: Annotated[
        Path | None,
        typer.Option(
            "--activations",
            metavar="FILE",
            exists=True,
            dir_okay=False,
            help="Input statistics from `spectra capture` (corda, eva).",
            rich_help_panel="Method",
        ),
    ] = None,
    corda_mode: Annotated[
        CordaMode | None,
        typer.Option(
            "--corda-mode",
            case_sensitive=False,
            help="corda: keep the top (ipm, default) or bottom (kpm) components.",
            rich_help_panel="Method",
        ),
    ] = None,
    no_redistribute: Annotated[
        bool,
        typer.Option(
            "--no-redistribute", help="eva: the same rank for every module.", rich_help_panel="Method"
        ),
    ] = False,
    rho: Annotated[
        float | None,
        typer.Option(
            "--rho",
            metavar="RHO",
            help="eva: components considered per module = ρ·r when redistributing (default 2).",
            rich_help_panel="Method",
        ),
    ] = None,
    whiten: Annotated[
        bool, typer.Option("--whiten", help="eva: whiten A by 1/√σ.", rich_help_panel="Method")
    ] = False,
    compressed: Annotated[
        Path | None,
        typer.Option(
            "--compressed",
            metavar="CKPT",
            help="eora: the compressed model (quantised-and-dequantised or pruned), a normal checkpoint.",
            rich_help_panel="Method",
        ),
    ] = None,
    gradients: Annotated[
        Path | None,
        typer.Option(
            "--gradients",
            metavar="FILE",
            help="lora-ga: each target weight's mean gradient, a safetensors file with the model's tensor names.",
            rich_help_panel="Method",
        ),
    ] = None,
    bits: Annotated[
        int | None,
        typer.Option(
            "--bits", metavar="[4|8]", help="loftq: NF4 (4) or int8 (8) quantisation (default 4).",
            rich_help_panel="Method",
        ),
    ] = None,
    loftq_iter: Annotated[
        int | None,
        typer.Option(
            "--loftq-iter", metavar="N", help="loftq: alternating quantisation/SVD steps (default 1, as PEFT).",
            rich_help_panel="Method",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", metavar="N", help="orthogonal, lora-ga: seed of the random draws (default 0).",
            rich_help_panel="Method",
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            metavar="DTYPE",
            help="Residual dtype: float32, bfloat16, float16 or float64 (default: as stored).",
            rich_help_panel="Output",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing --out folder.", rich_help_panel="Output")
    ] = False,
    list_methods: Annotated[
        bool,
        typer.Option(
            "--list-methods",
            callback=_list_methods,
            is_eager=True,
            help="List the methods with their references and exit.",
        ),
    ] = False,
    include: o.IncludeOpt = None,
    exclude: o.ExcludeOpt = None,
    kinds: o.KindsOpt = None,
    roles: o.RolesOpt = None,
    min_dim: o.MinDimOpt = 1,
    device: o.DeviceOpt = "auto",
    precision: o.PrecisionOpt = o.Precision.float32,
    backend: Annotated[o.Backend, o.backend_option("The top-r Gram route (pissa, extract) runs there; the exact "
                                                   "SVDs and QRs always run in PyTorch (on --device).")
                       ] = o.Backend.auto,
    max_memory: Annotated[int | None, o.max_memory_option("Each target matrix is decomposed whole: a target "
                                                          "whose working memory exceeds this is refused before "
                                                          "anything is written.")] = None,
    fmt: o.FormatOpt = o.Format.table,
    output: o.OutputOpt = None,
    html: o.HtmlOpt = None,
    columns: o.ColumnsOpt = None,
    wide: o.WideOpt = False,
    quiet: o.QuietOpt = False,
) -> None:
    """Export a PiSSA / MiLoRA / OLoRA / CorDA / EVA / MiCA / orthogonal / LoftQ / EoRA initialised LoRA adapter
    and its residual base, or extract a LoRA adapter from a fine-tune. By default every linear weight but embeddings and the output head is a
    target."""
    from spectra_cli.cli.outputs import check_outputs
    from spectra_cli.flows.init_adapter import InitOptions, run_init

    m_opts: dict[str, Any] = {}
    if corda_mode is not None:
        m_opts["mode"] = corda_mode.value
    if no_redistribute:
        m_opts["redistribute"] = False
    if rho is not None:
        m_opts["rho"] = rho
    if whiten:
        m_opts["whiten"] = True
    for key, value in (("bits", bits), ("loftq_iter", loftq_iter), ("seed", seed)):
        if value is not None:
            m_opts[key] = value
    opts = o.build(
        InitOptions, o.selection(include, exclude, kinds, min_dim, roles=roles), o.compute(device, precision, backend, max_memory),
        method=method, rank=rank, alpha=alpha, rslora=rslora, ranks_file=ranks, allocate=allocate,
        budget_rank=budget_rank, tuned=tuned, energy=energy, fast=fast, activations=activations,
        method_options=m_opts, dtype=dtype, force=force, compressed=compressed, gradients=gradients,
    )  # fmt: skip
    check_outputs([ckpt, tuned, activations, ranks, compressed, gradients], {"--output": output, "--html": html}, folders={"--out": out})
    with progress_bar(f"init-adapter {method}", quiet) as update:
        result = run_init(ckpt, out, opts, progress=update, argv=sys.argv)
    s = result.summary
    if s.untracked_changes:
        n = len(s.untracked_changes)
        shown = ", ".join(s.untracked_changes[:3]) + (f" and {n - 3} more" if n > 3 else "")
        warn(f"{n} other tensors differ between base and tuned and are not in the adapter: {shown}", quiet)
    if s.skipped_files:
        warn(f"not copied into residual/ (other weight formats): {', '.join(s.skipped_files)}", quiet)
    warn(f"wrote {out}", quiet)
    from spectra_cli.report.render import envelope
    from spectra_cli.report.views import view_for
    from spectra_cli.report.views.init_adapter import with_out

    env = envelope("init-adapter", result.inputs, result.rows, s, result.options)
    emit(env, fmt, output, html=html, quiet=quiet, columns=columns, wide=wide, view=with_out(view_for("init-adapter"), out))


def register(app: typer.Typer) -> None:
    epilog = EPILOG + "\nMethods:\n\n" + o.help_paragraphs(_method_lines()) + "\n"
    app.command("init-adapter", epilog=epilog)(handle_errors(init_adapter_cmd))
