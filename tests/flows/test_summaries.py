"""Typed summaries: every field of a command's summary dataclass is a key of its recorded JSON
(tests/golden/<case>.json) and every recorded key is a field; nested records likewise. And the dict that
:func:`spectra_cli.results.summary_dict` writes: fields in order, absent keys absent, groups in place."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import pytest

from scripts.golden import CASES, normalise
from spectra_cli.flows.allocate import AllocateSummary, PeftConfig
from spectra_cli.flows.analyze import AnalyzeSummary, KindStats
from spectra_cli.flows.capture import CaptureSummary
from spectra_cli.flows.check import CheckSummary
from spectra_cli.flows.compare import CompareSummary, DriftGroup, TunedSummary, WorstModule
from spectra_cli.flows.init_adapter import InitSummary
from spectra_cli.flows.merge import MergeSummary
from spectra_cli.flows.rankme import RankmeSummary
from spectra_cli.flows.reconstruct import ReconstructSummary
from spectra_cli.gate.summary import RuleTally
from spectra_cli.results import OMIT_NONE, flatten, summary_dict, summary_keys
from spectra_cli.spectral.merge_stats import SweepCurve

GOLDEN = Path(__file__).resolve().parents[1] / "golden"

SUMMARIES: dict[str, type] = {
    "analyze": AnalyzeSummary, "compare": CompareSummary, "rankme": RankmeSummary, "allocate": AllocateSummary,
    "capture": CaptureSummary, "init-adapter": InitSummary, "merge": MergeSummary,
    "reconstruct": ReconstructSummary, "check": CheckSummary,
}  # fmt: skip

#: optional keys that no recorded example has, each with why
NOT_RECORDED = {
    "allocate": {"components"},  # only --strategy eva
    # only --mp-fit / --randomize (tests/spectral/test_rmt.py), a diagnostic or --fit (tests/cli/test_analyze_cli.py)
    "analyze": {"spiked", "trapped", "correlation_traps", "unreliable_fits"},
    "init-adapter": {"peak_gpu_mb"},  # only on CUDA
    "merge": {
        "adapter_base_names",
        "adapter_tensors_not_merged",
        "adapter",  # only --to-adapter (tests/flows/test_merge_adapter.py)
        "tensors_not_in_adapter",  # only --to-adapter on full fine-tunes changing biases/norms
    },  # adapters naming different bases / extra tensors
}


def _recorded(command: str) -> list[dict[str, Any]]:
    docs = [
        json.loads((GOLDEN / f"{case}.json").read_text())
        for case, argv in CASES.items()
        if argv[0] == command
    ]
    assert docs, f"no recorded case of {command}"
    return [d["summary"] for d in docs]


def _optional(cls: type) -> set[str]:
    """Keys a run may leave out: OMIT_NONE fields and the fields of flattened groups."""
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        mark = f.metadata.get("spectra")
        if mark == "omit_none":
            out.add(f.name)
        elif mark == "flatten":
            out |= set(summary_keys(f.metadata["type"]))
    return out


def _volatile(keys: list[str]) -> set[str]:
    """The keys the record drops (timings, memory): what :func:`scripts.golden.normalise` leaves out."""
    return set(keys) - set(normalise(dict.fromkeys(keys, 0)))


def test_every_command_has_a_summary_type() -> None:
    assert {argv[0] for argv in CASES.values()} == set(SUMMARIES)


@pytest.mark.parametrize("command", sorted(SUMMARIES))
def test_summary_fields_are_the_recorded_keys(command: str) -> None:
    cls = SUMMARIES[command]
    keys = summary_keys(cls)
    assert len(keys) == len(set(keys)), f"{cls.__name__} declares a key twice"
    fields = set(keys) - _volatile(keys)
    recorded = _recorded(command)
    seen: set[str] = set()
    for s in recorded:
        assert set(s) <= fields, f"recorded keys without a field: {set(s) - fields}"
        missing = fields - _optional(cls) - set(s)
        assert not missing, f"fields every run has, not recorded: {missing}"
        seen |= set(s)
    assert fields - seen == NOT_RECORDED.get(command, set())
    assert NOT_RECORDED.get(command, set()) <= _optional(cls)  # only an optional key may go unrecorded


def _record_keys(td: type) -> set[str]:
    return set(td.__annotations__)


@pytest.mark.parametrize(
    ("command", "path", "record"),
    [
        ("analyze", ("by_kind", "*"), KindStats),
        ("compare", ("tuned", "*"), TunedSummary),
        ("compare", ("tuned", "*", "by_kind", "*"), DriftGroup),
        ("compare", ("tuned", "*", "by_depth", "*"), DriftGroup),
        ("compare", ("tuned", "*", "worst_modules", "[]"), WorstModule),
        ("check", ("by_rule", "*"), RuleTally),
        ("allocate", ("peft_config",), PeftConfig),
        ("merge", ("sweep",), SweepCurve),
    ],
)
def test_nested_records_are_the_recorded_keys(command: str, path: tuple[str, ...], record: type) -> None:
    found: list[dict[str, Any]] = []

    def walk(x: Any, rest: tuple[str, ...]) -> None:
        if not rest:
            found.append(x)
        elif rest[0] == "*":
            for v in x.values():
                walk(v, rest[1:])
        elif rest[0] == "[]":
            for v in x:
                walk(v, rest[1:])
        elif rest[0] in x:
            walk(x[rest[0]], rest[1:])

    for s in _recorded(command):
        walk(s, path)
    assert found, f"no recorded {'.'.join(path)} in {command}"
    for x in found:
        assert set(x) == _record_keys(record) - _volatile(list(_record_keys(record)))


# ---- summary_dict ------------------------------------------------------------------------------------------


class _Rec(TypedDict):
    a: int


@dataclass(frozen=True)
class _Group:
    g1: float | None
    g2: int


@dataclass(frozen=True)
class _Inner:
    x: int


@dataclass(frozen=True, kw_only=True)
class _Summary:
    first: str
    maybe: int | None = field(default=None, metadata=OMIT_NONE)
    null: int | None = None
    group: _Group | None = field(default=None, metadata=flatten(_Group))
    inner: _Inner
    records: list[_Rec]
    last: float


def test_summary_dict_keeps_order_leaves_out_absent_keys_and_flattens_groups() -> None:
    s = _Summary(first="f", inner=_Inner(1), records=[_Rec(a=1)], last=2.0)
    d = summary_dict(s)
    assert list(d) == ["first", "null", "inner", "records", "last"]
    assert d == {"first": "f", "null": None, "inner": {"x": 1}, "records": [{"a": 1}], "last": 2.0}
    full = summary_dict(dataclasses.replace(s, maybe=0, group=_Group(None, 3)))
    assert list(full) == ["first", "maybe", "null", "g1", "g2", "inner", "records", "last"]
    assert (full["maybe"], full["g1"], full["g2"]) == (0, None, 3)  # 0 and None inside a group are kept
    assert summary_keys(_Summary) == ["first", "maybe", "null", "g1", "g2", "inner", "records", "last"]
    assert summary_dict({"already": "a dict"}) == {"already": "a dict"}  # an envelope read back


def test_the_envelope_writes_the_summary_dict() -> None:
    from spectra_cli.report.render import envelope

    env = envelope("x", {}, [], _Summary(first="f", inner=_Inner(1), records=[], last=1.0))
    assert env["summary"] == {"first": "f", "null": None, "inner": {"x": 1}, "records": [], "last": 1.0}
