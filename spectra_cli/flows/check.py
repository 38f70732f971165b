"""``check``: evaluate a policy on a checkpoint: measure what the rules need, then one verdict per rule × module.

What is measured, and by which existing core function (nothing spectral is reimplemented here):

- rules on the tuned model's own spectra (``no_nonfinite``, ``alpha_range``, ``max_spectral_norm``,
  ``max_drift_pct``): :func:`spectra_cli.flows.analyze.run_analyze` on CKPT (which may be a spectra file written
  by ``analyze --save-spectra``; then nothing is decomposed);
- rules against the base weights (``max_intruders``, ``max_relative_delta``): :func:`run_compare` of CKPT
  against ``--base`` (a full checkpoint: intruders need the base's singular *vectors*, which a spectra file
  does not hold). When compare runs, the tuned and base spectra it computed are reused for every other rule,
  so each matrix is decomposed once per side; a PEFT adapter as CKPT is checked this way (W₀ + s·B·A);
- ``min_effective_rank_ratio`` needs the base's singular values only: from compare when it runs, else from
  ``--base-spectra FILE`` (``analyze --save-spectra`` of the base) or by analysing ``--base``.

Drift (``max_drift_pct``) is measured per module on :data:`spectra_cli.gate.rules.DRIFT_METRICS` against a
baseline file written by :func:`write_baseline`. No printing, no CLI.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectra_cli import __version__
from spectra_cli.errors import CheckpointError, PolicyError
from spectra_cli.gate.policy import Policy
from spectra_cli.gate.rules import (
    DRIFT_METRICS,
    RULES,
    Facts,
    Verdict,
    evaluate_module,
    evaluate_total_intruders,
    unevaluated,
)
from spectra_cli.gate.summary import CheckSummary, tally
from spectra_cli.options import ComputeOptions, SelectionOptions
from spectra_cli.report.render import write_text
from spectra_cli.results import RunResult

BASELINE_FORMAT = "spectra-baseline"
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class CheckOptions(SelectionOptions, ComputeOptions):
    """Options of ``check`` (the CLI flags of the same names). ``baseline`` overrides the policy's
    ``baseline``; ``update_baseline`` is the file a new baseline will be written to (then a missing baseline is
    not an error, and ``max_drift_pct`` is skipped when it would compare against the file being rewritten);
    ``allow_missing`` skips base tensors missing from CKPT (as ``compare --allow-missing``)."""

    base: Path | None = None
    base_spectra: Path | None = None
    baseline: Path | None = None
    update_baseline: Path | None = None
    allow_missing: bool = False

    @property
    def updating(self) -> bool:
        return self.update_baseline is not None


@dataclass(frozen=True)
class CheckPlan:
    """What a run of the policy needs, decided before any work: the active rules (registry order), whether
    CKPT is compared against ``--base`` (a rule needs it, or CKPT is an adapter), whether CKPT is an adapter, and
    the baseline file the drift rule reads (None when no active rule reads one)."""

    active: list[str]
    compare: bool
    adapter: bool
    baseline: Path | None

    @property
    def needs(self) -> set[str]:
        """What the active rules measure (:attr:`spectra_cli.gate.rules.Rule.needs`)."""
        return {RULES[r].needs for r in self.active}


@dataclass
class Measured:
    """The facts per module (checkpoint order) with the baseline attached, the inputs record, the notes so far
    and whether ``max_drift_pct`` is off (no baseline yet, or the baseline is being rewritten)."""

    facts: dict[str, Facts]
    inputs: dict[str, Any]
    notes: list[str]
    rewriting: bool
    drift_off: bool


@dataclass
class CheckResult(RunResult[CheckSummary]):
    """Rows are the verdicts (one per rule × module, plus model-level ones) as dicts; ``facts`` what was
    measured per module (what :func:`write_baseline` stores)."""

    verdicts: list[Verdict] = field(default_factory=list)
    facts: dict[str, Facts] = field(default_factory=dict)
    policy: Policy | None = None

    @property
    def failed(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status == "fail"]

    @property
    def ok(self) -> bool:
        return not self.failed


def _where(policy: Policy, rule: str) -> str:
    line = policy.line_of(rule)
    return f"{rule} ({policy.path.name}:{line})" if line else rule


def is_spectra_file(path: str | Path) -> bool:
    """Whether ``path`` is a singular-value file written by ``analyze --save-spectra``."""
    from spectra_cli.checkpoint.source import open_checkpoint
    from spectra_cli.checkpoint.spectra_file import SPECTRA_FORMAT

    p = Path(path)
    if not p.is_file() or p.suffix != ".safetensors":
        return False
    return open_checkpoint(p).metadata.get("format") == SPECTRA_FORMAT


def _baseline_path(policy: Policy, opts: CheckOptions) -> Path | None:
    return opts.baseline or policy.baseline


def plan_check(ckpt: str | Path, policy: Policy, opts: CheckOptions) -> CheckPlan:
    """Which inputs the active rules need, checked before any work: raises :class:`PolicyError` (a usage
    error) when a rule's input is missing, naming the rule, its policy line and the flag to pass."""
    from spectra_cli.checkpoint.adapter import is_adapter

    active = policy.active()
    needs = {RULES[r].needs for r in active}
    adapter = is_adapter(ckpt)
    compare = "compare" in needs or adapter
    if compare and opts.base is None:
        rules = [_where(policy, r) for r in active if RULES[r].needs == "compare"]
        why = (
            f"{', '.join(rules)} compare{'s' if len(rules) == 1 else ''} against the base model"
            if rules
            else (f"{ckpt} is a PEFT adapter, so its weights are W₀ + s·B·A")
        )
        raise PolicyError(f"{why}: pass --base BASE (the full base checkpoint)")
    if compare:
        assert opts.base is not None
        if is_spectra_file(ckpt):
            raise PolicyError(
                f"{ckpt} is a spectra file; rules against --base need the tuned weights themselves"
            )
        if is_spectra_file(opts.base):
            raise PolicyError(
                f"--base {opts.base} is a spectra file, but intruder and ΔW rules need the base weights (singular "
                "vectors); pass the base checkpoint as --base (a spectra file can be --base-spectra)"
            )
    if "base_spectra" in needs and not compare and opts.base is None and opts.base_spectra is None:
        raise PolicyError(
            f"{_where(policy, 'min_effective_rank_ratio')} needs the base model's spectra: pass --base BASE or "
            "--base-spectra FILE (from `spectra analyze BASE --save-spectra FILE`)"
        )
    baseline = _baseline_path(policy, opts)
    drift = "baseline" in needs
    if drift and baseline is None and not opts.updating:
        raise PolicyError(
            f'{_where(policy, "max_drift_pct")} needs a baseline: pass --baseline FILE or set baseline = "FILE" '
            "in the policy (write one with --update-baseline FILE)"
        )
    if drift and baseline is not None and not baseline.is_file() and not opts.updating:
        raise PolicyError(
            f"baseline {baseline} not found (needed by {_where(policy, 'max_drift_pct')}); write it from a good "
            f"run with --update-baseline {baseline}"
        )
    return CheckPlan(active, compare, adapter, baseline if drift else None)


def _metrics(values: Any, shape: tuple[int, int], precision: str) -> dict[str, Any]:
    from spectra_cli.spectral.metrics import compute_metrics

    return compute_metrics(values, shape, precision).as_dict()


def _base_metrics(s: Any) -> dict[str, float]:
    """The base's numbers a rule reads (as the analyze path stores them): not the full metric set, whose α fit
    is the costly part and is never used for the base."""
    import numpy as np

    from spectra_cli.spectral.metrics import effective_rank

    s = np.clip(np.asarray(s, dtype=np.float64), 0.0, None)
    return {"effective_rank": effective_rank(s), "spectral_norm": float(s.max()) if s.size else 0.0}


def _from_compare(ckpt: str | Path, policy: Policy, opts: CheckOptions, progress: Progress | None
                  ) -> tuple[dict[str, Facts], dict[str, Any]]:  # fmt: skip
    from spectra_cli.flows.compare import CompareOptions, run_compare

    assert opts.base is not None
    copts = CompareOptions(
        include=opts.include, exclude=opts.exclude, kinds=opts.kinds, roles=opts.roles, min_dim=opts.min_dim,
        top_k=int(policy.params["intruder_top_k"]), epsilons=(float(policy.params["intruder_epsilon"]),),
        precision=opts.precision, device=opts.device, backend=opts.backend, max_memory=opts.max_memory,
        allow_missing=opts.allow_missing,
    )  # fmt: skip
    res = run_compare(opts.base, [("tuned", ckpt)], copts, progress=progress)
    mods = {m.spec.name: m for m in res.modules}
    facts: dict[str, Facts] = {}
    for row in res.rows:
        name = row["name"]
        f = Facts(name, row.get("kind"), compare=row)
        if row["status"] == "ok":
            m = mods[name]
            f.tuned = _metrics(m.svd_tuned.s, m.spec.shape, opts.precision)
            f.base = _base_metrics(m.s_base)
            f.nonfinite = 0
        else:
            f.nonfinite = int(row.get("nonfinite_tuned", 0))  # counted even when the base is the bad side
            if not f.nonfinite:
                f.note = f"the base's {name} has NaN/Inf weights"
        facts[f.name] = f  # names are unique: the reader refuses a tensor held twice
    inputs = {"checkpoint": str(ckpt), "base": str(opts.base), "compare": res.inputs}
    return facts, {"inputs": inputs, "seconds": res.summary.seconds}


def _analyze(path: str | Path, opts: CheckOptions, progress: Progress | None, rmt: Any = None) -> Any:
    from spectra_cli.flows.analyze import AnalyzeOptions, run_analyze

    aopts = AnalyzeOptions(
        include=opts.include, exclude=opts.exclude, kinds=opts.kinds, roles=opts.roles, min_dim=opts.min_dim,
        device=opts.device, precision=opts.precision, backend=opts.backend, max_memory=opts.max_memory, rmt=rmt,
    )  # fmt: skip
    return run_analyze(path, aopts, progress=progress)


def _from_analyze(ckpt: str | Path, needs: set[str], opts: CheckOptions, progress: Progress | None
                  ) -> tuple[dict[str, Facts], dict[str, Any]]:  # fmt: skip
    from spectra_cli.spectral.rmt import RMTOptions

    rmt = RMTOptions(mp_fit="mp_fit" in needs, randomize="randomize" in needs)
    res = _analyze(ckpt, opts, progress, rmt if rmt.any else None)
    facts: dict[str, Facts] = {}
    keys = ("spectral_norm", "effective_rank", "stable_rank", "alpha", "alpha_tail", "alpha_ks", "num_spikes",
            "spikes_ratio", "num_traps")
    for row in res.rows:
        f = Facts(row["name"], row.get("kind"), nonfinite=int(row["nan_count"]) + int(row["inf_count"]))
        if row["status"] == "ok":
            f.tuned = {k: row[k] for k in keys if k in row}
        facts[f.name] = f  # names are unique: the reader refuses a tensor held twice
    inputs: dict[str, Any] = {"checkpoint": str(ckpt), "analyze": res.inputs}
    if "base_spectra" in needs:
        src = opts.base_spectra or opts.base
        assert src is not None
        base = _analyze(src, opts, progress)
        by_name = {r["name"]: r for r in base.rows}
        for name, f in facts.items():
            b = by_name.get(name)
            if b is None:
                f.note = f"{name} is not in the base ({src})"
            elif b["status"] != "ok":
                f.note = f"the base's {name} has NaN/Inf weights"
            else:
                f.base = {"effective_rank": b["effective_rank"], "spectral_norm": b["spectral_norm"]}
        inputs["base" if opts.base_spectra is None else "base_spectra"] = str(src)
    return facts, {"inputs": inputs, "seconds": res.summary.seconds}


def read_baseline(path: Path) -> dict[str, dict[str, Any]]:
    """The per-module metrics of a baseline file (see :func:`write_baseline`)."""
    from spectra_cli.checkpoint.validate import load_json

    if not Path(path).exists():
        raise CheckpointError(f"{path}: baseline file not found; write it with --update-baseline")
    data = load_json(path, "baseline file", f"rewrite it with --update-baseline {path}", PolicyError)
    if (
        not isinstance(data, dict)
        or data.get("format") != BASELINE_FORMAT
        or not isinstance(data.get("modules"), dict)
        or not all(isinstance(m, dict) for m in data["modules"].values())
    ):
        raise PolicyError(f"{path}: not a spectra baseline file; rewrite it with --update-baseline {path}")
    return data["modules"]


def write_baseline(path: Path, result: CheckResult) -> int:
    """Write the baseline JSON of ``result`` atomically: ``{"format": "spectra-baseline", "version": 1,
    "metrics": [...], "checkpoint": …, "modules": {matrix name: {metric: value or null}}}`` over every module
    whose spectrum was measured. Returns the number of modules written."""
    modules = {}
    for name, f in result.facts.items():
        if f.tuned is None:
            continue
        modules[name] = {m: _num(f.tuned.get(m)) for m in DRIFT_METRICS}
    record = {
        "format": BASELINE_FORMAT,
        "version": 1,
        "spectra_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint": result.inputs.get("checkpoint"),
        "metrics": list(DRIFT_METRICS),
        "modules": modules,
    }
    write_text(path, json.dumps(record, indent=2) + "\n")
    return len(modules)


def _same(a: Path, b: Path | None) -> bool:
    return b is not None and Path(a).resolve() == Path(b).resolve()


def _num(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def run_check(
    ckpt: str | Path, policy: Policy, options: CheckOptions | None = None, progress: Progress | None = None
) -> CheckResult:
    """Evaluate ``policy`` on the checkpoint (or adapter, or spectra file) at ``ckpt``.

    Verdicts come in registry order of the rules, modules in checkpoint order; ``max_intruders`` in ``[rules]``
    adds one model-level verdict (module ``(model)``) over the modules no override exempts."""
    opts = options or CheckOptions()
    t0 = time.perf_counter()
    p = plan_check(ckpt, policy, opts)
    got = measure(ckpt, policy, opts, p, progress)
    verdicts = judge(p, policy, got)
    summary = tally(verdicts, policy, got.notes, round(time.perf_counter() - t0, 3))
    inputs = {**got.inputs, "policy": str(policy.path)}
    if p.baseline is not None:
        inputs["baseline"] = str(p.baseline)
    used = {**policy.as_dict(), "include": list(opts.include), "exclude": list(opts.exclude),
            "kinds": list(opts.kinds), "roles": list(opts.roles), "min_dim": opts.min_dim, "precision": opts.precision}  # fmt: skip
    return CheckResult([v.as_row() for v in verdicts], summary, inputs, used, verdicts, got.facts, policy)


def measure(ckpt: str | Path, policy: Policy, opts: CheckOptions, p: CheckPlan,
            progress: Progress | None = None) -> Measured:  # fmt: skip
    """Measure what the planned rules need (by compare or analyze) and attach the baseline."""
    if p.compare:
        facts, info = _from_compare(ckpt, policy, opts, progress)
    else:
        facts, info = _from_analyze(ckpt, p.needs, opts, progress)
    notes: list[str] = []
    if p.compare and opts.base_spectra is not None:
        notes.append("--base-spectra was not needed: the base spectra came from comparing against --base")
    for i, o in enumerate(policy.overrides, 1):
        if not any(o.matches(name) for name in facts):  # a glob with a typo would silently change nothing
            where = f" ({policy.path.name}:{o.line})" if o.line else ""
            globs = ", ".join(f'"{g}"' for g in o.modules)
            notes.append(f"override #{i}{where} matches no checked module: {globs}")
    baseline_file = p.baseline
    if (
        baseline_file is not None
        and baseline_file.is_file()
        and not _same(baseline_file, opts.update_baseline)
    ):
        base_modules = read_baseline(baseline_file)
        for name, f in facts.items():
            f.baseline = base_modules.get(name)
        missing = sorted(set(base_modules) - set(facts))
        if missing:
            notes.append(f"{len(missing)} {'module' if len(missing) == 1 else 'modules'} of the baseline "
                         f"{'was' if len(missing) == 1 else 'were'} not measured now (selection changed?)")  # fmt: skip
    rewriting = (
        baseline_file is not None
        and opts.update_baseline is not None
        and Path(opts.update_baseline).resolve() == baseline_file.resolve()
    )
    drift_off = "baseline" in p.needs and (baseline_file is None or not baseline_file.is_file() or rewriting)
    return Measured(facts, info["inputs"], notes, rewriting, drift_off)


def judge(p: CheckPlan, policy: Policy, got: Measured) -> list[Verdict]:
    """One verdict per active rule × module whose limit applies (and the model-level intruder total)."""
    verdicts: list[Verdict] = []
    for rule_name in p.active:
        rule = RULES[rule_name]
        total_limit = policy.rules.get(rule_name)
        if rule_name == "max_intruders" and total_limit is not None and total_limit is not False:
            counted = {n: f for n, f in got.facts.items() if not policy.exempt("max_intruders", n)}
            verdicts.append(evaluate_total_intruders(policy.rules["max_intruders"], counted,
                                                     policy.lines.get("max_intruders")))  # fmt: skip
        for name, f in got.facts.items():
            limit, line = policy.limit(rule_name, name)
            if limit is None or limit is False:
                continue
            if rule_name == "max_drift_pct" and got.drift_off:
                why = (
                    "the baseline is being rewritten by --update-baseline"
                    if got.rewriting
                    else "no baseline yet"
                )
                verdicts.append(Verdict(rule_name, name, "skip", None, limit, why, line, f.kind))
                continue
            verdicts.append(evaluate_module(rule, limit, f, line))
    verdicts += unevaluated(verdicts, p.active, policy.allow_unevaluated,
                            {r: policy.line_of(r) for r in p.active},
                            excused={"max_drift_pct"} if got.drift_off else ())  # fmt: skip
    return verdicts


__all__ = ["BASELINE_FORMAT", "CheckOptions", "CheckPlan", "CheckResult", "CheckSummary", "is_spectra_file",
           "judge", "measure", "plan_check", "read_baseline", "run_check", "write_baseline"]  # fmt: skip
