"""What every command's core returns: rows (one dict per matrix), a typed summary, the inputs and the options.

A summary is a frozen dataclass per command (``AnalyzeSummary``, ``MergeSummary``, … in ``flows/``): code that
holds a result reads it by attribute. :func:`summary_dict` turns it into the dict of the JSON envelope — the
fields in their declared order, nested dataclasses as dicts — which the renderer, the HTML page and
``spectra report`` read. Two field markers keep that dict exactly as the commands have always written it:

- :data:`OMIT_NONE`: the key is left out when the value is None (a key some runs do not have at all, such as
  ``peak_gpu_mb`` off a GPU), unlike a plain ``X | None`` field, which is written as ``null``;
- :func:`flatten`: a nested dataclass whose fields are written in the parent at this place (a group of keys
  present together, such as merge's rmm storage figures); None writes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import pandas as pd
    from _typeshed import DataclassInstance

#: field metadata: leave the key out of the summary dict when the value is None
OMIT_NONE: Mapping[str, Any] = {"spectra": "omit_none"}


def flatten(cls: type[DataclassInstance]) -> Mapping[str, Any]:
    """Field metadata: write the nested ``cls`` instance's fields in place of this field (nothing when None)."""
    return {"spectra": "flatten", "type": cls}


S = TypeVar("S", bound="DataclassInstance")


def _plain(x: Any) -> Any:
    """Dataclasses (not their classes) → dicts, recursively through dicts, lists and tuples; the rest as is."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return summary_dict(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    return x


def summary_dict(summary: DataclassInstance | Mapping[str, Any]) -> dict[str, Any]:
    """The summary as the JSON envelope holds it: fields in order, nested dataclasses as dicts, :data:`OMIT_NONE`
    fields left out when None, :func:`flatten` fields written in place. A mapping (a summary read back from
    a results file) is returned as a plain dict."""
    if isinstance(summary, Mapping):
        return {k: _plain(v) for k, v in summary.items()}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(summary):
        value = getattr(summary, f.name)
        mark = f.metadata.get("spectra")
        if mark == "flatten":
            if value is not None:
                out.update(summary_dict(value))
        elif mark == "omit_none" and value is None:
            continue
        else:
            out[f.name] = _plain(value)
    return out


def summary_keys(cls: type[DataclassInstance]) -> list[str]:
    """Every key the summary dict of ``cls`` can hold, in order (flattened groups expanded)."""
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("spectra") == "flatten":
            keys += summary_keys(f.metadata["type"])
        else:
            keys.append(f.name)
    return keys


def jsonable(x: Any) -> Any:
    """NumPy arrays and scalars → lists and Python numbers, recursively through dicts (keys as strings), lists
    and tuples (as lists)."""
    import numpy as np

    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def options_record(opts: DataclassInstance) -> dict[str, Any]:
    """A command's options as the envelope (and ``spectra_run.json``) records them: every field, paths as strings,
    tuples as lists, mappings as dicts."""
    d = dataclasses.asdict(opts)
    for k, v in d.items():
        if isinstance(v, PurePath):
            d[k] = str(v)
        elif isinstance(v, tuple):
            d[k] = list(v)
        elif isinstance(v, Mapping):
            d[k] = dict(v)
    return d


@dataclass
class RunResult(Generic[S]):
    """rows (one dict per matrix), ``summary`` (the command's summary dataclass), inputs and options (dicts as
    the envelope holds them)."""

    rows: list[dict[str, Any]]
    summary: S
    inputs: dict[str, Any]
    options: dict[str, Any]

    def summary_dict(self) -> dict[str, Any]:
        """The summary as the JSON envelope holds it (:func:`summary_dict`)."""
        return summary_dict(self.summary)

    def to_pandas(self) -> pd.DataFrame:
        """The rows as a DataFrame, one row per matrix (as WeightWatcher's ``analyze()`` returns)."""
        import pandas as pd

        return pd.DataFrame(self.rows)
