"""`spectra merge --to-adapter` and PEFT's combination types, against PEFT itself: tiny LLaMA / GPT-2 models
built from configs, real PEFT LoRA adapters (random factors) saved with ``save_pretrained``; the expected
updates come from PEFT's ``get_delta_weight`` and ``LoraModel.add_weighted_adapter``, never from spectra."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from typer.testing import CliRunner

from fixtures import init_models as im
from spectra_cli.cli.app import app

runner = CliRunner()


def spectra(*args: str | Path) -> dict[str, Any]:
    r = runner.invoke(app, [str(a) for a in args] + ["-f", "json", "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr + (r.stdout or "")
    return json.loads(r.stdout)


def gpt2_model(seed: int = 0) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).float().eval()


def make_adapter(base: Any, out: Path, targets: list[str], r: int, alpha: int, seed: int, **kw: Any) -> Path:
    """A PEFT LoRA adapter of ``base`` with random A and B (init_lora_weights=False), saved to ``out``."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kw)
    model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge_adapter")
    base = im.tiny_llama(root / "base")
    model = im.llama_model()
    return {
        "base": base,
        "a": make_adapter(model, root / "a", ["q_proj", "v_proj", "down_proj"], 4, 8, 1),
        "b": make_adapter(model, root / "b", ["q_proj", "v_proj", "down_proj"], 4, 8, 2),
        "c": make_adapter(model, root / "c", ["q_proj", "v_proj"], 2, 8, 3),  # other rank, fewer modules
        "one_a": make_adapter(model, root / "one_a", ["model.layers.0.self_attn.q_proj"], 4, 8, 4),
        "one_b": make_adapter(model, root / "one_b", ["model.layers.0.self_attn.q_proj"], 4, 8, 5),
    }


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge_gpt2")
    model = gpt2_model()
    model.save_pretrained(root / "base", safe_serialization=True)
    return {
        "base": root / "base",
        "a": make_adapter(model, root / "a", ["c_fc"], 4, 8, 1, fan_in_fan_out=True),
        "b": make_adapter(model, root / "b", ["c_fc"], 4, 8, 2, fan_in_fan_out=True),
    }


def _peft(base_dir: Path, adapters: dict[str, Path], kind: str = "llama") -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    names = list(adapters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(adapters[n], adapter_name=n)
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    return model


def _deltas(model: Any, adapter: str) -> dict[str, np.ndarray]:
    """Module path → ΔW in the logical out×in layout, as PEFT computes it."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in model.base_model.model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            d = mod.get_delta_weight(adapter).detach().double().numpy()
            out[name] = d.T if getattr(mod, "fan_in_fan_out", False) else d
    return out


def _rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


# ---- --to-adapter --------------------------------------------------------------------------------------------


def test_to_adapter_full_rank_reproduces_the_sum_and_loads_in_peft(llama, tmp_path):
    env = spectra("merge", llama["base"], f"a={llama['a']}", f"b={llama['b']}", "--weights", "0.7,-0.4",
                  "--to-adapter", "--out", tmp_path / "m")  # fmt: skip
    assert env["summary"]["output_kind"] == "adapter"
    peft_in = _peft(llama["base"], {"a": llama["a"], "b": llama["b"]})
    da, db = _deltas(peft_in, "a"), _deltas(peft_in, "b")
    merged = _deltas(_peft(llama["base"], {"m": tmp_path / "m"}), "m")
    assert set(merged) == set(da) and len(merged) == 6
    for name in da:
        assert _rel(merged[name], 0.7 * da[name] - 0.4 * db[name]) < 1e-5
    # exact: rank ≤ Σrᵢ = 8, error zero
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    ranks = [cfg["rank_pattern"].get(k, cfg["r"]) for k in cfg["rank_pattern"]] + [cfg["r"]]
    assert max(ranks) <= 8
    assert env["summary"]["adapter"]["adapter_max_error"] < 1e-6
    assert all(r["adapter_rank"] == 8 for r in env["rows"])


def test_to_adapter_rank_truncation_error_is_the_discarded_singular_values(llama, tmp_path):
    env = spectra("merge", llama["base"], f"a={llama['a']}", f"b={llama['b']}", "--to-adapter", "--rank", "3",
                  "--out", tmp_path / "m")  # fmt: skip
    peft_in = _peft(llama["base"], {"a": llama["a"], "b": llama["b"]})
    da, db = _deltas(peft_in, "a"), _deltas(peft_in, "b")
    merged = _deltas(_peft(llama["base"], {"m": tmp_path / "m"}), "m")
    errors = env["summary"]["adapter"]["adapter_errors"]
    for name in da:
        total = da[name] + db[name]
        s = np.linalg.svd(total, compute_uv=False)
        want = np.sqrt(np.sum(s[3:] ** 2) / np.sum(s**2))
        assert errors[name] == pytest.approx(want, rel=1e-4)
        assert _rel(merged[name], total) == pytest.approx(want, rel=1e-3)  # Eckart–Young: it is the best rank 3


def test_to_adapter_on_gpt2_conv1d(gpt2, tmp_path):
    spectra("merge", gpt2["base"], f"a={gpt2['a']}", f"b={gpt2['b']}", "--to-adapter", "--out", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    peft_in = _peft(gpt2["base"], {"a": gpt2["a"], "b": gpt2["b"]})
    da, db = _deltas(peft_in, "a"), _deltas(peft_in, "b")
    merged = _deltas(_peft(gpt2["base"], {"m": tmp_path / "m"}), "m")
    for name in da:
        assert _rel(merged[name], da[name] + db[name]) < 1e-5


def test_to_adapter_from_ties_factors_the_dense_result(llama, tmp_path):
    """TIES is elementwise (dense, full rank in general): the adapter is its exact SVD at numerical rank."""
    env = spectra("merge", llama["base"], f"a={llama['a']}", f"b={llama['b']}", "--method", "ties",
                  "--to-adapter", "--out", tmp_path / "m")  # fmt: skip
    spectra("merge", llama["base"], f"a={llama['a']}", f"b={llama['b']}", "--method", "ties", "--out", tmp_path / "ck")
    base = load_file(llama["base"] / "model.safetensors")
    ck = load_file(tmp_path / "ck" / "model.safetensors")
    merged = _deltas(_peft(llama["base"], {"m": tmp_path / "m"}), "m")
    for name, d in merged.items():
        want = ck[f"{name}.weight"].astype(np.float64) - base[f"{name}.weight"]
        assert _rel(d, want) < 1e-5
    assert max(r["adapter_rank"] for r in env["rows"]) > 8  # more than Σrᵢ: the dense rule's price


def test_rank_without_to_adapter_is_refused(llama, tmp_path):
    r = runner.invoke(app, ["merge", str(llama["base"]), f"a={llama['a']}", f"b={llama['b']}", "--rank", "2",
                            "--out", str(tmp_path / "m")])  # fmt: skip
    assert r.exit_code != 0 and "--to-adapter" in (r.stderr + r.stdout)


# ---- PEFT's combination types ----------------------------------------------------------------------------


def _peft_combined(base_dir: Path, adapters: dict[str, Path], ct: str, weights: list[float], seed: int = 0,
                   **kw: Any) -> dict[str, np.ndarray]:  # fmt: skip
    model = _peft(base_dir, adapters)
    torch.manual_seed(seed)
    model.add_weighted_adapter(list(adapters), weights, "m", combination_type=ct, **kw)
    return _deltas(model, "m")


def _spectra_combined(base_dir: Path, adapters: dict[str, Path], ct: str, weights: list[float], out: Path,
                      *extra: str) -> dict[str, np.ndarray]:  # fmt: skip
    spectra("merge", base_dir, *(f"{n}={p}" for n, p in adapters.items()), "--method", ct,
            "--weights", ",".join(map(str, weights)), "--out", out, *extra)  # fmt: skip
    base = load_file(base_dir / "model.safetensors")
    got = load_file(out / "model.safetensors")
    return {k[: -len(".weight")]: got[k].astype(np.float64) - base[k] for k in got if k.endswith(".weight")
            and not np.array_equal(got[k], base[k])}  # fmt: skip


@pytest.mark.parametrize(
    ("ct", "kw", "extra"),
    [
        ("linear", {}, []),
        ("cat", {}, []),
        ("svd", {}, []),
        ("svd", {"svd_rank": 3}, ["--param", "rank=3"]),
        ("magnitude_prune", {"density": 0.5}, ["--density", "0.5"]),
        ("magnitude_prune_svd", {"density": 0.5}, ["--density", "0.5"]),
        ("ties_svd", {"density": 0.5}, ["--density", "0.5"]),
    ],
)
def test_peft_combination_types_equal_peft(llama, tmp_path, ct, kw, extra):
    adapters = {"a": llama["a"], "b": llama["b"]}
    want = _peft_combined(llama["base"], adapters, ct, [0.8, 0.5], **kw)
    got = _spectra_combined(llama["base"], adapters, ct, [0.8, 0.5], tmp_path / "m", *extra)
    assert set(got) == set(want)
    for name in want:
        assert _rel(got[name], want[name]) < 1e-5, name


def _peft_dare(base_dir: Path, adapters: dict[str, Path], ct: str, weights: list[float], seed: int,
               density: float) -> np.ndarray:  # fmt: skip
    """PEFT's own per-module merge code (what add_weighted_adapter runs for each module) on layer 0's q_proj,
    right after torch.manual_seed(seed): add_weighted_adapter itself first draws the new adapter's random init
    from the same global generator, so its masks cannot be reproduced from a seed."""
    model = _peft(base_dir, adapters)
    target = model.base_model.model.model.layers[0].self_attn.q_proj
    lm = model.base_model
    names = list(adapters)
    torch.manual_seed(seed)
    if ct.endswith("_svd"):
        a0, b0 = target.lora_A[names[0]].weight, target.lora_B[names[0]].weight
        vh, u = lm._svd_generalized_task_arithmetic_weighted_adapter(ct, names, weights, 4, target, a0, b0, density,
                                                                     "total")  # fmt: skip
        return (u @ vh).detach().double().numpy()
    a, b = lm._generalized_task_arithmetic_weighted_adapter(ct, names, weights, target, density, "total")
    return (b @ a).detach().double().numpy()


@pytest.mark.parametrize("ct", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_types_equal_peft_with_the_same_seed(llama, tmp_path, ct):
    """DARE's masks are random: one module, PEFT's global generator seeded as spectra's (module 0: seed)."""
    adapters = {"a": llama["one_a"], "b": llama["one_b"]}
    want = _peft_dare(llama["base"], adapters, ct, [1.0, 0.6], 7, 0.5)
    name = "model.layers.0.self_attn.q_proj"
    got = _spectra_combined(llama["base"], adapters, ct, [1.0, 0.6], tmp_path / "m", "--density", "0.5",
                            "--param", "seed=7")  # fmt: skip
    assert set(got) == {name}
    assert _rel(got[name], want) < 1e-5
    other = _spectra_combined(llama["base"], adapters, ct, [1.0, 0.6], tmp_path / "m2", "--density", "0.5",
                              "--param", "seed=8")  # fmt: skip
    assert _rel(other[name], want) > 1e-3


def test_factorwise_types_need_one_rank(llama, tmp_path):
    r = runner.invoke(app, ["merge", str(llama["base"]), f"a={llama['a']}", f"c={llama['c']}", "--method", "linear",
                            "--out", str(tmp_path / "m")])  # fmt: skip
    assert r.exit_code != 0 and "one rank" in (r.stderr + r.stdout)


@pytest.mark.parametrize(("ct", "extra"), [("svd", []), ("ties_svd", ["--density", "0.5"]), ("linear", []),
                                         ("cat", [])])
def test_peft_types_on_gpt2_conv1d_equal_peft(gpt2, tmp_path, ct, extra):
    """GPT-2 Conv1D (fan_in_fan_out) modules: PEFT 0.21 handles them (its SVD types fail on torch nn.Conv1d
    kernels instead, which spectra's adapters do not cover); spectra equals it, the stored in×out layout kept."""
    adapters = {"a": gpt2["a"], "b": gpt2["b"]}
    want = _peft_combined(gpt2["base"], adapters, ct, [1.0, 0.7], density=0.5)
    got = _spectra_combined(gpt2["base"], adapters, ct, [1.0, 0.7], tmp_path / "m", *extra)
    assert set(got) == set(want) and len(want) == 2
    for name in want:
        assert _rel(got[name].T, want[name]) < 1e-5  # Conv1D stores in×out
