"""The plan step of every split flow on its own: targets, ranks, budgets and inputs are decided (and bad ones
refused) before any weight is read, so before any decomposition. ``no_reads`` makes reading a tensor of a
checkpoint an error for the duration of the plan."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fixtures import merge_cases as mc
from spectra_cli.checkpoint.source import Checkpoint
from spectra_cli.errors import BudgetError, PolicyError, SelectionError, ShapeMismatch, SpectraError


@contextlib.contextmanager
def no_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Reading any tensor's values (not headers) raises, so a plan that reads — or decomposes — fails."""

    def refuse(self: Checkpoint, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"a plan read tensor values from {self.path}")

    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "read", refuse)
        m.setattr(Checkpoint, "read_columns", refuse)
        yield


LLAMA_Q = [f"model.layers.{i}.self_attn.q_proj" for i in (1, 0)]  # read order: shard 1 holds layer 1
LLAMA_V = [f"model.layers.{i}.self_attn.v_proj" for i in (1, 0)]


# ---- init-adapter -----------------------------------------------------------------------------------------


def test_init_plan_chooses_targets_ranks_and_scales_without_reading(ckpts, monkeypatch) -> None:
    from spectra_cli.flows.init_adapter import InitOptions, plan_init

    with no_reads(monkeypatch):
        p = plan_init(ckpts.sharded.path, InitOptions(kinds=("q_proj", "v_proj"), rank=2, alpha=4.0))
    assert [t.path for t in p.targets] == [LLAMA_Q[0], LLAMA_V[0], LLAMA_Q[1], LLAMA_V[1]]
    assert {(t.rank, t.alpha, t.scale) for t in p.targets} == {(2, 4.0, 2.0)}
    assert [t.spec.shape for t in p.targets[:2]] == [(8, 8), (4, 8)]
    assert p.dropped == [] and p.method.name == "pissa" and p.device == "cpu"
    with no_reads(monkeypatch):
        rs = plan_init(ckpts.sharded.path, InitOptions(kinds=("q_proj",), rank=4, alpha=4.0, rslora=True))
    assert {t.scale for t in rs.targets} == {2.0}  # α/√r


def test_init_plan_keeps_alpha_over_rank_with_an_allocation_and_drops_rank_zero(ckpts, monkeypatch) -> None:
    from spectra_cli.flows.init_adapter import InitOptions, plan_init

    ranks = {LLAMA_Q[0]: 4, LLAMA_Q[1]: 0}
    with no_reads(monkeypatch):
        p = plan_init(
            ckpts.sharded.path, InitOptions(kinds=("q_proj",), ranks=ranks, alphas={LLAMA_Q[0]: 8.0})
        )
    assert [(t.path, t.rank, t.alpha, t.scale) for t in p.targets] == [(LLAMA_Q[0], 4, 8.0, 2.0)]
    assert p.dropped == [LLAMA_Q[1]]


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (
            {"kinds": ("v_proj",), "rank": 5},
            ShapeMismatch,
            r"rank larger than min\(out, in\).*v_proj \(4×8, rank 5\)",
        ),
        (
            {"kinds": ("nope",), "rank": 2},
            SelectionError,
            r"no weight matrices selected after filters \(--kinds nope\)",
        ),
        ({"kinds": ("q_proj",)}, SpectraError, "give --rank R"),
        (
            {"kinds": ("q_proj",), "rank": 2, "method": "corda"},
            SpectraError,
            "capture them with `spectra capture`",
        ),
    ],
)
def test_init_plan_refuses_before_reading(ckpts, monkeypatch, options, error, match) -> None:
    from spectra_cli.flows.init_adapter import InitOptions, plan_init

    with no_reads(monkeypatch), pytest.raises(error, match=match):
        plan_init(ckpts.sharded.path, InitOptions(**options))


def test_init_plan_reads_the_ranks_file_as_peft_does(ckpts, monkeypatch, tmp_path: Path) -> None:
    import json

    from spectra_cli.flows.init_adapter import InitOptions, plan_init

    f = tmp_path / "ranks.json"
    f.write_text(json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                             "rank_pattern": {r"model\.layers\.0\.self_attn\.q_proj": 4}}))  # fmt: skip
    with no_reads(monkeypatch):
        p = plan_init(ckpts.sharded.path, InitOptions(ranks_file=f))
    # only the file's target_modules; layer 0 at rank 4 keeps the file's α/r = 2
    assert [(t.path, t.rank, t.alpha) for t in p.targets] == [(LLAMA_Q[0], 2, 4.0), (LLAMA_Q[1], 4, 8.0)]


# ---- merge ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> mc.FullCase:
    return mc.full_case(tmp_path_factory.mktemp("plan-merge"), n=3)


def test_merge_plan_opens_and_matches_without_reading(full, monkeypatch) -> None:
    from spectra_cli.flows.merge import MergeOptions, plan_merge
    from spectra_cli.spectral.merge import METHODS

    pairs = list(full.paths.items())
    with no_reads(monkeypatch):
        p = plan_merge(
            full.base_path, pairs, MergeOptions(method="ties", weights=(1.0, 2.0, 3.0), kinds=("q_proj",))
        )
    assert [t.name for t in p.tuned] == list(full.paths)
    assert [s.name for s in p.work] == sorted(
        (n for n in full.base if n.endswith("q_proj.weight")), key=[s for s in full.base].index
    )
    assert p.weights == [1.0, 2.0, 3.0] and p.method is METHODS["ties"]
    assert p.params == METHODS["ties"].resolve_params({}) and p.dtype is np.float32
    with no_reads(monkeypatch):
        rmm = plan_merge(full.base_path, pairs, MergeOptions(method="rmm", basis=2))
    assert rmm.method is None and rmm.params == {} and rmm.weights == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("options", "n", "match"),
    [
        ({"method": "rmm", "basis": 4}, 3, r"--basis 4 is larger than the number of tasks \(3\)"),
        ({"weights": (1.0, 2.0)}, 3, "--weights has 2 values for 3 tuned models"),
        ({}, 1, "merge needs at least two tuned models"),
    ],
)
def test_merge_plan_refuses_before_reading(full, monkeypatch, options, n, match) -> None:
    from spectra_cli.flows.merge import MergeOptions, plan_merge

    with no_reads(monkeypatch), pytest.raises(SelectionError, match=match):
        plan_merge(full.base_path, list(full.paths.items())[:n], MergeOptions(**options))


# ---- allocate ---------------------------------------------------------------------------------------------


def test_allocate_plan_sizes_the_budget_without_decomposing(ckpts, monkeypatch) -> None:
    from spectra_cli.flows.allocate import AllocateOptions, plan_allocate

    with no_reads(monkeypatch):
        p = plan_allocate(ckpts.sharded.path, AllocateOptions(kinds=("q_proj", "v_proj"), budget_rank=2.5))
    assert [t.name for t in p.targets] == [LLAMA_Q[0], LLAMA_V[0], LLAMA_Q[1], LLAMA_V[1]]
    assert (p.budget_kind, p.budget, p.costs) == ("rank", 10.0, (1, 1, 1, 1))  # ⌊2.5 · 4⌋
    assert p.engine is not None and p.engine_info["device"] == "cpu" and not p.saved
    with no_reads(monkeypatch):
        q = plan_allocate(ckpts.sharded.path, AllocateOptions(kinds=("v_proj",), budget_params=100))
    assert (q.budget_kind, q.budget, q.costs) == ("params", 100.0, (12, 12))  # out + in = 4 + 8
    # without --kinds every linear weight but embeddings and the output head
    with no_reads(monkeypatch):
        d = plan_allocate(ckpts.sharded.path, AllocateOptions(budget_rank=1))
    assert len(d.targets) == 14 and not {t.role for t in d.targets} & {"embedding", "lm_head"}


def test_allocate_plan_refuses_a_bad_budget_before_decomposing(ckpts, monkeypatch) -> None:
    from spectra_cli.flows.allocate import AllocateOptions, plan_allocate
    from spectra_cli.spectral.allocation import AllocationError

    with no_reads(monkeypatch), pytest.raises(AllocationError, match="give exactly one budget"):
        plan_allocate(ckpts.sharded.path, AllocateOptions(kinds=("q_proj",)))


# ---- compare, analyze -------------------------------------------------------------------------------------


def test_compare_plan_matches_inputs_and_checks_the_budget_without_reading(ckpts, monkeypatch) -> None:
    from spectra_cli.flows.compare import CompareOptions, plan_compare

    path = ckpts.sharded.path
    with no_reads(monkeypatch):
        p = plan_compare(
            path, [("a", path), ("b", path)], CompareOptions(kinds=("q_proj",), precision="float64")
        )
    assert [s.name for s in p.work] == [f"{m}.weight" for m in LLAMA_Q]
    assert p.pairs == 4 and p.dtype is np.float64 and [t.name for t in p.tuned] == ["a", "b"]
    with no_reads(monkeypatch), pytest.raises(BudgetError, match="over the memory budget"):
        plan_compare(path, [("a", path)], CompareOptions(kinds=("q_proj",), max_memory=1000))
    with no_reads(monkeypatch), pytest.raises(SelectionError, match="distinct names"):
        plan_compare(path, [("a", path), ("a", path)], CompareOptions())


def test_analyze_plan_selects_without_reading(ckpts, monkeypatch) -> None:
    from spectra_cli.checkpoint.source import open_checkpoint
    from spectra_cli.flows.analyze import AnalyzeOptions, plan_analyze

    gen = ckpts.single
    with no_reads(monkeypatch):
        p = plan_analyze(open_checkpoint(gen.path), AnalyzeOptions())
    assert {s.name for s in p.specs} == set(gen.matrices)
    assert {s.name for s in p.skipped} == set(gen.skipped)
    assert p.engine.precision == "float32"


# ---- check ------------------------------------------------------------------------------------------------


def _policy(tmp_path: Path, rules: str) -> object:
    from spectra_cli.gate.policy import load_policy

    f = tmp_path / "spectra.toml"
    f.write_text(f"[rules]\n{rules}\n")
    return load_policy(f)


def test_check_plan_decides_what_to_measure(ckpts, tmp_path: Path) -> None:
    from spectra_cli.flows.check import CheckOptions, plan_check

    path = ckpts.sharded.path
    analyze_only = plan_check(
        path, _policy(tmp_path, "no_nonfinite = true\nmax_spectral_norm = 10.0"), CheckOptions()
    )
    assert not analyze_only.compare and not analyze_only.adapter and analyze_only.baseline is None
    assert analyze_only.needs == {"tuned"}
    against = plan_check(path, _policy(tmp_path, "max_intruders = 0"), CheckOptions(base=path))
    assert against.compare and against.active == ["max_intruders"]
    with pytest.raises(PolicyError, match=r"max_intruders \(spectra.toml:2\) compares against the base"):
        plan_check(path, _policy(tmp_path, "max_intruders = 0"), CheckOptions())


# ---- rankme -----------------------------------------------------------------------------------------------


def test_rankme_plan_opens_every_input_first(tmp_path: Path) -> None:
    from spectra_cli.flows.rankme import RankmeOptions, plan_rankme

    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, np.zeros((30, 4), np.float32))
    np.save(b, np.zeros((20, 4), np.float32))
    p = plan_rankme([("a", a), ("b", b)], RankmeOptions(device="cpu"))
    assert [(n, s.n, s.k) for n, s in p.sources] == [("a", 30, 4), ("b", 20, 4)]
    assert p.total == 50 and p.texts == [] and p.models == []
    with pytest.raises(SpectraError, match="two inputs are named 'a'"):
        plan_rankme([("a", a), ("a", b)], RankmeOptions())
    with pytest.raises(SpectraError, match="--model needs --texts"):
        plan_rankme([], RankmeOptions(), models=[("m", tmp_path)])


def test_energy_mode_keeps_targets_of_rank_zero(ckpts, monkeypatch, tmp_path: Path) -> None:
    """extract --energy: every target planned at rank 0 (chosen per module later), none dropped."""
    from spectra_cli.flows.init_adapter import InitOptions, plan_init

    with no_reads(monkeypatch):
        p = plan_init(ckpts.sharded.path, InitOptions(method="extract", tuned=ckpts.sharded.path, energy=0.9,
                                                      kinds=("q_proj",)))  # fmt: skip
    assert [(t.path, t.rank) for t in p.targets] == [(LLAMA_Q[0], 0), (LLAMA_Q[1], 0)]
    assert p.dropped == [] and set(p.tuned_infos) == {f"{m}.weight" for m in LLAMA_Q}
    assert all(math.isclose(t.scale, 1.0) for t in p.targets)
