"""`spectra init-adapter`: round trips through the real consumers (transformers + PEFT), parity with PEFT's own
initialisers, the on-disk layout (adapter keys, rank patterns, residual shards/index/dtypes, bit-for-bit copies),
extract from a fine-tune, and the CLI contract for bad input and interrupted runs.

Expected values come from transformers/PEFT or from NumPy on the files, never from spectra itself.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from typer.testing import CliRunner

import spectra_cli.checkpoint.writers as writers
from fixtures import init_models as im
from spectra_cli.cli.app import app
from spectra_cli.spectral.init import InitInput, methods

runner = CliRunner()
TOL = 1e-4


def run(*args: str | Path, catch: bool = False) -> Any:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=catch)


def init(ckpt: Path, out: Path, *args: str | Path) -> dict[str, Any]:
    r = run("init-adapter", ckpt, "--out", out, "-f", "json", "-q", *args)
    assert r.exit_code == 0, r.stderr + (r.stdout or "")
    return json.loads(r.stdout)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as g:
            for k in g.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[k] = g.get_tensor(k)
    return out


def digests(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.rglob("*")) if f.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("init_models")
    return {
        "bert": im.tiny_bert(root / "bert"),
        "llama": im.tiny_llama(root / "llama"),
        "llama_sharded": im.tiny_llama(root / "llama_sharded", shard="20KB"),
    }


def _auto(kind: str) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if kind == "bert" else AutoModelForCausalLM


def _outputs(model: Any, kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 12), generator=gen)
    with torch.no_grad():
        y = model(input_ids=ids)
    return y.last_hidden_state if kind == "bert" else y.logits


def _load_peft(base_dir: Path, adapter: Path, kind: str) -> Any:
    from peft import PeftModel

    base = _auto(kind).from_pretrained(base_dir).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter).eval()
    bad = [
        str(w.message)
        for w in caught
        if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()
    ]
    assert not bad, bad
    return model


def round_trip_error(original: Path, out: Path, kind: str, base_dir: Path | None = None) -> float:
    ref = _outputs(_auto(kind).from_pretrained(original).eval(), kind)
    model = _load_peft(base_dir or out / "residual", out / "adapter", kind)
    return float((_outputs(model, kind) - ref).abs().max())


# ---- round trips through transformers + PEFT -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize(
    "method,extra",
    [
        ("pissa", ()),
        ("milora", ()),
        ("olora", ()),
        ("pissa", ("--fast", "2")),
        ("pissa", ("--alpha", "16", "--rslora")),
    ],
    ids=["pissa", "milora", "olora", "pissa-fast", "pissa-rslora"],
)
def test_round_trip_residual_plus_adapter_is_the_original(models, tmp_path, kind, method, extra):
    out = tmp_path / "out"
    env = init(models[kind], out, "--method", method, "--rank", "4", *extra)
    assert env["summary"]["modules"] == 14 if kind == "llama" else env["summary"]["modules"] > 0
    assert round_trip_error(models[kind], out, kind) <= TOL
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["peft_type"] == "LORA"
    assert cfg["base_model_name_or_path"] == str((out / "residual").resolve())
    # the adapter really changes something: loading it on the residual is not the residual alone
    res = _auto(kind).from_pretrained(out / "residual").eval()
    assert (
        float(
            (_outputs(res, kind) - _outputs(_auto(kind).from_pretrained(models[kind]).eval(), kind))
            .abs()
            .max()
        )
        > 1e-3
    )


@pytest.mark.parametrize("extra", [(), ("--alpha", "8", "--rslora")], ids=["plain", "rslora"])
def test_readme_conversion_to_a_plain_lora_for_the_original_model(models, tmp_path, extra):
    """The README's recipe: after training on residual/, PEFT's save_pretrained(...,
    path_initial_model_for_weight_conversion=adapter/) gives a LoRA (r and α doubled, α×√2 with rsLoRA) that
    reproduces the trained model on the *original* base."""
    import shutil

    from peft import PeftModel

    out = tmp_path / "out"
    init(models["llama"], out, "--method", "pissa", "--rank", "3", "--kinds", "q_proj,v_proj", *extra)
    text = (out / "README.md").read_text()
    assert "path_initial_model_for_weight_conversion" in text
    init_copy = tmp_path / "init_adapter"
    shutil.copytree(out / "adapter", init_copy)  # PEFT rewrites the config of the folder it is given
    base = _auto("llama").from_pretrained(out / "residual")
    model = PeftModel.from_pretrained(base, out / "adapter", is_trainable=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "training"
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.eval()
    trained = _outputs(model, "llama")
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(init_copy))
    cfg = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert cfg["r"] == 6
    converted = _load_peft(models["llama"], tmp_path / "converted", "llama")
    assert float((_outputs(converted, "llama") - trained).abs().max()) <= TOL


def test_default_targets_are_all_linear_but_embeddings_and_head(models, tmp_path):
    env = init(models["llama"], tmp_path / "o", "--rank", "2")
    names = {r["name"] for r in env["rows"]}
    assert len(names) == 14 and not any("embed" in n or "lm_head" in n for n in names)
    env = init(models["bert"], tmp_path / "b", "--rank", "2")
    names = {r["name"] for r in env["rows"]}
    assert "pooler.dense" in names and not any("embeddings" in n for n in names)


def test_sharded_input_gives_sharded_residual_with_index_and_bit_for_bit_copies(models, tmp_path):
    src = models["llama_sharded"]
    before = digests(src)
    out = tmp_path / "out"
    init(src, out, "--method", "pissa", "--rank", "3", "--kinds", "q_proj,v_proj")
    assert digests(src) == before  # the input is never modified
    res = out / "residual"
    assert sorted(p.name for p in res.glob("*.safetensors")) == sorted(
        p.name for p in src.glob("*.safetensors")
    )
    idx_in = json.loads((src / "model.safetensors.index.json").read_text())
    idx_out = json.loads((res / "model.safetensors.index.json").read_text())
    assert idx_out["weight_map"] == idx_in["weight_map"]
    assert idx_out["metadata"]["total_size"] == idx_in["metadata"]["total_size"]
    assert (res / "config.json").read_bytes() == (src / "config.json").read_bytes()
    a, b = tensors(src), tensors(res)
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed == {
        f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")
    }
    for k in a:
        assert a[k].dtype == b[k].dtype
    assert round_trip_error(src, out, "llama") <= TOL


def test_dtype_converts_the_residual_and_config(models, tmp_path):
    out = tmp_path / "out"
    env = init(models["llama"], out, "--rank", "4", "--dtype", "bfloat16", "--kinds", "q_proj")
    res = tensors(out / "residual")
    assert all(t.dtype == torch.bfloat16 for t in res.values())
    assert (
        json.loads((out / "residual" / "config.json").read_text()).get("torch_dtype", "bfloat16")
        == "bfloat16"
    )
    orig = tensors(models["llama"])
    ad = tensors(out / "adapter")
    name = "model.layers.0.self_attn.q_proj"
    a, b = (
        ad[f"base_model.model.{name}.lora_A.weight"].double(),
        ad[f"base_model.model.{name}.lora_B.weight"].double(),
    )
    expect = (orig[f"{name}.weight"].double() - b @ a).to(torch.bfloat16)
    assert (
        torch.equal(res[f"{name}.weight"], expect)
        or float((res[f"{name}.weight"].double() - expect.double()).abs().max()) < 1e-2
    )
    assert torch.equal(res["model.norm.weight"], orig["model.norm.weight"].to(torch.bfloat16))
    assert env["summary"]["residual_dtype"] == "bfloat16"


def test_minilm_round_trip_pissa(tmp_path):
    from fixtures.real import minilm_dir

    src = minilm_dir()
    out = tmp_path / "out"
    env = init(src, out, "--method", "pissa", "--rank", "8")
    assert (
        env["summary"]["modules"] == 6 * 6 + 1
    )  # q, k, v, attention out, intermediate, output per layer + pooler
    assert (out / "residual" / "tokenizer.json").is_file() and (out / "residual" / "1_Pooling").is_dir()
    from transformers import AutoModel

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (2, 16), generator=gen)
    with torch.no_grad():
        ref = AutoModel.from_pretrained(src).eval()(input_ids=ids).last_hidden_state
        got = _load_peft(out / "residual", out / "adapter", "bert")(input_ids=ids).last_hidden_state
    assert float((got - ref).abs().max()) <= TOL


# ---- parity with PEFT's own initialisers ---------------------------------------------------------------------


def _peft_init(src: Path, init_weights: str, r: int, alpha: int, targets: list[str]) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(src).eval()
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=init_weights)
    return get_peft_model(base, cfg)


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_parity_with_peft_initialisers(models, tmp_path, method):
    """Same factors up to the sign of each singular pair (PiSSA) and the same residual, with s = α/r = 2."""
    out = tmp_path / "out"
    init(
        models["llama"], out, "--method", method, "--rank", "4", "--alpha", "8", "--kinds", "q_proj,down_proj"
    )
    peft_model = _peft_init(models["llama"], method, 4, 8, ["q_proj", "down_proj"])
    ours = tensors(out / "adapter")
    resid = tensors(out / "residual")
    n = 0
    for name, mod in peft_model.base_model.model.named_modules():
        if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
            continue
        n += 1
        pa, pb = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach()
        oa, ob = (
            ours[f"base_model.model.{name}.lora_A.weight"],
            ours[f"base_model.model.{name}.lora_B.weight"],
        )
        if method == "pissa":
            sign = torch.sign((pa * oa).sum(dim=1))
            oa, ob = oa * sign[:, None], ob * sign[None, :]
        torch.testing.assert_close(oa, pa, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ob, pb, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            resid[f"{name}.weight"], mod.base_layer.weight.detach(), atol=1e-5, rtol=1e-5
        )
    assert n == 4


def test_fast_uses_randomized_svd_and_differs_from_exact(models, tmp_path):
    init(models["llama"], tmp_path / "exact", "--rank", "4", "--kinds", "q_proj")
    init(models["llama"], tmp_path / "fast", "--rank", "4", "--kinds", "q_proj", "--fast", "0")
    a, b = tensors(tmp_path / "exact" / "adapter"), tensors(tmp_path / "fast" / "adapter")
    assert a.keys() == b.keys()
    assert any(not torch.allclose(a[k].abs(), b[k].abs(), atol=1e-4) for k in a)
    assert round_trip_error(models["llama"], tmp_path / "fast", "llama") <= TOL


# ---- rank patterns, alpha -----------------------------------------------------------------------------------


def test_ranks_file_every_module_gets_its_rank_in_peft(models, tmp_path):
    from peft import PeftModel

    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps({
        "r": 4, "lora_alpha": 8,
        "rank_pattern": {r"model\.layers\.1\.self_attn\.q_proj": 2, "v_proj": 6},
        "alpha_pattern": {r"model\.layers\.0\.self_attn\.q_proj": 3},
    }))  # fmt: skip
    out = tmp_path / "out"
    init(models["llama"], out, "--method", "milora", "--ranks", ranks, "--kinds", "q_proj,v_proj")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    want = {
        "model.layers.0.self_attn.q_proj": (4, 3.0),
        "model.layers.1.self_attn.q_proj": (2, 4.0),  # α/r kept at 8/4
        "model.layers.0.self_attn.v_proj": (6, 12.0),
        "model.layers.1.self_attn.v_proj": (6, 12.0),
    }
    base = _auto("llama").from_pretrained(out / "residual").eval()
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    for path, (r, alpha) in want.items():
        layer = model.base_model.model.get_submodule(path)
        assert layer.r["default"] == r and layer.lora_A["default"].weight.shape[0] == r
        assert layer.scaling["default"] == pytest.approx(alpha / r)
    assert cfg["r"] in (4, 6)
    assert round_trip_error(models["llama"], out, "llama") <= TOL


def test_peft_state_dict_has_no_missing_or_unexpected_keys(models, tmp_path):
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    out = tmp_path / "out"
    init(models["bert"], out, "--method", "olora", "--rank", "3")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    keep = {k: v for k, v in cfg.items() if k not in ("peft_type", "base_model_name_or_path")}
    model = PeftModel(_auto("bert").from_pretrained(out / "residual"), LoraConfig(**keep))
    result = set_peft_model_state_dict(model, load_file(out / "adapter" / "adapter_model.safetensors"))
    assert [k for k in result.missing_keys if "lora_" in k] == []
    assert result.unexpected_keys == []


# ---- extract -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetune(tmp_path_factory: pytest.TempPathFactory, models) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("finetune")
    base = models["llama"]
    model = _auto("llama").from_pretrained(base).eval()
    im.low_rank_finetune(model, root / "tuned", ("q_proj", "v_proj"), rank=2)
    return base, root / "tuned"


def test_extract_recovers_a_low_rank_finetune(finetune, tmp_path):
    base, tuned = finetune
    out = tmp_path / "out"
    env = init(base, out, "--method", "extract", "--tuned", tuned, "--rank", "2", "--kinds", "q_proj,v_proj")
    assert not (out / "residual").exists()
    assert env["summary"]["max_relative_error"] < 1e-4
    assert round_trip_error(tuned, out, "llama", base_dir=base) <= TOL
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(Path(base).resolve())


def test_extract_energy_picks_the_rank_and_reports_the_error(finetune, tmp_path):
    base, tuned = finetune
    env = init(base, tmp_path / "e", "--method", "extract", "--tuned", tuned, "--energy", "0.9999", "--kinds", "q_proj,v_proj")  # fmt: skip
    assert {r["rank"] for r in env["rows"]} == {2}
    env = init(
        base,
        tmp_path / "e1",
        "--method",
        "extract",
        "--tuned",
        tuned,
        "--rank",
        "1",
        "--kinds",
        "q_proj,v_proj",
    )
    a, b = tensors(Path(base)), tensors(Path(tuned))
    for row in env["rows"]:
        d = (b[row["name"] + ".weight"] - a[row["name"] + ".weight"]).double().numpy()
        s = np.linalg.svd(d, compute_uv=False)
        assert row["relative_error"] == pytest.approx(math.sqrt((s[1:] ** 2).sum() / (s**2).sum()), rel=1e-3)


def test_extract_warns_about_changed_tensors_outside_the_adapter(finetune, tmp_path):
    base, tuned = finetune
    r = run("init-adapter", base, "--out", tmp_path / "o", "--method", "extract", "--tuned", tuned, "--rank", "2",
            "--kinds", "q_proj")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert (
        "4 other tensors differ" not in r.stderr and "2 other tensors differ" in r.stderr
    )  # the v_proj weights


@settings(max_examples=15, deadline=None)
@given(m=st.integers(2, 9), n=st.integers(2, 9), seed=st.integers(0, 10_000))
def test_extract_error_falls_as_rank_rises(m, n, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    t = w + torch.randn(m, n, generator=gen, dtype=torch.float64)
    extract = methods()["extract"].factorize
    errs = [
        extract(InitInput("x", w, r, 1.0, tuned=t)).info["relative_error"] for r in range(1, min(m, n) + 1)
    ]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(errs)) and errs[-1] < 1e-10


@settings(max_examples=20, deadline=None)
@given(m=st.integers(2, 8), n=st.integers(2, 8), seed=st.integers(0, 10_000), alpha=st.floats(0.5, 32))
def test_residual_plus_update_is_w_for_every_svd_method(m, n, seed, alpha):
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = 1 + seed % min(m, n)
    for name in ("pissa", "milora", "olora"):
        f = methods()[name].factorize(InitInput("x", w, r, alpha / r))
        assert f.A.shape == (r, n) and f.B.shape == (m, r)
        assert f.residual is not None
        torch.testing.assert_close(f.residual + (alpha / r) * f.B @ f.A, w)
    s = np.linalg.svd(w.numpy(), compute_uv=False)
    f = methods()["pissa"].factorize(InitInput("x", w, r, 1.0))
    np.testing.assert_allclose(
        np.linalg.svd(f.B.numpy() @ f.A.numpy(), compute_uv=False)[:r], s[:r], rtol=1e-8
    )


# ---- data-driven methods through the registry ----------------------------------------------------------------


def _activations(src: Path, path: Path, kinds: tuple[str, ...]) -> None:
    from spectra_cli.checkpoint.activations import ModuleActivations, write_activations

    model = _auto("llama").from_pretrained(src).eval()
    seen: dict[str, list[np.ndarray]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in kinds:

            def hook(_m: Any, args: Any, _o: Any, name: str = name) -> None:
                seen.setdefault(name, []).append(
                    args[0].detach().reshape(-1, args[0].shape[-1]).double().numpy()
                )

            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3)))
    write_activations(
        path, {k: ModuleActivations(k, input_samples=np.concatenate(v), tokens=64) for k, v in seen.items()}
    )


@pytest.mark.skipif("corda" not in methods(), reason="the data-driven methods are not in this tree")
@pytest.mark.parametrize(
    "method,extra",
    [("corda", ()), ("corda", ("--corda-mode", "kpm")), ("eva", ()), ("eva", ("--no-redistribute",))],
)
def test_data_driven_methods_run_end_to_end(models, tmp_path, method, extra):
    acts = tmp_path / "acts.safetensors"
    _activations(models["llama"], acts, ("q_proj", "v_proj"))
    out = tmp_path / "out"
    env = init(
        models["llama"],
        out,
        "--method",
        method,
        "--rank",
        "4",
        "--kinds",
        "q_proj,v_proj",
        "--activations",
        acts,
        *extra,
    )
    assert env["summary"]["modules"] >= 1
    base = None if method == "corda" else models["llama"]
    assert (out / "residual").exists() == (method == "corda")
    if "--no-redistribute" in extra:
        assert {r["rank"] for r in env["rows"]} == {4}
    if "kpm" in extra:
        assert {r.get("mode") for r in env["rows"]} == {"kpm"}
    assert round_trip_error(models["llama"], out, "llama", base_dir=base) <= TOL


@pytest.mark.skipif("corda" not in methods(), reason="the data-driven methods are not in this tree")
def test_activations_for_other_modules_are_refused(models, tmp_path):
    from spectra_cli.checkpoint.activations import ModuleActivations, write_activations

    acts = tmp_path / "acts.safetensors"
    x = np.ones((4, 32))
    write_activations(acts, {"model.layers.0.self_attn.q_proj": ModuleActivations("q", input_samples=x),
                             "other.model.proj": ModuleActivations("o", input_samples=x)})  # fmt: skip
    r = run("init-adapter", models["llama"], "--out", tmp_path / "o", "--method", "corda", "--rank", "2",
            "--kinds", "q_proj", "--activations", acts)  # fmt: skip
    assert r.exit_code == 1 and "not in the checkpoint" in r.stderr and "other.model.proj" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["eva", "corda"])
def test_non_finite_activations_are_refused(models, tmp_path, method):
    """NaN statistics (e.g. captured from a model with NaN weights) gave EVA an all-NaN lora_A, silently."""
    from spectra_cli.checkpoint.activations import ModuleActivations, write_activations

    acts = tmp_path / "acts.safetensors"
    c = np.eye(32)
    c[3, 3] = np.nan
    name = "model.layers.0.self_attn.q_proj"
    write_activations(
        acts, {name: ModuleActivations(name, input_covariance=c, input_mean=np.zeros(32), tokens=9)}
    )
    r = run("init-adapter", models["llama"], "--out", tmp_path / "o", "--method", method, "--rank", "2",
            "--include", f"{name}.weight", "--activations", acts)  # fmt: skip
    assert r.exit_code == 1, r.stdout
    assert f"{name}.input_covariance holds NaN or infinite values" in r.stderr
    assert not (tmp_path / "o").exists()


# ---- bad input, existing output, interrupted runs ---------------------------------------------------------------


@pytest.mark.parametrize(
    "method,extra", [("pissa", ()), ("pissa", ("--fast", "2")), ("olora", ()), ("extract", ())]
)
def test_nan_weights_are_one_line_errors(models, tmp_path, method, extra):
    """NaN in a target weight: pissa died with torch's LinAlgError traceback, olora wrote a NaN adapter (exit 0)."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(models["llama"], bad)
    sd = load_file(bad / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    sd[name][0, 0] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    args = ("--tuned", bad) if method == "extract" else ()
    base = models["llama"] if method == "extract" else bad
    r = run("init-adapter", base, "--out", tmp_path / "o", "--method", method, "--rank", "2", "--kinds", "q_proj",
            *args, *extra)  # fmt: skip
    assert r.exit_code == 1, (r.stdout, r.exception)
    assert r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1
    assert f"{name}" in r.stderr and "NaN or infinite" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args,code,message",
    [
        (("--rank", "40"), 1, "rank larger than min(out, in)"),
        (("--rank", "2", "--kinds", "q_proj,nope"), 1, "--kinds nope: matches no linear weight"),
        (("--rank", "2", "--method", "milora", "--fast", "2"), 1, "--fast is not available for milora"),
        (("--rank", "2", "--method", "nope"), 2, "'nope' is not one of corda"),
        (("--rank", "2", "--method", "extract"), 1, "add --tuned"),
        (("--rank", "2", "--energy", "0.9"), 1, "--energy is only used by extract"),
        (("--rank", "2", "--dtype", "int8"), 2, "choose one of"),
        ((), 1, "give --rank R"),
        (("--rank", "2", "--ranks", "missing.json"), 2, "missing.json"),
        (("--rank", "2", "--kinds", "embed_tokens"), 1, "embeddings are not supported"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(models, tmp_path, args, code, message):
    out = tmp_path / "out"
    r = run("init-adapter", models["llama"], "--out", out, *args)
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert message in r.stderr
    if code == 1:
        assert r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bin_input_is_refused_for_a_residual(models, tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "bin"
    src.mkdir()
    torch.save(load_file(models["llama"] / "model.safetensors"), src / "pytorch_model.bin")
    (src / "config.json").write_bytes((models["llama"] / "config.json").read_bytes())
    r = run("init-adapter", src, "--out", tmp_path / "o", "--rank", "2", "--kinds", "q_proj")
    assert r.exit_code == 1 and "needs safetensors input" in r.stderr


def test_existing_output_needs_force(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = run("init-adapter", models["llama"], "--out", out, "--rank", "2", "--kinds", "q_proj")
    assert r.exit_code == 1 and "already exists" in r.stderr and (out / "keep.txt").exists()
    r = run(
        "init-adapter", models["llama"], "--out", out, "--rank", "2", "--kinds", "q_proj", "--force", "-q"
    )
    assert r.exit_code == 0 and not (out / "keep.txt").exists() and (out / "adapter").is_dir()
    assert {p.name for p in out.iterdir()} == {"adapter", "residual", "README.md", "spectra_run.json"}
    record = json.loads((out / "spectra_run.json").read_text())
    assert record["command"] == "init-adapter" and record["options"]["rank"] == 2
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_report_output_never_lands_on_an_input(models, tmp_path):
    """`-o MODEL/model.safetensors` wrote the table over the model's weights (exit 0)."""
    import shutil

    src = tmp_path / "m"
    shutil.copytree(models["llama"], src)
    before = digests(src)
    for target in (src / "model.safetensors", src / "report.json"):
        r = run(
            "init-adapter", src, "--out", tmp_path / "o", "--rank", "2", "--kinds", "q_proj", "-o", target
        )
        assert r.exit_code == 1 and r.stderr.startswith("Error: ") and "refusing" in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()
    assert digests(src) == before


def test_run_record_names_inputs_by_absolute_path(models, tmp_path, monkeypatch):
    """spectra_run.json recorded `--ranks r.json` / `--tuned t/` as typed, useless from another directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.json").write_text(json.dumps({"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}))
    r = run("init-adapter", models["llama"], "--out", "o", "--ranks", "r.json", "--kinds", "q_proj", "-q")
    assert r.exit_code == 0, r.stderr
    inputs = json.loads((tmp_path / "o" / "spectra_run.json").read_text())["inputs"]
    assert inputs["ranks_file"] == str(tmp_path / "r.json")


@pytest.mark.parametrize(
    "failure", [RuntimeError("disk on fire"), KeyboardInterrupt()], ids=["error", "interrupt"]
)
def test_an_interrupted_run_leaves_nothing_behind(models, tmp_path, monkeypatch, failure):
    calls = {"n": 0}
    real = writers.ResidualWriter.put

    def put(self: Any, *args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise failure
        real(self, *args)

    monkeypatch.setattr(writers.ResidualWriter, "put", put)
    src = models["llama_sharded"]
    before = digests(src)
    r = run("init-adapter", src, "--out", tmp_path / "out", "--rank", "2", catch=True)
    assert r.exit_code != 0 and calls["n"] == 3
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
    assert digests(src) == before


def test_table_output_and_list_methods(models, tmp_path):
    r = run(
        "init-adapter", models["llama"], "--out", tmp_path / "o", "--rank", "2", "--kinds", "v_proj", "-q"
    )
    assert r.exit_code == 0 and "model.layers.1.self_attn.v_proj" in r.stdout and "energy" in r.stdout
    r = run("init-adapter", "--list-methods")
    assert r.exit_code == 0
    for name in ("pissa", "milora", "olora", "extract"):
        assert f"{name}: " in r.stdout
    assert "arXiv:2404.02948" in r.stdout


def test_help_lists_every_registry_method_however_the_process_started():
    """The method list comes from the registry in any process (CliRunner here, not `spectra init-adapter`)."""
    r = run("init-adapter", "--help")
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())
    for name, m in methods().items():
        assert f"{name}: " in text and m.reference.split(",")[0] in text
    assert "(needs --activations)" in text and "(needs --tuned)" in text


def test_registry_metadata_imports_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; from spectra_cli.spectral.init import methods; import spectra_cli.cli.init_adapter\n"
        "names = sorted(methods()); assert names == ['corda', 'eora', 'eva', 'extract', 'loftq', 'lora-ga', 'mica', 'milora', 'olora', "
        "'orthogonal', 'pissa'], names\n"
        "print('TORCH', 'torch' in sys.modules)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "TORCH False" in p.stdout


# ---- allocations, GPT-2 Conv1D -------------------------------------------------------------------------------


def test_allocate_and_allocate_peft_config_give_the_same_adapter(models, tmp_path):
    """--allocate runs `spectra allocate` in process; its --peft-config file given as --ranks gives the same ranks."""
    from peft import PeftModel

    peft_cfg = tmp_path / "lora.json"
    r = run("allocate", models["llama"], "--kinds", "q_proj,v_proj,down_proj", "--budget-rank", "4",
            "--strategy", "energy", "--peft-config", peft_cfg, "-q", "-f", "json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    a = init(models["llama"], tmp_path / "a", "--kinds", "q_proj,v_proj,down_proj", "--allocate", "energy",
             "--budget-rank", "4")  # fmt: skip
    b = init(models["llama"], tmp_path / "b", "--kinds", "q_proj,v_proj,down_proj", "--ranks", peft_cfg)
    ranks_a = {row["name"]: row["rank"] for row in a["rows"]}
    assert ranks_a == {row["name"]: row["rank"] for row in b["rows"] if row["rank"]}
    assert sum(ranks_a.values()) <= 4 * 6
    base = _auto("llama").from_pretrained(tmp_path / "a" / "residual").eval()
    model = PeftModel.from_pretrained(base, tmp_path / "a" / "adapter").eval()
    for name, rank in ranks_a.items():
        assert model.base_model.model.get_submodule(name).lora_A["default"].weight.shape[0] == rank
    assert round_trip_error(models["llama"], tmp_path / "a", "llama") <= TOL


def test_ranks_file_target_modules_choose_the_targets(models, tmp_path):
    """`allocate --kinds q_proj,v_proj --peft-config` then `init-adapter --ranks` without --kinds adapted every
    linear module (the file's r for the others); PEFT itself would adapt only the file's target_modules."""
    peft_cfg = tmp_path / "lora.json"
    r = run("allocate", models["llama"], "--kinds", "q_proj,v_proj", "--budget-rank", "4",
            "--strategy", "energy", "--peft-config", peft_cfg, "-q", "-f", "json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    targets = set(json.loads(peft_cfg.read_text())["target_modules"])
    env = init(models["llama"], tmp_path / "a", "--ranks", peft_cfg)
    assert {row["name"] for row in env["rows"]} == targets
    assert all(row["name"].endswith(("q_proj", "v_proj")) for row in env["rows"])
    # PEFT's matching: short names match module paths by suffix, a string is a full regex
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"r": 2, "target_modules": ["o_proj"]}))
    env = init(models["llama"], tmp_path / "b", "--ranks", short)
    assert {row["name"] for row in env["rows"]} == {f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)}
    regex = tmp_path / "regex.json"
    regex.write_text(json.dumps({"r": 2, "target_modules": r".*\.1\.mlp\.(up|down)_proj"}))
    env = init(models["llama"], tmp_path / "c", "--ranks", regex)
    assert {row["name"] for row in env["rows"]} == {
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    }
    # a rank_pattern key that matches no module of the checkpoint: a ranks file for another model
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"r": 2, "rank_pattern": {"encoder.layer.0.attention.self.query": 4}}))
    r = run("init-adapter", models["llama"], "--out", tmp_path / "d", "--ranks", other)
    assert (
        r.exit_code == 1 and "encoder.layer.0.attention.self.query" in r.stderr and "matches no" in r.stderr
    )
    assert not (tmp_path / "d").exists()


def test_ranks_file_targets_need_activations_only_for_them(models, tmp_path):
    """corda with --ranks: activations were required for every linear module, not the file's targets."""
    acts = tmp_path / "acts.safetensors"
    _activations(models["llama"], acts, ("q_proj", "v_proj"))
    ranks = tmp_path / "r.json"
    ranks.write_text(json.dumps({"r": 2, "lora_alpha": 2, "target_modules": ["q_proj", "v_proj"]}))
    out = tmp_path / "o"
    env = init(models["llama"], out, "--method", "corda", "--ranks", ranks, "--activations", acts)
    assert len(env["rows"]) == 4
    assert round_trip_error(models["llama"], out, "llama") <= TOL


def test_gpt2_conv1d_weights_get_fan_in_fan_out(tmp_path):
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    model.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    out = tmp_path / "out"
    env = init(tmp_path / "gpt2", out, "--method", "pissa", "--rank", "3")
    assert {r["name"].rsplit(".", 1)[-1] for r in env["rows"]} == {"c_attn", "c_proj", "c_fc"}
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ad = tensors(out / "adapter")
    assert ad["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (3, 32)
    assert ad["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 3)
    peft_model = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(out / "residual").eval(), out / "adapter"
    )
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((peft_model.eval()(ids).logits - model(ids).logits).abs().max()) <= TOL


def test_options_for_other_methods_are_refused(models, tmp_path):
    acts = tmp_path / "acts.safetensors"
    acts.write_bytes(b"")
    r = run("init-adapter", models["llama"], "--out", tmp_path / "o", "--rank", "2", "--activations", acts)
    assert r.exit_code == 1 and "--activations is not used by pissa" in r.stderr
    r = run(
        "init-adapter", models["llama"], "--out", tmp_path / "o", "--rank", "2", "--tuned", models["bert"]
    )
    assert r.exit_code == 1 and "--tuned is only used by" in r.stderr
    assert not (tmp_path / "o").exists()


def test_bf16_checkpoint_residual_is_rounded_from_the_fp32_residual(models, tmp_path):
    """bf16 weights are upcast, decomposed in float32, and the residual rounded back to bf16 (round to nearest)."""
    model = _auto("llama").from_pretrained(models["llama"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16", safe_serialization=True)
    out = tmp_path / "out"
    init(tmp_path / "bf16", out, "--rank", "4", "--alpha", "8", "--kinds", "v_proj")
    src, res, ad = tensors(tmp_path / "bf16"), tensors(out / "residual"), tensors(out / "adapter")
    name = "model.layers.1.self_attn.v_proj"
    a, b = ad[f"base_model.model.{name}.lora_A.weight"], ad[f"base_model.model.{name}.lora_B.weight"]
    assert a.dtype == torch.float32 and res[f"{name}.weight"].dtype == torch.bfloat16
    w = src[f"{name}.weight"].double()
    expect = (w - 2.0 * b.double() @ a.double()).float().to(torch.bfloat16)
    mismatch = (res[f"{name}.weight"] != expect).float().mean().item()
    assert mismatch < 0.02  # float32 vs float64 products may round a rare element the other way
    s = np.linalg.svd(w.numpy(), compute_uv=False)
    np.testing.assert_allclose(
        np.linalg.svd(2.0 * (b.double() @ a.double()).numpy(), compute_uv=False)[:4], s[:4], rtol=1e-4
    )


def test_index_file_as_input_writes_the_sharded_folder(models, tmp_path):
    src = models["llama_sharded"]
    out = tmp_path / "out"
    init(src / "model.safetensors.index.json", out, "--rank", "2", "--kinds", "o_proj")
    res = out / "residual"
    assert (res / "model.safetensors.index.json").is_file() and (res / "config.json").is_file()
    assert round_trip_error(src, out, "llama") <= TOL
