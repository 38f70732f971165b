"""The reversible-merge bundle (``merge --method rmm --out DIR``): ``basis.safetensors`` (per module the mean,
the p basis updates, dense or as B/A factors) and ``coefficients.json`` (format, version, tasks, per-module
coefficients, errors and storage). ``reconstruct`` reads it back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.adapter import check_lora_config
from spectra_cli.checkpoint.source import Checkpoint, open_checkpoint
from spectra_cli.checkpoint.tensors import SUPPORTED_FLOATS, TensorInfo, to_float
from spectra_cli.checkpoint.validate import Fields, is_int, is_number, load_json
from spectra_cli.errors import CheckpointError
from spectra_cli.spectral.merge import RMMModule, Update

BUNDLE_FORMAT = "spectra-rmm-bundle"
BUNDLE_VERSION = 1


_HINT = "the bundle is damaged or was edited; make it again with `spectra merge … --method rmm --out DIR`"


def read_bundle(bundle: str | Path) -> tuple[dict[str, Any], Checkpoint]:
    """coefficients.json and the opened basis.safetensors of a bundle folder, every field that ``reconstruct``
    reads checked first (types, ranges, the n×p coefficients of every module, and the basis tensors each module
    needs, with their shapes): one :class:`CheckpointError` naming the file otherwise."""
    folder = Path(bundle)
    cj = folder / "coefficients.json"
    if not os.path.lexists(cj) or not os.path.lexists(folder / "basis.safetensors"):
        raise CheckpointError(
            f"{folder}: not an rmm bundle (needs coefficients.json and basis.safetensors); "
            "make one with `spectra merge … --method rmm --out DIR`"
        )
    doc = load_json(cj, "bundle's coefficients file", _HINT)
    f = Fields(doc, str(cj), _HINT)
    version = doc.get("version", 0)
    if doc.get("format") != BUNDLE_FORMAT or not is_int(version) or not 1 <= version <= BUNDLE_VERSION:
        raise CheckpointError(f"{cj}: not a spectra rmm bundle of a version this spectra reads")
    ck = open_checkpoint(folder / "basis.safetensors")
    _check_doc(f, {t.name: t for t in ck.tensors})
    return doc, ck


def _check_doc(f: Fields, basis: dict[str, TensorInfo]) -> None:
    base = f.child("base", f.mapping("base"), "base")
    base.text("path")
    base_tensors = base.mapping("tensors")
    for name, shape in base_tensors.items():
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            base.fail(f"the shape of {name[:80]!r} is not a list of whole numbers ≥ 0", "tensors")
    f.number("storage", None)
    tasks = f.sequence("tasks")
    if not tasks:
        f.fail("is empty", "tasks")
    modules = f.mapping("modules")
    names: set[str] = set()
    for i, raw in enumerate(tasks):
        t = f.child("tasks", raw, f"task #{i + 1}")
        name = t.text("name")
        if name in names:
            t.fail("appears twice", "name")
        names.add(name)
        kind = t.text("kind", choices=("full", "adapter"))
        t.number("weight")
        t.text("path", "")
        extra = t.sequence("extra_tensors")
        if not all(isinstance(x, str) for x in extra):
            t.fail("must be a list of tensor names", "extra_tensors")
        missing = [x for x in extra if f"task.{name}.{x}" not in basis]
        if missing:
            t.fail(f"names {missing[0][:80]!r}, which basis.safetensors does not hold", "extra_tensors")
        if kind == "full" and any(basis[f"task.{name}.{x}"].dtype not in SUPPORTED_FLOATS for x in extra):
            t.fail("names a tensor that is not floating point", "extra_tensors")
        if kind == "full" and any(x not in base_tensors for x in extra):
            t.fail("names a tensor that is not in the base's tensors", "extra_tensors")
        if kind == "adapter":
            check_lora_config(t.mapping("adapter_config"), t.source, _HINT)
            for base_name, m in t.mapping("modules").items():
                mf = t.child("modules", m, f"task #{i + 1} module {base_name[:80]!r}")
                for key in ("path", "a", "b"):
                    mf.text(key)
                mf.integer("rank", minimum=1)
                mf.flag("embedding")
                mf.flag("transposed")
                if base_name not in modules:
                    mf.fail("is not in the bundle's modules", None)
    for name, m in modules.items():
        mf = f.child("modules", m, f"module {name[:80]!r}")
        _check_module(mf, name, len(tasks), basis)
        if mf.obj["tensor"] not in base_tensors:
            mf.fail("is not one of the base's tensors", "tensor")


def _check_module(m: Fields, name: str, n: int, basis: dict[str, TensorInfo]) -> None:
    """One module's record: ``coefficients`` n×p, ``errors`` n, ``zero_tasks`` task indices, and the mean (when
    centred) and the p basis updates present in basis.safetensors with the module's shape."""
    m.text("tensor")
    shape = m.sequence("shape")
    if len(shape) != 2 or not all(is_int(d) and d >= 1 for d in shape):
        m.fail("must be two whole numbers ≥ 1 [out, in]", "shape")
    m.flag("transposed")
    centered = m.flag("centered")
    p = m.integer("p", minimum=0)
    m.integer("storage", minimum=0)
    m.integer("raw", minimum=0)
    coefficients = m.sequence("coefficients")
    if len(coefficients) != n or not all(
        isinstance(row, list) and len(row) == p and all(is_number(c) for c in row) for row in coefficients
    ):
        m.fail(
            f"must be {n}×{p} finite numbers (one row per task, one column per basis update)", "coefficients"
        )
    errors = m.sequence("errors")
    if len(errors) != n or not all(is_number(e) and e >= 0 for e in errors):
        m.fail(f"must be {n} finite numbers ≥ 0 (one per task)", "errors")
    values = m.sequence("singular_values")
    if not all(is_number(v) for v in values):
        m.fail("must be a list of finite numbers", "singular_values")
    zero = m.sequence("zero_tasks", [])
    if not all(is_int(i) and 0 <= i < n for i in zero):
        m.fail(f"must be task indices from 0 to {n - 1}", "zero_tasks")
    keys = ([f"{name}.mean"] if centered else []) + [f"{name}.basis.{k}" for k in range(p)]
    for key in keys:
        _check_update(m, key, (shape[0], shape[1]), basis)


def _check_update(m: Fields, key: str, shape: tuple[int, int], basis: dict[str, TensorInfo]) -> None:
    dense, b, a = basis.get(key), basis.get(f"{key}.B"), basis.get(f"{key}.A")
    parts = [x for x in (dense, b, a) if x is not None]
    if not parts or any(x.dtype not in SUPPORTED_FLOATS for x in parts):
        m.fail(f"basis.safetensors has no float tensor {key!r} (or {key}.B/.A)", None)
    if dense is not None:
        ok = dense.shape == shape
    else:
        ok = (b is not None and a is not None and len(b.shape) == 2 and len(a.shape) == 2
              and (b.shape[0], a.shape[1]) == shape and b.shape[1] == a.shape[0])  # fmt: skip
    if not ok:
        got = " and ".join(str(list(x.shape)) for x in parts)
        m.fail(f"its basis tensor {key!r} is {got}, not a {shape[0]}×{shape[1]} update", None)


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
