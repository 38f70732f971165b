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
from spectra_cli.checkpoint.tensors import SUPPORTED_FLOATS, TensorInfo, to_float
from spectra_cli.checkpoint.validate import Fields, is_int, parse_json, type_name
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


_HINT = "write it again with `spectra analyze CKPT --save-spectra FILE`"


def saved_matrices(ckpt: Checkpoint, sel: Selection) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The matrix records of a spectra file (``analyze --save-spectra``) that ``sel`` accepts, in file order,
    and the options the spectra were computed with. Every record and the options are checked (types, ranges,
    the tensor of singular values each record names) before use: one :class:`CheckpointError` otherwise."""
    source = str(ckpt.path)
    if "matrices" not in ckpt.metadata:
        raise CheckpointError(f"{source}: spectra file without a valid 'matrices' record; {_HINT}")
    metas = parse_json(ckpt.metadata["matrices"], source, "'matrices' record", _HINT)
    if not isinstance(metas, list):
        raise CheckpointError(
            f"{source}: the 'matrices' record must be a list, not {type_name(metas)}; {_HINT}"
        )
    by_name = {t.name: t for t in ckpt.tensors}
    records = [_record(ckpt, by_name, i, m) for i, m in enumerate(metas)]
    names = [r["name"] for r in records]
    if len(set(names)) != len(names):
        twice = next(n for i, n in enumerate(names) if n in names[:i])
        raise CheckpointError(f"{source}: the 'matrices' record lists {twice[:80]!r} twice; {_HINT}")
    saved_opts = parse_json(ckpt.metadata.get("options", "{}"), source, "'options' record", _HINT)
    opts = Fields(saved_opts, source, _HINT, where="options: ", what="the 'options' record")
    opts.text("precision", None, choices=("float32", "float64"))
    resolved = opts.mapping("resolved", {})
    if not all(v is None or isinstance(v, str | int | float) for v in resolved.values()):
        opts.fail("must map names to strings or numbers (the engine used)", "resolved")
    skipped = ckpt.metadata.get("skipped_tensors", "0")
    if not (skipped.isascii() and skipped.isdigit()) and skipped != "":
        raise CheckpointError(
            f"{source}: metadata 'skipped_tensors' is {skipped[:40]!r}, not a count; {_HINT}"
        )
    chosen = [
        m for m in records
        if sel.accepts_name(m["tensor"], m["kind"]) and sel.accepts_role(m["role"]) and min(m["shape"]) >= sel.min_dim
    ]
    return chosen, saved_opts


def _record(ckpt: Checkpoint, by_name: dict[str, TensorInfo], i: int, meta: Any) -> dict[str, Any]:
    """One matrix record, its fields' types and ranges checked, and the tensor of its values (when there is
    one: a matrix with NaN/Inf weights has none) a float vector of at most min(shape) values."""
    f = Fields(meta, str(ckpt.path), _HINT, where=f"matrix record #{i + 1}: ", what=f"matrix record #{i + 1}")
    for key in ("name", "tensor", "kind", "role", "dtype"):
        f.text(key)
    f.text("note", "")
    f.integer("depth", None, minimum=0)
    shape = f.sequence("shape")
    if len(shape) != 2 or not all(is_int(d) and d >= 1 for d in shape):
        f.fail(f"must be two whole numbers ≥ 1 [rows, cols], not a list of {len(shape)} values", "shape")
    nan, inf = f.integer("nan_count", 0, minimum=0), f.integer("inf_count", 0, minimum=0)
    name = f.obj["name"]
    info = by_name.get(name)
    if info is None and not (nan or inf):
        f.fail("has no saved singular values and no NaN/Inf count (the file is incomplete)", "name")
    if info is not None and (
        info.dtype not in SUPPORTED_FLOATS or len(info.shape) != 1 or info.shape[0] > min(shape)
    ):
        f.fail(
            f"its values are {info.dtype} of shape {list(info.shape)}, not a float vector of at most "
            f"{min(shape)} singular values",
            "name",
        )
    return {**f.obj, "note": f.obj.get("note") or "", "nan_count": nan, "inf_count": inf}


def saved_values(ckpt: Checkpoint, name: str) -> np.ndarray | None:
    """The saved singular values (float64, descending) of one matrix; None for a matrix that had NaN/Inf
    weights (it was not decomposed, so the file holds no values for it). Values that are not finite and ≥ 0
    are refused (they cannot be singular values)."""
    try:
        info = ckpt.info(name)
    except CheckpointError:
        return None
    if info.dtype not in SUPPORTED_FLOATS:
        raise CheckpointError(
            f"{ckpt.path}: the singular values of {name!r} are {info.dtype}, not floats; {_HINT}"
        )
    values = to_float(ckpt.read(info), np.float64).reshape(-1)
    if not (np.isfinite(values).all() and (values >= 0).all()):
        raise CheckpointError(
            f"{ckpt.path}: the saved singular values of {name!r} are not all finite and ≥ 0; {_HINT}"
        )
    return np.sort(values)[::-1]
