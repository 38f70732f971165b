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


def check_outputs(inputs: Iterable[Path | None], outputs: Mapping[str, Path | None]) -> None:
    """Refuse, with one line saying what to do, an output file that is an input, lies inside an input model
    folder (as a weights or JSON file), is a folder, or whose folder does not exist.

    ``outputs`` maps each option's flag (``--output``, ``--html`` …) to its value; None entries are skipped.
    """
    # realpath, not Path.resolve: an input that is a symlink loop must reach its reader's one-line error
    srcs = [Path(os.path.realpath(p)) for p in inputs if p is not None]
    for flag, out in outputs.items():
        if out is None or str(out) == "-":
            continue
        dst = Path(os.path.realpath(out))
        for src in srcs:
            if dst == src:
                raise SpectraError(f"{out}: refusing to write over an input ({flag}); choose another path")
            if src.is_dir() and src in dst.parents and dst.suffix in _WEIGHT_SUFFIXES:
                raise SpectraError(
                    f"{out}: refusing to write into the input model folder {src} ({flag}); choose another path"
                )
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
                     {"seconds": result.summary["seconds"]}, [p.name for p in figures], extra)  # fmt: skip
    warn(f"wrote {len(figures)} figures to {folder}/", quiet)
