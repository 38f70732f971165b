"""``spectra merge BASE NAME=TUNED…``: merge fine-tunes of one base, or store them reversibly (an rmm bundle)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from spectra_cli.cli import options as o
from spectra_cli.cli.emit import emit
from spectra_cli.cli.errors import handle_errors
from spectra_cli.cli.outputs import check_outputs, figures_written
from spectra_cli.cli.progress import progress_bar, warn

MERGE_EPILOG = """\
Examples:

  spectra merge base/ math=ft-math/ code=ft-code/ --method task-arithmetic --scale 0.5 --out merged/

  spectra merge base/ a=lora-a/ b=lora-b/ c=lora-c/ --method tsv --weights 1,1,0.5 --out merged/

  spectra merge base/ a=lora-a/ b=lora-b/ --method knots --param combine=linear --out merged/

  spectra merge base/ a=lora-a/ b=lora-b/ --method task-arithmetic --to-adapter --rank 16 --out merged-lora/

  spectra merge base/ a=lora-a/ b=lora-b/ --method dare_ties --density 0.5 --to-adapter --out merged-lora/

  spectra merge base/ a=ft-a/ b=ft-b/ c=ft-c/ d=ft-d/ --method rmm --basis 2 --sweep --plots plots/ --out bundle/

  spectra reconstruct bundle/ --task b --out ft-b-rebuilt/
"""

_DECOMPOSITIONS = ("merge runs its decompositions (SVDs, QRs, the rmm basis) there; the task updates and "
                   "elementwise methods are computed with NumPy on the CPU.")
_NO_BUDGET = "Not used yet by merge: one module of every input is in memory at a time."


def _method_help() -> str:
    from spectra_cli.flows.merge import method_names

    return f"Merge method: {', '.join(method_names())} (each described below, with its paper)."


def _epilog() -> str:
    """The examples, then one paragraph per method from the registry (name, summary, parameters, reference)."""

    return MERGE_EPILOG + "\nMethods:\n\n" + o.help_paragraphs(_method_lines()) + "\n"


def _method_lines() -> list[str]:
    """One line per method for ``--help`` and the docs: name, summary, parameters (default), reference."""
    from spectra_cli.flows.merge import METHODS, RMM, RMM_REFERENCE

    lines = []
    for m in METHODS.values():
        params = ", ".join(f"{k}={d!r}" for k, (d, _) in m.params.items())
        how = "exact from the factors" if m.factored else "the SVD of the dense result"
        lines.append(f"{m.name}: {m.summary} Parameters: {params or 'none'}. --to-adapter: {how}. [{m.reference}]")
    lines.append(
        f"{RMM}: a per-module basis (--basis P or --energy τ, --center) and per-task coefficients, written as a "
        "bundle; `spectra reconstruct` rebuilds any task. Saves space on full fine-tunes with --basis P < n (or "
        "--energy τ < 1); on adapters the bundle is larger than the adapters (each basis element has about their "
        f"summed rank): use it there for the shared basis, not to save space. [{RMM_REFERENCE}]"
    )
    return lines


def _params(
    values: list[str] | None, scale: float | None, density: float | None
) -> tuple[tuple[str, Any], ...]:
    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r}: use KEY=VALUE, e.g. combine=linear", param_hint="--param")
        out[key.strip()] = value.strip()
    if scale is not None:
        out["scale"] = scale
    if density is not None:
        out["density"] = density
    return tuple(out.items())


def merge_cmd(
    base: Annotated[Path, typer.Argument(metavar="BASE", help="The base checkpoint the tuned models share.")],
    tuned: Annotated[
        list[str],
        typer.Argument(
            metavar="TUNED...",
            show_default=False,
            help="Two or more tuned checkpoints or PEFT LoRA adapter folders, as NAME=PATH or PATH "
            "(the name is then the folder's).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Output folder: merged checkpoint, PEFT adapter (--to-adapter), or rmm bundle.",
            rich_help_panel="Output",
            show_default=False,
        ),
    ],
    method: Annotated[
        str, typer.Option("--method", "-m", metavar="METHOD", help=_method_help())
    ] = "task-arithmetic",
    weights: Annotated[
        list[str] | None,
        typer.Option("--weights", "-w", metavar="W,…", help="One weight per tuned model (default 1 each)."),
    ] = None,
    scale: Annotated[
        float | None,
        typer.Option(
            "--scale",
            metavar="λ",
            help="The method's scale (λ for task-arithmetic/ties/knots, α for tsv).",
            show_default=False,
        ),
    ] = None,
    density: Annotated[
        float | None,
        typer.Option(
            "--density",
            metavar="D",
            help="ties/knots/PEFT types: fraction of entries kept (by magnitude; DARE: at random).",
            show_default=False,
        ),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", metavar="KEY=VALUE", help="Any other method parameter, e.g. combine=linear (knots)."
        ),
    ] = None,
    basis: Annotated[
        int | None,
        typer.Option(
            "--basis", "-p", metavar="P", help="rmm: basis size per module (1 ≤ p ≤ n).", show_default=False
        ),
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            "--energy",
            metavar="τ",
            show_default=False,
            help="rmm: per module the smallest basis keeping this fraction of the (centred) energy. "
            "Without --basis/--energy every direction is kept (exact).",
        ),
    ] = None,
    center: Annotated[
        bool,
        typer.Option("--center/--no-center", help="rmm: fit the basis around the tasks' mean (stored too)."),
    ] = True,
    sweep: Annotated[
        bool,
        typer.Option(
            "--sweep", help="Also report error and storage of an rmm basis for p = 1..n (and plot it)."
        ),
    ] = False,
    to_adapter: Annotated[
        bool,
        typer.Option(
            "--to-adapter",
            help="Write the merged update as one PEFT LoRA adapter (exact, rank ≤ Σrᵢ on adapters), not a merged "
            "checkpoint; the error of --rank is reported per module.",
            rich_help_panel="Output",
        ),
    ] = False,
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            "-r",
            metavar="R",
            help="--to-adapter: keep the top R singular triplets per module (default: all, exact).",
            rich_help_panel="Output",
            show_default=False,
        ),
    ] = None,
    interference_k: Annotated[
        int,
        typer.Option("--interference-k", metavar="K", help="Top-k subspaces compared between tasks (K ≥ 1)."),
    ] = 8,
    force: o.ForceOutOpt = False,
    include: o.IncludeOpt = None,
    exclude: o.ExcludeOpt = None,
    kinds: o.KindsOpt = None,
    roles: o.RolesOpt = None,
    min_dim: o.MinDimOpt = 1,
    device: Annotated[str, o.device_option(_DECOMPOSITIONS)] = "auto",
    precision: o.PrecisionOpt = o.Precision.float32,
    backend: Annotated[o.Backend, o.backend_option(_DECOMPOSITIONS)] = o.Backend.auto,
    max_memory: Annotated[int | None, o.max_memory_option(_NO_BUDGET)] = None,
    fmt: o.FormatOpt = o.Format.table,
    output: o.OutputOpt = None,
    html: o.HtmlOpt = None,
    plots: o.PlotsOpt = None,
    columns: o.ColumnsOpt = None,
    wide: o.WideOpt = False,
    quiet: o.QuietOpt = False,
) -> None:
    """Merge fine-tunes of one base (full checkpoints or LoRA adapters), or store them reversibly (rmm)."""
    from spectra_cli.checkpoint.tuned import default_name
    from spectra_cli.flows.merge import MergeOptions, run_merge

    pairs = o.named_paths(tuned, "TUNED", default_name)
    opts = o.build(
        MergeOptions, o.selection(include, exclude, kinds, min_dim, roles=roles), o.compute(device, precision, backend, max_memory),
        method=method, weights=o.numbers(weights, "--weights", "0.5,1") or None, params=_params(param, scale, density),
        basis=basis, energy=energy, center=center, sweep=sweep, interference_k=interference_k,
        to_adapter=to_adapter, rank=rank,
    )  # fmt: skip
    check_outputs([base, *(Path(p) for _, p in pairs)], {"--output": output, "--html": html},
                  folders={"--out": out, "--plots": plots})
    with progress_bar("merging", quiet) as update:
        result = run_merge(base, pairs, out, opts, force=force, argv=sys.argv, progress=update)
    if result.summary.adapter_base_names is not None:
        names = ", ".join(result.summary.adapter_base_names)
        warn(
            f"the adapters name different base models ({names}); they fit BASE's shapes, check they belong together",
            quiet,
        )
    s = result.summary.rmm
    if method == "rmm" and opts.weights is not None:
        warn(
            "--weights do not change an rmm bundle (every task is rebuilt as it came in); they are only recorded",
            quiet,
        )
    if s is not None and s.storage is not None and s.stored_numbers > s.raw_numbers:
        why = (
            "every basis element of adapters has about their summed rank, so rmm on adapters gives a shared basis, "
            "not a saving; the adapters themselves are the smaller store"
            if any(t["kind"] == "adapter" for t in result.inputs["tuned"])
            else "choose --basis P below the number of tasks, or --energy τ < 1, to trade error for space"
        )
        warn(
            f"the bundle is {s.storage:.2f}× the size of the inputs, larger than the inputs: {why}", quiet
        )
    ad = result.summary.adapter
    if ad and ad["adapter_from_dense"] and opts.rank is None and ad["adapter_ranks"]:
        warn(f"--method {method} is elementwise (its merged update is dense): the adapter is its exact SVD, up to "
             f"rank {ad['adapter_ranks']['max']} per module; cap it with --rank R", quiet)  # fmt: skip
    if result.summary.tensors_not_in_adapter:
        warn(f"{result.summary.tensors_not_in_adapter} changed tensors outside the merged matrices (biases, norms) "
             "have no place in a LoRA adapter and were left out", quiet)  # fmt: skip
    for name, skipped in (result.summary.adapter_tensors_not_merged or {}).items():
        warn(f"{name}: {len(skipped)} non-LoRA adapter tensors (e.g. {skipped[0]}) were not merged", quiet)
    if plots:
        from spectra_cli.report.views.merge import merge_plots

        figures_written("merge", plots, merge_plots(result, plots), result, quiet)
    from spectra_cli.report.render import envelope

    env = envelope("merge", result.inputs, result.rows, result.summary, result.options)
    emit(env, fmt, output, html=html, quiet=quiet, columns=columns, wide=wide)


def register(app: typer.Typer) -> None:
    app.command("merge", epilog=_epilog())(handle_errors(merge_cmd))
