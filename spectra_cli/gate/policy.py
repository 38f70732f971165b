"""Policy files for ``spectra check``: TOML → a frozen :class:`Policy`, with errors that name the line.

A policy is ``spectra.toml`` (or ``[tool.spectra]`` in ``pyproject.toml``)::

    baseline = "spectra-baseline.json"   # optional: the file max_drift_pct compares against
    allow_unevaluated = false            # optional: true lets a rule that applied to no module pass

    [rules]
    no_nonfinite = true
    max_intruders = 0
    alpha_range = [2.0, 6.0]

    [[overrides]]
    modules = ["*.q_proj.*", "*.v_proj.*"]   # fnmatch globs on matrix names
    max_intruders = 0                        # per module in an override
    alpha_range = false                      # false turns a rule off for these modules

Overrides are applied in file order; a later override that sets the same rule wins. TOML parsers do not report
where a key is, so :func:`key_lines` finds each key's line in the text itself.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectra_cli.checkpoint.validate import MAX_DEPTH, json_depth, read_bytes
from spectra_cli.errors import PolicyError
from spectra_cli.gate.rules import PARAMETERS, RULES, ValueProblem, shown, validate_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

#: a policy file is a few hundred bytes; anything past this is not one
_MAX_POLICY = 16 * 1024 * 1024
TOP_LEVEL = ("rules", "overrides", "baseline", "allow_unevaluated")
PolicyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Override:
    """Rule values for the modules matching any of ``modules`` (fnmatch globs on matrix names)."""

    modules: tuple[str, ...]
    values: Mapping[str, Any]
    lines: Mapping[str, int]
    line: int | None

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.modules)


@dataclass(frozen=True)
class Policy:
    """A validated policy. ``rules`` holds the ``[rules]`` values (``False`` = off), ``params`` every
    :data:`~spectra_cli.gate.rules.PARAMETERS` value (defaults filled in), ``lines`` the line of each key of
    ``[rules]``, ``baseline`` the baseline file (relative paths resolved against the policy's folder).
    ``allow_unevaluated``: a rule that could be evaluated on no module is a skip, not a failure."""

    path: Path
    rules: Mapping[str, Any]
    params: Mapping[str, Any]
    overrides: tuple[Override, ...] = ()
    baseline: Path | None = None
    lines: Mapping[str, int] = field(default_factory=dict)
    allow_unevaluated: bool = False

    def limit(self, rule: str, module: str) -> tuple[Any, int | None]:
        """The value of ``rule`` for ``module`` and the policy line it comes from: the last matching override
        that sets it, else ``[rules]`` (except ``max_intruders``, whose ``[rules]`` value is the model total:
        per module it only comes from overrides). ``None`` when the rule does not apply."""
        for o in reversed(self.overrides):
            if rule in o.values and o.matches(module):
                return o.values[rule], o.lines.get(rule)
        if rule == "max_intruders":
            return None, None
        return self.rules.get(rule), self.lines.get(rule)

    def active(self) -> list[str]:
        """Rules that apply anywhere (set, not ``false``, in ``[rules]`` or in an override), registry order."""
        on = {k for k, v in self.rules.items() if v is not False}
        on |= {k for o in self.overrides for k, v in o.values.items() if v is not False}
        return [r for r in RULES if r in on]

    def needs(self) -> set[str]:
        """What the active rules need measured (see :data:`spectra_cli.gate.rules.NEEDS`)."""
        return {RULES[r].needs for r in self.active()}

    def exempt(self, rule: str, module: str) -> bool:
        """An override turns ``rule`` off for ``module`` (used for the model-level intruder total)."""
        for o in reversed(self.overrides):
            if rule in o.values and o.matches(module):
                return o.values[rule] is False
        return False

    def line_of(self, rule: str) -> int | None:
        """The first line that sets ``rule`` ([rules] first, then overrides)."""
        if rule in self.lines:
            return self.lines[rule]
        return next((o.lines[rule] for o in self.overrides if rule in o.lines), None)

    def as_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v

        return {
            "policy": str(self.path),
            "rules": {k: plain(v) for k, v in self.rules.items()},
            "params": dict(self.params),
            "overrides": [
                {"modules": list(o.modules), **{k: plain(v) for k, v in o.values.items()}}
                for o in self.overrides
            ],
            "baseline": str(self.baseline) if self.baseline else None,
            # only when set: the options of a default policy stay as they were
            **({"allow_unevaluated": True} if self.allow_unevaluated else {}),
        }


# ---- where keys are --------------------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(
    r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)


def _split_key(text: str) -> tuple[str, ...]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", text)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


def key_lines(text: str) -> dict[PolicyPath, int]:
    """The 1-based line of every table header and ``key =`` in a TOML text, by full key path; arrays of
    tables get their index (``("overrides", 0, "modules")``). Keys inside multi-line strings may be
    mis-attributed; this only serves error messages and annotations."""
    out: dict[PolicyPath, int] = {}
    table: PolicyPath = ()
    counts: dict[tuple[str, ...], int] = {}
    depth = 0  # open brackets of a multi-line array / inline table
    for i, line in enumerate(text.splitlines(), start=1):
        if depth == 0 and (h := _HEADER.match(line)):
            name = _split_key(h.group(2))
            if h.group(1) == "[[":
                idx = counts.get(name, 0)
                counts[name] = idx + 1
                table = (*name, idx)
            else:
                table = name
            out.setdefault(table, i)
            continue
        if depth == 0 and (k := _KEY.match(line)):
            out.setdefault((*table, *_split_key(k.group(1))), i)
        code = re.sub(r""""[^"]*"|'[^']*'|#.*""", "", line)
        depth = max(0, depth + code.count("[") + code.count("{") - code.count("]") - code.count("}"))
    return out


# ---- reading -------------------------------------------------------------------------------------------------


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Reader:
    def __init__(self, path: Path, text: str, prefix: PolicyPath) -> None:
        self.path, self.prefix = path, prefix
        self.lines = key_lines(text)

    def line(self, *key: str | int) -> int | None:
        full = (*self.prefix, *key)
        while full:
            if full in self.lines:
                return self.lines[full]
            full = full[:-1]
        return None

    def error(self, key: tuple[str | int, ...], message: str) -> PolicyError:
        line = self.line(*key)
        return PolicyError(f"{self.path}:{line}: {message}" if line else f"{self.path}: {message}")


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file: ``spectra.toml``-style, or ``[tool.spectra]`` of a ``pyproject.toml``.
    Raises :class:`PolicyError` naming the file and line of the first problem."""
    p = Path(path)
    if not os.path.lexists(p):
        raise PolicyError(f"{p}: no such policy file; create one with `spectra check --init {p}`")
    data_bytes = read_bytes(p, "policy file", PolicyError, limit=_MAX_POLICY)
    try:
        text = data_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"{p}: the policy file is not UTF-8 text ({e.reason}); save it as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        where = f"{p}:{m.group(1)}" if m else str(p)
        raise PolicyError(f"{where}: invalid TOML: {e}") from None
    except RecursionError:
        data = None
    if data is None or json_depth(data, MAX_DEPTH) > MAX_DEPTH:
        raise PolicyError(
            f"{p}: the policy is nested more than {MAX_DEPTH} levels deep; a policy is flat tables"
        )
    prefix: PolicyPath = ()
    if p.name == "pyproject.toml":
        tool = data.get("tool", {})
        if not isinstance(tool, dict) or not isinstance(tool.get("spectra"), dict):
            raise PolicyError(f"{p}: no [tool.spectra] table; add one or pass --policy spectra.toml")
        data, prefix = tool["spectra"], ("tool", "spectra")
    return parse_policy(data, p, _Reader(p, text, prefix))


def parse_policy(data: Mapping[str, Any], path: Path, reader: _Reader | None = None) -> Policy:
    """Validate the parsed TOML ``data`` of the policy at ``path`` (see :func:`load_policy`)."""
    rd = reader or _Reader(path, "", ())
    for key in data:
        if key not in TOP_LEVEL:
            hint = (
                " (rules go under [rules])"
                if key in RULES or key in PARAMETERS
                else _suggest(key, list(TOP_LEVEL))
            )
            raise rd.error(
                (key,), f"unknown key {shown(key)} at the top level{hint}; expected {', '.join(TOP_LEVEL)}"
            )
    raw_rules = data.get("rules", {})
    if not isinstance(raw_rules, dict):
        raise rd.error(("rules",), "rules must be a table: write [rules] and one rule per line below it")
    rules: dict[str, Any] = {}
    params: dict[str, Any] = {k: p.default for k, p in PARAMETERS.items()}
    lines: dict[str, int] = {}
    for key, value in raw_rules.items():
        ln = rd.line("rules", key)
        if ln:
            lines[key] = ln
        try:
            if key in PARAMETERS:
                params[key] = PARAMETERS[key].validate(key, value)
            elif key in RULES:
                rules[key] = validate_value(key, value)
            elif key == "baseline":
                raise ValueProblem('baseline = "FILE" goes at the top level, above [rules], not under it')
            else:
                known = [*RULES, *PARAMETERS]
                raise ValueProblem(
                    f"unknown rule {shown(key)}{_suggest(key, known)}; known rules: {', '.join(RULES)}"
                )
        except ValueProblem as e:
            raise rd.error(("rules", key), str(e)) from None
    raw_over = data.get("overrides", [])
    if not isinstance(raw_over, list) or not all(isinstance(o, dict) for o in raw_over):
        raise rd.error(("overrides",), "overrides must be an array of tables: write [[overrides]] blocks")
    overrides = [_override(i, o, rd) for i, o in enumerate(raw_over)]
    if not any(v is not False for v in rules.values()) and not any(o.values for o in overrides):
        raise PolicyError(
            f"{path}: the policy has no rules; add a [rules] table (see `spectra check --init`)"
        )
    allow = data.get("allow_unevaluated", False)
    if not isinstance(allow, bool):
        raise rd.error(("allow_unevaluated",), f"allow_unevaluated must be true or false, got {shown(allow)}")
    baseline = data.get("baseline")
    if baseline is not None and (not isinstance(baseline, str) or not baseline):
        raise rd.error(("baseline",), f"baseline must be a file name (a string), got {shown(baseline)}")
    base_path = None
    if baseline:
        base_path = Path(baseline)
        if not base_path.is_absolute():
            base_path = path.parent / base_path
    return Policy(path, rules, params, tuple(overrides), base_path, lines, allow)


def _override(i: int, raw: dict[str, Any], rd: _Reader) -> Override:
    mods = raw.get("modules")
    if isinstance(mods, str):
        mods = [mods]
    if not mods or not isinstance(mods, list) or not all(isinstance(m, str) and m for m in mods):
        key: tuple[str | int, ...] = ("overrides", i, "modules") if "modules" in raw else ("overrides", i)
        raise rd.error(key, f'override #{i + 1} needs modules = "GLOB" or a list of globs, got {shown(mods)}')
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for k, v in raw.items():
        if k == "modules":
            continue
        try:
            if k in PARAMETERS:
                raise ValueProblem(f"{k} applies to the whole model: set it in [rules], not in an override")
            if k not in RULES:
                raise ValueProblem(
                    f"unknown rule {shown(k)}{_suggest(k, list(RULES))}; known rules: {', '.join(RULES)}"
                )
            values[k] = validate_value(k, v)
        except ValueProblem as e:
            raise rd.error(("overrides", i, k), str(e)) from None
        ln = rd.line("overrides", i, k)
        if ln:
            lines[k] = ln
    return Override(tuple(mods), values, lines, rd.line("overrides", i))


def find_policy(cwd: str | Path = ".") -> Path:
    """The default policy: ``spectra.toml`` in ``cwd``, else ``pyproject.toml`` when it has ``[tool.spectra]``."""
    folder = Path(cwd)
    if (folder / "spectra.toml").is_file():
        return folder / "spectra.toml"
    pyproject = folder / "pyproject.toml"
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError, RecursionError):
            data = {}
        if isinstance(data.get("tool"), dict) and "spectra" in data["tool"]:
            return pyproject
    raise PolicyError(
        "no policy: pass --policy FILE, or put spectra.toml (or [tool.spectra] in pyproject.toml) in the current "
        "folder; `spectra check --init` writes an example"
    )


EXAMPLE_POLICY = """\
# spectra.toml: the policy of `spectra check` (a CI gate on a fine-tuned checkpoint).
# The same tables can live in pyproject.toml as [tool.spectra], [tool.spectra.rules] and
# [[tool.spectra.overrides]]. Exit codes: 0 every rule holds, 1 a rule fails, 2 the gate could not run
# (usage or policy error, missing or unreadable input).
#
# As written, this policy passes a healthy model and fails a broken fine-tune. Measured on all-MiniLM-L6-v2
# (`spectra analyze --demo`) and on the example adapters of scripts/make_examples.py:
#   spectra check MINILM                                   -> passes (114 checks)
#   spectra check lora-a --base MINILM                     -> passes (a 5% update of query/value)
#   spectra check lora-broken --base MINILM                -> fails: a NaN, alpha < 2 in 11 modules
# Tighten the numbers from your own model's runs: `spectra analyze CKPT` shows alpha, its tail and sigma_1.

# The file that max_drift_pct compares against, relative to this file. Write it once from a good run
# with `spectra check CKPT --update-baseline spectra-baseline.json`.
# baseline = "spectra-baseline.json"

# A rule that could be evaluated on no module (a --base or --base-spectra that shares no matrix with the
# checkpoint, matrices too small to fit alpha) fails the gate; true makes it a skip.
# allow_unevaluated = false

[rules]
# Every weight is finite (no NaN / Inf). A single NaN makes a model useless; lora-broken has one.
no_nonfinite = true

# The heavy-tail exponent alpha of each layer's eigenvalue spectrum (power law fitted to the tail of the
# eigenvalues, as WeightWatcher does). WeightWatcher reads alpha < 2 as over-trained and alpha > 6 as
# under-trained. MiniLM's fits above 6 (6.6..12.4, four matrices) all rest on 9-16 tail eigenvalues
# (`spectra analyze` reads them "small-tail": fewer than 50, too few to trust, Clauset et al. 2009), so the
# upper bound here sits above them; its fits on 50+ eigenvalues lie in 2.46..4.06. The random 150% updates
# of lora-broken push its query/value layers to 1.88..1.99: below 2, they fail.
alpha_range = [2.0, 15.0]

# The largest singular value of every matrix: a guard against blown-up weights. MiniLM's largest is 28.7
# (the word embeddings), its attention and MLP layers stay under 12; lora-broken reaches 22.
max_spectral_norm = 100.0

# --- these need --base BASE (the model you fine-tuned from); turn them on when the gate always has it -------
# Intruder dimensions (Shuttleworth et al. 2024): top tuned singular vectors unlike every base one.
# This is the total over the model; an override below can limit single modules. lora-a has 0 at
# epsilon 0.5, lora-broken 8 in each module it changes: 10 separates them.
# max_intruders = 10
# intruder_epsilon = 0.5   # max |cos| below this makes an intruder
# intruder_top_k = 10      # how many top tuned singular vectors are checked

# ||W_tuned - W_base||_F / ||W_base||_F for each matrix. lora-a: 0.05 (the size it was built with).
# max_relative_delta = 0.1

# effective rank (tuned) / effective rank (base); --base-spectra FILE from `spectra analyze
# --save-spectra` is enough for this one.
# min_effective_rank_ratio = 0.9

# --- this one needs a baseline file -----------------------------------------------------------------------
# Spectral norm, effective rank and alpha of every matrix within this many percent of the baseline.
# max_drift_pct = 10.0

# Per-module overrides: globs on matrix names; later overrides win. `false` turns a rule off.
# Embedding tables are lookup tables, not learned maps: their alpha says little (MiniLM's position
# embeddings fit alpha 1.55 on a 284-eigenvalue tail), and word embeddings are large by design.
[[overrides]]
modules = ["*embed*", "*lm_head*"]
alpha_range = false
max_spectral_norm = false

# [[overrides]]
# modules = ["*.q_proj.*", "*.k_proj.*"]
# max_intruders = 0   # per module here: no intruder at all in these
"""


__all__ = ["EXAMPLE_POLICY", "Override", "Policy", "find_policy", "key_lines", "load_policy", "parse_policy"]
