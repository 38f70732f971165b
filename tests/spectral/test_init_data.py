"""CorDA and EVA initialisations: known answers by NumPy of the published formulas, invariants, and parity
with PEFT's own initialisers (``init_lora_weights="corda"`` / EVA's state dict)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectra_cli.checkpoint.activations import ModuleActivations
from spectra_cli.errors import CheckpointError, ShapeMismatch, SpectraError
from spectra_cli.spectral.init import InitInput, methods
from spectra_cli.spectral.init_data import corda_factorize, eva_factorize, eva_plan_ranks


def _data(n: int, d: int, seed: int, spread: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.geomspace(3.0, 0.05, d) ** spread
    return rng.standard_normal((n, d)) * scales + rng.standard_normal(d) * 0.3


def _numpy_corda(w: np.ndarray, c: np.ndarray, r: int, s: float, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """CorDA (Yang et al. 2024, as spectral/init_data.py documents it) written out directly in float64 NumPy."""
    lam = 0.01
    eye = np.eye(c.shape[0])
    while True:
        fixed = c + eye * np.mean(np.diag(c)) * lam
        inv = np.linalg.inv(fixed)
        if np.linalg.norm(fixed @ inv - eye) < 0.05:
            break
        lam *= 2
    u, sv, vh = np.linalg.svd(w @ fixed, full_matrices=False)
    v = (vh @ inv).T
    idx = slice(0, r) if mode == "ipm" else slice(len(sv) - r, len(sv))
    root = np.sqrt(sv[idx] / s)
    return root[:, None] * v[:, idx].T, u[:, idx] * root[None, :]


def _align(a: np.ndarray, b: np.ndarray, a_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip each singular pair (row of A with the matching column of B) to agree with a reference A."""
    signs = np.sign(np.sum(a * a_ref, axis=1))
    signs[signs == 0] = 1
    return a * signs[:, None], b * signs[None, :]


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_matches_the_formula_and_reconstructs(mode: str) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((12, 9))
    x = _data(200, 9, 2)
    c = x.T @ x / len(x)
    r, s = 3, 2.0
    acts = ModuleActivations("m", input_covariance=c)
    got = corda_factorize(InitInput("m", torch.tensor(w), r, s, activations=acts, options={"mode": mode}))
    a_ref, b_ref = _numpy_corda(w, c, r, s, mode)
    a, b = _align(got.A.numpy(), got.B.numpy(), a_ref)
    np.testing.assert_allclose(a, a_ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b, b_ref, rtol=1e-8, atol=1e-10)
    assert got.residual is not None
    np.testing.assert_allclose(got.residual.numpy() + s * b @ a, w, atol=1e-12)
    assert got.A.shape == (r, 9) and got.B.shape == (12, r)


def test_corda_full_rank_is_exact_and_damping_grows_for_singular_c() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 5))
    x = rng.standard_normal((2, 5))  # rank-2 second moment: needs damping
    acts = ModuleActivations("m", input_covariance=x.T @ x / 2)
    got = corda_factorize(InitInput("m", torch.tensor(w), 5, 1.0, activations=acts))
    assert got.residual is not None
    np.testing.assert_allclose(got.residual.numpy(), 0.0, atol=1e-9)  # all triplets: W = B·A
    assert got.info["damping"] >= 0.01


def test_corda_errors() -> None:
    w = torch.randn(4, 3, dtype=torch.float64)
    acts = ModuleActivations("m", input_covariance=np.eye(3))
    with pytest.raises(SpectraError, match="mode"):
        corda_factorize(InitInput("m", w, 2, 1.0, activations=acts, options={"mode": "xyz"}))
    with pytest.raises(ShapeMismatch, match="rank"):
        corda_factorize(InitInput("m", w, 4, 1.0, activations=acts))
    with pytest.raises(ShapeMismatch, match="inputs"):
        corda_factorize(
            InitInput("m", w, 2, 1.0, activations=ModuleActivations("m", input_covariance=np.eye(4)))
        )
    with pytest.raises(CheckpointError, match="--stats covariance"):
        corda_factorize(InitInput("m", w, 2, 1.0, activations=ModuleActivations("m", input_mean=np.zeros(3))))
    with pytest.raises(
        SpectraError, match=r"^enc\.0\.q: the input second moment is zero"
    ):  # names the module
        corda_factorize(
            InitInput(
                "enc.0.q", w, 2, 1.0, activations=ModuleActivations("m", input_covariance=np.zeros((3, 3)))
            )
        )
    with pytest.raises(SpectraError, match="activations"):
        corda_factorize(InitInput("m", w, 2, 1.0))


def test_eva_factors_are_the_top_principal_directions() -> None:
    x = _data(300, 8, 5)
    acts = ModuleActivations("m", input_samples=x, tokens=300)
    w = torch.randn(5, 8, dtype=torch.float64)
    got = eva_factorize(InitInput("m", w, 3, 2.0, activations=acts))
    xc = x - x.mean(axis=0)
    _, sv, vt = np.linalg.svd(xc, full_matrices=False)
    a = got.A.numpy()
    np.testing.assert_allclose(np.abs(np.sum(a * vt[:3], axis=1)), 1.0, atol=1e-10)
    assert got.residual is None and float(got.B.abs().max()) == 0.0 and got.B.shape == (5, 3)
    np.testing.assert_allclose(got.info["explained_variance"], np.sum(sv[:3] ** 2) / np.sum(xc**2))
    # whitening divides each row by the square root of the data matrix's singular value (PEFT's convention)
    white = eva_factorize(InitInput("m", w, 3, 2.0, activations=acts, options={"whiten": True}))
    np.testing.assert_allclose(np.linalg.norm(white.A.numpy(), axis=1), 1 / np.sqrt(sv[:3]), rtol=1e-9)
    # the same from a covariance + mean file
    cov_acts = ModuleActivations("m", input_covariance=x.T @ x / 300, input_mean=x.mean(axis=0), tokens=300)
    white2 = eva_factorize(InitInput("m", w, 3, 2.0, activations=cov_acts, options={"whiten": True}))
    np.testing.assert_allclose(np.linalg.norm(white2.A.numpy(), axis=1), 1 / np.sqrt(sv[:3]), rtol=1e-7)
    pca_only = ModuleActivations("m", pca_components=vt[:4], pca_explained_variance_ratio=np.ones(4) / 8)
    with pytest.raises(CheckpointError, match="input_variance"):
        eva_factorize(InitInput("m", w, 3, 2.0, activations=pca_only, options={"whiten": True}))
    # a PCA-only file whitens with the per-feature variance and the token count
    ratios = sv**2 / np.sum(xc**2)
    pca_var = ModuleActivations(
        "m",
        pca_components=vt[:4],
        pca_explained_variance_ratio=ratios[:4],
        input_variance=x.var(axis=0),
        tokens=300,
    )
    white3 = eva_factorize(InitInput("m", w, 3, 2.0, activations=pca_var, options={"whiten": True}))
    np.testing.assert_allclose(np.linalg.norm(white3.A.numpy(), axis=1), 1 / np.sqrt(sv[:3]), rtol=1e-9)


def test_eva_whitening_matches_peft_incremental_pca_singular_values() -> None:
    """PEFT's whiten divides by √(IncrementalPCA.singular_values_); a PCA-only file with input_variance gives the
    same rows (fitted here in two partial_fit batches, as PEFT's hooks do)."""
    from peft.utils.incremental_pca import IncrementalPCA

    x = _data(400, 12, 7, spread=3.0) + 5.0
    ipca = IncrementalPCA(n_components=4)
    for part in (x[:150], x[150:]):
        ipca.partial_fit(torch.as_tensor(part))
    peft_rows = ipca.components_[:3] / ipca.singular_values_[:3].sqrt().reshape(-1, 1)
    acts = ModuleActivations(
        "m",
        pca_components=ipca.components_.numpy(),
        pca_explained_variance_ratio=ipca.explained_variance_ratio_.numpy(),
        input_variance=x.var(axis=0),
        tokens=400,
    )
    w = torch.zeros(5, 12, dtype=torch.float64)
    got = eva_factorize(InitInput("m", w, 3, 1.0, activations=acts, options={"whiten": True}))
    np.testing.assert_allclose(got.A.numpy(), peft_rows.numpy(), rtol=1e-8, atol=1e-12)


def _pca_acts(ratios: list[float], dim: int = 16) -> ModuleActivations:
    comps = np.eye(dim)[: len(ratios)]
    return ModuleActivations("m", pca_components=comps, pca_explained_variance_ratio=np.array(ratios))


def test_eva_plan_ranks_known_answer() -> None:
    acts = {
        "a": _pca_acts([0.5, 0.3, 0.1, 0.05]),
        "b": _pca_acts([0.2, 0.15, 0.12, 0.11]),
        "c": _pca_acts([0.01, 0.005, 0.001, 0.0005]),
    }
    # r = 2, ρ = 2: budget 6 from the top 4 of each; sorted: .5 .3 .2 .15 .12 .11 | .1 ...
    assert eva_plan_ranks(acts, 2, {}) == {"a": 2, "b": 4, "c": 0}
    assert eva_plan_ranks(acts, 2, {"redistribute": False}) == {"a": 2, "b": 2, "c": 2}
    assert eva_plan_ranks(acts, 2, {"rho": 1}) == {"a": 2, "b": 2, "c": 2}
    # ρ = 1.5 offers round(3) = 3 per module: b can reach at most 3
    assert eva_plan_ranks(acts, 2, {"rho": 1.5}) == {"a": 3, "b": 3, "c": 0}
    with pytest.raises(SpectraError):
        eva_plan_ranks(acts, 2, {"rho": 0.5})


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.floats(0.0, 1.0), min_size=8, max_size=8), min_size=1, max_size=5),
    st.integers(1, 4),
    st.sampled_from([1.0, 1.5, 2.0]),
)
def test_eva_plan_ranks_invariants(ratio_lists: list[list[float]], r: int, rho: float) -> None:
    acts = {f"m{i}": _pca_acts(sorted(v, reverse=True)) for i, v in enumerate(ratio_lists)}
    plan = eva_plan_ranks(acts, r, {"rho": rho})
    assert sum(plan.values()) == r * len(acts)
    assert all(0 <= k <= round(r * rho) for k in plan.values())


def test_registry_entries() -> None:
    reg = methods()
    assert reg["corda"].needs_activations and reg["corda"].changes_base
    assert reg["eva"].needs_activations and not reg["eva"].changes_base and reg["eva"].plan_ranks is not None


# ---- parity with PEFT -------------------------------------------------------------------------------------


def _tiny_llama_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_parity_with_peft(tmp_path: Path, mode: str) -> None:
    """Same C given to PEFT (its covariance_file) and to spectra: same A, B (up to pair signs), same residual."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    model = _tiny_llama_model()
    targets = ["q_proj", "v_proj", "down_proj"]
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] in targets]
    original = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    covs = {}
    for i, n in enumerate(names):
        x = _data(120, original[n].shape[1], 10 + i)
        covs[n] = torch.tensor(x.T @ x / len(x), dtype=torch.float32)
    torch.save(covs, tmp_path / "cov.pt")
    r, alpha = 4, 8
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights="corda",
                     corda_config=CordaConfig(covariance_file=str(tmp_path / "cov.pt"), corda_method=mode))  # fmt: skip
    preprocess_corda(model, cfg)
    peft_model = get_peft_model(model, cfg)
    for n in names:
        layer = peft_model.base_model.model.get_submodule(n)
        a_peft = layer.lora_A["default"].weight.detach().double().numpy()
        b_peft = layer.lora_B["default"].weight.detach().double().numpy()
        res_peft = layer.base_layer.weight.detach().double().numpy()
        acts = ModuleActivations(n, input_covariance=covs[n].double().numpy())
        got = corda_factorize(
            InitInput(n, original[n], r, alpha / r, activations=acts, options={"mode": mode})
        )
        a, b = _align(got.A.double().numpy(), got.B.double().numpy(), a_peft)
        scale = np.abs(a_peft).max()
        np.testing.assert_allclose(a, a_peft, atol=2e-4 * scale)
        np.testing.assert_allclose(b, b_peft, atol=2e-4 * np.abs(b_peft).max())
        assert got.residual is not None
        np.testing.assert_allclose(got.residual.double().numpy(), res_peft, atol=1e-5)


def test_eva_decomposes_each_module_statistics_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning the ranks (ρ·r directions) and then factorising (r_i ≤ ρ·r) reuse one eigendecomposition of
    each module's covariance; the answers equal those of a fresh decomposition."""
    calls: list[int] = []
    eigh = np.linalg.eigh

    def counting(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(a.shape[0])
        return eigh(a)

    def acts_of(seed: int) -> dict[str, ModuleActivations]:
        out = {}
        for i, name in enumerate(("m.q", "m.k", "m.v")):
            x = _data(200, 12, seed + i, spread=1.0 + i)
            out[name] = ModuleActivations(name, input_covariance=x.T @ x / 200, input_mean=x.mean(axis=0))
        return out

    acts = acts_of(3)
    monkeypatch.setattr(np.linalg, "eigh", counting)
    ranks = eva_plan_ranks(acts, 3, {})
    w = torch.zeros(5, 12, dtype=torch.float64)
    got = {
        n: eva_factorize(InitInput(n, w, r, 1.0, activations=acts[n])).A.numpy()
        for n, r in ranks.items()
        if r
    }
    assert len(calls) == 3
    monkeypatch.setattr(np.linalg, "eigh", eigh)
    fresh = acts_of(3)
    for n, a in got.items():
        np.testing.assert_allclose(np.abs(a), np.abs(fresh[n].pca(ranks[n])[0]), atol=1e-12)
