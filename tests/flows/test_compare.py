"""`compare` core: intruder dimensions and drift against known answers, adapters against merged checkpoints,
real PEFT adapters, and an end-to-end run on the real MiniLM checkpoint.

Every expected value comes from the construction (fixtures.checkpoints: orthogonal updates, retargeted
triplets, rescaled spectra) or from NumPy computations in this file on the stored weights, never from spectra.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures import checkpoints as fx
from fixtures.real import minilm_dir
from spectra_cli.cli.app import app
from spectra_cli.flows.compare import CompareOptions, run_compare

L0, L1, L2 = (f"layers.{i}.mlp.up_proj.weight" for i in range(3))
DOWN = "layers.0.mlp.down_proj.weight"
K = 10  # default --top-k


# ---- independent NumPy references ----------------------------------------------------------------------


def svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.linalg.svd(np.asarray(x, dtype=np.float64), full_matrices=False)


def erank(s: np.ndarray) -> float:
    """Roy & Vetterli effective rank exp(−Σ p log p), p = σ/Σσ, 0·log 0 = 0."""
    s = np.asarray(s, dtype=np.float64)
    p = s[s > 0] / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def max_cos(w0: np.ndarray, wt: np.ndarray, k: int = K) -> np.ndarray:
    """max_i |⟨U₀[:, i], U_t[:, j]⟩| for the top-k tuned left singular vectors, i over all base vectors."""
    u0 = svd(w0)[0]
    ut = svd(wt)[0][:, : min(k, u0.shape[1])]
    return np.abs(u0.T @ ut).max(axis=0)


def intruder_ranks(w0: np.ndarray, wt: np.ndarray, eps: float, k: int = K) -> list[int]:
    return [int(j) + 1 for j in np.flatnonzero(max_cos(w0, wt, k) < eps)]


def drift_reference(w0: np.ndarray, wt: np.ndarray, k: int = K) -> dict[str, float]:
    """Every drift column of a compare row, computed here from the two matrices."""
    u0, s0, _ = svd(w0)
    ut, st, _ = svd(wt)
    sd = svd(wt - w0)[1]
    k = min(k, s0.size)
    m = u0[:, :k].T @ ut[:, :k]
    cosines = np.clip(np.linalg.svd(m, compute_uv=False), 0.0, 1.0)
    fro = float(np.linalg.norm(wt - w0))
    return {
        "relative_delta": fro / float(np.linalg.norm(w0)),
        "delta_frobenius": fro,
        "delta_spectral_norm": float(sd[0]),
        "delta_effective_rank": erank(sd) if fro > 0 else 0.0,
        "delta_stable_rank": float(np.sum(sd**2) / sd[0] ** 2) if fro > 0 else 0.0,
        "effective_rank_change": erank(st) - erank(s0),
        "spectral_norm_change": float((st[0] - s0[0]) / s0[0]),
        "subspace_overlap": float(np.sum(m * m) / k),
        "max_principal_angle": float(np.degrees(np.arccos(cosines.min()))),
    }


def by_name(rows: list[dict[str, Any]], tuned: str | None = None) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in rows if tuned is None or r["tuned"] == tuned}


TOL = {"float64": dict(rel=1e-9, abs=1e-9), "float32": dict(rel=1e-5, abs=1e-5)}


# ---- synthetic known answers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, fx.Generated]:
    return fx.intruder_cases(tmp_path_factory.mktemp("intruder_cases"))


def compare(cases: dict[str, fx.Generated], label: str, **options: Any) -> dict[str, dict[str, Any]]:
    result = run_compare(cases["base"].path, [(label, cases[label].path)], CompareOptions(**options))
    assert all(r["tuned"] == label and r["status"] == "ok" for r in result.rows)
    return by_name(result.rows)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_orthogonal_rank_r_update_gives_exactly_r_intruders_at_the_top(cases, precision):
    rows = compare(cases, "intruders", precision=precision)
    base, tuned = cases["base"].matrices, cases["intruders"].matrices
    for name, s_upd in fx.INTRUDER_UPDATES.items():
        r = s_upd.size
        row = rows[name]
        assert row["intruders"] == r and row["intruders@0.5"] == r
        assert row["intruder_ranks"] == list(range(1, r + 1))
        # the tuned matrix is U_rest Σ_rest V_restᵀ + Σⱼ xⱼ vⱼᵀ with xⱼ = σ_{n−r+j}·u_{n−r+j} + s_j·u⊥ⱼ
        s_last = svd(base[name])[1][-r:]
        designed = np.sort(np.hypot(s_last, s_upd))[::-1]
        tol = TOL[precision]
        assert row["intruder_sigmas"] == pytest.approx(designed, rel=1e-5)
        assert row["intruder_sigmas"] == pytest.approx(svd(tuned[name])[1][:r], **tol)
        cos = np.sort(s_last / np.hypot(s_last, s_upd))
        assert sorted(row["max_cos"][:r]) == pytest.approx(cos, abs=1e-5)
        assert row["max_cos"][r:] == pytest.approx(np.ones(K - r), abs=1e-5)
        assert row["max_cos"] == pytest.approx(max_cos(base[name], tuned[name]), abs=2e-6)
    unchanged = rows[DOWN]
    assert unchanged["intruders"] == 0 and unchanged["intruder_ranks"] == []


def test_intruder_count_per_epsilon(cases):
    eps = (0.7, 0.1, 0.3, 0.5, 0.9)  # the first is the primary one
    rows = compare(cases, "intruders", epsilons=eps)
    base, tuned = cases["base"].matrices, cases["intruders"].matrices
    targets, cosines = fx.RETARGET
    expected = {
        L0: {e: 2 for e in eps},
        L1: {e: 3 for e in eps},
        L2: {e: int(np.sum(cosines < e)) for e in eps},  # designed max |cos| 0.2, 0.4, 0.6, 0.8
        DOWN: {e: 0 for e in eps},
    }
    assert expected[L2] == {0.1: 0, 0.3: 1, 0.5: 2, 0.7: 3, 0.9: 4}
    for name, counts in expected.items():
        row = rows[name]
        mc = max_cos(base[name], tuned[name])
        assert min(abs(mc - e).min() for e in eps) > 0.05  # no value near a threshold: the counts are robust
        for e, n in counts.items():
            assert row[f"intruders@{e:g}"] == n == int(np.sum(mc < e)), (name, e)
        assert row["intruders"] == counts[0.7]
        assert row["intruder_ranks"] == intruder_ranks(base[name], tuned[name], 0.7)
    row = rows[L2]
    assert row["intruder_ranks"] == [1, 2, 3]
    assert row["max_cos"][:4] == pytest.approx(cosines, abs=1e-5)
    assert row["intruder_sigmas"] == pytest.approx(targets[:3], rel=1e-5)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_drift_columns_match_numpy(cases, precision):
    rows = compare(cases, "intruders", precision=precision)
    base, tuned = cases["base"].matrices, cases["intruders"].matrices
    tol = TOL[precision]
    for name, row in rows.items():
        ref = drift_reference(base[name], tuned[name])
        for key, value in ref.items():
            if key == "max_principal_angle":  # arccos near 1: float32 noise alone gives ~0.02°
                assert row[key] == pytest.approx(value, abs=0.05), (name, key)
            elif key == "delta_effective_rank":  # ΔW's values by the Gram route: ~1e-8·σ₁ resolution
                assert row[key] == pytest.approx(value, rel=1e-6 if precision == "float64" else 1e-5), name
            else:
                assert row[key] == pytest.approx(value, **tol), (name, key)
    # known answers of the construction: ΔW has singular values s_upd exactly (up to float32 storage)
    for name, s_upd in fx.INTRUDER_UPDATES.items():
        row = rows[name]
        assert row["delta_effective_rank"] == pytest.approx(erank(s_upd), rel=1e-5)
        assert row["delta_spectral_norm"] == pytest.approx(s_upd[0], rel=1e-6)
        assert row["delta_stable_rank"] == pytest.approx(np.sum(s_upd**2) / s_upd[0] ** 2, rel=1e-5)
        # the top-k tuned subspace holds k − r base vectors and r new directions orthogonal to all of them
        assert row["subspace_overlap"] == pytest.approx((K - s_upd.size) / K, abs=1e-6)
        assert row["max_principal_angle"] == pytest.approx(90.0, abs=1e-3)
    assert rows[L2]["subspace_overlap"] == pytest.approx((K - 4) / K, abs=1e-6)


def test_small_dense_noise_gives_no_intruders(cases):
    eps = (0.3, 0.5, 0.7, 0.9)
    rows = compare(cases, "noise", epsilons=eps)
    base, tuned = cases["base"].matrices, cases["noise"].matrices
    for name, row in rows.items():
        assert [row[f"intruders@{e:g}"] for e in eps] == [0, 0, 0, 0]
        assert row["intruder_ranks"] == [] and row["intruder_sigmas"] == []
        assert min(row["max_cos"]) > 0.999 and row["min_max_cos"] == pytest.approx(
            min(row["max_cos"]), abs=1e-6
        )
        # the noise has spectral norm 1e-4·σ₁(W) by construction (float32 storage adds ~1e-7 relative)
        assert row["delta_spectral_norm"] == pytest.approx(1e-4 * svd(base[name])[1][0], rel=1e-2)
        ref = drift_reference(base[name], tuned[name])
        assert row["relative_delta"] == pytest.approx(ref["relative_delta"], rel=1e-5)
        assert row["subspace_overlap"] == pytest.approx(1.0, abs=1e-6)


def test_permuted_and_rescaled_top_singular_values_give_no_intruders(cases):
    rows = compare(cases, "rescaled", epsilons=(0.5, 0.9))
    base, tuned = cases["base"].matrices, cases["rescaled"].matrices
    for name in fx.INTRUDER_BASE:
        row = rows[name]
        assert row["intruders"] == 0 and row["intruders@0.9"] == 0
        assert row["max_cos"] == pytest.approx(np.ones(K), abs=1e-5)
        assert row["subspace_overlap"] == pytest.approx(1.0, abs=1e-6)
        s = svd(base[name])[1]
        s_new = s.copy()
        s_new[:3] = s[[1, 2, 0]] * fx.RESCALED_FACTORS
        assert row["spectral_norm_change"] == pytest.approx(s_new.max() / s[0] - 1.0, abs=1e-5)
        assert row["spectral_norm_change"] == pytest.approx(0.2, abs=1e-5)  # σ₁ became 1.2·σ₁
        assert row["effective_rank_change"] == pytest.approx(erank(s_new) - erank(s), abs=1e-5)
        ref = drift_reference(base[name], tuned[name])
        for key in ("relative_delta", "delta_effective_rank", "delta_spectral_norm"):
            assert row[key] == pytest.approx(ref[key], rel=1e-4), key
    assert rows[DOWN]["relative_delta"] == 0.0  # the wide matrix is not rescaled


def test_identical_matrix_has_no_drift(cases):
    row = compare(cases, "intruders", precision="float64")[DOWN]
    assert row["relative_delta"] == 0.0 and row["delta_frobenius"] == 0.0
    assert row["delta_spectral_norm"] == 0.0 and row["delta_effective_rank"] == 0.0
    assert row["effective_rank_change"] == 0.0 and row["spectral_norm_change"] == 0.0
    assert row["subspace_overlap"] == pytest.approx(1.0, abs=1e-12)
    assert row["max_principal_angle"] == pytest.approx(0.0, abs=1e-3)
    assert row["max_cos"] == pytest.approx(np.ones(K), abs=1e-12)


def test_top_k_limits_the_vectors_checked(cases):
    rows = compare(cases, "intruders", top_k=2)
    assert rows[L1]["intruders"] == 2 and rows[L1]["intruder_ranks"] == [1, 2]  # 3 by design, 2 checked
    assert len(rows[L1]["max_cos"]) == 2
    rows = compare(cases, "intruders", top_k=100)  # more than min(m, n): all of them
    base, tuned = cases["base"].matrices, cases["intruders"].matrices
    for name, (_m, n, _) in fx.INTRUDER_BASE.items():
        assert len(rows[name]["max_cos"]) == n
        assert rows[name]["max_cos"] == pytest.approx(max_cos(base[name], tuned[name], k=n), abs=2e-6)
    assert rows[L2]["intruders"] == 2


def test_summary_totals_worst_modules_and_groups(cases):
    eps = (0.5, 0.3)
    result = run_compare(
        cases["base"].path,
        [("i", cases["intruders"].path), ("n", cases["noise"].path)],
        CompareOptions(epsilons=eps),
    )
    assert result.summary.epsilons == [0.5, 0.3]
    s = result.summary.tuned["i"]
    assert s["source"] == "checkpoint" and s["matrices"] == 4 and s["nonfinite"] == 0
    assert s["total_intruders"] == {"0.5": 2 + 3 + 2, "0.3": 2 + 3 + 1}
    assert s["matrices_with_intruders"] == 3
    worst = s["worst_modules"]
    assert (worst[0]["name"], worst[0]["intruders"]) == (L1, 3)
    assert {w["name"] for w in worst[:3]} == {L0, L1, L2} and worst[3]["name"] == DOWN
    base, tuned = cases["base"].matrices, cases["intruders"].matrices
    deltas = {k: drift_reference(base[k], tuned[k])["relative_delta"] for k in base}
    assert s["mean_relative_delta"] == pytest.approx(np.mean(list(deltas.values())), rel=1e-5)
    assert s["by_kind"]["up_proj"]["relative_delta"] == pytest.approx(
        np.mean([deltas[k] for k in (L0, L1, L2)]), rel=1e-5
    )
    assert s["by_kind"]["up_proj"]["intruders"] == 7 and s["by_kind"]["up_proj"]["matrices"] == 3
    assert s["by_depth"]["0"]["intruders"] == 2 and s["by_depth"]["0"]["matrices"] == 2
    assert s["by_depth"]["1"]["intruders"] == 3
    n = result.summary.tuned["n"]
    assert n["total_intruders"] == {"0.5": 0, "0.3": 0} and n["matrices_with_intruders"] == 0
    assert [i["name"] for i in result.inputs["tuned"]] == ["i", "n"]
    assert all(i["matrices"] == 4 and i["kind"] == "checkpoint" for i in result.inputs["tuned"])


# ---- an adapter against the same adapter merged --------------------------------------------------------


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> fx.Generated:
    return fx.lora_base(tmp_path_factory.mktemp("lora_base"))


ADAPTED = {  # module path → rank of its factors
    "model.layers.0.mlp.up_proj": 6,  # rank_pattern (escaped full path); intruders: B in W's complement
    "model.layers.1.mlp.up_proj": 2,  # rank_pattern "up_proj" (a later key): first match wins for layer 0
    "model.layers.0.self_attn.q_proj": 4,
    "model.layers.1.self_attn.v_proj": 4,  # wide 8×16
    "model.layers.1.mlp.down_proj": 4,  # wide 16×48
}


def make_factors(
    lora: fx.Generated, ranks: dict[str, int], seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for i, (path, r) in enumerate(ranks.items()):
        w = lora.matrices[path + ".weight"]
        m, n = w.shape
        a = fx.f32(rng.standard_normal((r, n)) * 0.5)
        b = (
            fx.complement_directions(w, r, seed + i) * 3.0
            if m >= n + r
            else rng.standard_normal((m, r)) * 0.5
        )
        out[path] = (a, fx.f32(b))
    return out


def merged_from(lora: fx.Generated, adapter: Path, factors, out: Path) -> fx.Generated:
    """The adapter merged by hand with PEFT's rule (fx.lora_scale), as a full float32 checkpoint."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    new = {}
    for path, (a, b) in factors.items():
        scale = fx.lora_scale(cfg, path)[2]
        new[path + ".weight"] = lora.matrices[path + ".weight"] + scale * (b @ a)
    return fx.patched_copy(lora.path, out, new)


COMPARED = ("intruders", "intruder_ranks", "min_max_cos", "relative_delta", "delta_frobenius",
            "delta_spectral_norm", "delta_effective_rank", "delta_stable_rank", "effective_rank_change",
            "spectral_norm_change", "subspace_overlap")  # fmt: skip


def assert_same_rows(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-5) -> None:
    for key in COMPARED:
        if isinstance(a[key], list):
            assert a[key] == b[key], (a["name"], key)
        else:
            assert a[key] == pytest.approx(b[key], rel=tol, abs=tol), (a["name"], key)
    assert a["intruder_sigmas"] == pytest.approx(b["intruder_sigmas"], rel=tol)
    assert a["max_cos"] == pytest.approx(b["max_cos"], abs=max(tol, 2e-6))  # rows round max_cos to 6 decimals
    assert a["max_principal_angle"] == pytest.approx(b["max_principal_angle"], abs=0.05)


def test_adapter_with_rank_and_alpha_patterns_equals_the_merged_checkpoint(lora, tmp_path):
    factors = make_factors(lora, ADAPTED, seed=11)
    key0 = re.escape("model.layers.0.mlp.up_proj")
    adapter = fx.lora_adapter(tmp_path / "adapter", factors, r=4, alpha=8,
                              rank_pattern={key0: 6, "up_proj": 2}, alpha_pattern={key0: 3})  # fmt: skip
    merged = merged_from(lora, adapter, factors, tmp_path / "merged")
    result = run_compare(lora.path, [("adapter", adapter), ("merged", merged.path)])
    ad, mg = by_name(result.rows, "adapter"), by_name(result.rows, "merged")
    assert set(ad) == {p + ".weight" for p in ADAPTED}
    assert len(mg) == len(lora.matrices)  # a full checkpoint covers every matrix
    expected_scale = {  # α/r: pattern α 3 over pattern r 6; default α 8 over pattern r 2; defaults 8/4
        "model.layers.0.mlp.up_proj": (6, 0.5),
        "model.layers.1.mlp.up_proj": (2, 4.0),
        "model.layers.0.self_attn.q_proj": (4, 2.0),
        "model.layers.1.self_attn.v_proj": (4, 2.0),
        "model.layers.1.mlp.down_proj": (4, 2.0),
    }
    for path, (r, scale) in expected_scale.items():
        row = ad[path + ".weight"]
        assert row["source"] == "adapter" and (row["lora_rank"], row["lora_scale"]) == (r, scale)
        assert_same_rows(row, mg[path + ".weight"])
        assert mg[path + ".weight"]["source"] == "checkpoint" and "lora_rank" not in mg[path + ".weight"]
        w0, wt = lora.matrices[path + ".weight"], merged.matrices[path + ".weight"]
        assert row["intruder_ranks"] == intruder_ranks(w0, wt, 0.5)
        assert row["relative_delta"] == pytest.approx(drift_reference(w0, wt)["relative_delta"], rel=1e-5)
    assert ad["model.layers.0.mlp.up_proj.weight"]["intruders"] >= 2  # the construction made some
    for name, row in mg.items():
        if name.removesuffix(".weight") not in ADAPTED:
            assert row["relative_delta"] == 0.0 and row["intruders"] == 0
    summary = result.summary.tuned
    assert summary["adapter"]["source"] == "adapter" and summary["adapter"]["matrices"] == len(ADAPTED)
    assert summary["adapter"]["total_intruders"] == summary["merged"]["total_intruders"]


@pytest.mark.parametrize("rslora", [True, False])
def test_rslora_scale_is_alpha_over_sqrt_r(lora, tmp_path, rslora):
    ranks = {"model.layers.0.mlp.up_proj": 4, "model.layers.1.mlp.gate_proj": 9}
    factors = make_factors(lora, ranks, seed=21)
    adapter = fx.lora_adapter(tmp_path / "adapter", factors, r=4, alpha=6, use_rslora=rslora,
                              rank_pattern={re.escape("model.layers.1.mlp.gate_proj"): 9})  # fmt: skip
    merged = merged_from(lora, adapter, factors, tmp_path / "merged")
    result = run_compare(
        lora.path, [("adapter", adapter), ("merged", merged.path)], CompareOptions(precision="float64")
    )
    ad, mg = by_name(result.rows, "adapter"), by_name(result.rows, "merged")
    for path, r in ranks.items():
        row = ad[path + ".weight"]
        assert row["lora_scale"] == pytest.approx(6 / math.sqrt(r) if rslora else 6 / r)
        assert_same_rows(row, mg[path + ".weight"], tol=1e-6)
        # ΔW's spectral norm from the factors, with the scale applied
        expected = np.linalg.norm(row["lora_scale"] * factors[path][1] @ factors[path][0], 2)
        assert row["delta_spectral_norm"] == pytest.approx(expected, rel=1e-9)


# ---- real PEFT adapters on tiny transformers models ----------------------------------------------------


@pytest.fixture(scope="module")
def peft_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, fx.PeftCase]:
    root = tmp_path_factory.mktemp("peft")
    return {
        arch: fx.peft_case(root / arch, arch, intruders=arch == "llama") for arch in ("bert", "llama", "gpt2")
    }


def _logical(folder: Path, name: str, conv1d: bool) -> np.ndarray:
    w = fx.read_tensor(folder, name)
    return w.T if conv1d else w


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_real_peft_adapter_equals_peft_merged_model(peft_cases, arch):
    case = peft_cases[arch]
    r = CliRunner().invoke(
        app,
        ["compare", str(case.base), f"adapter={case.adapter}", f"merged={case.merged}", "-f", "json", "-q"],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.stderr
    env = json.loads(r.stdout)
    ad, mg = by_name(env["rows"], "adapter"), by_name(env["rows"], "merged")
    assert set(ad) == {m + ".weight" for m in case.modules}
    conv1d = arch == "gpt2"  # GPT-2 Conv1D weights are stored in×out (fan_in_fan_out)
    total = 0
    for name, row in ad.items():
        assert row["lora_rank"] == 4 and row["lora_scale"] == 2.0
        assert_same_rows(row, mg[name])
        w0, wt = _logical(case.base, name, conv1d), _logical(case.merged, name, conv1d)
        assert row["shape"] == f"{wt.shape[0]}x{wt.shape[1]}"
        assert row["intruder_ranks"] == intruder_ranks(w0, wt, 0.5), name
        assert row["relative_delta"] == pytest.approx(drift_reference(w0, wt)["relative_delta"], rel=1e-5)
        total += row["intruders"]
    assert total > 0
    untouched = [row for name, row in mg.items() if name not in ad]
    assert untouched and all(row["relative_delta"] == 0.0 and row["intruders"] == 0 for row in untouched)
    if arch == "llama":  # lora_B along the complement of up_proj's column space: 4 intruders at the top
        for i in range(2):
            assert ad[f"model.layers.{i}.mlp.up_proj.weight"]["intruder_ranks"] == [1, 2, 3, 4]


# ---- a real pretrained checkpoint ----------------------------------------------------------------------





def test_minilm_against_a_perturbed_copy(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = minilm_dir()
    weights = load_file(str(folder / "model.safetensors"))
    hit, noisy = (f"encoder.layer.{i}.attention.self.query.weight" for i in (1, 4))
    w = weights[hit].astype(np.float64)
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((w.shape[0], 2)))[0]  # new directions: random unit vectors of ℝ³⁸⁴
    v = np.linalg.qr(rng.standard_normal((w.shape[1], 2)))[0]
    weights[hit] = (w + (u * (np.array([5.0, 4.0]) * np.linalg.norm(w, 2))) @ v.T).astype(np.float32)
    e = rng.standard_normal(weights[noisy].shape)
    weights[noisy] = (
        weights[noisy] + 1e-4 * np.linalg.norm(weights[noisy], 2) * e / np.linalg.norm(e, 2)
    ).astype(np.float32)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    before = (folder / "model.safetensors").stat().st_mtime_ns

    r = CliRunner().invoke(
        app,
        [
            "compare",
            str(folder),
            f"perturbed={tmp_path / 'model.safetensors'}",
            "--kinds",
            "query",
            "-f",
            "json",
            "-q",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.stderr
    rows = by_name(json.loads(r.stdout)["rows"])
    assert set(rows) == {f"encoder.layer.{i}.attention.self.query.weight" for i in range(6)}
    base = load_file(str(folder / "model.safetensors"))
    assert rows[hit]["intruders"] >= 2 and rows[hit]["intruder_ranks"][:2] == [1, 2]
    assert rows[hit]["intruder_ranks"] == intruder_ranks(base[hit], weights[hit], 0.5)
    assert rows[noisy]["intruders"] == 0 and rows[noisy]["relative_delta"] > 0
    for name, row in rows.items():
        if name not in (hit, noisy):
            assert row["intruders"] == 0 and row["relative_delta"] == 0.0
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
