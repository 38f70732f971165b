"""The rules of a ``spectra check`` policy: a registry of small objects, name → :class:`Rule`.

Each rule validates its value from the policy file, says what it needs measured (:data:`NEEDS`), and turns
the facts about one module (or the whole model) into a :class:`Verdict`. No I/O, no printing.

What each rule's value means (W is out×in, σ its singular values, ΔW = W_tuned − W_base):

- ``no_nonfinite = true``: every weight of the module is finite (no NaN / ±Inf).
- ``max_intruders = N``: in ``[rules]``, the model's total number of intruder dimensions against ``--base``
  (Shuttleworth et al. 2024; the top ``intruder_top_k`` tuned left singular vectors whose max |cos| with every
  base left singular vector is below ``intruder_epsilon``) is ≤ N; in an override, each matching module's own
  count is ≤ N (``max_intruders = 0`` forbids any intruder there).
- ``alpha_range = [lo, hi]``: the heavy-tail exponent α of the module's eigenvalue spectrum is in [lo, hi].
- ``min_effective_rank_ratio = r``: erank(W_tuned) / erank(W_base) ≥ r (Roy & Vetterli effective rank).
- ``max_relative_delta = d``: ‖ΔW‖_F / ‖W_base‖_F ≤ d.
- ``max_spectral_norm = s``: σ₁(W_tuned) ≤ s.
- ``max_drift_pct = p``: every drift metric (:data:`DRIFT_METRICS`) is within p % of the baseline's value.
- ``max_spikes_ratio = r``: the module's Marchenko–Pastur spikes (eigenvalues above the fitted bulk edge, as
  ``analyze --mp-fit`` counts them) divided by min(out, in) is ≤ r.
- ``max_correlation_traps = N``: the module's correlation traps (spikes of the ESD of W with its entries
  permuted, as ``analyze --randomize`` counts them) are ≤ N.

- ``reliable_alpha = true``: the module's power-law fit is read as ``ok`` — at least 50 tail eigenvalues and a
  KS distance D ≤ 1.36/√n_tail (``alpha_reliability`` of ``analyze``; docs/analyze-rmt.md gives the reasons).

Any rule set to ``false`` is off (useful in an override to exempt some modules).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: what a rule needs measured: the tuned model's spectra; the base model's spectra (``--base`` or
#: ``--base-spectra``); a comparison against the base weights (``--base``, singular vectors); a baseline file
NEEDS = ("tuned", "base_spectra", "compare", "baseline")

#: per-module metrics stored in a baseline file and compared by ``max_drift_pct``
DRIFT_METRICS = ("spectral_norm", "effective_rank", "alpha")

#: the name of the model-level "module" of a verdict (e.g. the total intruder count)
MODEL = "(model)"


@dataclass(frozen=True)
class Verdict:
    """One rule on one module: ``status`` is ``pass``, ``fail`` or ``skip`` (the rule could not apply, e.g. α
    could not be fitted, or the module is not in the baseline). ``value`` is what was measured, ``limit`` the
    policy value that applied, ``line`` the policy line it came from."""

    rule: str
    module: str
    status: str
    value: float | int | None
    limit: Any
    message: str
    line: int | None = None
    kind: str | None = None

    def as_row(self) -> dict[str, Any]:
        return {
            "rule": self.rule, "module": self.module, "kind": self.kind, "status": self.status,
            "value": self.value, "limit": list(self.limit) if isinstance(self.limit, tuple) else self.limit,
            "message": self.message, "line": self.line,
        }  # fmt: skip


@dataclass
class Facts:
    """What was measured for one module. ``tuned`` / ``base`` are analyze-style metric dicts (keys of
    :class:`spectra_cli.spectral.metrics.SpectralMetrics`); ``compare`` a compare row; ``baseline`` the
    module's entry of a baseline file. A missing source is ``None``; ``nonfinite`` counts NaN/Inf weights of
    the tuned matrix (``None`` when unknown)."""

    name: str
    kind: str | None = None
    nonfinite: int | None = 0
    tuned: dict[str, Any] | None = None
    base: dict[str, Any] | None = None
    compare: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None
    note: str = ""


Outcome = tuple[str, float | int | None, str]  # (status, value, message)


class ValueProblem(ValueError):
    """A rule value of the wrong type or range; the policy reader adds the file and line."""


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for a message, cut to ``limit`` characters (a policy value may be a huge or deeply
    nested array)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested past the recursion limit; an int of more digits than shown
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _number(name: str, value: Any, *, minimum: float | None = None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
        raise ValueProblem(f"{name} must be a number, got {shown(value)}")
    v = float(value)
    if positive and v <= 0:
        raise ValueProblem(f"{name} must be positive, got {shown(value)}")
    if minimum is not None and v < minimum:
        raise ValueProblem(f"{name} must be at least {minimum:g}, got {shown(value)}")
    return v


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueProblem(f"{name} must be a whole number ≥ 0, got {shown(value)}")
    return int(value)


def _true(name: str, value: Any) -> bool:
    if value is not True:
        raise ValueProblem(f"{name} must be true or false, got {shown(value)}")
    return True


def _range(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueProblem(f"{name} must be a pair [lo, hi] such as [2.0, 6.0], got {shown(value)}")
    lo, hi = (_number(name, v) for v in value)
    if not lo < hi:
        raise ValueProblem(f"{name} must have lo < hi, got [{lo:g}, {hi:g}]")
    return lo, hi


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, tuple):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    return str(x)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(float(x))


def _unmeasured(f: Facts, what: str) -> Outcome | None:
    """A failure when the tuned weights hold NaN/Inf (nothing can be measured), a skip when unknown."""
    if f.nonfinite:
        return "fail", None, f"{f.nonfinite} NaN/Inf weights: {what} cannot be measured"
    return None


# ---- evaluations -------------------------------------------------------------------------------------------


def _eval_nonfinite(limit: Any, f: Facts) -> Outcome:
    if f.nonfinite is None:
        return "skip", None, f"not checked: {f.note or 'the weights were not read'}"
    if f.nonfinite:
        return "fail", f.nonfinite, f"{f.nonfinite} NaN/Inf weights"
    return "pass", 0, "all weights finite"


def _eval_alpha(limit: Any, f: Facts) -> Outcome:
    if (bad := _unmeasured(f, "α")) is not None:
        return bad
    if f.tuned is None:
        return "skip", None, f"not measured: {f.note or 'no spectrum'}"
    a = f.tuned.get("alpha")
    lo, hi = limit
    if not _finite(a):
        return "skip", None, "α could not be fitted (spectrum too short or flat)"
    ok = lo <= a <= hi
    return ("pass" if ok else "fail"), a, f"α = {a:.3g} " + ("in" if ok else "outside") + f" [{lo:g}, {hi:g}]"


def _eval_spectral_norm(limit: Any, f: Facts) -> Outcome:
    if (bad := _unmeasured(f, "σ₁")) is not None:
        return bad
    if f.tuned is None:
        return "skip", None, f"not measured: {f.note or 'no spectrum'}"
    s = float(f.tuned["spectral_norm"])
    ok = s <= limit
    return ("pass" if ok else "fail"), s, f"σ₁ = {s:.4g} " + ("≤" if ok else ">") + f" {limit:g}"


def _eval_spikes_ratio(limit: Any, f: Facts) -> Outcome:
    if (bad := _unmeasured(f, "the MP spikes")) is not None:
        return bad
    r = (f.tuned or {}).get("spikes_ratio")
    if not _finite(r):
        return "skip", None, f"not measured: {f.note or 'no Marchenko–Pastur fit'}"
    n = (f.tuned or {}).get("num_spikes")
    ok = r <= limit
    return ("pass" if ok else "fail"), r, f"{n} spikes, ratio {r:.3g} " + ("≤" if ok else ">") + f" {limit:g}"


def _eval_reliable_alpha(limit: Any, f: Facts) -> Outcome:
    from spectra_cli.spectral.fits import reliability

    if (bad := _unmeasured(f, "the α fit")) is not None:
        return bad
    t = f.tuned or {}
    if not _finite(t.get("alpha")) or t.get("alpha_tail") is None:
        return "skip", None, f"not measured: {f.note or 'α could not be fitted'}"
    n, d = int(t["alpha_tail"]), float(t["alpha_ks"])
    reading = reliability(float(t["alpha"]), d, n)
    ok = reading == "ok"
    return ("pass" if ok else "fail"), d, f"α fit {reading}: {n} tail eigenvalues, KS D = {d:.3g}"


def _eval_traps(limit: Any, f: Facts) -> Outcome:
    if (bad := _unmeasured(f, "correlation traps")) is not None:
        return bad
    n = (f.tuned or {}).get("num_traps")
    if n is None or not _finite(n):
        return "skip", None, f"not measured: {f.note or 'no randomised spectrum'}"
    ok = n <= limit
    return ("pass" if ok else "fail"), int(n), f"{_n(int(n), 'correlation trap')} " + ("≤" if ok else ">") + f" {limit}"


def _eval_erank_ratio(limit: Any, f: Facts) -> Outcome:
    if (bad := _unmeasured(f, "the effective rank")) is not None:
        return bad
    if f.tuned is None or f.base is None:
        return "skip", None, f"not measured: {f.note or 'the module is not in the base'}"
    t, b = float(f.tuned["effective_rank"]), float(f.base["effective_rank"])
    if b <= 0:
        return "skip", None, "the base matrix is zero (effective rank 0)"
    r = t / b
    ok = r >= limit
    return (
        ("pass" if ok else "fail"),
        r,
        f"erank {t:.4g} / base {b:.4g} = {r:.3g} " + ("≥" if ok else "<") + f" {limit:g}",
    )


def _compare_row(f: Facts) -> tuple[dict[str, Any] | None, Outcome | None]:
    c = f.compare
    if c is None:
        return None, ("skip", None, f"not compared: {f.note or 'the module is not in the base'}")
    if c.get("status") != "ok":
        nb, nt = c.get("nonfinite_base", 0), c.get("nonfinite_tuned", 0)
        return None, ("fail", None, f"not comparable: NaN/Inf weights (base {nb}, tuned {nt})")
    return c, None


def _eval_intruders(limit: Any, f: Facts) -> Outcome:
    c, bad = _compare_row(f)
    if c is None:
        assert bad is not None
        return bad
    n = int(c["intruders"])
    ranks = c.get("intruder_ranks") or []
    ok = n <= limit
    where = f" (ranks {', '.join(map(str, ranks))})" if ranks else ""
    return (
        ("pass" if ok else "fail"),
        n,
        f"{n} intruder dimensions{where} " + ("≤" if ok else ">") + f" {limit}",
    )


def _eval_relative_delta(limit: Any, f: Facts) -> Outcome:
    c, bad = _compare_row(f)
    if c is None:
        assert bad is not None
        return bad
    d = float(c["relative_delta"])
    ok = d <= limit
    return ("pass" if ok else "fail"), d, "‖ΔW‖/‖W‖ = " + f"{d:.4g} " + ("≤" if ok else ">") + f" {limit:g}"


def drift_pct(current: float, reference: float) -> float:
    """100·|current − reference| / |reference| (0 when both are 0, inf when only the reference is)."""
    if reference == 0:
        return 0.0 if current == 0 else math.inf
    return 100.0 * abs(current - reference) / abs(reference)


def _eval_drift(limit: Any, f: Facts) -> Outcome:
    if (bad := _unmeasured(f, "drift")) is not None:
        return bad
    if f.baseline is None:
        return "skip", None, "not in the baseline (run with --update-baseline to add it)"
    if f.tuned is None:
        return "skip", None, f"not measured: {f.note or 'no spectrum'}"
    worst: tuple[float, str] | None = None
    for m in DRIFT_METRICS:
        ref, cur = f.baseline.get(m), f.tuned.get(m)
        if ref is None or cur is None or not (_finite(ref) and _finite(cur)):
            continue
        pct = drift_pct(float(cur), float(ref))
        text = f"{m} {float(cur):.4g} vs {float(ref):.4g} ({pct:.3g}%)"
        if worst is None or pct > worst[0]:
            worst = (pct, text)
    if worst is None:
        return "skip", None, "no metric measurable in both this run and the baseline"
    ok = worst[0] <= limit
    return (
        ("pass" if ok else "fail"),
        worst[0],
        f"largest drift: {worst[1]} " + ("≤" if ok else ">") + f" {limit:g}%",
    )


# ---- the registry ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A policy rule: its name, what its value must be (``validate`` returns the normalised value or raises
    :class:`ValueProblem`), what it needs measured (one of :data:`NEEDS`), a one-line description, and
    ``evaluate(limit, facts)`` → (status, value, message) for one module."""

    name: str
    needs: str
    description: str
    example: str
    validate: Callable[[str, Any], Any]
    evaluate: Callable[[Any, Facts], Outcome]


@dataclass(frozen=True)
class Parameter:
    """A setting beside a rule (not a rule itself), with its default; allowed only in ``[rules]``."""

    name: str
    rule: str
    default: Any
    description: str
    validate: Callable[[str, Any], Any]


RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule("no_nonfinite", "tuned", "every weight is finite (no NaN/Inf)", "true", _true, _eval_nonfinite),
        Rule("max_intruders", "compare",
             "intruder dimensions against --base: the model's total in [rules], each module's own count in an "
             "override", "0", _count, _eval_intruders),
        Rule("alpha_range", "tuned", "the heavy-tail exponent α lies in [lo, hi]", "[2.0, 6.0]", _range,
             _eval_alpha),
        Rule("min_effective_rank_ratio", "base_spectra", "effective rank of tuned / base is at least this",
             "0.9", lambda n, v: _number(n, v, positive=True), _eval_erank_ratio),
        Rule("max_relative_delta", "compare", "‖W_tuned − W_base‖_F / ‖W_base‖_F is at most this", "0.1",
             lambda n, v: _number(n, v, minimum=0.0), _eval_relative_delta),
        Rule("max_spectral_norm", "tuned", "the largest singular value σ₁ is at most this", "100.0",
             lambda n, v: _number(n, v, positive=True), _eval_spectral_norm),
        Rule("max_drift_pct", "baseline",
             "spectral norm, effective rank and α each within this many % of the baseline file", "10.0",
             lambda n, v: _number(n, v, minimum=0.0), _eval_drift),
        Rule("max_spikes_ratio", "mp_fit", "Marchenko–Pastur spikes / min(out, in) is at most this", "0.05",
             lambda n, v: _number(n, v, minimum=0.0), _eval_spikes_ratio),
        Rule("max_correlation_traps", "randomize", "correlation traps (spikes of the permuted W's ESD) at most N",
             "0", _count, _eval_traps),
        Rule("reliable_alpha", "tuned", "the power-law fit of α is reliable: ≥ 50 tail eigenvalues and KS "
             "D ≤ 1.36/√n_tail", "true", _true, _eval_reliable_alpha),
    )
}  # fmt: skip

PARAMETERS: dict[str, Parameter] = {
    p.name: p
    for p in (
        Parameter("intruder_epsilon", "max_intruders", 0.5,
                  "a tuned direction is an intruder when its max |cos| with every base direction is below this",
                  lambda n, v: _epsilon(n, v)),
        Parameter("intruder_top_k", "max_intruders", 10, "how many top tuned singular vectors are checked",
                  lambda n, v: _top_k(n, v)),
    )
}  # fmt: skip


def _epsilon(name: str, value: Any) -> float:
    v = _number(name, value)
    if not 0 < v <= 1:
        raise ValueProblem(f"{name} must be in (0, 1], got {shown(value)}")
    return v


def _top_k(name: str, value: Any) -> int:
    v = _count(name, value)
    if v < 1:
        raise ValueProblem(f"{name} must be at least 1, got {shown(value)}")
    return v


def validate_value(name: str, value: Any) -> Any:
    """The normalised value of rule ``name`` (``False`` = off), or :class:`ValueProblem`."""
    if value is False:
        return False
    return RULES[name].validate(name, value)


def evaluate_module(rule: Rule, limit: Any, facts: Facts, line: int | None) -> Verdict:
    status, value, message = rule.evaluate(limit, facts)
    return Verdict(rule.name, facts.name, status, value, limit, message, line, facts.kind)


def evaluate_total_intruders(limit: int, facts: Mapping[str, Facts], line: int | None) -> Verdict:
    """The model-level ``max_intruders``: the total over the modules in ``facts``; a failure when any of them
    could not be compared (NaN/Inf), since the total is then unknown."""
    if not any(f.compare is not None for f in facts.values()):
        why = next((f.note for f in facts.values() if f.note), "no module was compared with the base")
        return Verdict("max_intruders", MODEL, "skip", None, limit, f"not compared: {why}", line)
    total = 0
    uncompared = []
    for f in facts.values():
        c = f.compare
        if c is None:
            continue
        if c.get("status") != "ok":
            uncompared.append(f.name)
            continue
        total += int(c["intruders"])
    with_any = sum(
        1 for f in facts.values() if f.compare and f.compare.get("status") == "ok" and f.compare["intruders"]
    )
    if uncompared:
        return Verdict("max_intruders", MODEL, "fail", total, limit,
                       f"{_n(len(uncompared), 'matrix', 'matrices')} with NaN/Inf could not be compared, so the "
                       f"total is unknown (≥ {total})", line)  # fmt: skip
    ok = total <= limit
    return Verdict("max_intruders", MODEL, "pass" if ok else "fail", total, limit,
                   f"{_n(total, 'intruder dimension')} in {_n(with_any, 'matrix', 'matrices')} "
                   + ("≤" if ok else ">") + f" {limit}", line)  # fmt: skip


def unevaluated(verdicts: Sequence[Verdict], rules: Sequence[str], allow: bool, lines: Mapping[str, int | None],
                excused: Collection[str] = ()) -> list[Verdict]:  # fmt: skip
    """One model-level verdict for each of ``rules`` that no module could be evaluated on (every verdict of it a
    skip, or none at all: e.g. a base that shares no matrix with the checkpoint): a failure, so that a gate
    that checked nothing does not pass, unless ``allow`` (the policy's ``allow_unevaluated``), then a skip.
    Rules in ``excused`` are skipped on purpose (``max_drift_pct`` while the baseline is being written)."""
    out = []
    for rule in rules:
        if rule in excused:
            continue
        mine = [v for v in verdicts if v.rule == rule]
        if any(v.status != "skip" for v in mine):
            continue
        why = next((v.message for v in mine if v.message), "no module was checked")
        out.append(Verdict(rule, MODEL, "skip" if allow else "fail", None, None,
                           f"could not be evaluated on any of {_n(len(mine), 'module')} ({why})"
                           + ("" if allow else "; fix the inputs, or set allow_unevaluated = true in the policy"),
                           lines.get(rule)))  # fmt: skip
    return out


def _n(count: int, one: str, many: str | None = None) -> str:
    """``1 matrix``, ``2 matrices``."""
    return f"{count} {one if count == 1 else (many or one + 's')}"


__all__ = [
    "DRIFT_METRICS", "MODEL", "NEEDS", "PARAMETERS", "RULES", "Facts", "Parameter", "Rule", "ValueProblem",
    "Verdict", "drift_pct", "evaluate_module", "evaluate_total_intruders", "shown", "unevaluated", "validate_value",
]  # fmt: skip
