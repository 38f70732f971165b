"""Output paths checked before a run starts, so a typo costs a second, not the run's minutes."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from spectra_cli.errors import SpectraError
from spectra_cli.results import RunResult

# files that would be taken for weights if they were written into a model folder
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".json"}


def check_outputs(inputs: Iterable[Path | None], outputs: Mapping[str, Path | None], *,
                  binary: Mapping[str, Path | None] | None = None,
                  folders: Mapping[str, Path | None] | None = None) -> None:  # fmt: skip
    """Refuse, before any work and with one line saying what to do: an output that is an input, lies inside
    an input model folder (as a weights or JSON file), is a folder where a file goes (or not a folder where a
    folder goes), whose folder does not exist, or that another output of the run also names (after symlinks
    and ``..``; the null device excepted); ``-`` for a binary or folder output, or for a second output to
    stdout; an output inside the ``--out`` folder (the run replaces it). Then take the lock of every ``--plots`` folder for the rest of the run (the error handler releases
    it): a second run into the same folder fails here.

    Each mapping takes an option's flag (``--output``, ``--html`` …) to its value; None entries are skipped.
    ``outputs`` are text files (``-`` is stdout; ``--output`` absent or None means the data goes to stdout),
    ``binary`` binary files, ``folders`` output folders (``--out DIR``, ``--plots DIR``; ``--out`` is locked
    when the run stages it, by ``checkpoint.writers.prepare_output``).
    """
    from spectra_cli.checkpoint.output import is_null_device, is_stdout, lock_output, output_identity

    binary, folders = binary or {}, folders or {}
    # realpath, not Path.resolve: an input that is a symlink loop must reach its reader's one-line error
    srcs = [Path(os.path.realpath(p)) for p in inputs if p is not None]
    taken: dict[tuple[object, ...], str] = {}
    if "--output" in outputs and outputs["--output"] is None:
        taken[output_identity("-")] = "the data (no --output)"
    for kind, group in (("text", outputs), ("binary", binary), ("folder", folders)):
        for flag, out in group.items():
            if out is None:
                continue
            if is_stdout(out) and kind != "text":
                what = "is a folder" if kind == "folder" else "is binary"
                raise SpectraError(f"{flag} -: this output {what} and cannot go to stdout; give a path")
            if not is_stdout(out):
                _check_path(flag, out, srcs, folder=kind == "folder")
            if is_null_device(out):
                continue
            key = output_identity(out)
            if key in taken:
                raise SpectraError(
                    f"{out}: {flag} and {taken[key]} name the same output; give each its own path"
                )
            taken[key] = flag
    staged = folders.get("--out")
    if staged is not None and not is_stdout(staged):
        d = staged.resolve()
        for flag, out in [*outputs.items(), *binary.items(), *folders.items()]:
            if out is not None and flag != "--out" and not is_stdout(out) and d in out.resolve().parents:
                raise SpectraError(
                    f"{out}: {flag} lies inside the --out folder {staged}, which the run replaces; "
                    "choose a path outside it"
                )
    for flag, out in folders.items():
        if out is not None and flag == "--plots":
            lock_output(out, flag)


def _check_path(flag: str, out: Path, srcs: list[Path], folder: bool) -> None:
    dst = Path(os.path.realpath(out))
    for src in srcs:
        if dst == src:
            raise SpectraError(f"{out}: refusing to write over an input ({flag}); choose another path")
        if not folder and src.is_dir() and src in dst.parents and dst.suffix in _WEIGHT_SUFFIXES:
            raise SpectraError(
                f"{out}: refusing to write into the input model folder {src} ({flag}); choose another path"
            )
    if folder:
        if out.exists() and not out.is_dir():
            raise SpectraError(f"{out}: is not a folder; {flag} writes a folder, choose another path")
        return
    if out.is_dir():
        raise SpectraError(f"{out}: is a folder; give {flag} a file name")
    if not out.parent.is_dir():
        raise SpectraError(f"{out.parent}: no such folder; create it first (for {flag})")


def figures_written(
    command: str, folder: Path, figures: Sequence[Path], result: RunResult, quiet: bool,
    extra: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """After ``--plots DIR``: the run record beside the figures (``DIR/spectra_run.json``) and one line saying
    how many were written."""
    from spectra_cli.checkpoint.provenance import write_run_record
    from spectra_cli.cli.progress import warn

    write_run_record(folder, command, sys.argv, result.inputs, result.options,
                     {"seconds": result.summary.seconds}, [p.name for p in figures], extra)  # fmt: skip
    from spectra_cli.report.render import plural

    names = ", ".join(p.name for p in figures[:4]) + (", …" if len(figures) > 4 else "")
    warn(f"wrote {plural(len(figures), 'figure', 'figures')} to {folder}/" + (f" ({names})" if figures else ""), quiet)
