"""`spectra allocate`: known answers of every strategy, budget edge cases, invariants (hypothesis), the PEFT config
loaded by the real consumer (peft), the CLI contract and bad input.

Expected answers are computed here independently: by hand from spectra built with known singular values, by
brute force over all rank vectors, or by the published rule (EVA: sort all ratios, keep the top B, count).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fixtures import allocation as fxa
from spectra_cli.cli.app import app
from spectra_cli.errors import SpectraError
from spectra_cli.flows.allocate import AllocateOptions, run_allocate
from spectra_cli.spectral.allocation import (
    STRATEGIES,
    AllocationError,
    Constraints,
    Problem,
    allocate,
)

runner = CliRunner()
A, B, C, D = fxa.KNOWN  # q0 (rank 2, σ = 2, 2), v0 (flat 8), q1 (flat 4 of 12), v1 (flat 12)


def run(*args: str | Path) -> Any:
    return runner.invoke(app, ["allocate", *[str(a) for a in args]], catch_exceptions=False)


def ok_json(*args: str | Path) -> dict[str, Any]:
    r = run(*args, "-f", "json", "-q")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fxa.known_spectra_checkpoint(tmp_path_factory.mktemp("known"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fxa.tiny_llama(tmp_path_factory.mktemp("llama"))


def ranks_of(path: Path, **kw: Any) -> list[int]:
    res = run_allocate(path, AllocateOptions(**kw))
    return [res.ranks[m] for m in fxa.KNOWN]


# ---- known answers -------------------------------------------------------------------------------------------


def test_uniform_known(known: Path) -> None:
    assert ranks_of(known, strategy="uniform", budget_rank=3) == [3, 3, 3, 3]
    # params: costs 24, 16, 36, 36 per rank; 112·r ≤ 400 → r = 3 (336), 4 would be 448
    assert ranks_of(known, strategy="uniform", budget_params=400) == [3, 3, 3, 3]
    # caps: A and B have full rank 8; 36 ranks give r = 10 to C and D (8 + 8 + 10 + 10)
    assert ranks_of(known, strategy="uniform", budget_rank=9) == [8, 8, 10, 10]


def test_energy_known_and_brute_force(known: Path) -> None:
    # start (1,1,1,1), 8 left: A's 2nd rank (+1/2), C's 2..4 (+1/4 each), then B's (+1/8) beat D's (+1/12)
    assert ranks_of(known, strategy="energy", budget_rank=3) == [2, 5, 4, 1]
    res = run_allocate(known, AllocateOptions(strategy="energy", budget_rank=3))
    energy = {"model.layers.0.self_attn.q_proj": 1.0, "model.layers.0.self_attn.v_proj": 5 / 8,
              "model.layers.1.self_attn.q_proj": 1.0, "model.layers.1.self_attn.v_proj": 1 / 12}  # fmt: skip
    for row in res.rows:
        assert row["energy"] == pytest.approx(energy[row["name"]], abs=1e-9)
        assert row["uniform_rank"] == 3
    assert res.summary.mean_energy == pytest.approx(np.mean(list(energy.values())), abs=1e-9)
    # brute force over every rank vector with total ≤ 12 and each rank in [1, full]
    fulls = [8, 8, 12, 12]
    flats = {0: [2.0, 2.0], 1: [1.0] * 8, 2: [3.0] * 4, 3: [0.5] * 12}

    def e(i: int, r: int) -> float:
        s2 = np.array(flats[i]) ** 2
        return float(s2[:r].sum() / s2.sum())

    best = max(
        (sum(e(i, r) for i, r in enumerate(rs)), rs)
        for rs in itertools.product(*[range(1, f + 1) for f in fulls])
        if sum(rs) <= 12
    )
    assert list(best[1]) == [2, 5, 4, 1]


def test_effective_rank_known(known: Path) -> None:
    # effective ranks 2, 8, 4, 12 (flat spectra): 26 ranks in total are exactly proportional
    assert ranks_of(known, strategy="effective-rank", budget_rank=6.5) == [2, 8, 4, 12]
    res = run_allocate(known, AllocateOptions(strategy="effective-rank", budget_rank=6.5))
    assert [r["effective_rank"] for r in res.rows] == pytest.approx([2, 8, 4, 12], rel=1e-6)


def test_welore_known(tmp_path: Path) -> None:
    spectra = {"a.q_proj": (3, 3, [1.0, 0.5, 0.0]), "a.v_proj": (4, 4, [2.0, 1.5, 1.0, 0.5])}
    ck = fxa.known_spectra_checkpoint(tmp_path, spectra)
    # σ̃: a = [1, .5, 0], b = [1, 2/3, 1/3, 0]. 4 ranks: t = 1/2 keeps 2 + 2; 5 ranks: t = 1/3 keeps 2 + 3
    res = run_allocate(ck, AllocateOptions(strategy="welore", budget_rank=2))
    assert list(res.ranks.values()) == [2, 2]
    assert res.summary.threshold == pytest.approx(0.5)
    res = run_allocate(ck, AllocateOptions(strategy="welore", budget_rank=2.5))
    assert list(res.ranks.values()) == [2, 3]
    assert res.summary.threshold == pytest.approx(1 / 3)
    # reduction ratio: pruned (σ̃ < 1/3) = 1 + 1 of 7
    assert res.summary.reduction_ratio == pytest.approx(2 / 7)
    assert [r["pruned_fraction"] for r in res.rows] == pytest.approx([1 / 3, 1 / 4])
    assert res.summary.low_rank_components == 0
    r = run(ck, "--budget-rank", "2.5", "--strategy", "welore", "-q")
    assert (
        r.exit_code == 0 and "WeLore threshold t = 0.3333" in r.stdout and "0 low-rank components" in r.stdout
    )


EVA_RATIOS = {
    A: (8, [0.4, 0.3, 0.2, 0.1]),
    B: (8, [0.5, 0.25, 0.15, 0.1]),
    C: (24, [1 / 24] * 4),
    D: (12, [0.12, 0.11, 0.1, 0.09]),
}


def eva_reference(ratios: dict[str, tuple[int, list[float]]], r: int, rho: float) -> list[int]:
    """EVA's rule as published: top ρ·r ratios per module, sorted globally, keep the top r·#modules, count."""
    k = math.ceil(rho * r)
    pool = [(-v, i) for i, (_, vs) in enumerate(ratios.values()) for v in vs[:k]]
    kept = sorted(pool)[: r * len(ratios)]
    return [sum(1 for _, i in kept if i == j) for j in range(len(ratios))]


def test_eva_matches_the_published_rule(known: Path, tmp_path: Path) -> None:
    acts = fxa.pca_activations(tmp_path / "acts.safetensors", EVA_RATIOS)
    want = eva_reference(EVA_RATIOS, 2, 2.0)
    assert want == [3, 3, 0, 2]
    got = ranks_of(known, strategy="eva", budget_rank=2, activations=acts, allow_zero=True)
    assert got == want
    res = run_allocate(
        known, AllocateOptions(strategy="eva", budget_rank=2, activations=acts, allow_zero=True)
    )
    assert res.rows[0]["explained_variance"] == pytest.approx(0.9)
    assert res.summary.dropped == [C]
    # ρ = 1: no redistribution, every module keeps r
    assert ranks_of(known, strategy="eva", budget_rank=2, activations=acts, allow_zero=True, rho=1) == [2] * 4
    # without --allow-zero every module keeps at least 1
    assert ranks_of(known, strategy="eva", budget_rank=2, activations=acts) == [3, 3, 1, 1]


# ---- budget edge cases and constraints -----------------------------------------------------------------------


def test_budget_below_number_of_modules(known: Path) -> None:
    with pytest.raises(AllocationError, match=r"below the minimum \(4\).*--allow-zero"):
        run_allocate(known, AllocateOptions(strategy="energy", budget_rank=0.5))
    # with --allow-zero: 2 ranks go where they add most energy (A's two ranks, 1/2 each)
    assert ranks_of(known, strategy="energy", budget_rank=0.5, allow_zero=True) == [2, 0, 0, 0]
    assert ranks_of(known, strategy="uniform", budget_rank=0.5, allow_zero=True) == [1, 1, 0, 0]
    r = run(known, "--budget-rank", "0.5")
    assert r.exit_code == 1 and r.stderr.startswith("Error: the budget (2) is below the minimum (4)")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("strategy", ["uniform", "energy", "effective-rank", "welore"])
def test_budget_above_full_rank(known: Path, strategy: str) -> None:
    res = run_allocate(known, AllocateOptions(strategy=strategy, budget_rank=1000))
    assert [res.ranks[m] for m in fxa.KNOWN] == [8, 8, 12, 12]
    assert res.summary.used == 40 < res.summary.budget


def test_constraints(known: Path) -> None:
    got = ranks_of(known, strategy="energy", budget_rank=3, max_rank=3)
    assert max(got) <= 3 and sum(got) <= 12
    got = ranks_of(known, strategy="energy", budget_rank=8, multiple_of=4)
    assert all(r % 4 == 0 and r >= 4 for r in got) and sum(got) <= 32
    with pytest.raises(AllocationError, match="full rank 8 is below the smallest allowed rank 12"):
        run_allocate(known, AllocateOptions(strategy="energy", budget_rank=16, multiple_of=12))
    assert ranks_of(known, strategy="energy", budget_rank=16, multiple_of=12, allow_zero=True) == [
        0,
        0,
        12,
        12,
    ]
    with pytest.raises(AllocationError, match="dropped every module: no module has an allowed rank"):
        run_allocate(
            known, AllocateOptions(strategy="energy", budget_rank=16, multiple_of=13, allow_zero=True)
        )
    # one rank of the cheapest module (v0, 8×8) costs 16 parameters
    with pytest.raises(
        AllocationError,
        match=r"budget \(10 parameters\) is below the cheapest adapter .*0.self_attn.v_proj at rank 1: 16",
    ):
        run_allocate(known, AllocateOptions(strategy="energy", budget_params=10, allow_zero=True))


# ---- invariants (hypothesis) ---------------------------------------------------------------------------------


@st.composite
def problems(draw: st.DrawFn) -> tuple[Problem, str]:
    n = draw(st.integers(1, 4))
    shapes = tuple((draw(st.integers(1, 9)), draw(st.integers(1, 9))) for _ in range(n))
    spectra = tuple(
        np.sort(
            np.array(
                draw(
                    st.lists(
                        st.sampled_from([0.0, 0.1, 0.5, 1.0, 1.5, 3.0]), min_size=min(s), max_size=min(s)
                    )
                )
            )
        )[::-1]
        for s in shapes
    )
    c = Constraints(
        min_rank=draw(st.integers(1, 3)),
        max_rank=draw(st.one_of(st.none(), st.integers(3, 8))),
        multiple_of=draw(st.integers(1, 3)),
        allow_zero=draw(st.booleans()),
    )
    kind = draw(st.sampled_from(["rank", "params"]))
    costs = tuple(1 if kind == "rank" else m + k for m, k in shapes)
    budget = float(draw(st.integers(0, 40 if kind == "rank" else 400)))
    ratios = {f"m{i}": np.sort(np.array(draw(st.lists(st.floats(0, 1), min_size=6, max_size=6))))[::-1]
              for i in range(n)}  # fmt: skip
    names = tuple(f"m{i}" for i in range(n))
    return Problem(names, shapes, spectra, budget, costs, c, ratios, 2.0, 3), kind


def allowed(problem: Problem) -> list[set[int]] | None:
    """Allowed ranks per module, computed from the constraints here; None when a module has none."""
    c = problem.constraints
    out = []
    for m, k in problem.shapes:
        top = min(m, k) if c.max_rank is None else min(m, k, c.max_rank)
        lv = {r for r in range(1, top + 1) if r >= c.min_rank and r % c.multiple_of == 0}
        if c.allow_zero:
            lv.add(0)
        if not lv:
            return None
        out.append(lv)
    return out


def total_energy(problem: Problem, ranks: tuple[int, ...]) -> float:
    tot = 0.0
    for s, r in zip(problem.spectra, ranks, strict=True):
        s2 = np.asarray(s) ** 2
        tot += float(s2[:r].sum() / s2.sum()) if s2.sum() > 0 else 0.0
    return tot


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(sorted(STRATEGIES)), st.integers(1, 30))
def test_never_exceeds_budget_and_monotone(case: tuple[Problem, str], strategy: str, extra: int) -> None:
    problem, kind = case
    levels = allowed(problem)
    floor = None if levels is None else sum(min(lv) * k for lv, k in zip(levels, problem.costs, strict=True))
    if levels is None or floor > problem.budget:
        with pytest.raises(AllocationError):
            allocate(strategy, problem)
        return
    got = allocate(strategy, problem)
    assert sum(r * k for r, k in zip(got.ranks, problem.costs, strict=True)) <= problem.budget
    assert all(r in lv for r, lv in zip(got.ranks, levels, strict=True))
    bigger = Problem(**{**problem.__dict__, "budget": problem.budget + extra})
    more = allocate(strategy, bigger)
    monotone = strategy in ("energy", "uniform", "welore") or (
        strategy == "effective-rank" and kind == "rank" and not problem.constraints.allow_zero
    )
    if monotone:
        assert total_energy(bigger, more.ranks) >= total_energy(problem, got.ranks) - 1e-9
    if strategy == "welore":
        t = got.info["threshold"]
        assert 0.0 <= t <= 1.0 + 1e-9


@settings(max_examples=60, deadline=None)
@given(problems())
def test_energy_greedy_is_optimal_for_rank_budgets(case: tuple[Problem, str]) -> None:
    problem, _ = case
    c = Constraints(min_rank=1)
    p = Problem(problem.names, problem.shapes, problem.spectra, problem.budget, (1,) * len(problem.names), c)
    fulls = [min(s) for s in p.shapes]
    assume(len(fulls) <= p.budget)
    got = allocate("energy", p).ranks
    best = max(
        total_energy(p, rs)
        for rs in itertools.product(*[range(1, f + 1) for f in fulls])
        if sum(rs) <= p.budget
    )
    assert total_energy(p, got) == pytest.approx(best, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_eva_is_top_b_of_sorted_ratios(case: tuple[Problem, str]) -> None:
    problem, _ = case
    n = len(problem.names)
    p = Problem(problem.names, ((12, 12),) * n, problem.spectra, float(2 * n), (1,) * n,
                Constraints(allow_zero=True), problem.explained, 2.0, 2)  # fmt: skip
    assert problem.explained is not None
    ratios = {k: (12, [float(x) for x in v]) for k, v in problem.explained.items()}
    want = eva_reference(ratios, 2, 2.0)
    got = list(allocate("eva", p).ranks)
    # ties between equal ratios may go to either module: compare the captured totals and the count
    assert sum(got) == sum(want)
    cap = [float(np.sum(problem.explained[k][:r])) for k, r in zip(problem.names, got, strict=True)]
    ref = [float(np.sum(problem.explained[k][:r])) for k, r in zip(problem.names, want, strict=True)]
    assert sum(cap) == pytest.approx(sum(ref), abs=1e-12)


# ---- saved spectra -------------------------------------------------------------------------------------------


def test_saved_spectra_give_the_same_answer(known: Path, tmp_path: Path) -> None:
    saved = tmp_path / "spectra.safetensors"
    r = runner.invoke(app, ["analyze", str(known), "--save-spectra", str(saved), "-q", "-f", "json"])
    assert r.exit_code == 0, r.stderr
    a = run_allocate(known, AllocateOptions(strategy="energy", budget_rank=3))
    b = run_allocate(saved, AllocateOptions(strategy="energy", budget_rank=3))
    assert a.ranks == b.ranks
    assert b.summary.engine["source"] == "saved spectra"
    assert b.inputs["spectra_of"] == str(known)


# ---- PEFT: the config gives each module its rank -------------------------------------------------------------


def peft_model(folder: Path, cfg: dict[str, Any]) -> Any:
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(folder)
        return get_peft_model(model, LoraConfig(**cfg))


def check_peft(folder: Path, cfg: dict[str, Any], ranks: dict[str, int], alphas: dict[str, float]) -> None:
    model = peft_model(folder, cfg)
    modules = dict(model.base_model.model.named_modules())
    for name, r in ranks.items():
        mod = modules[name]
        if r == 0:
            assert not hasattr(mod, "lora_A"), f"{name} was dropped but has a LoRA"
            continue
        a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        out_f, in_f = mod.base_layer.weight.shape
        assert tuple(a.shape) == (r, in_f), name
        assert tuple(b.shape) == (out_f, r), name
        assert mod.scaling["default"] == pytest.approx(alphas[name] / r), name
    lora = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert {n.removeprefix("base_model.model.") for n in lora} == {m for m, r in ranks.items() if r > 0}


@pytest.mark.parametrize(("strategy", "alpha"), [("energy", "scale"), ("welore", "2r"), ("uniform", "fixed")])
def test_peft_config_gives_each_module_its_rank(
    llama: Path, tmp_path: Path, strategy: str, alpha: str
) -> None:
    out = tmp_path / "lora.json"
    env = ok_json(llama, "--kinds", "q_proj,v_proj", "--budget-rank", "4", "--strategy", strategy,
                  "--alpha", alpha, "--lora-alpha", "8", "--peft-config", out)  # fmt: skip
    cfg = json.loads(out.read_text())
    assert cfg == env["summary"]["peft_config"]
    ranks = {row["name"]: row["rank"] for row in env["rows"]}
    alphas = {row["name"]: row["alpha"] for row in env["rows"]}
    assert len(ranks) == 6 and sum(ranks.values()) <= 24
    if strategy != "uniform":
        assert len(set(ranks.values())) > 1, "the spectra differ, so should the ranks"
    for name, r in ranks.items():
        want = {"scale": 8 * r / 4, "2r": 2.0 * r, "fixed": 8.0}[alpha]
        assert alphas[name] == pytest.approx(want)
    assert all(re.escape(m) in cfg["rank_pattern"] for m in ranks)
    check_peft(llama, cfg, ranks, alphas)


def test_peft_config_drops_modules(llama: Path, tmp_path: Path) -> None:
    ratios = {f"model.layers.{i}.self_attn.{k}": (32, [0.5, 0.3, 0.1, 0.05] if i < 2 else [0.01] * 4)
              for i in range(3) for k in ("q_proj", "v_proj")}  # fmt: skip
    acts = fxa.pca_activations(tmp_path / "acts.safetensors", ratios)
    res = run_allocate(llama, AllocateOptions(kinds=("q_proj", "v_proj"), strategy="eva", budget_rank=2,
                                              activations=acts, allow_zero=True))  # fmt: skip
    assert sorted(res.summary.dropped) == [f"model.layers.2.self_attn.{k}" for k in ("q_proj", "v_proj")]
    cfg = res.peft_config()
    assert len(cfg["target_modules"]) == 4
    check_peft(llama, cfg, res.ranks, res.alphas)


def test_pattern_keys_order_when_one_path_is_a_suffix_of_another() -> None:
    from spectra_cli.flows.allocate import AllocationResult

    res = AllocationResult(
        [], {}, {}, {}, {"attn.q": 2, "layers.0.attn.q": 6}, {"attn.q": 2.0, "layers.0.attn.q": 6.0}, 2, 2.0
    )
    keys = list(res.peft_config()["rank_pattern"])

    def first(name: str) -> str:
        return next(k for k in keys if re.match(rf"(.*\.)?({k})$", name))

    assert res.peft_config()["rank_pattern"][first("layers.0.attn.q")] == 6
    assert res.peft_config()["rank_pattern"][first("attn.q")] == 2


# ---- CLI contract --------------------------------------------------------------------------------------------


def test_formats_and_output(known: Path, tmp_path: Path) -> None:
    env = ok_json(known, "--budget-rank", "3")
    assert env["command"] == "allocate" and env["schema_version"] == 1
    assert [r["rank"] for r in env["rows"]] == [2, 5, 4, 1]
    s = env["summary"]
    assert (s["budget"], s["used"], s["params"]) == (12, 12, 2 * 24 + 5 * 16 + 4 * 36 + 36)
    r = run(known, "--budget-rank", "3", "-f", "csv", "-q")
    assert r.exit_code == 0 and r.stdout.splitlines()[0].startswith("name,")
    r = run(known, "--budget-rank", "3", "-f", "markdown", "-q")
    assert r.exit_code == 0 and "| module |" in r.stdout
    r = run(known, "--budget-rank", "3", "-q")
    assert r.exit_code == 0 and "mean energy captured" in r.stdout
    out = tmp_path / "rows.json"
    r = run(known, "--budget-params", "0.4K", "-f", "json", "-o", out, "-q")
    assert r.exit_code == 0 and r.stdout == ""
    assert json.loads(out.read_text())["summary"]["budget_kind"] == "params"


def test_peft_config_file_and_force(known: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora.json"
    assert run(known, "--budget-rank", "3", "--peft-config", out, "-q").exit_code == 0
    r = run(known, "--budget-rank", "3", "--peft-config", out, "-q")
    assert r.exit_code == 1 and "already exists" in r.stderr and "--force" in r.stderr
    assert run(known, "--budget-rank", "2", "--peft-config", out, "--force", "-q").exit_code == 0
    assert json.loads(out.read_text())["rank_pattern"]


def test_default_targets_leave_out_embeddings_and_head(llama: Path) -> None:
    res = run_allocate(llama, AllocateOptions(strategy="uniform", budget_rank=2))
    assert "model.embed_tokens" not in res.ranks and "lm_head" not in res.ranks
    assert len(res.ranks) == 3 * 7  # q, k, v, o, gate, up, down in each of 3 layers
    res = run_allocate(llama, AllocateOptions(strategy="uniform", budget_rank=2, kinds=("lm_head",)))
    assert list(res.ranks) == ["lm_head"]


def test_plots(llama: Path, tmp_path: Path) -> None:
    r = run(llama, "--kinds", "q_proj,v_proj", "--budget-rank", "4", "--plots", tmp_path / "p", "-q")
    assert r.exit_code == 0, r.stderr
    names = {p.name for p in (tmp_path / "p").iterdir()}
    assert {"ranks_by_depth.png", "heatmap_rank.png", "ranks.png", "spectra_run.json"} <= names
    assert (tmp_path / "p" / "ranks_by_depth.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "args",
    [
        [],  # no budget
        ["--budget-rank", "2", "--budget-params", "100"],
        ["--budget-rank", "2", "--strategy", "nope"],
        ["--budget-params", "lots"],
        ["--budget-rank", "2", "--strategy", "eva"],  # eva without --activations
        ["--budget-rank", "2", "--multiple-of", "0"],
    ],
)
def test_bad_flags_exit_2(known: Path, args: list[str]) -> None:
    assert run(known, *args).exit_code == 2


def test_activations_for_modules_not_in_the_checkpoint(known: Path, tmp_path: Path) -> None:
    acts = fxa.pca_activations(
        tmp_path / "a.safetensors", {**EVA_RATIOS, "model.layers.9.mlp.up_proj": (8, [1.0])}
    )
    r = run(known, "--budget-rank", "2", "--strategy", "eva", "--activations", acts)
    assert r.exit_code == 1
    assert "activations for modules that are not in the checkpoint: model.layers.9.mlp.up_proj" in r.stderr
    partial = fxa.pca_activations(tmp_path / "b.safetensors", {A: EVA_RATIOS[A]})
    r = run(known, "--budget-rank", "2", "--strategy", "eva", "--activations", partial)
    assert r.exit_code == 1 and "no activations for" in r.stderr
    wrong = fxa.pca_activations(tmp_path / "c.safetensors", {**EVA_RATIOS, A: (5, [0.5, 0.5])})
    r = run(known, "--budget-rank", "2", "--strategy", "eva", "--activations", wrong)
    assert r.exit_code == 1 and "input features" in r.stderr
    r = run(
        known, "--budget-rank", "2", "--strategy", "eva", "--activations", tmp_path / "missing.safetensors"
    )
    assert r.exit_code == 1 and "no such activations file" in r.stderr


def test_other_bad_input(known: Path, tmp_path: Path) -> None:
    r = run(tmp_path / "nothing-here", "--budget-rank", "2")
    assert r.exit_code == 1 and r.stderr.startswith("Error:")
    r = run(known, "--budget-rank", "2", "--kinds", "gate_proj")
    assert r.exit_code == 1 and "no weight matrices selected" in r.stderr
    with pytest.raises(SpectraError, match="exactly one budget"):
        run_allocate(known, AllocateOptions())


# ---- EVA: one rule for `allocate --strategy eva` and `init-adapter --method eva` ------------------------------


def _eva_acts(ratio_lists: list[list[float]], dim: int = 16) -> dict[str, Any]:
    from spectra_cli.checkpoint.activations import ModuleActivations

    return {
        f"m{i}": ModuleActivations(f"m{i}", pca_components=np.eye(dim)[: len(v)],
                                   pca_explained_variance_ratio=np.array(sorted(v, reverse=True)))
        for i, v in enumerate(ratio_lists)
    }  # fmt: skip


def eva_published(ratio_lists: list[list[float]], r: int, rho: float) -> list[int]:
    """REFERENCE/PEFT: k = round(ρ·r) ratios per module (PEFT's `round`), sorted globally (ties: module order),
    keep the top r·#modules, count per module."""
    k = round(rho * r)
    pool = sorted(
        (-v, i, j) for i, vs in enumerate(ratio_lists) for j, v in enumerate(sorted(vs, reverse=True)[:k])
    )
    kept = pool[: r * len(ratio_lists)]
    return [sum(1 for _, i, _ in kept if i == m) for m in range(len(ratio_lists))]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.floats(0.0, 1.0), min_size=8, max_size=8), min_size=1, max_size=5),
    st.integers(1, 3),  # round(ρ·r) ≤ 8, the components stored
    st.sampled_from([1.0, 1.5, 2.0, 2.5]),
)
def test_eva_one_rule_for_allocate_and_init_adapter(
    ratio_lists: list[list[float]], r: int, rho: float
) -> None:
    from spectra_cli.spectral.allocation import eva_ranks
    from spectra_cli.spectral.init_data import eva_plan_ranks

    acts = _eva_acts(ratio_lists)
    want = eva_published(ratio_lists, r, rho)
    plan = eva_plan_ranks(acts, r, {"rho": rho})
    assert list(plan.values()) == want
    n = len(ratio_lists)
    explained = {k: a.pca(round(rho * r))[1] for k, a in acts.items()}
    p = Problem(tuple(acts), ((16, 16),) * n, (np.ones(1),) * n, float(r * n), (1,) * n,
                Constraints(allow_zero=True), explained, rho, r)  # fmt: skip
    assert list(allocate("eva", p).ranks) == want
    assert eva_ranks(explained, r, rho) == dict(zip(acts, want, strict=True))


def test_eva_multiple_of_above_the_components_looked_at() -> None:
    # --multiple-of 4 with R = 1, ρ = 2: EVA looks at 2 components per module, a step adds 4 ranks; the budget of
    # 4 ranks goes to the module with the most variance in its top 2 (it used to be clamped back to 0 everywhere)
    explained = {"a": np.array([0.3, 0.2]), "b": np.array([0.6, 0.1]), "c": np.array([0.1, 0.05]),
                 "d": np.array([0.2, 0.2])}  # fmt: skip
    p = Problem(tuple(explained), ((16, 16),) * 4, (np.ones(1),) * 4, 4.0, (1,) * 4,
                Constraints(multiple_of=4, allow_zero=True), explained, 2.0, 1)  # fmt: skip
    assert list(allocate("eva", p).ranks) == [0, 4, 0, 0]


def test_eva_same_ranks_through_allocate_and_init_adapter(llama: Path, tmp_path: Path) -> None:
    """`allocate --strategy eva --budget-rank r --activations A` and `init-adapter --method eva --rank r
    --activations A` give every module the same rank (allocate needs --allow-zero for EVA's dropped modules)."""
    names = [f"model.layers.{i}.self_attn.{k}" for i in range(3) for k in ("q_proj", "v_proj")]
    lists = [
        [0.30, 0.20, 0.10, 0.05, 0.03, 0.02, 0.01, 0.01],
        [0.10, 0.09, 0.08, 0.07, 0.06, 0.05, 0.04, 0.03],
        [0.25, 0.05, 0.02, 0.01, 0.01, 0.01, 0.01, 0.01],
        [0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01],  # EVA drops this one
        [0.15, 0.14, 0.13, 0.02, 0.01, 0.01, 0.01, 0.01],
        [0.50, 0.10, 0.05, 0.01, 0.01, 0.01, 0.01, 0.01],
    ]
    acts = fxa.pca_activations(
        tmp_path / "acts.safetensors", {n: (32, v) for n, v in zip(names, lists, strict=True)}
    )
    for r, rho in ((2, 2.0), (3, 1.5)):
        want = eva_published(lists, r, rho)
        assert len(set(want)) > 2 and (r == 3 or want[3] == 0)  # the case is not trivial
        common = ("--activations", acts, "--kinds", "q_proj,v_proj", "--rho", str(rho))
        got_alloc = ok_json(llama, "--strategy", "eva", "--budget-rank", str(r), "--allow-zero", *common)
        res = runner.invoke(app, ["init-adapter", str(llama), "--out", str(tmp_path / f"o{r}"), "--method", "eva",
                                  "--rank", str(r), "-f", "json", "-q", *map(str, common)])  # fmt: skip
        assert res.exit_code == 0, res.stderr
        got_init = {row["name"]: row["rank"] for row in json.loads(res.stdout)["rows"]}
        alloc = {row["name"]: row["rank"] for row in got_alloc["rows"]}
        assert [alloc[n] for n in names] == want
        assert [got_init.get(n, 0) for n in names] == want


@pytest.mark.parametrize("t0", [0.0225, 0.0495, 0.076, 0.105, 0.135, 0.17, 0.21])  # WeLore's published t
def test_welore_reproduces_the_published_rule_on_a_synthetic_spectrum(t0: float) -> None:
    """WeLore: σ̃ = (σ − min σ)/(max σ − min σ) per matrix, prune #{σ̃ < t} with one global t, reduction ratio
    Σ pruned / Σ min(m, n). A budget of exactly the ranks that t0 keeps must give t0's ranks and ratio."""
    rng = np.random.default_rng(1)
    shapes = ((64, 64), (96, 64), (64, 128), (48, 48), (80, 40))
    # heavy-tailed spectra with different decays, as WeLore sees in LLaMA layers
    spectra = tuple(np.sort(np.exp(-rng.uniform(0.02, 0.3) * np.arange(min(s))) + 0.01 * rng.random(min(s)))[::-1]
                    for s in shapes)  # fmt: skip
    normed = [(s - s.min()) / (s.max() - s.min()) for s in spectra]
    kept = [int((n >= t0).sum()) for n in normed]
    pruned = sum(len(n) - k for n, k in zip(normed, kept, strict=True))
    assert 0 < pruned < sum(min(s) for s in shapes)
    n = len(shapes)
    p = Problem(tuple(f"m{i}" for i in range(n)), shapes, spectra, float(sum(kept)), (1,) * n)
    got = allocate("welore", p)
    assert list(got.ranks) == kept
    assert got.info["reduction_ratio"] == pytest.approx(pruned / sum(min(s) for s in shapes))
    assert got.info["threshold"] >= t0 - 1e-12
    assert [int((m >= got.info["threshold"]).sum()) for m in normed] == kept


def test_outputs_in_a_missing_folder_are_refused_before_any_work(known: Path, tmp_path: Path) -> None:
    for flag in ("--peft-config", "--output"):
        r = run(known, "--budget-rank", "3", flag, tmp_path / "no" / "x.json", "-q")
        assert r.exit_code == 1 and r.stderr.startswith("Error:") and "no such folder; create it first" in r.stderr, r.stderr
