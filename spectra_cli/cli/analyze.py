"""``spectra analyze CKPT``: what does each layer's spectrum look like?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spectra_cli.cli import options as o
from spectra_cli.cli.emit import emit
from spectra_cli.cli.errors import handle_errors
from spectra_cli.cli.outputs import check_outputs, figures_written
from spectra_cli.cli.progress import progress_bar, warn
from spectra_cli.report.render import plural

EPILOG = """\
Examples:

  spectra analyze model.safetensors

  spectra analyze ./Llama-3.2-1B --kinds q_proj,v_proj --plots plots/

  spectra analyze ckpt.bin --format json | jq '.rows[] | select(.alpha_flag != "ok") | .name'

  spectra analyze big-model/ --max-memory 2GB --save-spectra spectra.safetensors

  spectra analyze spectra.safetensors --format csv -o layers.csv   # reuse saved spectra, no SVD

  spectra analyze --demo --plots demo-plots/

  spectra analyze --demo --mp-fit --randomize --plots rmt-plots/   # WeightWatcher's RMT diagnostics

  spectra analyze --demo --kinds query --fit e_tpl --plots tpl-plots/   # a truncated power law per matrix

  spectra analyze model.safetensors --html report.html   # one self-contained page (see spectra report)
"""


def analyze_cmd(
    ckpt: Annotated[
        Path | None,
        typer.Argument(
            metavar="CKPT",
            help="Checkpoint: .safetensors file, sharded folder, HF model folder, .bin/.pt/.pth, "
            "PEFT adapter folder, or a spectra file from --save-spectra.",
            show_default=False,
        ),
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Analyse the bundled demo model (all-MiniLM-L6-v2).")
    ] = False,
    include: o.IncludeOpt = None,
    exclude: o.ExcludeOpt = None,
    kinds: o.KindsOpt = None,
    roles: o.RolesOpt = None,
    min_dim: o.MinDimOpt = 1,
    split_fused: o.SplitFusedOpt = False,
    device: o.DeviceOpt = "auto",
    precision: o.PrecisionOpt = o.Precision.float32,
    method: o.MethodOpt = o.Method.auto,
    backend: o.BackendOpt = o.Backend.auto,
    max_memory: o.MaxMemoryOpt = None,
    fmt: o.FormatOpt = o.Format.table,
    output: o.OutputOpt = None,
    html: o.HtmlOpt = None,
    plots: o.PlotsOpt = None,
    plot_layers: Annotated[
        str | None,
        typer.Option(
            "--plot-layers",
            metavar="GLOB",
            help="Glob of layers whose ESD to plot (default: the most extreme few).",
            rich_help_panel="Output",
        ),
    ] = None,
    save_spectra: Annotated[
        Path | None,
        typer.Option(
            "--save-spectra",
            metavar="FILE",
            help="Write every matrix's singular values to this .safetensors file "
            "(analyze reads it back without recomputing).",
            dir_okay=False,
            rich_help_panel="Output",
        ),
    ] = None,
    columns: o.ColumnsOpt = None,
    wide: o.WideOpt = False,
    mp_fit: Annotated[
        bool, typer.Option("--mp-fit", help="Marchenko–Pastur fit of each ESD's bulk (WeightWatcher's mp_fit): "
                           "sigma_mp, bulk_min/bulk_max, num_spikes, mp_softrank.", rich_help_panel="Diagnostics")
    ] = False,
    randomize: Annotated[
        bool, typer.Option("--randomize", help="Also decompose each matrix with its entries permuted (seeded): "
                           "max_rand_eval, rand_distance, ww_softrank, num_traps (correlation traps).",
                           rich_help_panel="Diagnostics")
    ] = False,
    detx: Annotated[
        bool, typer.Option("--detx", help="detX tail (WeightWatcher's detX_num, detX_val).",
                           rich_help_panel="Diagnostics")
    ] = False,
    vectors: Annotated[
        bool, typer.Option("--vectors", help="Eigenvector localisation (WeightWatcher's vectors=True): bulk/tail "
                           "mean and variance of localisation ratio, participation ratio, vector entropy.",
                           rich_help_panel="Diagnostics")
    ] = False,
    all_diagnostics: Annotated[
        bool, typer.Option("--all", help="--mp-fit --randomize --detx --vectors.", rich_help_panel="Diagnostics")
    ] = False,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the --randomize permutations.", rich_help_panel="Diagnostics")
    ] = 0,
    fit: Annotated[
        str, typer.Option("--fit", metavar="[pl|tpl|e_tpl]", help="Also fit the tail with WeightWatcher's fit: pl "
                          "(power law), tpl (truncated power law x^-α·e^-Λx, WeightWatcher's TPL), e_tpl (TPL with "
                          "xmin near the ESD's peak, WeightWatcher's E_TPL): fit_alpha, fit_Lambda, fit_xmin, "
                          "fit_ks, fit_tail, fit_reliability. A TPL takes about a second per matrix.",
                          rich_help_panel="Diagnostics")
    ] = "pl",
    fix_fingers: Annotated[
        str | None, typer.Option("--fix-fingers", metavar="[xmin_peak|clip_xmax]",
                                 help="WeightWatcher's fix_fingers for the --fit: xmin_peak (search xmin near the "
                                 "ESD's peak) or clip_xmax (drop up to 9 top eigenvalues while α falls by > 1; "
                                 "adds fit_num_fingers, fit_raw_alpha).", rich_help_panel="Diagnostics")
    ] = None,
    xmax: Annotated[
        str | None, typer.Option("--xmax", metavar="[N|force]", help="WeightWatcher's xmax for the --fit: N drops "
                                 "the N largest eigenvalues before fitting; force ends a truncated power law "
                                 "at the largest eigenvalue (tpl/e_tpl).", rich_help_panel="Diagnostics")
    ] = None,
    quiet: o.QuietOpt = False,
) -> None:
    """Per-matrix spectra: norms, stable and effective rank, heavy-tail α, entropy, NaN/Inf; and a summary."""
    from spectra_cli.flows.analyze import AnalyzeOptions, run_analyze

    if demo and ckpt is not None:
        raise typer.BadParameter("give either CKPT or --demo, not both")
    if not demo and ckpt is None:
        raise typer.BadParameter(
            "missing CKPT (a checkpoint path); try `spectra analyze --demo`", param_hint="CKPT"
        )
    from spectra_cli.spectral.fits import FitOptions
    from spectra_cli.spectral.rmt import RMTOptions

    rmt = RMTOptions(mp_fit or all_diagnostics, randomize or all_diagnostics, detx or all_diagnostics, seed,
                     vectors or all_diagnostics)
    fits = o.build(FitOptions, {}, fit=fit, fix_fingers=fix_fingers, xmax=_xmax(xmax))
    opts = o.build(AnalyzeOptions, o.selection(include, exclude, kinds, min_dim, split_fused, roles=roles),
                   o.engine(device, precision, backend, max_memory, method), rmt=rmt if rmt.any else None,
                   fit=None if fits.default else fits)  # fmt: skip
    if demo:
        from spectra_cli.checkpoint.demo import demo_checkpoint

        ckpt = demo_checkpoint()
        warn(f"analysing the demo checkpoint: {ckpt}", quiet)
    assert ckpt is not None
    check_outputs([ckpt], {"--output": output, "--html": html}, binary={"--save-spectra": save_spectra},
                  folders={"--plots": plots})
    with progress_bar("analysing", quiet) as update:
        result = run_analyze(ckpt, opts, progress=update)
    if result.summary.nonfinite:
        warn(
            f"{plural(len(result.summary.nonfinite), 'matrix contains', 'matrices contain')} NaN/Inf and "
            "were not decomposed (see status column)",
            quiet,
        )
    if save_spectra:
        result.save_spectra(save_spectra)
        warn(f"wrote singular values of {plural(len(result.spectra), 'matrix', 'matrices')} to {save_spectra}", quiet)
    if plots:
        from spectra_cli.report.views.analyze import analyze_plots, choose_layers

        if plot_layers and not choose_layers(result.rows, plot_layers):
            warn(f"--plot-layers {plot_layers} matches no analysed matrix: no ESD figure drawn (names look like "
                 f"{result.rows[0]['name'] if result.rows else '?'})", quiet)  # fmt: skip
        warn(f"drawing figures into {plots}/ …", quiet)
        figs = analyze_plots(result.rows, result.spectra, plots, plot_layers, result.rand_spectra)
        figures_written("analyze", plots, figs, result, quiet)
    from spectra_cli.report.render import envelope

    env = envelope("analyze", result.inputs, result.rows, result.summary, result.options)
    emit(env, fmt, output, html=html, quiet=quiet, columns=columns, wide=wide)


def _xmax(value: str | None) -> int | str | None:
    """``--xmax``: None, ``force`` or an integer (WeightWatcher's xmax values)."""
    if value is None or value == "force":
        return value
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"--xmax {value}: give a number of eigenvalues to drop, or force") from None


def register(app: typer.Typer) -> None:
    app.command("analyze", epilog=EPILOG, no_args_is_help=False)(handle_errors(analyze_cmd))
