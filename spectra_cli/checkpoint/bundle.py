"""The reversible-merge bundle (``merge --method rmm --out DIR``): ``basis.safetensors`` (per module the mean,
the p basis updates, dense or as B/A factors; per task the tensors stored exactly) and ``coefficients.json``
(format, version, tasks, per-module coefficients, errors and storage). :class:`BundleWriter` writes it,
``reconstruct`` reads it back (:func:`read_bundle`, :func:`module_fit`).

Bundle (a folder):
- ``basis.safetensors``: per module ``<tensor>.mean`` / ``<tensor>.basis.<k>`` (dense out×in, logical
  orientation) or, for factored updates, ``<tensor>.mean.B`` / ``.mean.A`` and ``<tensor>.basis.<k>.B`` /
  ``.A`` (B out×r, A r×in); per task the tensors that are not reconstructed from the basis, stored exactly:
  ``task.<name>.<tensor>`` (full inputs: every float tensor outside the merged matrices that differs from
  the base, e.g. biases and norms; adapters: their non-LoRA tensors such as ``modules_to_save``).
- ``coefficients.json``: tasks (name, kind, weight, source path, adapter config and per-module factor keys
  for adapters), per module p, the n×p coefficients, each task's relative reconstruction error, the
  singular values of the (centred) stack and the storage; the base's path and tensor shapes.
- ``spectra_run.json``: provenance (written by the flow)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.adapter import check_lora_config
from spectra_cli.checkpoint.safetensors_io import write_safetensors
from spectra_cli.checkpoint.source import Checkpoint, open_checkpoint
from spectra_cli.checkpoint.tensors import SUPPORTED_FLOATS, RawTensor, TensorInfo, to_float
from spectra_cli.checkpoint.tuned import Tuned
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


class BundleWriter:
    """Collects a bundle in a staging folder, module by module: each module's mean and basis go to a ``.npy``
    spill file kept as a read-only memory map (only one module's arrays are in memory), its coefficients and
    errors to the ``coefficients.json`` record; :meth:`write` writes both files."""

    def __init__(self, stage: Path, dtype: type[np.floating]) -> None:
        self.stage = stage
        self.dtype = dtype
        self.tensors: dict[str, RawTensor | np.ndarray] = {}
        self.modules: dict[str, dict[str, Any]] = {}
        self.spill = stage / ".bundle-parts"
        self.spill.mkdir()

    def add_module(self, name: str, tensor: str, shape: tuple[int, int], transposed: bool, fit: RMMModule,
                   factored: bool, covered: list[str], zero_tasks: list[int]) -> None:  # fmt: skip
        """One module's fit: ``tensor`` its base tensor, ``shape`` logical out×in, ``covered`` the tasks whose
        input holds it, ``zero_tasks`` the task indices that left it unchanged (rebuilt as the base's)."""
        errs = [float(e) for e in fit.errors]
        self.modules[name] = {
            "tensor": tensor, "shape": list(shape), "transposed": transposed,
            "factored": factored, "p": fit.p,
            "coefficients": np.asarray(fit.coefficients, dtype=np.float64).tolist(),
            "errors": errs, "singular_values": [float(x) for x in fit.singular_values],
            "centered": fit.mean is not None, "storage": fit.storage, "raw": fit.raw,
            "energy_kept": fit.energy_kept, "covered": covered, "zero_tasks": zero_tasks,
        }  # fmt: skip
        if fit.mean is not None:
            self._put(f"{name}.mean", fit.mean)
        for k, b in enumerate(fit.basis):
            self._put(f"{name}.basis.{k}", b)

    def _keep(self, key: str, arr: np.ndarray | None) -> None:
        x: np.ndarray = np.ascontiguousarray(arr, self.dtype)
        if x.size:
            f = self.spill / f"{len(self.tensors)}.npy"
            np.save(f, x)
            x = np.load(f, mmap_mode="r")
        self.tensors[key] = x

    def _put(self, key: str, u: Update) -> None:
        if u.is_factored:
            self._keep(f"{key}.B", u.B)
            self._keep(f"{key}.A", u.A)
        else:
            self._keep(key, u.dense)

    def add_task_tensor(self, task: str, tensor: str, value: RawTensor) -> None:
        """A tensor of one task stored exactly, as read (``task.<task>.<tensor>``)."""
        self.tensors[f"task.{task}.{tensor}"] = value

    def task_numbers(self) -> int:
        """How many numbers the exactly stored task tensors hold."""
        return sum(int(np.asarray(v.data if isinstance(v, RawTensor) else v).size)
                   for k, v in self.tensors.items() if k.startswith("task."))  # fmt: skip

    def write(self, base: Checkpoint, tuned: Sequence[Tuned], weights: Sequence[float], reference: str,
              settings: dict[str, Any], storage: float | None) -> None:  # fmt: skip
        """Write ``basis.safetensors`` and ``coefficients.json``, then drop the spill files. ``settings``: the
        fit's ``center``, ``basis``, ``energy`` and ``precision``; ``storage``: the bundle's size over the
        inputs'."""
        tasks = []
        for t, w in zip(tuned, weights, strict=True):
            entry: dict[str, Any] = {"name": t.name, "kind": "adapter" if t.adapter else "full", "weight": w,
                                     "path": str(Path(t.path).resolve())}  # fmt: skip
            if t.adapter is not None:
                entry["adapter_config"] = t.adapter.config
                entry["modules"] = {
                    base_name: {"path": m.path, "a": m.a.name, "b": m.b.name, "rank": m.rank,
                                "embedding": m.embedding, "transposed": m.transposed}
                    for base_name, m in t.modules.items()
                }  # fmt: skip
                entry["extra_tensors"] = list(t.adapter.ignored)
            else:
                entry["extra_tensors"] = sorted(
                    k.removeprefix(f"task.{t.name}.") for k in self.tensors if k.startswith(f"task.{t.name}.")
                )
            tasks.append(entry)
        doc = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "reference": reference,
            "base": {"path": str(Path(base.path).resolve()),
                     "tensors": {x.name: list(x.shape) for x in base.tensors}},
            "tasks": tasks,
            "center": settings["center"],
            "basis": settings["basis"],
            "energy": settings["energy"],
            "precision": settings["precision"],
            "storage": storage,
            "modules": self.modules,
        }  # fmt: skip
        write_safetensors(self.stage / "basis.safetensors", self.tensors, {"format": "pt"})
        (self.stage / "coefficients.json").write_text(json.dumps(doc, indent=1) + "\n")
        self.tensors.clear()  # drop the memory maps before their files
        shutil.rmtree(self.spill)
