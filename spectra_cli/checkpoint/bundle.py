"""The reversible-merge bundle (``merge --method rmm --out DIR``): ``basis.safetensors`` (per module the mean,
the p basis updates, dense or as B/A factors) and ``coefficients.json`` (format, version, tasks, per-module
coefficients, errors and storage). ``reconstruct`` reads it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.source import Checkpoint, open_checkpoint
from spectra_cli.checkpoint.tensors import to_float
from spectra_cli.errors import CheckpointError
from spectra_cli.spectral.merge import RMMModule, Update

BUNDLE_FORMAT = "spectra-rmm-bundle"
BUNDLE_VERSION = 1


def read_bundle(bundle: str | Path) -> tuple[dict[str, Any], Checkpoint]:
    """coefficients.json and the opened basis.safetensors of a bundle folder."""
    folder = Path(bundle)
    cj = folder / "coefficients.json"
    if not cj.is_file() or not (folder / "basis.safetensors").is_file():
        raise CheckpointError(
            f"{folder}: not an rmm bundle (needs coefficients.json and basis.safetensors); "
            "make one with `spectra merge … --method rmm --out DIR`"
        )
    try:
        doc = json.loads(cj.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cj}: not valid JSON ({e})") from None
    if doc.get("format") != BUNDLE_FORMAT or int(doc.get("version", 0)) > BUNDLE_VERSION:
        raise CheckpointError(f"{cj}: not a spectra rmm bundle of a version this spectra reads")
    return doc, open_checkpoint(folder / "basis.safetensors")


def load_update(ck: Checkpoint, key: str, dtype: type[np.floating] = np.float64) -> Update:
    names = {x.name for x in ck.tensors}
    if f"{key}.B" in names:
        return Update(
            B=to_float(ck.read(ck.info(f"{key}.B")), dtype), A=to_float(ck.read(ck.info(f"{key}.A")), dtype)
        )
    return Update(dense=to_float(ck.read(ck.info(key)), dtype))


def module_fit(doc: dict[str, Any], ck: Checkpoint, name: str) -> Any:
    """Rebuild the :class:`~spectra_cli.spectral.merge.RMMModule` of one module from a bundle."""
    meta = doc["modules"][name]
    mean = load_update(ck, f"{name}.mean") if meta["centered"] else None
    basis = [load_update(ck, f"{name}.basis.{k}") for k in range(meta["p"])]
    return RMMModule(mean=mean, basis=basis, coefficients=np.asarray(meta["coefficients"], dtype=np.float64),
                     errors=np.asarray(meta["errors"]), singular_values=np.asarray(meta["singular_values"]),
                     storage=int(meta["storage"]), raw=int(meta["raw"]))  # fmt: skip
