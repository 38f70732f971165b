"""``track``'s summary: per-step aggregates, and findings stated as sentences.

The findings read the long-format rows (checkpoint × matrix, in step order):

- intruders (with ``--base``): the first step at which any matrix has intruder dimensions at the primary ε,
  which layers and module kinds, and how many there are at the last step;
- heavy-tail α by role (attention, mlp, …): the mean at the first and the last checkpoint, and the matrices
  whose α crossed 2 (WeightWatcher's boundary of over-training: α < 2) and between which steps;
- effective-rank ratio by role: a fall (or rise) of more than 5 % from the first to the last checkpoint, with
  the step interval that holds the largest part of the change;
- drift: the mean ‖ΔW‖/‖W₀‖ at the last step and the layer that moved most; with ``--against previous``, the
  step interval with the largest mean step-to-step change.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

if TYPE_CHECKING:
    from spectra_cli.flows.track import TrackOptions

ALPHA_LINE = 2.0


class StepStats(TypedDict):
    """Means over the matrices of one checkpoint."""

    checkpoint: str
    step: int | None
    matrices: int
    mean_alpha: float | None
    mean_effective_rank_ratio: float | None
    mean_stable_rank: float | None
    intruders: int | None
    mean_relative_delta: float | None
    mean_step_relative_delta: float | None


@dataclass(frozen=True)
class TrackSummary:
    """The summary of ``track``: the checkpoints (and those skipped, with why), per-step means, the findings
    as sentences, and how much was computed versus read back (``from_cache``)."""

    checkpoints: int
    matrices: int
    first_step: int | None
    last_step: int | None
    epsilon: float
    base: str | None
    against: str | None
    by_step: list[StepStats]
    findings: list[str]
    skipped_checkpoints: list[dict[str, str]]
    computed: int
    from_cache: int
    tasks: int
    seconds: float


def _mean(xs: Sequence[Any]) -> float | None:
    v = [float(x) for x in xs if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def _label(step: int | None, name: str) -> str:
    return f"step {step}" if step is not None else name


def spans(depths: Sequence[int]) -> str:
    """Layers as ranges: [3, 4, 5, 7] → '3–5, 7'."""
    ds = sorted(set(depths))
    out: list[str] = []
    i = 0
    while i < len(ds):
        j = i
        while j + 1 < len(ds) and ds[j + 1] == ds[j] + 1:
            j += 1
        out.append(str(ds[i]) if i == j else f"{ds[i]}–{ds[j]}")
        i = j + 1
    return ", ".join(out)


def summarize(rows: list[dict[str, Any]], runs: list[dict[str, Any]], opts: TrackOptions,
              skipped: list[dict[str, str]], computed: int, from_cache: int, tasks: int,
              seconds: float) -> TrackSummary:  # fmt: skip
    by_ck: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_ck[r["checkpoint"]].append(r)
    stats: list[StepStats] = []
    for run in runs:
        rs = [r for r in by_ck[run["name"]] if r.get("status") == "ok"]
        stats.append(StepStats(
            checkpoint=run["name"], step=run["step"], matrices=len(by_ck[run["name"]]),
            mean_alpha=_mean([r.get("alpha") for r in rs]),
            mean_effective_rank_ratio=_mean([r.get("effective_rank_ratio") for r in rs]),
            mean_stable_rank=_mean([r.get("stable_rank") for r in rs]),
            intruders=int(sum(r.get("intruders") or 0 for r in rs)) if opts.base is not None else None,
            mean_relative_delta=_mean([r.get("relative_delta") for r in rs]) if opts.base is not None else None,
            mean_step_relative_delta=(_mean([r.get("step_relative_delta") for r in rs])
                                      if opts.against == "previous" else None),
        ))  # fmt: skip
    return TrackSummary(
        checkpoints=len(runs), matrices=len(rows), first_step=runs[0]["step"] if runs else None,
        last_step=runs[-1]["step"] if runs else None, epsilon=float(opts.epsilons[0]), base=opts.base,
        against=opts.against, by_step=stats, findings=findings(rows, runs, opts), skipped_checkpoints=skipped,
        computed=computed, from_cache=from_cache, tasks=tasks, seconds=seconds,
    )  # fmt: skip


def findings(rows: list[dict[str, Any]], runs: list[dict[str, Any]], opts: TrackOptions) -> list[str]:
    """The findings, as sentences (see the module docstring)."""
    if not runs:
        return []
    order = [r["name"] for r in runs]
    label = {r["name"]: _label(r["step"], r["name"]) for r in runs}
    ok = [r for r in rows if r.get("status") == "ok"]
    out: list[str] = []
    if opts.base is not None:
        out += _intruders(ok, order, label, opts.epsilons[0])
    if len(runs) > 1:
        out += _alpha(ok, order, label)
        out += _erank(ok, order, label)
    if opts.base is not None:
        out += _drift(ok, order, label)
    if opts.against == "previous" and len(runs) > 1:
        means = [(c, _mean([r.get("step_relative_delta") for r in ok if r["checkpoint"] == c])) for c in order[1:]]
        known = [(c, m) for c, m in means if m is not None]
        best = max(known, key=lambda m: m[1], default=None)
        if best is not None:
            i = order.index(best[0])
            out.append(f"the largest step-to-step change is between {label[order[i - 1]]} and {label[best[0]]} "
                       f"(mean ‖ΔW‖/‖W‖ {best[1]:.3g})")  # fmt: skip
    bad = [r for r in rows if r.get("status") != "ok"]
    if bad:
        first = next(c for c in order if any(r["checkpoint"] == c for r in bad))
        held = "1 matrix holds" if len(bad) == 1 else f"{len(bad)} matrices hold"
        out.append(f"{held} NaN/Inf (first at {label[first]}); not decomposed")
    return out


def _intruders(ok: list[dict[str, Any]], order: list[str], label: dict[str, str], eps: float) -> list[str]:
    with_intr = [r for r in ok if (r.get("intruders") or 0) > 0]
    if not with_intr:
        return [f"no intruder dimensions at ε={eps:g} at any step (up to {label[order[-1]]})"]
    first = next(c for c in order if any(r["checkpoint"] == c for r in with_intr))
    at = [r for r in with_intr if r["checkpoint"] == first]
    depths = [r["depth"] for r in at if r.get("depth") is not None]
    kinds = sorted({str(r["kind"]) for r in at})
    where = f"in layers {spans(depths)}" if depths else "in " + ", ".join(r["name"] for r in at[:3])
    text = f"intruders at ε={eps:g} first appear at {label[first]} {where} ({', '.join(kinds)})"
    last = [r for r in with_intr if r["checkpoint"] == order[-1]]
    if order[-1] != first:
        text += (f"; at {label[order[-1]]}: {sum(r['intruders'] for r in last)} in "
                 f"{len(last)} matrices")  # fmt: skip
    return [text]


def _by_role(ok: list[dict[str, Any]], key: str) -> dict[str, dict[str, list[float]]]:
    """role → checkpoint → values of ``key``."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in ok:
        v = r.get(key)
        if isinstance(v, int | float) and math.isfinite(v):
            out[str(r.get("role") or r.get("kind"))][r["checkpoint"]].append(float(v))
    return out


def _alpha(ok: list[dict[str, Any]], order: list[str], label: dict[str, str]) -> list[str]:
    out: list[str] = []
    for role, per in sorted(_by_role(ok, "alpha").items()):
        a, b = _mean(per.get(order[0], [])), _mean(per.get(order[-1], []))
        if a is None or b is None:
            continue
        verb = "fell" if b < a - 0.05 * abs(a) else "rose" if b > a + 0.05 * abs(a) else "stayed near"
        text = (f"mean α of {role} {verb} from {a:.2g} to {b:.2g}" if verb != "stayed near"
                else f"mean α of {role} stayed near {b:.2g}")  # fmt: skip
        crossed: list[int] = []  # index of the checkpoint where each matrix first went under the line
        for name in sorted({r["name"] for r in ok if str(r.get("role") or r.get("kind")) == role}):
            series = {r["checkpoint"]: r.get("alpha") for r in ok if r["name"] == name}
            seq = [(i, float(v)) for i, c in enumerate(order)
                   if isinstance(v := series.get(c), int | float) and math.isfinite(v)]  # fmt: skip
            for (_, v0), (i1, v1) in itertools.pairwise(seq):
                if v0 >= ALPHA_LINE > v1:
                    crossed.append(i1)
                    break
        if crossed:
            lo, hi = min(crossed), max(crossed)
            text += (f"; {len(crossed)} {'matrix' if len(crossed) == 1 else 'matrices'} crossed {ALPHA_LINE:g} "
                     f"between {label[order[max(0, lo - 1)]]} and {label[order[hi]]}")  # fmt: skip
        out.append(text)
    return out


def _erank(ok: list[dict[str, Any]], order: list[str], label: dict[str, str]) -> list[str]:
    out: list[str] = []
    for role, per in sorted(_by_role(ok, "effective_rank_ratio").items()):
        means = [_mean(per.get(c, [])) for c in order]
        first, last = means[0], means[-1]
        if first is None or last is None or abs(last - first) <= 0.05 * abs(first):
            continue
        falling = last < first
        steps = [(i, b - a) for i, (a, b) in enumerate(itertools.pairwise(means), start=1)
                 if a is not None and b is not None]  # fmt: skip
        i, d = max(steps, key=lambda s: abs(s[1]) if (s[1] < 0) == falling else -1.0)
        verb = "fell" if falling else "rose"
        out.append(f"effective-rank ratio of {role} {verb} from {first:.2g} to {last:.2g}, most between "
                   f"{label[order[i - 1]]} and {label[order[i]]} ({d:+.2g})")  # fmt: skip
    return out


def _drift(ok: list[dict[str, Any]], order: list[str], label: dict[str, str]) -> list[str]:
    last = [r for r in ok if r["checkpoint"] == order[-1] and isinstance(r.get("relative_delta"), int | float)]
    if not last:
        return []
    finite = [r for r in last if math.isfinite(r["relative_delta"])]
    mean = _mean([r["relative_delta"] for r in finite])
    if mean is None:
        return []
    top = max(finite, key=lambda r: r["relative_delta"])
    return [f"at {label[order[-1]]} the weights moved {mean:.3g} of their norm from the base on average "
            f"(‖ΔW‖/‖W₀‖); most in {top['name']} ({top['relative_delta']:.3g})"]  # fmt: skip


__all__ = ["ALPHA_LINE", "StepStats", "TrackSummary", "findings", "spans", "summarize"]
