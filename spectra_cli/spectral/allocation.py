"""The registry of LoRA rank-allocation strategies (``spectra allocate --strategy``).

Every strategy is a small :class:`Strategy` object (name, summary, paper reference, whether it needs input
activations) with a pure function ``allocate(problem) -> Allocation``. The constraints (``--min-rank``,
``--max-rank``, ``--multiple-of``, ``--allow-zero``) are applied *inside* the strategies, so that the answer
never exceeds the budget.

Conventions. W is out×in with singular values σ₁ ≥ σ₂ ≥ …; a LoRA of rank r on it has r·(in + out) trainable
parameters. A budget is counted in *cost units*: one unit per rank for a rank budget (``--budget-rank R`` is
R × the number of modules units), ``in + out`` units per rank for a parameter budget. The energy of a module at
rank r is E(r) = Σ_{i≤r} σᵢ² / Σ σᵢ² (0 for an all-zero matrix).

The allowed ranks of module i are its *levels*: 0 (only with ``allow_zero``), then m, m+q, m+2q, … up to its cap,
where q = ``multiple_of``, m = ``min_rank`` rounded up to a multiple of q, and the cap is min(``max_rank``, full
rank min(out, in)) rounded down to a multiple of q.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spectra_cli.errors import SpectraError

if TYPE_CHECKING:
    import numpy as np

# NumPy is imported inside the functions that use it: the CLI builds its --strategy choices from this registry
# when it starts, and `spectra --help` should not pay for NumPy.


class AllocationError(SpectraError):
    """The budget or the constraints cannot be met."""


@dataclass(frozen=True)
class Constraints:
    """Rank constraints applied to every module."""

    min_rank: int = 1
    max_rank: int | None = None
    multiple_of: int = 1
    allow_zero: bool = False

    def __post_init__(self) -> None:
        if self.multiple_of < 1:
            raise AllocationError(f"--multiple-of must be at least 1, not {self.multiple_of}")
        if self.min_rank < 1:
            raise AllocationError(
                f"--min-rank must be at least 1, not {self.min_rank}; pass --allow-zero to let modules get 0"
            )
        if self.max_rank is not None and self.max_rank < self.min_rank:
            raise AllocationError(f"--max-rank {self.max_rank} is below --min-rank {self.min_rank}")

    @property
    def smallest(self) -> int:
        """The smallest non-zero rank allowed: min_rank rounded up to a multiple of multiple_of."""
        q = self.multiple_of
        return -(-self.min_rank // q) * q

    def cap(self, full_rank: int) -> int:
        """The largest rank allowed for a module of this full rank (a multiple of multiple_of)."""
        top = full_rank if self.max_rank is None else min(full_rank, self.max_rank)
        return (top // self.multiple_of) * self.multiple_of


@dataclass(frozen=True)
class Problem:
    """One allocation problem.

    ``names`` are module paths; ``shapes`` their out×in shapes; ``spectra`` their singular values (descending,
    any length ≤ min(out, in); missing ones count as 0); ``budget`` the total in cost units and ``costs`` the
    cost of one rank of each module (1 for a rank budget, in + out for a parameter budget). ``explained`` holds,
    for EVA, each module's explained-variance ratios of its input activations (descending); ``rho`` is EVA's ρ
    and ``reference_rank`` the average rank R of the budget (EVA looks at the top ρ·R components).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    spectra: tuple[np.ndarray, ...]
    budget: float
    costs: tuple[int, ...]
    constraints: Constraints = field(default_factory=Constraints)
    explained: Mapping[str, np.ndarray] | None = None
    rho: float = 2.0
    reference_rank: int = 1

    @property
    def full_ranks(self) -> list[int]:
        return [min(s) for s in self.shapes]

    def levels(self) -> list[list[int]]:
        """The allowed ranks of every module, ascending (see the module docstring)."""
        c = self.constraints
        out: list[list[int]] = []
        for name, full in zip(self.names, self.full_ranks, strict=True):
            cap = c.cap(full)
            lv = [0] if c.allow_zero else []
            if cap >= c.smallest:
                lv.extend(range(c.smallest, cap + 1, c.multiple_of))
            if not lv:
                raise AllocationError(
                    f"{name}: full rank {full} is below the smallest allowed rank {c.smallest} "
                    f"(--min-rank {c.min_rank}, --multiple-of {c.multiple_of}); lower them, exclude the module "
                    "or pass --allow-zero"
                )
            out.append(lv)
        return out

    def floor_cost(self) -> float:
        """The cost of giving every module its lowest level."""
        return float(sum(lv[0] * k for lv, k in zip(self.levels(), self.costs, strict=True)))

    def check_floor(self) -> None:
        need = self.floor_cost()
        if need > self.budget:
            c = self.constraints
            raise AllocationError(
                f"the budget ({_units(self.budget)}) is below the minimum ({_units(need)}) that gives each of "
                f"the {len(self.names)} modules rank {c.smallest}; raise the budget, lower --min-rank or pass "
                "--allow-zero to drop modules"
            )


def _units(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.2f}"


@dataclass(frozen=True)
class Allocation:
    """A strategy's answer: one rank per module (in the problem's order) and strategy-specific figures."""

    ranks: tuple[int, ...]
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Strategy:
    """One allocation strategy of the registry."""

    name: str
    summary: str
    reference: str
    allocate: Callable[[Problem], Allocation]
    needs_activations: bool = False


# ---- shared numerics ---------------------------------------------------------------------------------------


def energy_curve(sigma: np.ndarray, full_rank: int) -> np.ndarray:
    """E(r) for r = 0..full_rank: the fraction Σ_{i≤r} σᵢ² / Σ σᵢ² (all zeros for an all-zero matrix)."""
    import numpy as np

    s = np.sort(np.abs(np.asarray(sigma, dtype=np.float64)))[::-1][:full_rank]
    lam = np.zeros(full_rank)
    lam[: len(s)] = s**2
    cum = np.concatenate([[0.0], np.cumsum(lam)])
    total = cum[-1]
    return cum / total if total > 0 else np.zeros(full_rank + 1)


def total_cost(ranks: Sequence[int], costs: Sequence[int]) -> float:
    return float(sum(r * k for r, k in zip(ranks, costs, strict=True)))


def greedy(problem: Problem, priority: Callable[[int, int, int], float | None]) -> list[int]:
    """Grow ranks one level at a time, always taking the step of highest priority.

    Every module starts at its lowest level. ``priority(i, r, r_next)`` scores the step of module i from rank r
    to its next level r_next, or is None when the module takes no further step. A step that does not fit in the remaining budget freezes its module (its later
    steps are never taken); the others go on, so the budget is used as fully as the levels allow. Within a
    module the priorities used for ordering are made non-increasing (running minimum), which makes the order
    of steps a fixed sequence: with priority = gain per cost unit, the total gain is then monotone in the
    budget. Ties go to the earlier module.
    """
    problem.check_floor()
    levels = problem.levels()
    pos = [0] * len(levels)
    ranks = [lv[0] for lv in levels]
    left = problem.budget - total_cost(ranks, problem.costs)
    last = [math.inf] * len(levels)
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        if pos[i] + 1 < len(levels[i]):
            score = priority(i, levels[i][pos[i]], levels[i][pos[i] + 1])
            if score is None:
                return
            p = min(score, last[i])
            last[i] = p
            heapq.heappush(heap, (-p, i))

    for i in range(len(levels)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        step = (levels[i][pos[i] + 1] - levels[i][pos[i]]) * problem.costs[i]
        if step > left + 1e-9:
            continue  # frozen: this module's later steps cost at least as much per step
        left -= step
        pos[i] += 1
        ranks[i] = levels[i][pos[i]]
        push(i)
    return ranks


# ---- the strategies ----------------------------------------------------------------------------------------


def uniform_ranks(problem: Problem) -> list[int]:
    """The same rank u for every module (capped at each module's cap), u the largest level that fits.

    When not even the smallest rank fits every module (possible only with ``allow_zero``), modules get the
    smallest rank in their order while it fits and 0 after.
    """
    problem.check_floor()
    levels = problem.levels()
    candidates = sorted({v for lv in levels for v in lv if v > 0})

    def at(u: int) -> list[int]:
        return [max(v for v in lv if v <= u) if lv[0] <= u else lv[0] for lv in levels]

    best: list[int] | None = None
    for u in candidates:  # ascending: the cost grows with u
        ranks = at(u)
        if total_cost(ranks, problem.costs) > problem.budget + 1e-9:
            break
        best = ranks
    if best is not None:
        return best
    ranks = [0] * len(levels)
    left = problem.budget
    for i, lv in enumerate(levels):
        first = next((v for v in lv if v > 0), 0)
        if first and first * problem.costs[i] <= left + 1e-9:
            ranks[i] = first
            left -= first * problem.costs[i]
    return ranks


def _uniform(problem: Problem) -> Allocation:
    ranks = uniform_ranks(problem)
    nonzero = sorted({r for r in ranks if r > 0})
    return Allocation(tuple(ranks), {"uniform_rank": nonzero[-1] if nonzero else 0})


def _energy(problem: Problem) -> Allocation:
    curves = [energy_curve(s, f) for s, f in zip(problem.spectra, problem.full_ranks, strict=True)]

    def gain(i: int, r: int, r_next: int) -> float:
        return float(curves[i][r_next] - curves[i][r]) / ((r_next - r) * problem.costs[i])

    return Allocation(tuple(greedy(problem, gain)))


def _effective_rank(problem: Problem) -> Allocation:
    from spectra_cli.spectral.metrics import effective_rank  # Roy & Vetterli; 0 for an all-zero matrix

    weights = [effective_rank(s) for s in problem.spectra]

    def divisor(i: int, r: int, r_next: int) -> float:
        return weights[i] / r_next  # D'Hondt: ranks proportional to the weights, house-monotone

    ranks = greedy(problem, divisor)
    return Allocation(tuple(ranks), {"effective_ranks": weights})


def normalised_sigma(sigma: np.ndarray, full_rank: int) -> np.ndarray:
    """WeLore's σ̃ = (σ − min σ)/(max σ − min σ) over the full rank (missing values are 0); all ones when flat."""
    import numpy as np

    s = np.zeros(full_rank)
    v = np.sort(np.abs(np.asarray(sigma, dtype=np.float64)))[::-1][:full_rank]
    s[: len(v)] = v
    lo, hi = s.min(), s.max()
    return (s - lo) / (hi - lo) if hi > lo else np.ones(full_rank)


def _welore(problem: Problem) -> Allocation:
    import numpy as np

    problem.check_floor()
    levels = problem.levels()
    normed = [normalised_sigma(s, f) for s, f in zip(problem.spectra, problem.full_ranks, strict=True)]

    def ranks_at(t: float) -> list[int]:
        out = []
        for lv, sn in zip(levels, normed, strict=True):
            kept = int((sn >= t).sum())
            fits = [v for v in lv if v <= kept]
            out.append(fits[-1] if fits else lv[0])
        return out

    # the kept ranks change only at the σ̃ values: bisect over them (ascending t = fewer kept)
    cands = np.unique(np.concatenate([np.asarray(n) for n in normed] + [np.array([0.0, 1.0 + 1e-12])]))
    lo, hi = 0, len(cands) - 1  # ranks_at(cands[hi]) keeps the floor, which fits (check_floor)
    if total_cost(ranks_at(cands[lo]), problem.costs) <= problem.budget + 1e-9:
        hi = lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if total_cost(ranks_at(cands[mid]), problem.costs) <= problem.budget + 1e-9:
            hi = mid
        else:
            lo = mid
    t = float(cands[hi])
    ranks = ranks_at(t)
    full = sum(problem.full_ranks)
    pruned = [int((n < t).sum()) for n in normed]
    info = {
        "threshold": t,
        "reduction_ratio": sum(pruned) / full if full else 0.0,
        "pruned_fraction": [p / f for p, f in zip(pruned, problem.full_ranks, strict=True)],
    }
    return Allocation(tuple(ranks), info)


def eva_components(rank: int, rho: float) -> int:
    """How many principal components of each module's inputs EVA looks at: round(ρ·r) (PEFT's rule), at least 1."""
    return max(1, round(rho * rank))


def _eva(problem: Problem) -> Allocation:
    """EVA's rank redistribution, the one implementation (``allocate --strategy eva`` and ``init-adapter
    --method eva`` both come here).

    The published rule (Paischer et al. 2024; PEFT ``_get_rank_distribution``): with B = r × #modules,
    take the explained-variance ratios of the top k = round(ρ·r) components of every module's inputs, sort them
    all globally, keep the top B and count per module. Here it is run as a greedy over the ratios (each module's
    ratios sorted descending), which picks exactly those top B; ties go to the earlier module, as a stable global
    sort would. A module never goes beyond its k components (or the ratios it has, if fewer).

    Constraints on top, as for every strategy (:class:`Constraints`): every module starts at its lowest level
    (``min_rank``, or 0 with ``allow_zero``; those components count as taken), and grows one level at a time
    (``multiple_of`` ranks, the step's priority the sum of the ratios it adds per budget unit, ratios past k
    counting 0; steps entirely past k are never taken); ``max_rank`` and the full rank cap the levels. With
    ``allow_zero``, ``min_rank`` 1, ``multiple_of`` 1 and a rank budget this is exactly the published rule. A
    parameter budget makes the priority "ratio per parameter" (one rank of a module costs in + out).
    """
    import numpy as np

    if problem.explained is None:
        raise AllocationError("the eva strategy needs --activations FILE (input statistics of every module)")
    k = eva_components(problem.reference_rank, problem.rho)
    cums, avail, vals = [], [], []
    for name in problem.names:
        if name not in problem.explained:
            raise AllocationError(
                f"the activations hold no statistics for {name}; capture them for every module"
            )
        got = np.sort(np.clip(np.asarray(problem.explained[name], dtype=np.float64).ravel(), 0.0, None))[
            ::-1
        ][:k]
        avail.append(len(got))
        vals.append(got)
        cums.append(np.concatenate([[0.0], np.cumsum(got)]))

    def gain(i: int, r: int, r_next: int) -> float | None:
        if r >= avail[i]:
            return None  # EVA never looks past the top ρ·r components
        added = float(np.sum(vals[i][r:r_next]))  # not a difference of cumulative sums: ties must stay exact
        return added / ((r_next - r) * problem.costs[i])

    ranks = greedy(problem, gain)
    captured = [float(cums[i][min(r, avail[i])]) for i, r in enumerate(ranks)]
    return Allocation(tuple(ranks), {"components": k, "explained_variance": captured})


def eva_ranks(
    explained: Mapping[str, np.ndarray],
    rank: int,
    rho: float = 2.0,
    constraints: Constraints | None = None,
    full_ranks: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """EVA's ranks for modules with the given explained-variance ratios (module → ratios, any order; at least the
    top :func:`eva_components` of them), under the rank budget r × #modules: module → rank (0 = no adapter).

    The rule is :func:`_eva`'s; ``constraints`` default to the published rule (0 allowed, no minimum, steps of 1);
    ``full_ranks`` cap the ranks (default: the number of ratios given). ``init-adapter --method eva`` uses this.
    """
    import numpy as np

    names = tuple(explained)
    caps = [max(1, (full_ranks or {}).get(n, len(np.asarray(explained[n]).ravel()))) for n in names]
    problem = Problem(
        names,
        tuple((c, c) for c in caps),
        tuple(np.zeros(1) for _ in names),
        float(rank * len(names)),
        tuple(1 for _ in names),
        constraints or Constraints(allow_zero=True),
        explained,
        rho,
        rank,
    )
    return dict(zip(names, allocate("eva", problem).ranks, strict=True))


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "uniform",
            "the same rank for every module (the usual LoRA baseline)",
            "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models",
            _uniform,
        ),
        Strategy(
            "energy",
            "greedy on the captured σ² energy per parameter: each step goes to the module whose next ranks "
            "add the most energy fraction per budget unit",
            "energy-threshold rank selection (PEFT convert_to_lora); greedy marginal allocation",
            _energy,
        ),
        Strategy(
            "effective-rank",
            "ranks proportional to each weight's effective rank (D'Hondt rounding)",
            "Roy & Vetterli 2007, The effective rank: a measure of effective dimensionality",
            _effective_rank,
        ),
        Strategy(
            "welore",
            "one global threshold t on the normalised singular values, found by bisection to meet the budget",
            "Jaiswal et al. 2024, From GaLore to WeLore: how low-rank weights non-uniformly emerge",
            _welore,
        ),
        Strategy(
            "eva",
            "explained variance of each module's input activations: the top B of all modules' top ρ·R "
            "ratios, counted per module (needs --activations; add --allow-zero for EVA's exact rule, the ranks "
            "init-adapter --method eva gives: otherwise every module keeps --min-rank)",
            "Paischer et al. 2024, One Initialization to Rule them All: Explained Variance Adaptation (EVA)",
            _eva,
            needs_activations=True,
        ),
    )
}


def allocate(strategy: str, problem: Problem) -> Allocation:
    """Run one strategy of :data:`STRATEGIES` and check the answer against the budget and the levels."""
    if strategy not in STRATEGIES:
        raise AllocationError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    result = STRATEGIES[strategy].allocate(problem)
    levels = problem.levels()
    for name, r, lv in zip(problem.names, result.ranks, levels, strict=True):
        if r not in lv:  # a bug, not a user error
            raise AssertionError(f"{strategy}: rank {r} for {name} is not an allowed level")
    if total_cost(result.ranks, problem.costs) > problem.budget + 1e-9:
        raise AssertionError(f"{strategy}: allocation exceeds the budget")
    return result


__all__ = [
    "STRATEGIES",
    "Allocation",
    "AllocationError",
    "Constraints",
    "Problem",
    "Strategy",
    "allocate",
    "energy_curve",
    "eva_components",
    "eva_ranks",
    "greedy",
    "normalised_sigma",
    "uniform_ranks",
]
