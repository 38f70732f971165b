"""The types of the envelope fields that the report page reads, checked before the page is drawn.

A results file given to ``spectra report`` may have been edited, truncated or crafted: a ``kind`` that is an
object, a ``depth`` that is a list, a summary whose ``tuned`` entries are numbers. The page's tables, cards and
figures read those fields with their types assumed, so :func:`envelope_problem` checks them first and names
the first one that is wrong. Fields not listed here are shown as they are (any JSON value), never computed on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from spectra_cli.checkpoint.validate import is_number, type_name

#: row fields that are text (or null), in the rows of any command
TEXT = frozenset({
    "name", "kind", "role", "status", "tuned", "shape", "dtype", "note", "source", "alpha_flag", "message",
    "rule", "module", "input", "mode", "output", "task", "tensor", "alias_of",
})  # fmt: skip
#: row fields that are numbers (or null): everything a figure, a card or a sort may compute on
NUMBER = frozenset({
    "depth", "line", "rows", "cols", "params", "K", "N", "alpha", "alpha_ks", "alpha_req", "alpha_req_points",
    "alpha_weighted", "alpha_xmin", "components", "condition_number", "converged", "damping",
    "delta_effective_rank", "delta_frobenius", "delta_norm", "delta_spectral_norm", "delta_stable_rank",
    "effective_rank", "effective_rank_change", "effective_rank_ratio", "energy", "energy_gain", "energy_kept",
    "energy_rank_90", "energy_rank_99", "entropy", "explained_variance", "frobenius_norm", "full_rank",
    "in_features", "inf_count", "intruders", "kept", "log_norm", "log_spectral_norm", "lora_rank",
    "lora_scale", "max_principal_angle", "max_rank", "mean_overlap", "min_max_cos", "nan_count",
    "nuclear_norm", "numerical_rank", "p", "participation_ratio", "pruned_fraction", "rank", "rankme",
    "rankme_fraction", "rel_error", "relative_delta", "relative_error", "relative_residual", "scale",
    "sigma_r", "spectral_norm", "spectral_norm_change", "stable_rank", "storage", "subspace_overlap",
    "tokens", "top_ratio", "uniform_energy", "uniform_rank", "value", "weight",
})  # fmt: skip
#: row fields that are lists of numbers
NUMBERS = frozenset({"intruder_ranks", "intruder_sigmas"})


def _number(v: Any) -> bool:
    """A number as the page computes on it: int or float (NaN and ±Infinity allowed: the page shows '-' or
    'inf'), not a bool."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and all(_number(x) for x in v)


def _row_ok(key: str, v: Any) -> str | None:
    """What a row field must be, when ``v`` is not that; None when it is fine."""
    if v is None:
        return None
    if key in TEXT and not isinstance(v, str):
        return "text"
    if (key in NUMBER or key.startswith("intruders@")) and not _number(v):
        return "a number"
    if key in NUMBERS and not _numbers(v):
        return "a list of numbers"
    if key == "max_cos" and not (_number(v) or _numbers(v)):
        return "a number or a list of numbers"
    if key == "limit" and not (_number(v) or isinstance(v, bool) or _numbers(v)):
        return "a number, true/false or a list of numbers"
    return None


def _summary_checks() -> dict[str, dict[str, Callable[[Any], bool]]]:
    maybe_number: Callable[[Any], bool] = lambda v: v is None or _number(v)  # noqa: E731
    counts = {k: maybe_number for k in ("analysed", "matrices", "params", "skipped_tensors", "excluded", "mean_alpha",
                                        "over_trained", "under_trained", "mean_effective_rank_ratio")}  # fmt: skip

    def tuned(v: Any) -> bool:
        if v is None:
            return True
        if not isinstance(v, dict):
            return False
        for t in v.values():
            if not isinstance(t, dict):
                return False
            totals = t.get("total_intruders")
            if totals is not None and not (
                isinstance(totals, dict) and all(maybe_number(x) for x in totals.values())
            ):
                return False
            keys = ("matrices_with_intruders", "matrices", "mean_relative_delta", "mean_subspace_overlap")
            if not all(maybe_number(t.get(k)) for k in keys):
                return False
        return True

    def by_rule(v: Any) -> bool:
        return v is None or (isinstance(v, dict) and all(isinstance(r, dict) for r in v.values()))

    return {
        "analyze": {**counts, "nonfinite": lambda v: v is None or isinstance(v, list)},
        "compare": {
            "epsilons": lambda v: v is None or (_numbers(v) and len(v) > 0 and all(is_number(x) for x in v)),
            "tuned": tuned,
        },
        "check": {
            "by_rule": by_rule,
            "ok": lambda v: v is None or isinstance(v, bool),
            **{k: maybe_number for k in ("failed", "passed", "skipped", "checks", "modules")},
        },
    }


_SUMMARY = _summary_checks()
_WHAT = {"epsilons": "a list of numbers", "tuned": "an object of per-model objects of numbers",
         "by_rule": "an object of per-rule objects", "ok": "true or false", "nonfinite": "a list"}  # fmt: skip


def envelope_problem(command: str, rows: list[dict[str, Any]], summary: Mapping[str, Any],
                     options: Mapping[str, Any]) -> str | None:  # fmt: skip
    """The first field of the envelope whose type the page cannot use ("rows[3].kind must be text, not an
    object"), or None when every field the page reads has its type."""
    for i, row in enumerate(rows):
        for key, value in row.items():
            want = _row_ok(key, value)
            if want:
                return f"rows[{i}].{key[:40]} must be {want}, not {type_name(value)}"
    checks = _SUMMARY.get(command, {})
    for key, ok in checks.items():
        if not ok(summary.get(key)):
            return f"summary.{key} must be {_WHAT.get(key, 'a number')}, not {type_name(summary.get(key))}"
    if command == "compare" and not checks["epsilons"](options.get("epsilons")):
        return f"options.epsilons must be a list of numbers, not {type_name(options.get('epsilons'))}"
    return None
