"""``merge``'s tensors outside the merged matrices (biases, norms, unselected matrices), on the host: they are
small next to the matrices, whatever the backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from spectra_cli.checkpoint.bundle import BundleWriter
from spectra_cli.checkpoint.task_updates import RestTensors
from spectra_cli.spectral.merge import Update

if TYPE_CHECKING:
    from spectra_cli.checkpoint.writers import PatchedCopy
    from spectra_cli.flows.merge import MergePlan

#: methods whose rule is elementwise, so it applies as such to biases and other non-matrix tensors
ELEMENTWISE = ("task-arithmetic", "ties")


def merge_rest(p: MergePlan, copy: PatchedCopy | None, bundle: BundleWriter | None) -> int:
    """Tensors outside the merged matrices. rmm: every full task's changed tensors are stored exactly in the
    bundle (adapters: their non-LoRA tensors). Other methods: task-arithmetic and TIES apply their elementwise
    rule; the rest take the weighted mean θ₀ + Σwᵢ·Δᵢ / Σwᵢ (as TSV does for 1-D parameters). Returns how many
    tensors were changed/stored."""
    changed = 0
    rest = RestTensors(p.base, p.work, p.tuned)
    if bundle is not None:
        for t in p.tuned:
            if t.adapter is not None:
                for name in t.adapter.ignored:
                    bundle.add_task_tensor(t.name, name, t.adapter.checkpoint.read(t.adapter.checkpoint.info(name)))
                    changed += 1
    for info in rest.infos:
        got = rest.deltas(info)
        if got is None:
            continue
        w0, ds, raws = got
        changed += 1
        if bundle is not None:  # stored as read above, not read again
            for t, d, raw in zip(rest.full, ds, raws, strict=True):
                if np.any(d != 0):
                    bundle.add_task_tensor(t.name, info.name, raw)
            continue
        assert p.method is not None
        if copy is None:  # --to-adapter: a LoRA adapter holds no other tensors (counted, reported)
            continue
        if p.method.name in ELEMENTWISE:
            ups = [Update(dense=d.reshape(1, -1)) for d in ds]
            merged: np.ndarray = p.method(ups, p.weights, p.params).update.to_dense().reshape(w0.shape)
        else:
            merged = np.sum([w * d for w, d in zip(p.weights, ds, strict=True)], axis=0) / sum(p.weights)
        copy.patch(info, w0 + merged)
    return changed
