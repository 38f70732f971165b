"""The merge-method registry (``spectra merge --method``): name → :class:`MergeMethod`, each with its
parameters and its paper reference. The reversible merge (``rmm``) is not a registry method: it writes a
bundle (:mod:`spectra_cli.spectral.merge.rmm`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spectra_cli.errors import ShapeMismatch
from spectra_cli.spectral.linalg import NUMPY, Backend
from spectra_cli.spectral.merge.elementwise import merge_task_arithmetic, merge_ties
from spectra_cli.spectral.merge.subspace import merge_knots, merge_tsv
from spectra_cli.spectral.merge.updates import MergeError, MergeOutcome, Update, check_shapes


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: ``params`` maps a parameter name to (default, help); ``merge`` gets the task updates
    of one module, one weight per task, the parameters (defaults filled in by :func:`resolve_params`) and
    the :class:`~spectra_cli.spectral.linalg.Backend` its decompositions run on."""

    name: str
    summary: str
    reference: str
    params: dict[str, tuple[Any, str]]
    merge: Callable[[Sequence[Update], Sequence[float], Mapping[str, Any], Backend], MergeOutcome]

    def resolve_params(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults overridden by ``given``; unknown names are an error."""
        out = {name: default for name, (default, _) in self.params.items()}
        for key, value in (given or {}).items():
            if key not in out:
                known = ", ".join(sorted(out)) or "none"
                raise MergeError(f"method {self.name!r} has no parameter {key!r}; its parameters: {known}")
            out[key] = value
        return out

    def __call__(
        self,
        updates: Sequence[Update],
        weights: Sequence[float] | None = None,
        params: Mapping[str, Any] | None = None,
        backend: Backend = NUMPY,
    ) -> MergeOutcome:
        check_shapes(updates)
        w = [1.0] * len(updates) if weights is None else [float(x) for x in weights]
        if len(w) != len(updates):
            raise ShapeMismatch(f"{len(w)} weights for {len(updates)} updates; give one weight per task")
        return self.merge(updates, w, self.resolve_params(params), backend)


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            name="task-arithmetic",
            summary="ΔW = λ·Σ wᵢΔWᵢ: the sum of the task updates (factored inputs stay factored).",
            reference="Ilharco et al. 2023, Editing Models with Task Arithmetic (ICLR)",
            params={"scale": (1.0, "λ, multiplies the summed update")},
            merge=merge_task_arithmetic,
        ),
        MergeMethod(
            name="ties",
            summary="Trim each update to its top-density entries, elect signs by summed mass, average agreeing entries.",
            reference="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models (NeurIPS); as mergekit",
            params={
                "density": (0.2, "fraction of each update's entries kept by magnitude"),
                "scale": (1.0, "λ, multiplies the merged update"),
            },
            merge=merge_ties,
        ),
        MergeMethod(
            name="tsv",
            summary="Top ⌊min(out,in)/T⌋ singular triplets per task, U's and V's orthogonalised by Procrustes.",
            reference="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging (CVPR)",
            params={"scale": (1.0, "α, multiplies the merged update (chosen on validation in the paper)")},
            merge=merge_tsv,
        ),
        MergeMethod(
            name="knots",
            summary="SVD of the concatenated updates gives a shared U; the tasks' diag(s)·Vᵢᵀ blocks are merged there.",
            reference="Stoica et al. 2025, Model Merging with SVD to Tie the KnOTS (ICLR)",
            params={
                "combine": (
                    "ties",
                    "how the aligned blocks are merged: 'ties' (disjoint mean) or 'linear' (sum)",
                ),
                "density": (
                    0.2,
                    "TIES: fraction of each block's entries kept by magnitude (authors: topK=20%)",
                ),
                "scale": (1.0, "λ, multiplies the merged update (the authors tune it; 0.6 in their configs)"),
            },
            merge=merge_knots,
        ),
    )
}
