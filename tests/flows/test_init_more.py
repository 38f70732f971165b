"""`spectra init-adapter --method mica|orthogonal|loftq|eora`: parity with PEFT 0.21's own initialisers where
PEFT runs here (MiCA, orthogonal), and the claims of LoftQ and EoRA checked against independent formulas.

Expected values come from PEFT, transformers or NumPy, never from spectra itself.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fixtures import init_models as im
from tests.flows.test_init_adapter import init, run, tensors


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return im.tiny_llama(tmp_path_factory.mktemp("more") / "llama")


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _peft(src: Path, init_weights: str, r: int, alpha: int, targets: list[str]) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(src).eval()
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                           init_lora_weights=init_weights))  # fmt: skip


def _load(base: Path, adapter: Path, trainable: bool = False) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base).eval(), adapter, is_trainable=trainable)


def _lora_modules(peft_model: Any) -> dict[str, Any]:
    return {n: m for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


# ---- MiCA ---------------------------------------------------------------------------------------------------


def test_mica_factors_equal_peft_up_to_sign_and_b_is_frozen(llama, tmp_path):
    out = tmp_path / "mica"
    env = init(llama, out, "--method", "mica", "--rank", "4", "--alpha", "8", "--kinds", "q_proj,down_proj")
    assert env["summary"]["residual"] is False
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] == "mica"
    peft_model = _peft(llama, "mica", 4, 8, ["q_proj", "down_proj"])
    ours = tensors(out / "adapter")
    mods = _lora_modules(peft_model)
    assert len(mods) == 4
    for name, mod in mods.items():
        pa, pb = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach()
        oa, ob = ours[f"base_model.model.{name}.lora_A.weight"], ours[f"base_model.model.{name}.lora_B.weight"]
        assert torch.count_nonzero(oa) == 0 and torch.count_nonzero(pa) == 0
        sign = torch.sign((pb * ob).sum(dim=0))
        torch.testing.assert_close(ob * sign[None, :], pb, atol=1e-5, rtol=1e-4)
        # B spans the left singular vectors of the smallest singular values (independent NumPy SVD)
        w = mod.base_layer.weight.detach().double().numpy()
        u = np.linalg.svd(w, full_matrices=False)[0][:, -4:]
        np.testing.assert_allclose(np.abs(u.T @ ob.double().numpy()), np.eye(4), atol=1e-4)
    # loaded for training, PEFT freezes lora_B and trains lora_A; outputs equal PEFT's initialised model
    model = _load(llama, out / "adapter", trainable=True)
    for mod in _lora_modules(model).values():
        assert not mod.lora_B["default"].weight.requires_grad
        assert mod.lora_A["default"].weight.requires_grad
    torch.testing.assert_close(_logits(model.eval()), _logits(peft_model.eval()), atol=1e-5, rtol=1e-5)


# ---- orthogonal -----------------------------------------------------------------------------------------------


def test_orthogonal_equals_peft_with_the_module_seed(llama, tmp_path):
    """One target module, so PEFT's global torch RNG draws exactly that module's numbers."""
    out = tmp_path / "orth"
    path = "model.layers.1.mlp.down_proj"
    init(llama, out, "--method", "orthogonal", "--rank", "4", "--alpha", "8", "--include", "*layers.1.mlp.down_proj*", "--seed", "7")
    torch.manual_seed((7 + zlib.crc32(path.encode())) % 2**63)
    peft_model = _peft(llama, "orthogonal", 4, 8, [path])
    mods = _lora_modules(peft_model)
    assert list(mods) == [path]
    ours = tensors(out / "adapter")
    pa, pb = mods[path].lora_A["default"].weight.detach(), mods[path].lora_B["default"].weight.detach()
    torch.testing.assert_close(ours[f"base_model.model.{path}.lora_A.weight"], pa, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours[f"base_model.model.{path}.lora_B.weight"], pb, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(pa @ pa.T) > 0
    # the rows of A (before /10 and the Gaussian projection) are orthogonal directions: B·A is not zero
    assert float((pb @ pa).abs().max()) > 0
    model = _load(llama, out / "adapter")
    torch.testing.assert_close(_logits(model.eval()), _logits(peft_model.eval()), atol=1e-5, rtol=1e-5)


def test_orthogonal_refuses_an_odd_rank(llama, tmp_path):
    r = run("init-adapter", llama, "--out", tmp_path / "o", "--method", "orthogonal", "--rank", "3", "-q",
            catch=True)  # fmt: skip
    assert r.exit_code != 0 and "even rank" in r.stderr


# ---- LoftQ ---------------------------------------------------------------------------------------------------


def _weights(folder: Path) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in tensors(folder).items()}


def _loftq_errors(src: Path, out: Path) -> dict[str, tuple[float, float]]:
    """Per module: (‖W − Q − s·B·A‖, ‖W − Q‖) from the files, s = 1."""
    w0, res, ad = _weights(src), _weights(out / "residual"), _weights(out / "adapter")
    errs = {}
    for k, a in ad.items():
        if not k.endswith("lora_A.weight"):
            continue
        mod = k[len("base_model.model.") : -len(".lora_A.weight")]
        b = ad[k.replace("lora_A", "lora_B")]
        w, q = w0[f"{mod}.weight"], res[f"{mod}.weight"]
        errs[mod] = (float(np.linalg.norm(w - q - b @ a)), float(np.linalg.norm(w - q)))
    return errs


def test_loftq_beats_nf4_alone_on_every_module_and_improves_with_steps(llama, tmp_path):
    from tests.spectral.test_quant import numpy_nf4

    w0 = _weights(llama)
    by_steps = {}
    for steps in (1, 5):
        out = tmp_path / f"lq{steps}"
        env = init(llama, out, "--method", "loftq", "--bits", "4", "--loftq-iter", str(steps), "--rank", "4")
        errs = _loftq_errors(llama, out)
        assert len(errs) == 14
        for mod, (err, _) in errs.items():
            w = w0[f"{mod}.weight"]
            nf4_alone = float(np.linalg.norm(w - numpy_nf4(w.astype(np.float32))))
            assert err < 0.95 * nf4_alone, mod
        # the written base is NF4-quantised: quantising it again (independent implementation) changes nothing
        res = _weights(out / "residual")
        for mod in errs:
            q = res[f"{mod}.weight"].astype(np.float32)
            np.testing.assert_array_equal(numpy_nf4(q), q)
        rows = {r["name"]: r for r in env["rows"]}
        for mod, (err, _) in errs.items():
            assert rows[mod]["relative_error"] == pytest.approx(err / np.linalg.norm(w0[f"{mod}.weight"]), rel=1e-4)
        by_steps[steps] = errs
    for mod in by_steps[1]:
        assert by_steps[5][mod][0] < by_steps[1][mod][0], mod
    readme = (tmp_path / "lq5" / "README.md").read_text()
    assert "load_in_4bit" in readme and "dequantised" in readme


def test_loftq_int8_and_alpha(llama, tmp_path):
    """int8 errors are far smaller than NF4's; with s = α/r = 2 the residual plus s·B·A is what approximates W."""
    out = tmp_path / "lq8"
    init(llama, out, "--method", "loftq", "--bits", "8", "--rank", "4", "--alpha", "8", "--kinds", "q_proj")
    w0, res, ad = _weights(llama), _weights(out / "residual"), _weights(out / "adapter")
    for mod in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"):
        w, q = w0[f"{mod}.weight"], res[f"{mod}.weight"]
        a, b = ad[f"base_model.model.{mod}.lora_A.weight"], ad[f"base_model.model.{mod}.lora_B.weight"]
        amax = np.abs(w).max(axis=1, keepdims=True)
        int8_alone = np.linalg.norm(w - np.round(w * 127 / amax) / 127 * amax)
        assert np.linalg.norm(w - q - 2 * b @ a) < int8_alone
        assert np.linalg.norm(w - q) / np.linalg.norm(w) < 0.01


# ---- EoRA ----------------------------------------------------------------------------------------------------


def _round4(w: torch.Tensor) -> torch.Tensor:
    """Symmetric 4-bit rounding, absmax per row (the "compressed" model of the test)."""
    a = w.abs().amax(dim=1, keepdim=True)
    return torch.round(w / a * 7) / 7 * a


def test_eora_lowers_the_output_error_more_than_a_plain_svd(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from fixtures.capture_data import SENTENCES, WORDS, text_file, tiny_llama, tiny_tokenizer
    from spectra_cli.flows.capture import CaptureOptions, run_capture

    src = tiny_llama(tmp_path / "llama")
    model = LlamaForCausalLM.from_pretrained(src).eval()
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        for n in targets:
            mod = model.get_submodule(n)
            mod.weight.copy_(_round4(mod.weight))
    comp = tmp_path / "compressed"
    model.save_pretrained(comp)
    for f in src.iterdir():  # the tokenizer and anything else that is not weights
        if not (comp / f.name).exists():
            (comp / f.name).write_bytes(f.read_bytes())
    # calibration: random word sequences; held out: the fixture's sentences
    rng = np.random.default_rng(0)
    calib = [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))) for _ in range(200)]
    held = SENTENCES
    acts = tmp_path / "acts.safetensors"
    run_capture(src, text_file(tmp_path / "calib.txt", calib), acts, CaptureOptions(stats="covariance"))
    out = tmp_path / "eora"
    env = init(src, out, "--method", "eora", "--compressed", comp, "--activations", acts, "--rank", "2")
    assert env["summary"]["residual"] is False and len(env["rows"]) == len(targets)
    assert all(0 < r["recovered"] <= 1 for r in env["rows"])
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == comp.resolve()

    enc = tiny_tokenizer()(held, return_tensors="pt", padding=True)

    def logits(m: Any) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits

    ref = logits(LlamaForCausalLM.from_pretrained(src).eval())
    compressed = LlamaForCausalLM.from_pretrained(comp).eval()
    err_comp = float((logits(compressed) - ref).norm())
    eora_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(comp).eval(), out / "adapter").eval()
    err_eora = float((logits(eora_model) - ref).norm())
    # a plain rank-2 SVD of each module's error ΔW = W − W_c (NumPy), merged into the compressed model
    orig = LlamaForCausalLM.from_pretrained(src).eval()
    plain = LlamaForCausalLM.from_pretrained(comp).eval()
    with torch.no_grad():
        for n in targets:
            mod = plain.get_submodule(n)
            d = (orig.get_submodule(n).weight - mod.weight).double().numpy()
            u, s, vt = np.linalg.svd(d, full_matrices=False)
            mod.weight += torch.from_numpy((u[:, :2] * s[:2]) @ vt[:2]).float()
    err_plain = float((logits(plain) - ref).norm())
    assert err_eora < err_plain < err_comp, (err_eora, err_plain, err_comp)


# ---- what the other commands read, and bad input -----------------------------------------------------------


def test_analyze_and_compare_read_what_the_new_methods_write(llama, tmp_path):
    init(llama, tmp_path / "mica", "--method", "mica", "--rank", "2", "--kinds", "q_proj")
    init(llama, tmp_path / "lq", "--method", "loftq", "--rank", "2", "--kinds", "q_proj")
    r = run("analyze", tmp_path / "mica" / "adapter", "-f", "json", "-q")
    assert r.exit_code == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)["rows"]}
    assert len(rows) == 4  # lora_A and lora_B of two modules
    r = run("compare", llama, f"lq={tmp_path / 'lq' / 'residual'}", "-f", "json", "-q")
    assert r.exit_code == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)["rows"]}
    w0, res = _weights(llama), _weights(tmp_path / "lq" / "residual")
    name = "model.layers.0.self_attn.q_proj.weight"
    want = np.linalg.norm(res[name] - w0[name]) / np.linalg.norm(w0[name])
    assert rows[name]["relative_delta"] == pytest.approx(want, rel=1e-4)
    assert rows["model.layers.0.self_attn.k_proj.weight"]["relative_delta"] == 0.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "eora", "--rank", "2"], "--compressed"),
        (["--method", "pissa", "--rank", "2", "--compressed", "."], "only used by eora"),
        (["--method", "loftq", "--rank", "2", "--bits", "3"], "--bits 3"),
        (["--method", "loftq", "--rank", "2", "--loftq-iter", "0"], "--loftq-iter 0"),
        (["--method", "pissa", "--rank", "2", "--bits", "4"], "--bits is only used by loftq"),
    ],
)
def test_bad_options_are_one_line_errors(llama, tmp_path, args, message):
    r = run("init-adapter", llama, "--out", tmp_path / "o", "-q", *args, catch=True)
    assert r.exit_code != 0 and message in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


# ---- LoRA-GA -------------------------------------------------------------------------------------------------


def test_lora_ga_equals_peft_preprocess_loraga(llama, tmp_path):
    """Gradients of one causal-LM batch, taken here with plain autograd, written as a gradients file; PEFT's
    preprocess_loraga + get_peft_model(init_lora_weights="lora_ga") on the same batch. r = 8 makes PEFT's
    randomized SVD (q = min(4r, min(out, in))) exact, so the factors agree up to the sign of each singular
    vector and base + adapter gives PEFT's outputs (both: the original model's)."""
    from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    ids = torch.randint(4, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    kinds = ["q_proj", "down_proj"]
    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {f"{n}.weight": m.weight.grad.detach().clone().contiguous() for n, m in model.named_modules()
             if n.split(".")[-1] in kinds}  # fmt: skip
    assert len(grads) == 4
    save_file(grads, str(tmp_path / "grads.safetensors"))
    out = tmp_path / "ga"
    init(llama, out, "--method", "lora-ga", "--rank", "8", "--alpha", "16", "--kinds", ",".join(kinds),
         "--gradients", tmp_path / "grads.safetensors")  # fmt: skip

    peft_base = AutoModelForCausalLM.from_pretrained(llama)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=kinds, init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig())  # fmt: skip

    def train_step() -> None:
        peft_base(input_ids=ids, labels=ids).loss.backward()

    preprocess_loraga(peft_base, cfg, train_step)
    peft_model = get_peft_model(peft_base, cfg).eval()
    ours, resid = tensors(out / "adapter"), tensors(out / "residual")
    mods = _lora_modules(peft_model)
    assert len(mods) == 4
    for name, mod in mods.items():
        pa, pb = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach()
        oa, ob = ours[f"base_model.model.{name}.lora_A.weight"], ours[f"base_model.model.{name}.lora_B.weight"]
        sa, sb = torch.sign((pa * oa).sum(dim=1)), torch.sign((pb * ob).sum(dim=0))
        torch.testing.assert_close(oa * sa[:, None], pa, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ob * sb[None, :], pb, atol=1e-5, rtol=1e-4)
        # A = Vᵀ[:r], B = U[:, r:2r]·S[r:2r]·d_out^{1/4}/4 from an independent NumPy SVD of the gradient
        g = grads[f"{name}.weight"].double().numpy()
        u, s, vt = np.linalg.svd(g)
        want_b = u[:, 8:16] * s[8:16] * g.shape[0] ** 0.25 / 4
        np.testing.assert_allclose(np.abs(ob.double().numpy()), np.abs(want_b), atol=1e-5 * s[0], rtol=1e-3)
        np.testing.assert_allclose(np.abs(oa.double().numpy()), np.abs(vt[:8]), atol=1e-4)
        w = model.get_submodule(name).weight.detach()
        torch.testing.assert_close(resid[f"{name}.weight"] + 2.0 * ob @ oa, w, atol=1e-5, rtol=1e-5)
    ga_model = _load(out / "residual", out / "adapter")
    ref = _logits(AutoModelForCausalLM.from_pretrained(llama).eval())
    torch.testing.assert_close(_logits(ga_model.eval()), _logits(peft_model), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_logits(ga_model.eval()), ref, atol=1e-4, rtol=1e-4)
