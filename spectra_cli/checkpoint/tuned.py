"""Tuned inputs: a full fine-tuned checkpoint or a PEFT LoRA adapter, matched against the base matrices it
changes (by tensor name and shape for checkpoints, by module path for adapters). Used by compare, merge and
check."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spectra_cli.checkpoint.adapter import Adapter, LoraModule, is_adapter, match_base, open_adapter
from spectra_cli.checkpoint.matrices import MatrixSpec
from spectra_cli.checkpoint.source import Checkpoint, open_checkpoint
from spectra_cli.checkpoint.tensors import TensorInfo
from spectra_cli.errors import CheckpointError, ShapeMismatch


@dataclass
class Tuned:
    """One tuned input: a full checkpoint or an adapter, with its name and which base matrices it changes."""

    name: str
    path: Path
    checkpoint: Checkpoint | None = None
    adapter: Adapter | None = None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # base matrix name → tuned tensor
    modules: dict[str, LoraModule] = field(default_factory=dict)  # base matrix name → LoRA module
    missing: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "adapter" if self.adapter else "checkpoint"

    def covers(self, name: str) -> bool:
        return name in (self.modules if self.adapter else self.tensors)


def default_name(path: Path) -> str:
    p = Path(path)
    return (p.name if p.is_dir() else p.stem) or str(p)


def open_tuned(
    name: str, path: Path, base: Checkpoint, specs: Sequence[MatrixSpec], allow_missing: bool
) -> Tuned:
    """Open a tuned input and match it against the selected base matrices."""
    t = Tuned(name=name, path=Path(path))
    selected = {s.name: s for s in specs}
    if is_adapter(path):
        t.adapter = open_adapter(path)
        try:
            mapping = match_base(t.adapter.modules, [x.name for x in base.tensors], allow_missing)
        except CheckpointError as e:
            raise CheckpointError(f"{name}: {e}") from None
        for mod in t.adapter.modules:
            base_name = mapping.get(mod.path)
            if base_name is None:
                t.missing.append(mod.path)
                continue
            if base_name not in selected:
                continue
            spec = selected[base_name]
            out, inp = (spec.stored_2d[1], spec.stored_2d[0]) if mod.transposed else spec.stored_2d
            if (mod.b.shape[0], mod.a.shape[1]) != (out, inp):
                raise ShapeMismatch(
                    f"{name}: module {mod.path} updates a {mod.b.shape[0]}×{mod.a.shape[1]} weight but the base "
                    f"{base_name} is {spec.stored_2d[0]}×{spec.stored_2d[1]}; the adapter belongs to another base"
                )
            t.modules[base_name] = mod
        return t
    t.checkpoint = open_checkpoint(path)
    by_name = {x.name: x for x in t.checkpoint.tensors}
    for spec in specs:
        info = by_name.get(spec.tensor.name)
        if info is None:
            if not allow_missing:
                raise CheckpointError(
                    f"{name}: tensor {spec.tensor.name} of the base is missing from {path}; "
                    "the checkpoints do not match (use --allow-missing to skip such tensors)"
                )
            t.missing.append(spec.tensor.name)
            continue
        if info.shape != spec.tensor.shape:
            raise ShapeMismatch(
                f"{name}: tensor {spec.tensor.name} is {list(info.shape)} in {path} but {list(spec.tensor.shape)} "
                "in the base; the checkpoints are of different architectures"
            )
        if not info.is_float:
            raise ShapeMismatch(f"{name}: tensor {spec.tensor.name} is not floating point in {path}")
        t.tensors[spec.name] = info
    return t
