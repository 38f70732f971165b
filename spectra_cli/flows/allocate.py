"""``allocate``: decide a LoRA rank per target module under a budget, and the PEFT config that applies it.

The flow: open the checkpoint (or a spectra file from ``analyze --save-spectra``, so no SVD is redone) → select
the target matrices → their singular values (the streaming engine of ``analyze``: each matrix read once, within
``--max-memory``) → a :class:`~spectra_cli.spectral.allocation.Problem` → one strategy of the registry →
rows, summary and the PEFT ``LoraConfig`` keyword arguments. No printing, no CLI.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.activations import Activations, read_activations
from spectra_cli.checkpoint.loader import MatrixLoader
from spectra_cli.checkpoint.matrices import select_matrices
from spectra_cli.checkpoint.naming import module_path
from spectra_cli.checkpoint.source import Checkpoint, checkpoint_inputs, open_checkpoint
from spectra_cli.checkpoint.spectra_file import SPECTRA_FORMAT, saved_matrices, saved_values
from spectra_cli.errors import SelectionError
from spectra_cli.options import EngineOptions, SelectionOptions
from spectra_cli.results import RunResult
from spectra_cli.spectral.allocation import (
    STRATEGIES,
    AllocationError,
    Constraints,
    Problem,
    allocate,
    energy_curve,
    eva_components,
    uniform_ranks,
)
from spectra_cli.spectral.engine import engine_info, resolve, singular_values

ALPHA_POLICIES = ("scale", "fixed", "2r")
_NOT_TARGETS = ("embedding", "lm_head")


@dataclass(frozen=True)
class AllocateOptions(SelectionOptions, EngineOptions):
    """Options of ``allocate`` (the CLI flags of the same names).

    Exactly one of ``budget_rank`` (average rank R over the target modules: a total of R × #modules ranks) and
    ``budget_params`` (trainable parameters Σ r·(in + out)) must be given. ``alpha_policy``: ``scale`` keeps
    α/r = ``lora_alpha``/R_ref for every module, ``fixed`` gives every module α = ``lora_alpha``, ``2r`` gives
    α = 2r. ``lora_alpha`` defaults to the reference rank R_ref (the budget rank, or the uniform rank that a
    parameter budget affords), i.e. a scale α/r of 1.
    """

    strategy: str = "energy"
    budget_rank: float | None = None
    budget_params: int | None = None
    min_rank: int = 1
    max_rank: int | None = None
    multiple_of: int = 1
    allow_zero: bool = False
    alpha_policy: str = "scale"
    lora_alpha: float | None = None
    activations: str | Path | None = None
    rho: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise AllocationError(f"--strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.alpha_policy not in ALPHA_POLICIES:
            raise AllocationError(f"--alpha {self.alpha_policy!r} is not one of {', '.join(ALPHA_POLICIES)}")
        if (self.budget_rank is None) == (self.budget_params is None):
            raise AllocationError("give exactly one budget: --budget-rank R (average rank) or --budget-params P")
        if self.budget_rank is not None and not (self.budget_rank > 0 and math.isfinite(self.budget_rank)):
            raise AllocationError(f"--budget-rank {self.budget_rank}: the average rank must be a positive number")
        if self.budget_params is not None and self.budget_params <= 0:
            raise AllocationError(f"--budget-params {self.budget_params}: the parameter budget must be positive")
        if STRATEGIES[self.strategy].needs_activations and self.activations is None:
            raise AllocationError(f"--strategy {self.strategy} needs --activations FILE (see `spectra capture`)")
        if not self.rho >= 1:
            raise AllocationError(f"--rho {self.rho}: must be at least 1")
        if self.lora_alpha is not None and not self.lora_alpha >= 0:
            raise AllocationError(f"--lora-alpha {self.lora_alpha}: must not be negative")
        Constraints(self.min_rank, self.max_rank, self.multiple_of, self.allow_zero)  # checks --min-rank, --max-rank, --multiple-of

    @property
    def constraints(self) -> Constraints:
        return Constraints(self.min_rank, self.max_rank, self.multiple_of, self.allow_zero)


@dataclass
class AllocationResult(RunResult):
    """Rows (one per target module), the summary, and the allocation.

    ``ranks`` maps each target module path (tensor name without ``.weight``) to its rank (0 = dropped);
    ``alphas`` maps the modules with rank > 0 to their LoRA α.
    """

    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    r: int = 0
    lora_alpha: float = 0.0

    def peft_config(self) -> dict[str, Any]:
        """Keyword arguments for ``peft.LoraConfig``: ``r``, ``lora_alpha``, ``target_modules`` (full module paths
        of the modules with rank > 0, matched by PEFT as names or dotted suffixes), ``rank_pattern`` and
        ``alpha_pattern`` (every target module, keys ``re.escape``-d full paths, in an order in which PEFT's
        first-match rule ``re.match(rf"(.*\\.)?({key})$", name)`` always finds the module's own key)."""
        kept = [m for m, r in self.ranks.items() if r > 0]
        keys = _pattern_order(kept)
        return {
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": kept,
            "rank_pattern": {re.escape(m): self.ranks[m] for m in keys},
            "alpha_pattern": {re.escape(m): self.alphas[m] for m in keys},
        }

    def write_peft_config(self, path: str | Path) -> None:
        """Write :meth:`peft_config` as JSON through the one output writer (``checkpoint.output``)."""
        from spectra_cli.checkpoint.output import write_text

        write_text(path, json.dumps(self.peft_config(), indent=2) + "\n")


def _pattern_order(paths: list[str]) -> list[str]:
    """Checkpoint order, unless a path is a dotted suffix of another: then longest first, so that the longer
    module's own key comes before the shorter key that would also match it."""
    for a in paths:
        for b in paths:
            if a != b and b.endswith("." + a):
                return sorted(paths, key=len, reverse=True)
    return list(paths)


@dataclass(frozen=True)
class _Target:
    name: str  # module path
    tensor: str
    shape: tuple[int, int]
    depth: int | None
    kind: str
    role: str


def _targets_from_checkpoint(
    ckpt: Checkpoint, opts: AllocateOptions, progress: Callable[[int, int, str], None] | None
) -> tuple[list[_Target], list[np.ndarray], dict[str, Any]]:
    specs, _ = select_matrices(ckpt, opts.selection())
    if not opts.include and not opts.kinds:
        specs = [s for s in specs if s.role not in _NOT_TARGETS]
        if not specs:
            raise SelectionError(
                f"{ckpt.path}: no weight matrices besides embeddings; choose targets with --kinds"
            )
    eng = resolve(opts.engine)
    loader = MatrixLoader(ckpt)
    values: dict[str, np.ndarray] = {}
    bad: list[str] = []
    for i, mv in enumerate(singular_values(specs, eng, loader.load, loader.chunks)):
        if mv.values is None:
            bad.append(mv.spec.name)
        else:
            values[mv.spec.name] = mv.values
        if progress:
            progress(i + 1, len(specs), mv.spec.name)
    if bad:
        raise AllocationError(
            f"{len(bad)} target matrices contain NaN/Inf ({', '.join(bad[:3])}); fix the checkpoint or leave them "
            "out with --exclude"
        )
    targets = [_Target(module_path(s.name), s.name, s.shape, s.depth, s.kind, s.role) for s in specs]
    return targets, [values[s.name] for s in specs], engine_info(eng)


def _targets_from_saved(
    ckpt: Checkpoint, opts: AllocateOptions, progress: Callable[[int, int, str], None] | None
) -> tuple[list[_Target], list[np.ndarray], dict[str, Any]]:
    chosen, saved_opts = saved_matrices(ckpt, opts.selection())
    if not opts.include and not opts.kinds:
        chosen = [m for m in chosen if m.get("role") not in _NOT_TARGETS]
    if not chosen:
        raise SelectionError(f"{ckpt.path}: no saved spectra selected after filters")
    parts = [m["name"] for m in chosen if m["name"] != m["tensor"]]
    if parts:
        raise SelectionError(
            f"{ckpt.path}: {parts[0]} is part of a split fused projection, which cannot be a LoRA target; save "
            "the spectra without --split-fused"
        )
    targets, spectra = [], []
    for i, m in enumerate(chosen):
        values = saved_values(ckpt, m["name"])
        if values is None:
            raise AllocationError(
                f"{ckpt.path}: no saved singular values for {m['name']} (NaN/Inf weights); leave it out with --exclude"
            )
        spectra.append(values)
        shape = (int(m["shape"][0]), int(m["shape"][1]))
        targets.append(
            _Target(module_path(m["tensor"]), m["tensor"], shape, m.get("depth"), m["kind"], m["role"])
        )
        if progress:
            progress(i + 1, len(chosen), m["name"])
    return targets, spectra, {"source": "saved spectra", **saved_opts.get("resolved", {})}


def _explained(acts: Activations, ckpt: Checkpoint, targets: list[_Target], k: int) -> dict[str, np.ndarray]:
    known = {module_path(t.name) for t in ckpt.tensors}
    if ckpt.metadata.get("format") == SPECTRA_FORMAT:
        known |= {t.name for t in targets}
    acts.check_modules(known, {t.name: t.shape[1] for t in targets})
    acts.require(t.name for t in targets)
    return {t.name: acts.modules[t.name].pca(min(k, t.shape[1]))[1] for t in targets}


def _budget(opts: AllocateOptions, targets: list[_Target]) -> tuple[str, float, tuple[int, ...]]:
    if (opts.budget_rank is None) == (opts.budget_params is None):
        raise AllocationError("give exactly one budget: --budget-rank R (average rank) or --budget-params P")
    if opts.budget_rank is not None:
        if not (opts.budget_rank > 0 and math.isfinite(opts.budget_rank)):
            raise AllocationError(f"--budget-rank must be a positive number, not {opts.budget_rank}")
        return "rank", float(math.floor(opts.budget_rank * len(targets) + 1e-9)), tuple(1 for _ in targets)
    assert opts.budget_params is not None
    if opts.budget_params <= 0:
        raise AllocationError(f"--budget-params must be positive, not {opts.budget_params}")
    return "params", float(opts.budget_params), tuple(t.shape[0] + t.shape[1] for t in targets)


def run_allocate(
    path: str | Path,
    opts: AllocateOptions | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> AllocationResult:
    """Allocate LoRA ranks to the selected modules of the checkpoint at ``path`` (or of a saved spectra file).

    ``progress(done, total, name)`` is called after each matrix's singular values.
    """
    opts = opts or AllocateOptions()
    t0 = time.perf_counter()
    if opts.strategy not in STRATEGIES:
        raise AllocationError(f"unknown strategy {opts.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if opts.alpha_policy not in ALPHA_POLICIES:
        raise AllocationError(
            f"unknown --alpha policy {opts.alpha_policy!r}; choose one of {', '.join(ALPHA_POLICIES)}"
        )
    strategy = STRATEGIES[opts.strategy]
    if strategy.needs_activations and opts.activations is None:
        raise AllocationError(f"--strategy {strategy.name} needs --activations FILE (see `spectra capture`)")
    if opts.rho < 1:
        raise AllocationError(f"--rho must be at least 1, not {opts.rho}")
    constraints = opts.constraints
    ckpt = open_checkpoint(path)
    saved = ckpt.metadata.get("format") == SPECTRA_FORMAT
    # check the cheap inputs before any SVD
    acts = read_activations(opts.activations) if opts.activations is not None else None
    if saved:
        targets, spectra, engine = _targets_from_saved(ckpt, opts, progress)
    else:
        targets, spectra, engine = _targets_from_checkpoint(ckpt, opts, progress)
    kind, budget, costs = _budget(opts, targets)
    names = tuple(t.name for t in targets)
    shapes = tuple(t.shape for t in targets)
    base = Problem(names, shapes, tuple(spectra), budget, costs, constraints)
    uniform = uniform_ranks(base)
    if opts.budget_rank is not None:
        ref = max(1, round(opts.budget_rank))
    else:
        ref = max([r for r in uniform if r > 0], default=constraints.smallest)
    explained = None
    if strategy.needs_activations and acts is not None:
        explained = _explained(acts, ckpt, targets, eva_components(ref, opts.rho))
    problem = Problem(names, shapes, tuple(spectra), budget, costs, constraints, explained, opts.rho, ref)
    answer = allocate(strategy.name, problem)
    ranks = list(answer.ranks)
    if not any(ranks):
        steps = [
            (lv[1] * c, lv[1], n)
            for lv, c, n in zip(problem.levels(), costs, names, strict=True)
            if len(lv) > 1
        ]
        if not steps:
            raise AllocationError(
                "the allocation dropped every module: no module has an allowed rank within its full rank "
                f"(--min-rank {constraints.min_rank}, --multiple-of {constraints.multiple_of}"
                + (f", --max-rank {constraints.max_rank}" if constraints.max_rank is not None else "")
                + "); lower them"
            )
        cost, r, name = min(steps)
        unit = "ranks" if kind == "rank" else "parameters"
        raise AllocationError(
            f"the allocation dropped every module: the budget ({budget:,.0f} {unit}) is below the cheapest "
            f"adapter ({name} at rank {r}: {cost:,} {unit}); raise the budget"
        )

    base_alpha = float(opts.lora_alpha) if opts.lora_alpha is not None else float(ref)

    def alpha_of(r: int) -> float:
        if opts.alpha_policy == "fixed":
            return base_alpha
        if opts.alpha_policy == "2r":
            return 2.0 * r
        return base_alpha * r / ref

    counts = Counter(r for r in ranks if r > 0)
    r_common = max(counts, key=lambda r: (counts[r], r))
    rows: list[dict[str, Any]] = []
    energies, uni_energies = [], []
    for i, t in enumerate(targets):
        curve = energy_curve(spectra[i], min(t.shape))
        e, eu = float(curve[ranks[i]]), float(curve[uniform[i]])
        energies.append(e)
        uni_energies.append(eu)
        out, inp = t.shape
        row: dict[str, Any] = {
            "name": t.name, "tensor": t.tensor, "depth": t.depth, "kind": t.kind, "role": t.role,
            "shape": f"{out}x{inp}", "rows": out, "cols": inp, "full_rank": min(out, inp),
            "rank": ranks[i], "params": ranks[i] * (out + inp),
            "alpha": alpha_of(ranks[i]) if ranks[i] > 0 else None,
            "energy": e, "uniform_rank": uniform[i], "uniform_energy": eu, "energy_gain": e - eu,
        }  # fmt: skip
        if "explained_variance" in answer.info:
            row["explained_variance"] = answer.info["explained_variance"][i]
        if "pruned_fraction" in answer.info:  # WeLore: > 50% of the rank below t marks a low-rank component
            row["pruned_fraction"] = answer.info["pruned_fraction"][i]
            row["low_rank_component"] = answer.info["pruned_fraction"][i] > 0.5
        if "effective_ranks" in answer.info:
            row["effective_rank"] = answer.info["effective_ranks"][i]
        rows.append(row)
    used = sum(r * c for r, c in zip(ranks, costs, strict=True))
    summary: dict[str, Any] = {
        "strategy": strategy.name,
        "reference": strategy.reference,
        "budget_kind": kind,
        "budget": budget,
        "used": used,
        "uniform_used": sum(r * c for r, c in zip(uniform, costs, strict=True)),
        "modules": len(targets),
        "adapted": sum(1 for r in ranks if r > 0),
        "dropped": [t.name for t, r in zip(targets, ranks, strict=True) if r == 0],
        "total_rank": sum(ranks),
        "mean_rank": sum(ranks) / len(ranks),
        "params": sum(row["params"] for row in rows),
        "uniform_params": sum(u * (t.shape[0] + t.shape[1]) for u, t in zip(uniform, targets, strict=True)),
        "uniform_rank": max(uniform),
        "mean_energy": float(np.mean(energies)),
        "mean_energy_uniform": float(np.mean(uni_energies)),
        "reference_rank": ref,
        "r": r_common,
        "lora_alpha": alpha_of(r_common),
        "alpha_policy": opts.alpha_policy,
        **{k: v for k, v in answer.info.items() if k in ("threshold", "reduction_ratio", "components")},
        **(
            {"low_rank_components": sum(1 for row in rows if row["low_rank_component"])}
            if "pruned_fraction" in answer.info
            else {}
        ),
        "engine": engine,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    inputs = checkpoint_inputs(ckpt)
    if saved:
        inputs["spectra_of"] = ckpt.metadata.get("source")
    if opts.activations is not None:
        inputs["activations"] = str(opts.activations)
    options = asdict(opts)
    for k in ("include", "exclude", "kinds"):
        options[k] = list(options[k])
    if options["activations"] is not None:
        options["activations"] = str(options["activations"])
    rank_map = {t.name: r for t, r in zip(targets, ranks, strict=True)}
    alphas = {t.name: alpha_of(r) for t, r in zip(targets, ranks, strict=True) if r > 0}
    result = AllocationResult(rows, summary, inputs, options, rank_map, alphas, r_common, alpha_of(r_common))
    summary["peft_config"] = result.peft_config()
    return result


__all__ = ["ALPHA_POLICIES", "AllocateOptions", "AllocationResult", "run_allocate"]
