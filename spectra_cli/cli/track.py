"""``spectra track RUN_DIR | CKPT… | NAME=PATH…``: what training did to the spectra, checkpoint by checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from spectra_cli.cli import options as o
from spectra_cli.cli.emit import emit
from spectra_cli.cli.errors import handle_errors
from spectra_cli.cli.outputs import check_outputs
from spectra_cli.cli.progress import progress_bar, warn

EPILOG = """\
Examples:

  spectra track runs/llama-ft/                       # every checkpoint-N/ of a Trainer run, in step order

  spectra track runs/llama-ft/ --base meta-llama/ --against previous --kinds q_proj,v_proj

  spectra track runs/llama-ft/ --cache .spectra-cache --format csv -o track.csv   # a rerun reads it back

  spectra track runs/llama-ft/ --watch --poll 60 --cache .spectra-cache -o track.json --format json

  spectra track a=ckpt-a.safetensors b=ckpt-b.safetensors --steps 100,200 --html track.html

  spectra track runs/llama-ft/ --ray auto            # as tasks on the Ray cluster this machine is part of
"""


def track_cmd(
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="RUN_DIR|CKPT...",
            help="A training run's output folder (checkpoint-N/, global_stepN/, *step=N*.ckpt, step_N/ …), or "
            "checkpoints as PATH or NAME=PATH.",
            show_default=False,
        ),
    ],
    base: Annotated[
        Path | None,
        typer.Option("--base", metavar="BASE", help="Compare every checkpoint with this model: intruder "
                     "dimensions, drift and ‖ΔW‖ per matrix (as spectra compare)."),
    ] = None,
    against: Annotated[
        str | None,
        typer.Option("--against", metavar="previous", help="'previous': also compare each checkpoint with the "
                     "one before it (step-to-step change; columns step_*)."),
    ] = None,
    steps: Annotated[
        str | None,
        typer.Option("--steps", metavar="N,…", help="With a run folder: track only these steps. With "
                     "checkpoints: their steps, in the order given (when the names hold none)."),
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", metavar="K", help="Top singular vectors checked for intruders.")
    ] = 10,
    epsilon: Annotated[
        list[str] | None,
        typer.Option("--epsilon", "-e", metavar="EPS,…", help="Intruder threshold(s) on max |cos| (default 0.5); "
                     "the first is primary."),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option("--cache", metavar="DIR", help="Keep each checkpoint's singular values (and comparisons) "
                     "here, keyed by its files' identity: a rerun, or a run after an interruption, computes only "
                     "what is missing.", file_okay=False),
    ] = None,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Keep polling the run folder and add checkpoints as training writes them; "
                     "Ctrl-C stops and writes the rows so far (--output is rewritten after each new checkpoint)."),
    ] = False,
    poll: Annotated[
        float, typer.Option("--poll", metavar="SECONDS", help="How often --watch looks for new checkpoints.")
    ] = 30.0,
    ray: Annotated[
        str | None,
        typer.Option("--ray", metavar="ADDRESS|auto|local", help="Run the work as Ray tasks: 'local' starts a "
                     "cluster on this machine, 'auto' joins the one this machine is part of, or HOST:PORT / "
                     "ray://HOST:PORT (pip install 'spectra\\[ray]'). Checkpoints (and --cache) must be at paths "
                     "every node sees."),
    ] = None,
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
    columns: o.ColumnsOpt = None,
    wide: o.WideOpt = False,
    quiet: o.QuietOpt = False,
) -> None:
    """Spectra over a training run: analyze's metrics per checkpoint and matrix, intruders and drift against a
    base or the previous checkpoint, and findings by step."""
    from spectra_cli.flows.track import TrackOptions, run_track, watch_track

    pairs = [(n or None, p) for n, p in o.named_paths(inputs, "RUN_DIR|CKPT", lambda p: "")]
    step_list = tuple(int(s) for s in o.numbers([steps] if steps else None, "--steps", "500,1000,1500"))
    opts = o.build(TrackOptions, o.selection(include, exclude, kinds, min_dim, split_fused, roles=roles),
                   o.engine(device, precision, backend, max_memory, method),
                   base=str(base) if base else None, against=against, steps=step_list, top_k=top_k,
                   epsilons=o.numbers(epsilon, "--epsilon", "0.5 or 0.3,0.5,0.7") or (0.5,),
                   cache=str(cache) if cache else None, ray=ray)  # fmt: skip
    if watch and (len(pairs) != 1 or pairs[0][0] is not None or not pairs[0][1].is_dir()):
        raise typer.BadParameter("--watch needs one run folder (RUN_DIR)", param_hint="--watch")
    if poll <= 0:
        raise typer.BadParameter(f"{poll:g}: must be positive (seconds)", param_hint="--poll")
    check_outputs([p for _, p in pairs] + ([base] if base else []), {"--output": output, "--html": html})

    def write(result: Any) -> None:
        from spectra_cli.report.render import envelope

        env = envelope("track", result.inputs, result.rows, result.summary, result.options)
        emit(env, fmt, output, html=html, quiet=quiet, columns=columns, wide=wide)

    if watch:
        def round_done(result: Any) -> None:
            warn(f"{len(result.checkpoints)} checkpoints tracked (last: {result.checkpoints[-1].name}); "
                 "waiting for more (Ctrl-C stops)", quiet)  # fmt: skip
            if output is not None:
                write(result)

        with progress_bar("tracking", quiet) as update:
            last = watch_track(pairs[0][1], opts, round_done, poll, progress=update)
        if last is None:
            warn("stopped before any checkpoint appeared: nothing to write", quiet)
            return
        _skipped(last, quiet)
        write(last)
        return
    with progress_bar("tracking", quiet) as update:
        result = run_track(pairs, opts, update)
    _skipped(result, quiet)
    write(result)


def _skipped(result: Any, quiet: bool) -> None:
    for s in result.summary.skipped_checkpoints:
        warn(f"skipped checkpoint {s['name']}: {s['reason']}", quiet)
    s = result.summary
    if s.from_cache:
        warn(f"{s.computed} matrices computed, {s.from_cache} read back from the cache", quiet)


def register(app: typer.Typer) -> None:
    app.command("track", epilog=EPILOG)(handle_errors(track_cmd))
