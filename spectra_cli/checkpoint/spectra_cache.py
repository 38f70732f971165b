"""``spectra track --cache DIR``: every checkpoint's singular values (and its comparisons), kept between runs.

A checkpoint's entry is a folder ``DIR/<key>/`` where ``key`` is a hash of the checkpoint's file identity
(each file's resolved path, size and mtime_ns: :func:`~spectra_cli.checkpoint.run_folder.file_identity`), so a
checkpoint rewritten in place gets a fresh entry and an unchanged one is never decomposed again. Each finished
task adds one file ``<settings>-<part>.safetensors`` to the entries of the checkpoints it covered, in the
saved-spectra format of ``analyze --save-spectra`` (:mod:`spectra_cli.checkpoint.spectra_file`): the values of
each matrix (float64), and in each matrix record its comparison against the base (``vs_base``, with
``base_key``) and against the previous checkpoint (``vs_previous``, with ``previous_key``) when they were
measured. ``settings`` is a hash of what changes the numbers (precision, method, top-k, ε). Files are written
atomically (temporary name, then rename): an interrupted run leaves whole files only, and a rerun computes
what is missing. A file that cannot be read is ignored (and recomputed).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.matrices import Selection
from spectra_cli.checkpoint.source import open_checkpoint
from spectra_cli.checkpoint.spectra_file import saved_matrices, saved_values, write_spectra_file
from spectra_cli.errors import SpectraError


@dataclass(frozen=True)
class CachedMatrix:
    """One matrix of one checkpoint as computed (or read back): its record (name, tensor, shape, dtype, depth,
    kind, role, note, NaN/Inf counts), its singular values (None when it held NaN/Inf), and its comparisons
    (``vs_base``/``vs_previous``: the metric fields, keyed by the other side's identity)."""

    record: Mapping[str, Any]
    values: np.ndarray | None
    base_key: str | None = None
    vs_base: Mapping[str, Any] | None = None
    previous_key: str | None = None
    vs_previous: Mapping[str, Any] | None = None
    #: analyze's metrics of ``values`` (computed in the task, kept so that a rerun does not fit α again)
    metrics: Mapping[str, Any] | None = None

    @property
    def name(self) -> str:
        return str(self.record["name"])


def identity_key(identity: Iterable[Any]) -> str:
    """A short stable hash of a file identity (or any JSON-able value)."""
    return hashlib.sha256(json.dumps(list(identity), sort_keys=True).encode()).hexdigest()[:24]


def _finite(x: Any) -> Any:
    """JSON has no Infinity/NaN: store them as strings, read back by :func:`_number`."""
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _number(x: Any) -> Any:
    if isinstance(x, str) and x in ("inf", "-inf", "nan"):
        return float(x)
    if isinstance(x, dict):
        return {k: _number(v) for k, v in x.items()}
    return x


class SpectraCache:
    """The cache folder. ``settings`` names the computation (see the module docstring)."""

    def __init__(self, root: str | Path, settings: str) -> None:
        self.root = Path(root)
        self.settings = settings
        if self.root.exists() and not self.root.is_dir():
            raise SpectraError(f"--cache {self.root}: not a folder; give a folder (it is created when missing)")

    def entry(self, key: str) -> Path:
        return self.root / key

    def lookup(self, key: str) -> dict[str, list[CachedMatrix]]:
        """Every cached result of the checkpoint ``key`` under this cache's settings, by matrix name."""
        out: dict[str, list[CachedMatrix]] = defaultdict(list)
        folder = self.entry(key)
        if not folder.is_dir():
            return out
        for f in sorted(folder.glob(f"{self.settings}-*.safetensors")):
            try:
                ck = open_checkpoint(f)
                records, _ = saved_matrices(ck, Selection())
                got = [(r, saved_values(ck, r["name"])) for r in records]
            except SpectraError:  # a damaged file: ignored, its matrices are computed again
                continue
            for r, values in got:
                out[r["name"]].append(CachedMatrix(
                    {k: v for k, v in r.items() if k not in _EXTRA}, values, r.get("base_key"),
                    _number(r.get("vs_base")), r.get("previous_key"), _number(r.get("vs_previous")),
                    _number(r.get("metrics")),
                ))  # fmt: skip
        return out

    def store(self, key: str, source: str, results: Sequence[CachedMatrix]) -> Path:
        """Write one task's results for checkpoint ``key`` as one new file of its entry."""
        folder = self.entry(key)
        folder.mkdir(parents=True, exist_ok=True)
        names = [r.name for r in results]
        part = identity_key([names, [r.base_key for r in results], [r.previous_key for r in results]])[:16]
        path = folder / f"{self.settings}-{part}.safetensors"
        records = []
        for r in results:
            rec = dict(r.record)
            rec.update(base_key=r.base_key, vs_base=_finite(dict(r.vs_base)) if r.vs_base is not None else None,
                       previous_key=r.previous_key,
                       vs_previous=_finite(dict(r.vs_previous)) if r.vs_previous is not None else None,
                       metrics=_finite(dict(r.metrics)) if r.metrics is not None else None)  # fmt: skip
            records.append(rec)
        spectra = {r.name: r.values for r in results if r.values is not None}
        write_spectra_file(path, spectra, records, source, {"cache_settings": self.settings}, 0)
        return path


_EXTRA = ("base_key", "vs_base", "previous_key", "vs_previous", "metrics")

__all__ = ["CachedMatrix", "SpectraCache", "identity_key"]
