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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from spectra_cli.checkpoint.activations import Activations, read_activations
from spectra_cli.checkpoint.loader import MatrixLoader
from spectra_cli.checkpoint.matrices import MatrixSpec, select_matrices
from spectra_cli.checkpoint.naming import module_path
from spectra_cli.checkpoint.source import Checkpoint, checkpoint_inputs, open_checkpoint
from spectra_cli.checkpoint.spectra_file import SPECTRA_FORMAT, saved_matrices, saved_values
from spectra_cli.errors import SelectionError
from spectra_cli.options import EngineOptions, SelectionOptions
from spectra_cli.results import OMIT_NONE, RunResult, options_record
from spectra_cli.spectral.allocation import (
    STRATEGIES,
    AllocationError,
    Constraints,
    Problem,
    Strategy,
    allocate,
    energy_curve,
    eva_components,
    uniform_ranks,
)
from spectra_cli.spectral.engine import ResolvedEngine, engine_info, resolve, singular_values

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


class PeftConfig(TypedDict):
    """Keyword arguments of ``peft.LoraConfig`` (see :func:`peft_config`)."""

    r: int
    lora_alpha: float
    target_modules: list[str]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]


@dataclass(frozen=True, kw_only=True)
class AllocateSummary:
    """The summary of ``allocate``. ``budget`` is in ``budget_kind`` units (ranks or parameters); ``used`` and
    ``uniform_used`` likewise; the ``uniform_*`` fields describe the uniform allocation of the same budget;
    ``r`` / ``lora_alpha`` the commonest rank and its α. Strategy-specific keys appear only for that strategy:
    ``threshold``, ``reduction_ratio`` and ``low_rank_components`` (welore), ``components`` (eva)."""

    strategy: str
    reference: str
    budget_kind: str
    budget: float
    used: int
    uniform_used: int
    modules: int
    adapted: int
    dropped: list[str]
    total_rank: int
    mean_rank: float
    params: int
    uniform_params: int
    uniform_rank: int
    mean_energy: float
    mean_energy_uniform: float
    reference_rank: int
    r: int
    lora_alpha: float
    alpha_policy: str
    threshold: float | None = field(default=None, metadata=OMIT_NONE)
    reduction_ratio: float | None = field(default=None, metadata=OMIT_NONE)
    components: int | None = field(default=None, metadata=OMIT_NONE)
    low_rank_components: int | None = field(default=None, metadata=OMIT_NONE)
    engine: dict[str, Any]
    seconds: float
    peft_config: PeftConfig


def peft_config(ranks: Mapping[str, int], alphas: Mapping[str, float], r: int, lora_alpha: float) -> PeftConfig:
    """Keyword arguments for ``peft.LoraConfig``: ``r``, ``lora_alpha``, ``target_modules`` (full module paths
    of the modules with rank > 0, matched by PEFT as names or dotted suffixes), ``rank_pattern`` and
    ``alpha_pattern`` (every target module, keys ``re.escape``-d full paths, in an order in which PEFT's
    first-match rule ``re.match(rf"(.*\\.)?({key})$", name)`` always finds the module's own key)."""
    kept = [m for m, rank in ranks.items() if rank > 0]
    keys = _pattern_order(kept)
    return PeftConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=kept,
        rank_pattern={re.escape(m): ranks[m] for m in keys},
        alpha_pattern={re.escape(m): alphas[m] for m in keys},
    )


@dataclass
class AllocationResult(RunResult[AllocateSummary]):
    """Rows (one per target module), the summary, and the allocation.

    ``ranks`` maps each target module path (tensor name without ``.weight``) to its rank (0 = dropped);
    ``alphas`` maps the modules with rank > 0 to their LoRA α.
    """

    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    r: int = 0
    lora_alpha: float = 0.0

    def peft_config(self) -> PeftConfig:
        """Keyword arguments for ``peft.LoraConfig`` (:func:`peft_config` of this allocation)."""
        return peft_config(self.ranks, self.alphas, self.r, self.lora_alpha)

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
class Target:
    """One module that may get an adapter: its path (tensor name without ``.weight``), the matrix it adapts,
    its logical out×in shape, depth, kind and role."""

    name: str  # module path
    tensor: str
    shape: tuple[int, int]
    depth: int | None
    kind: str
    role: str


@dataclass(frozen=True)
class AllocatePlan:
    """What one run allocates, decided before any decomposition: the opened checkpoint (or spectra file), the
    targets (read order), the selected matrices of a checkpoint (empty for a spectra file), the engine and its
    description for the summary, the activations,
    the strategy and the budget (kind ``rank``/``params``, total, cost per unit rank of each target)."""

    ckpt: Checkpoint
    saved: bool
    targets: list[Target]
    specs: list[MatrixSpec]
    engine: ResolvedEngine | None  # None: the spectra are read from the file
    engine_info: dict[str, Any]
    activations: Activations | None
    strategy: Strategy
    budget_kind: str
    budget: float
    costs: tuple[int, ...]


@dataclass(frozen=True)
class Decision:
    """The strategy's answer: per target its rank and the uniform allocation's, the reference rank R_ref, the
    strategy's extra facts (``info``) and the problem it solved."""

    ranks: list[int]
    uniform: list[int]
    reference_rank: int
    info: Mapping[str, Any]
    problem: Problem


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
    p = plan_allocate(path, opts)
    spectra = measure(p, progress)
    d = decide(p, spectra, opts)
    alpha_of = _alpha_rule(opts, d.reference_rank)
    counts = Counter(r for r in d.ranks if r > 0)
    r_common = max(counts, key=lambda r: (counts[r], r))
    rows = _rows(p.targets, spectra, d, alpha_of)
    rank_map = {t.name: r for t, r in zip(p.targets, d.ranks, strict=True)}
    alphas = {t.name: alpha_of(r) for t, r in zip(p.targets, d.ranks, strict=True) if r > 0}
    config = peft_config(rank_map, alphas, r_common, alpha_of(r_common))
    summary = summarize(p, d, rows, opts.alpha_policy, r_common, alpha_of(r_common), p.engine_info,
                        round(time.perf_counter() - t0, 3), config)  # fmt: skip
    inputs = checkpoint_inputs(p.ckpt)
    if p.saved:
        inputs["spectra_of"] = p.ckpt.metadata.get("source")
    if opts.activations is not None:
        inputs["activations"] = str(opts.activations)
    options = options_record(opts)
    return AllocationResult(rows, summary, inputs, options, rank_map, alphas, r_common, alpha_of(r_common))


def plan_allocate(path: str | Path, opts: AllocateOptions) -> AllocatePlan:
    """Open the checkpoint (or spectra file) and the activations, choose the targets and size the budget;
    nothing is decomposed (the options themselves were checked by :class:`AllocateOptions`)."""
    strategy = STRATEGIES[opts.strategy]
    ckpt = open_checkpoint(path)
    saved = ckpt.metadata.get("format") == SPECTRA_FORMAT
    # check the cheap inputs before any SVD
    acts = read_activations(opts.activations) if opts.activations is not None else None
    engine: ResolvedEngine | None = None
    if saved:
        targets, saved_opts = _targets_from_saved(ckpt, opts)
        specs: list[MatrixSpec] = []
        info = {"source": "saved spectra", **saved_opts.get("resolved", {})}
    else:
        specs = _checkpoint_specs(ckpt, opts)
        targets = [Target(module_path(s.name), s.name, s.shape, s.depth, s.kind, s.role) for s in specs]
        engine = resolve(opts.engine)
        info = engine_info(engine)
    kind, budget, costs = _budget(opts, targets)
    return AllocatePlan(ckpt, saved, targets, specs, engine, info, acts, strategy, kind, budget, costs)


def _checkpoint_specs(ckpt: Checkpoint, opts: AllocateOptions) -> list[MatrixSpec]:
    specs, _ = select_matrices(ckpt, opts.selection())
    if not opts.include and not opts.kinds and not opts.roles:
        specs = [s for s in specs if s.role not in _NOT_TARGETS]
        if not specs:
            raise SelectionError(
                f"{ckpt.path}: no weight matrices besides embeddings; choose targets with --kinds"
            )
    return specs


def _targets_from_saved(ckpt: Checkpoint, opts: AllocateOptions) -> tuple[list[Target], dict[str, Any]]:
    chosen, saved_opts = saved_matrices(ckpt, opts.selection())
    if not opts.include and not opts.kinds and not opts.roles:
        chosen = [m for m in chosen if m.get("role") not in _NOT_TARGETS]
    if not chosen:
        raise SelectionError(f"{ckpt.path}: no saved spectra selected after filters")
    parts = [m["name"] for m in chosen if m["name"] != m["tensor"]]
    if parts:
        raise SelectionError(
            f"{ckpt.path}: {parts[0]} is part of a split fused projection, which cannot be a LoRA target; save "
            "the spectra without --split-fused"
        )
    return [
        Target(module_path(m["tensor"]), m["tensor"], (int(m["shape"][0]), int(m["shape"][1])), m.get("depth"),
               m["kind"], m["role"])
        for m in chosen
    ], saved_opts  # fmt: skip


def measure(p: AllocatePlan, progress: Callable[[int, int, str], None] | None = None) -> list[np.ndarray]:
    """Every target's singular values (streamed by the engine, or read from the spectra file), in plan order."""
    if p.engine is None:
        spectra = []
        for i, t in enumerate(p.targets):
            saved = saved_values(p.ckpt, t.tensor)
            if saved is None:
                raise AllocationError(
                    f"{p.ckpt.path}: no saved singular values for {t.tensor} (NaN/Inf weights); leave it out with "
                    "--exclude"
                )
            spectra.append(saved)
            if progress:
                progress(i + 1, len(p.targets), t.tensor)
        return spectra
    loader = MatrixLoader(p.ckpt)
    values: dict[str, np.ndarray] = {}
    bad: list[str] = []
    for i, mv in enumerate(singular_values(p.specs, p.engine, loader.load, loader.chunks)):
        if mv.values is None:
            bad.append(mv.spec.name)
        else:
            values[mv.spec.name] = mv.values
        if progress:
            progress(i + 1, len(p.specs), mv.spec.name)
    if bad:
        raise AllocationError(
            f"{len(bad)} target matrices contain NaN/Inf ({', '.join(bad[:3])}); fix the checkpoint or leave them "
            "out with --exclude"
        )
    return [values[s.name] for s in p.specs]


def _explained(acts: Activations, ckpt: Checkpoint, targets: list[Target], k: int) -> dict[str, np.ndarray]:
    known = {module_path(t.name) for t in ckpt.tensors}
    if ckpt.metadata.get("format") == SPECTRA_FORMAT:
        known |= {t.name for t in targets}
    acts.check_modules(known, {t.name: t.shape[1] for t in targets})
    acts.require(t.name for t in targets)
    return {t.name: acts.modules[t.name].pca(min(k, t.shape[1]))[1] for t in targets}


def _budget(opts: AllocateOptions, targets: list[Target]) -> tuple[str, float, tuple[int, ...]]:
    """The budget's kind, total and cost per unit rank of each target (exactly one budget: the options')."""
    if opts.budget_rank is not None:
        return "rank", float(math.floor(opts.budget_rank * len(targets) + 1e-9)), tuple(1 for _ in targets)
    assert opts.budget_params is not None
    return "params", float(opts.budget_params), tuple(t.shape[0] + t.shape[1] for t in targets)


def decide(p: AllocatePlan, spectra: list[np.ndarray], opts: AllocateOptions) -> Decision:
    """Run the strategy on the targets' spectra (and the activations' explained variance when it needs them);
    refuses an allocation that drops every module, saying which constraint or budget is too tight."""
    constraints = opts.constraints
    names = tuple(t.name for t in p.targets)
    shapes = tuple(t.shape for t in p.targets)
    base = Problem(names, shapes, tuple(spectra), p.budget, p.costs, constraints)
    uniform = uniform_ranks(base)
    if opts.budget_rank is not None:
        ref = max(1, round(opts.budget_rank))
    else:
        ref = max([r for r in uniform if r > 0], default=constraints.smallest)
    explained = None
    if p.strategy.needs_activations and p.activations is not None:
        explained = _explained(p.activations, p.ckpt, p.targets, eva_components(ref, opts.rho))
    problem = Problem(names, shapes, tuple(spectra), p.budget, p.costs, constraints, explained, opts.rho, ref)
    answer = allocate(p.strategy.name, problem)
    ranks = list(answer.ranks)
    if not any(ranks):
        steps = [
            (lv[1] * c, lv[1], n)
            for lv, c, n in zip(problem.levels(), p.costs, names, strict=True)
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
        unit = "ranks" if p.budget_kind == "rank" else "parameters"
        raise AllocationError(
            f"the allocation dropped every module: the budget ({p.budget:,.0f} {unit}) is below the cheapest "
            f"adapter ({name} at rank {r}: {cost:,} {unit}); raise the budget"
        )
    return Decision(ranks, list(uniform), ref, answer.info, problem)


def _alpha_rule(opts: AllocateOptions, ref: int) -> Callable[[int], float]:
    """α of a module of rank r under ``opts.alpha_policy`` (``lora_alpha`` defaults to R_ref: scale 1)."""
    base_alpha = float(opts.lora_alpha) if opts.lora_alpha is not None else float(ref)

    def alpha_of(r: int) -> float:
        if opts.alpha_policy == "fixed":
            return base_alpha
        if opts.alpha_policy == "2r":
            return 2.0 * r
        return base_alpha * r / ref

    return alpha_of


def _rows(targets: list[Target], spectra: list[np.ndarray], d: Decision,
          alpha_of: Callable[[int], float]) -> list[dict[str, Any]]:  # fmt: skip
    ranks, uniform, info = d.ranks, d.uniform, d.info
    rows: list[dict[str, Any]] = []
    for i, t in enumerate(targets):
        curve = energy_curve(spectra[i], min(t.shape))
        e, eu = float(curve[ranks[i]]), float(curve[uniform[i]])
        out, inp = t.shape
        row: dict[str, Any] = {
            "name": t.name, "tensor": t.tensor, "depth": t.depth, "kind": t.kind, "role": t.role,
            "shape": f"{out}x{inp}", "rows": out, "cols": inp, "full_rank": min(out, inp),
            "rank": ranks[i], "params": ranks[i] * (out + inp),
            "alpha": alpha_of(ranks[i]) if ranks[i] > 0 else None,
            "energy": e, "uniform_rank": uniform[i], "uniform_energy": eu, "energy_gain": e - eu,
        }  # fmt: skip
        if "explained_variance" in info:
            row["explained_variance"] = info["explained_variance"][i]
        if "pruned_fraction" in info:  # WeLore: > 50% of the rank below t marks a low-rank component
            row["pruned_fraction"] = info["pruned_fraction"][i]
            row["low_rank_component"] = info["pruned_fraction"][i] > 0.5
        if "effective_ranks" in info:
            row["effective_rank"] = info["effective_ranks"][i]
        rows.append(row)
    return rows


def summarize(p: AllocatePlan, d: Decision, rows: list[dict[str, Any]], alpha_policy: str, r: int,
              lora_alpha: float, engine: dict[str, Any], seconds: float,
              config: PeftConfig) -> AllocateSummary:  # fmt: skip
    """Budget use, energy captured against the uniform allocation, the PEFT config."""
    ranks, uniform, info, targets = d.ranks, d.uniform, d.info, p.targets
    return AllocateSummary(
        strategy=p.strategy.name,
        reference=p.strategy.reference,
        budget_kind=p.budget_kind,
        budget=p.budget,
        used=sum(r * c for r, c in zip(ranks, p.costs, strict=True)),
        uniform_used=sum(r * c for r, c in zip(uniform, p.costs, strict=True)),
        modules=len(targets),
        adapted=sum(1 for r in ranks if r > 0),
        dropped=[t.name for t, r in zip(targets, ranks, strict=True) if r == 0],
        total_rank=sum(ranks),
        mean_rank=sum(ranks) / len(ranks),
        params=sum(row["params"] for row in rows),
        uniform_params=sum(u * (t.shape[0] + t.shape[1]) for u, t in zip(uniform, targets, strict=True)),
        uniform_rank=max(uniform),
        mean_energy=float(np.mean([row["energy"] for row in rows])),
        mean_energy_uniform=float(np.mean([row["uniform_energy"] for row in rows])),
        reference_rank=d.reference_rank,
        r=r,
        lora_alpha=lora_alpha,
        alpha_policy=alpha_policy,
        threshold=info.get("threshold"),
        reduction_ratio=info.get("reduction_ratio"),
        components=info.get("components"),
        low_rank_components=(
            sum(1 for row in rows if row["low_rank_component"]) if "pruned_fraction" in info else None
        ),
        engine=engine,
        seconds=seconds,
        peft_config=config,
    )


__all__ = ["ALPHA_POLICIES", "AllocateOptions", "AllocatePlan", "AllocateSummary", "AllocationResult", "Decision",
           "Target", "decide", "measure", "peft_config", "plan_allocate", "run_allocate"]  # fmt: skip
