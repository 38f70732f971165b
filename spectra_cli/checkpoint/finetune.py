"""A full fine-tuned checkpoint read beside its base (``init-adapter --method extract --tuned``): its tensors
matched to the base's by name and shape, and the tensors that changed outside the matched ones."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spectra_cli.checkpoint.adapter import is_adapter
from spectra_cli.checkpoint.matrices import MatrixSpec
from spectra_cli.checkpoint.source import Checkpoint, open_checkpoint
from spectra_cli.checkpoint.tensors import TensorInfo
from spectra_cli.errors import CheckpointError, ShapeMismatch


def open_finetune(
    path: str | Path, specs: Sequence[MatrixSpec], role: str = "fine-tune"
) -> tuple[Checkpoint, dict[str, TensorInfo]]:
    """The fine-tuned checkpoint at ``path`` and, per base matrix (by ``spec.name``), its tensor of the same name;
    refuses an adapter folder and a tensor that is missing or shaped differently (not a fine-tune of the base).
    ``role`` names what the checkpoint should be in the messages ("compressed copy" for EoRA)."""
    if is_adapter(path):
        raise CheckpointError(f"{path}: a PEFT adapter folder; a full checkpoint ({role} of the base) is needed")
    tuned = open_checkpoint(path)
    by_name = {t.name: t for t in tuned.tensors}
    infos: dict[str, TensorInfo] = {}
    for s in specs:
        info = by_name.get(s.tensor.name)
        if info is None or info.shape != s.tensor.shape:
            raise ShapeMismatch(
                f"{path}: tensor {s.tensor.name} is "
                + ("missing" if info is None else f"{list(info.shape)}, the base has {list(s.tensor.shape)}")
                + f"; it must be a {role} of this base"
            )
        infos[s.name] = info
    return tuned, infos


def untracked_changes(base: Checkpoint, tuned: Checkpoint, targets: set[str]) -> list[str]:
    """Tensors other than the ``targets`` (tensor names) that differ between base and tuned (or exist on one
    side only): an adapter extracted over the targets does not carry them."""
    by_name = {t.name: t for t in tuned.tensors}
    changed: list[str] = []
    for t in base.tensors:
        if t.name in targets:
            continue
        u = by_name.get(t.name)
        if u is None or u.shape != t.shape or u.dtype != t.dtype:
            changed.append(t.name)
            continue
        if not np.array_equal(base.read(t).data, tuned.read(u).data):
            changed.append(t.name)
    base_names = {t.name for t in base.tensors}
    changed += [n for n in by_name if n not in base_names]
    return changed
