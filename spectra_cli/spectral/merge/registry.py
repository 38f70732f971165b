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
from spectra_cli.spectral.merge.isotropic import merge_iso_c, merge_iso_cts
from spectra_cli.spectral.merge.peft_types import merge_cat, merge_factorwise, merge_svd_type
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
    #: the merged update of factored inputs is exactly a product B·A of rank ≤ Σrᵢ (``--to-adapter`` keeps it
    #: exact without forming ΔW); False: elementwise rules, whose result is dense (full rank in general)
    factored: bool = True

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


ISO_REF = ("Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
           "Subspaces (ICML; arXiv:2502.04959)")
PEFT_REF = "PEFT LoraModel.add_weighted_adapter (Mangrulkar et al. 2022, huggingface/peft)"
DARE_REF = "Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models (DARE, ICML)"
TIES_REF = "Yadav et al. 2023, TIES-Merging (NeurIPS)"

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
            factored=False,
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
        MergeMethod(
            name="iso-c",
            summary="Σ wᵢΔWᵢ with its singular values flattened to their mean (a flat spectrum), times α.",
            reference=ISO_REF,
            params={"scale": (1.0, "α, multiplies the merged update (chosen on validation in the paper)")},
            merge=merge_iso_c,
        ),
        MergeMethod(
            name="iso-cts",
            summary="Common subspace of Σ wᵢΔWᵢ plus per-task directions orthogonal to it, orthogonalised, flat spectrum.",
            reference=ISO_REF,
            params={
                "common_fraction": (0.8, "share of the directions kept from the common subspace (authors: 0.8)"),
                "scale": (1.0, "α, multiplies the merged update (chosen on validation in the paper)"),
            },
            merge=merge_iso_cts,
        ),
        MergeMethod(
            name="linear",
            summary="PEFT's linear: lora_A's and lora_B's summed separately (weights ±√|wᵢsᵢ|); not Σ wᵢΔWᵢ.",
            reference=PEFT_REF,
            params={},
            merge=merge_factorwise("linear"),
        ),
        MergeMethod(
            name="cat",
            summary="PEFT's cat: the factors concatenated, Σ wᵢΔWᵢ exactly at rank Σrᵢ.",
            reference=PEFT_REF,
            params={},
            merge=merge_cat,
        ),
        MergeMethod(
            name="magnitude_prune",
            summary="PEFT's magnitude_prune: each factor pruned to its top-density magnitudes, then summed.",
            reference=PEFT_REF,
            params={"density": (0.2, "fraction of each factor's entries kept by magnitude")},
            merge=merge_factorwise("magnitude_prune"),
        ),
        MergeMethod(
            name="dare_linear",
            summary="PEFT's dare_linear: each factor's entries kept with probability density, rescaled, summed.",
            reference=f"{DARE_REF}; {PEFT_REF}",
            params={"density": (0.2, "probability an entry is kept"), "seed": (0, "seed of the masks (module k: seed+k)")},
            merge=merge_factorwise("dare_linear"),
        ),
        MergeMethod(
            name="dare_ties",
            summary="PEFT's dare_ties: DARE masks on each factor, then TIES' sign election and disjoint mean.",
            reference=f"{DARE_REF}; {PEFT_REF}",
            params={"density": (0.2, "probability an entry is kept"), "seed": (0, "seed of the masks (module k: seed+k)")},
            merge=merge_factorwise("dare_ties"),
        ),
        MergeMethod(
            name="svd",
            summary="PEFT's svd: Σ wᵢΔWᵢ truncated to its top-rank triplets (exact factored SVD, no dense ΔW).",
            reference=PEFT_REF,
            params={"rank": (0, "output rank (0: the largest input rank, as PEFT)")},
            merge=merge_svd_type("svd"),
        ),
        MergeMethod(
            name="ties_svd",
            summary="PEFT's ties_svd: TIES on the dense ΔWᵢ (PEFT's variant), truncated by SVD.",
            reference=f"{TIES_REF}; {PEFT_REF}",
            params={"density": (0.2, "fraction of each ΔWᵢ's entries kept by magnitude"),
                    "rank": (0, "output rank (0: the largest input rank, as PEFT)")},
            merge=merge_svd_type("ties_svd"),
            factored=False,
        ),
        MergeMethod(
            name="magnitude_prune_svd",
            summary="PEFT's magnitude_prune_svd: magnitude-pruned ΔWᵢ summed, truncated by SVD.",
            reference=PEFT_REF,
            params={"density": (0.2, "fraction of each ΔWᵢ's entries kept by magnitude"),
                    "rank": (0, "output rank (0: the largest input rank, as PEFT)")},
            merge=merge_svd_type("magnitude_prune_svd"),
            factored=False,
        ),
        MergeMethod(
            name="dare_linear_svd",
            summary="PEFT's dare_linear_svd: DARE-masked ΔWᵢ summed, truncated by SVD.",
            reference=f"{DARE_REF}; {PEFT_REF}",
            params={"density": (0.2, "probability an entry is kept"), "seed": (0, "seed of the masks (module k: seed+k)"),
                    "rank": (0, "output rank (0: the largest input rank, as PEFT)")},
            merge=merge_svd_type("dare_linear_svd"),
            factored=False,
        ),
        MergeMethod(
            name="dare_ties_svd",
            summary="PEFT's dare_ties_svd: DARE masks, TIES sign election on ΔWᵢ, truncated by SVD.",
            reference=f"{DARE_REF}; {PEFT_REF}",
            params={"density": (0.2, "probability an entry is kept"), "seed": (0, "seed of the masks (module k: seed+k)"),
                    "rank": (0, "output rank (0: the largest input rank, as PEFT)")},
            merge=merge_svd_type("dare_ties_svd"),
            factored=False,
        ),
    )
}
