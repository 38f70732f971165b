"""``spectra check CKPT --policy spectra.toml``: a CI gate. Exit 0 when every rule holds, 1 when any fails,
2 for usage, policy and input errors (the gate could not run)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from spectra_cli.cli import options as o
from spectra_cli.cli.emit import emit
from spectra_cli.cli.errors import handle_errors
from spectra_cli.cli.outputs import check_outputs
from spectra_cli.cli.progress import progress_bar, warn
from spectra_cli.errors import SpectraError

EPILOG = """\
Examples:

  spectra check --init                       # write a commented spectra.toml

  spectra check tuned/                       # policy from ./spectra.toml or \\[tool.spectra] in pyproject.toml

  spectra check tuned/ --base base/ --policy gate.toml --junit report.xml --markdown summary.md --github

  spectra check adapter/ --base base/ --kinds q_proj,v_proj --format json

  spectra check tuned/ --base-spectra base.spectra.safetensors   # min_effective_rank_ratio without re-doing the base

  spectra check tuned/ --update-baseline spectra-baseline.json   # record the baseline max_drift_pct compares to

  spectra check tuned/ --html gate.html      # the verdicts as one self-contained page (see spectra report)

Exit codes: 0 every rule holds; 1 a rule fails; 2 the gate could not run (bad flag, policy error, missing or
unreadable checkpoint, base or baseline, a rule whose input was not given).
"""


def _init(target: Path | None, force: bool, quiet: bool) -> None:
    from spectra_cli.gate.markdown import write_text
    from spectra_cli.gate.policy import EXAMPLE_POLICY

    path = target or Path("spectra.toml")
    if path.exists() and not force:
        raise SpectraError(f"{path} already exists; pass --force to replace it")
    write_text(path, EXAMPLE_POLICY)
    warn(f"wrote an example policy to {path}; edit it, then run `spectra check CKPT --policy {path}`", quiet)


def check_cmd(
    ckpt: Annotated[
        Path | None,
        typer.Argument(
            metavar="CKPT",
            help="The checkpoint to gate (any format analyze reads, a PEFT adapter with --base, or a spectra "
            "file from analyze --save-spectra). With --init: the policy file to write.",
            show_default=False,
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            "-p",
            metavar="FILE",
            dir_okay=False,
            help="Policy file (TOML). Default: ./spectra.toml, else \\[tool.spectra] in ./pyproject.toml.",
        ),
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option(
            "--base",
            "-b",
            metavar="BASE",
            help="The base checkpoint, for max_intruders, max_relative_delta and min_effective_rank_ratio.",
        ),
    ] = None,
    base_spectra: Annotated[
        Path | None,
        typer.Option(
            "--base-spectra",
            metavar="FILE",
            dir_okay=False,
            help="The base's spectra from `analyze BASE --save-spectra FILE`: enough for "
            "min_effective_rank_ratio (intruder and ΔW rules need --base).",
        ),
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            "--baseline",
            metavar="FILE",
            dir_okay=False,
            help="Baseline JSON for max_drift_pct (overrides the policy's baseline = …).",
        ),
    ] = None,
    update_baseline: Annotated[
        Path | None,
        typer.Option(
            "--update-baseline",
            metavar="FILE",
            dir_okay=False,
            help="Write this run's per-module spectral norm, effective rank and α as the baseline JSON.",
        ),
    ] = None,
    init: Annotated[
        bool,
        typer.Option(
            "--init", help="Write a commented example policy (to CKPT's place, default spectra.toml)."
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="With --init: replace an existing file.")] = False,
    allow_missing: Annotated[
        bool,
        typer.Option(
            "--allow-missing",
            help="With --base: skip base tensors or adapter modules missing from the other side.",
        ),
    ] = False,
    junit: Annotated[
        Path | None,
        typer.Option(
            "--junit",
            metavar="FILE",
            dir_okay=False,
            rich_help_panel="Output",
            help="Write JUnit XML: one testcase per rule × module.",
        ),
    ] = None,
    markdown: Annotated[
        Path | None,
        typer.Option(
            "--markdown",
            metavar="FILE",
            dir_okay=False,
            rich_help_panel="Output",
            help="Write a Markdown summary (for a PR comment or $GITHUB_STEP_SUMMARY).",
        ),
    ] = None,
    github: Annotated[
        bool,
        typer.Option(
            "--github",
            rich_help_panel="Output",
            help="Print GitHub Actions ::error annotations for failures (on stdout; on stderr when stdout holds "
            "--format json/csv/markdown: use --output FILE then).",
        ),
    ] = False,
    show_all: Annotated[
        bool,
        typer.Option(
            "--all",
            rich_help_panel="Output",
            help="Table and Markdown views: list every verdict, not the per-rule summary.",
        ),
    ] = False,
    include: o.IncludeOpt = None,
    exclude: o.ExcludeOpt = None,
    kinds: o.KindsOpt = None,
    roles: o.RolesOpt = None,
    min_dim: o.MinDimOpt = 1,
    device: o.DeviceOpt = "auto",
    precision: o.PrecisionOpt = o.Precision.float32,
    backend: o.BackendOpt = o.Backend.auto,
    max_memory: o.MaxMemoryOpt = None,
    fmt: o.FormatOpt = o.Format.table,
    output: o.OutputOpt = None,
    html: o.HtmlOpt = None,
    columns: o.ColumnsOpt = None,
    wide: o.WideOpt = False,
    quiet: o.QuietOpt = False,
) -> None:
    """Gate a checkpoint on a policy of spectral rules: exit 0 all hold, 1 a rule fails, 2 the gate cannot run."""
    _check(**locals())


def _check(ckpt: Path | None, policy: Path | None, base: Path | None, base_spectra: Path | None,
           baseline: Path | None, update_baseline: Path | None, init: bool, force: bool, junit: Path | None,
           markdown: Path | None, github: bool, show_all: bool, allow_missing: bool, include: list[str] | None,
           exclude: list[str] | None, kinds: list[str] | None, roles: list[str] | None, min_dim: int, device: str, precision: o.Precision,
           backend: o.Backend, max_memory: int | None, fmt: o.Format, output: Path | None, html: Path | None,
           columns: list[str] | None, wide: bool, quiet: bool) -> None:  # fmt: skip
    if init:
        _init(ckpt, force, quiet)
        return
    if ckpt is None:
        raise typer.BadParameter(
            "missing CKPT (the checkpoint to check); or `--init` for a policy", param_hint="CKPT"
        )
    from spectra_cli.flows.check import CheckOptions, run_check, write_baseline
    from spectra_cli.gate.junit import write_junit
    from spectra_cli.gate.markdown import github_annotations, markdown_summary, write_text
    from spectra_cli.gate.policy import find_policy, load_policy

    opts = o.build(CheckOptions, o.selection(include, exclude, kinds, min_dim, roles=roles),
                   o.compute(device, precision, backend, max_memory), base=base, base_spectra=base_spectra,
                   baseline=baseline, update_baseline=update_baseline, allow_missing=allow_missing)  # fmt: skip
    pol = load_policy(policy if policy is not None else find_policy(Path.cwd()))
    check_outputs([ckpt, base, base_spectra], {"--output": output, "--junit": junit, "--markdown": markdown,
                                               "--update-baseline": update_baseline, "--html": html})  # fmt: skip
    with progress_bar("checking", quiet) as update:
        result = run_check(ckpt, pol, opts, progress=update)
    policy_name = _display(pol.path)
    title = f"spectra check {ckpt}"
    if update_baseline is not None:
        n = write_baseline(update_baseline, result)
        warn(f"wrote the baseline of {n} {'module' if n == 1 else 'modules'} to {update_baseline}", quiet)
    if junit is not None:
        write_junit(junit, result.verdicts, title, result.summary.seconds, policy_name)
    md = markdown_summary(result.verdicts, result.summary, str(ckpt), policy_name)
    if markdown is not None:
        write_text(markdown, md)
    if github:
        data_on_stdout = fmt.value != "table" and output is None
        for line in github_annotations(result.verdicts, policy_name):
            print(line, file=sys.stderr if data_on_stdout else sys.stdout)
        sys.stdout.flush()
    from spectra_cli.report.render import envelope
    from spectra_cli.report.views import view_for
    from spectra_cli.report.views.check import by_rule

    env = envelope("check", result.inputs, result.rows, result.summary, result.options)
    view = None if show_all else by_rule(view_for("check"), md)  # --all: every verdict, as the page has them
    emit(env, fmt, output, html=html, quiet=quiet, columns=columns, wide=wide, view=view)
    if not result.ok:
        raise typer.Exit(1)


def _display(path: Path) -> str:
    """The policy path relative to the current folder when it is below it (what GitHub annotations need)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def register(app: typer.Typer) -> None:
    # exit 2, not the other commands' 1, for any error, an unexpected exception included: CI must tell "a rule
    # failed" (1) from "the gate could not run" (2)
    gate = handle_errors(check_cmd, code=2, catch_all=True)
    app.command("check", epilog=EPILOG, no_args_is_help=False)(gate)
