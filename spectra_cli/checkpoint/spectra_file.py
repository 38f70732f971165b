"""The saved-spectra format (``analyze --save-spectra``): every matrix's singular values (float64, descending)
in a safetensors file whose metadata records the matrices (name, tensor, shape, dtype, depth, kind, role, note,
NaN/Inf counts) and the options they were computed with. ``analyze``, ``allocate`` and ``check`` read it back
instead of decomposing again."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli import __version__
from spectra_cli.checkpoint.matrices import Selection
from spectra_cli.checkpoint.safetensors_io import write_safetensors
from spectra_cli.checkpoint.source import Checkpoint
from spectra_cli.errors import CheckpointError

SPECTRA_FORMAT = "spectra-singular-values"


def is_spectra_checkpoint(ckpt: Checkpoint) -> bool:
    """Whether an opened checkpoint is a spectra file."""
    return ckpt.metadata.get("format") == SPECTRA_FORMAT


def write_spectra_file(
    path: str | Path,
    spectra: Mapping[str, np.ndarray],
    matrices: Sequence[Mapping[str, Any]],
    source: str,
    options: Mapping[str, Any],
    skipped_tensors: int,
) -> None:
    """Write the singular values of ``matrices`` (records as :func:`saved_matrices` returns them)."""
    meta = {
        "format": SPECTRA_FORMAT,
        "spectra_version": __version__,
        "source": source,
        "options": json.dumps(options),
        "matrices": json.dumps(list(matrices)),
        "skipped_tensors": str(skipped_tensors),
    }
    write_safetensors(
        Path(path), {m["name"]: spectra[m["name"]] for m in matrices if m["name"] in spectra}, meta
    )


def saved_matrices(ckpt: Checkpoint, sel: Selection) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The matrix records of a spectra file (``analyze --save-spectra``) that ``sel`` accepts, in file order,
    and the options the spectra were computed with."""
    try:
        metas: list[dict[str, Any]] = json.loads(ckpt.metadata["matrices"])
        saved_opts = json.loads(ckpt.metadata.get("options", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt.path}: spectra file without a valid 'matrices' record") from e
    chosen = [m for m in metas if sel.accepts_name(m["tensor"], m["kind"]) and min(m["shape"]) >= sel.min_dim]
    return chosen, saved_opts


def saved_values(ckpt: Checkpoint, name: str) -> np.ndarray | None:
    """The saved singular values (float64, descending) of one matrix; None for a matrix that had NaN/Inf
    weights (it was not decomposed, so the file holds no values for it)."""
    try:
        info = ckpt.info(name)
    except CheckpointError:
        return None
    return ckpt.read(info).data.astype(np.float64)
