"""spectra capture: streamed statistics against activations hooked directly, aliases, --max-tokens, padding,
the incremental PCA against an exact eigendecomposition, PEFT parity (EVA, CorDA) and the init-adapter round
trip through transformers + peft."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fixtures.capture_data import SENTENCES, jsonl_file, text_file, tiny_bert, tiny_llama, tiny_tokenizer
from spectra_cli.checkpoint.activations import read_activations
from spectra_cli.checkpoint.source import open_checkpoint
from spectra_cli.cli.app import app
from spectra_cli.flows.capture import CaptureOptions, run_capture
from spectra_cli.spectral.init_data import eva_plan_ranks
from spectra_cli.spectral.pca import IncrementalPCA

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("capture-models")
    return {
        "bert": tiny_bert(root / "bert"),
        "llama": tiny_llama(root / "llama"),
        "data": text_file(root / "data.txt"),
    }


def _direct_inputs(model_dir: Path, kind: str, texts: list[str], batch_size: int) -> dict[str, np.ndarray]:
    """Every nn.Linear's unpadded input rows, hooked the plain way (independent of spectra's hooks)."""
    from transformers import BertModel, LlamaForCausalLM

    cls = BertModel if kind == "bert" else LlamaForCausalLM
    model = cls.from_pretrained(model_dir).eval()
    tok = tiny_tokenizer()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows: dict[str, list[np.ndarray]] = {}
    mask_box: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def f(module: Any, args: Any, output: Any) -> None:
            x = args[0].detach().double()
            m = mask_box["m"]
            kept = x[m] if x.shape[:-1] == m.shape else x.reshape(-1, x.shape[-1])
            rows.setdefault(name, []).append(kept.numpy())

        return f

    for n, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(hook(n))
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True)
            mask_box["m"] = enc["attention_mask"].bool()
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return {n: np.concatenate(v) for n, v in rows.items()}


# ---- the incremental PCA ----------------------------------------------------------------------------------


def _exact_pca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xc = x - x.mean(axis=0)
    w, v = np.linalg.eigh(xc.T @ xc)
    order = np.argsort(w)[::-1]
    return v[:, order].T, w[order] / w.sum()


def test_incremental_pca_is_exact_when_nothing_is_truncated() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 10)) * np.geomspace(5, 0.1, 10) + 3.0
    ipca = IncrementalPCA(10, 10)
    for start in range(0, 400, 37):  # uneven chunks, the first smaller than k is fine too
        ipca.update(torch.tensor(x[start : start + 37]))
    comps, ratios = _exact_pca(x)
    np.testing.assert_allclose(ipca.explained_variance_ratio.numpy(), ratios, rtol=1e-9, atol=1e-12)
    cos = np.abs(np.sum(ipca.components.numpy() * comps, axis=1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-9)
    assert ipca.n == 400
    np.testing.assert_allclose(ipca.mean.numpy(), x.mean(axis=0), atol=1e-12)


def test_incremental_pca_truncated_matches_exact_on_a_clear_spectrum() -> None:
    """k < d: the Ross et al. update drops the tail each step; the top directions stay accurate when they
    stand out (documented tolerance: |cos| ≥ 0.999, ratios within 1% for the top 3)."""
    rng = np.random.default_rng(1)
    d = 24
    x = rng.standard_normal((3000, d)) * np.r_[[8.0, 6.0, 4.0], np.full(d - 3, 0.3)] + 1.0
    ipca = IncrementalPCA(6, d)
    for start in range(0, 3000, 100):
        ipca.update(torch.tensor(x[start : start + 100]))
    comps, ratios = _exact_pca(x)
    cos = np.abs(np.sum(ipca.components.numpy()[:3] * comps[:3], axis=1))
    assert cos.min() > 0.999
    np.testing.assert_allclose(ipca.explained_variance_ratio.numpy()[:3], ratios[:3], rtol=1e-2)
    assert ipca.converged(0.99) >= 3


# ---- statistics against directly hooked activations --------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_statistics_equal_direct_hooks(models: dict[str, Path], tmp_path: Path, kind: str) -> None:
    out = tmp_path / "acts.safetensors"
    opts = CaptureOptions(stats="both", components=32, batch_size=5)
    result = run_capture(models[kind], models["data"], out, opts)
    acts = read_activations(out)
    direct = _direct_inputs(models[kind], kind, SENTENCES, 5)
    ckpt_names = {t.name for t in open_checkpoint(models[kind]).tensors}
    assert acts.modules, "nothing captured"
    for name, m in acts.modules.items():
        assert f"{name}.weight" in ckpt_names  # module paths are the checkpoint's tensor names minus .weight
        x = direct[name]
        assert m.tokens == len(x)
        np.testing.assert_allclose(m.input_mean, x.mean(axis=0), atol=1e-6)
        assert m.input_variance is not None  # per-feature population variance (EVA's --whiten from PCA alone)
        np.testing.assert_allclose(m.input_variance, x.var(axis=0), rtol=1e-5, atol=1e-6)
        assert m.input_covariance is not None
        np.testing.assert_allclose(m.input_covariance, x.T @ x / len(x), rtol=1e-5, atol=1e-5)
        comps, ratios = _exact_pca(x)
        k = len(m.pca_explained_variance_ratio)  # 32 ≥ rank of ≤ 80 rows of width 32: exact
        if x.shape[1] <= 32:
            np.testing.assert_allclose(m.pca_explained_variance_ratio[:5], ratios[:5], rtol=1e-6, atol=1e-9)
            cos = np.abs(np.sum(m.pca_components[:5] * comps[:5], axis=1))
            np.testing.assert_allclose(cos, 1.0, atol=1e-4)
        # directions with no variance left are dropped (LayerNorm outputs lose one; the pooler sees few rows)
        xc = x - x.mean(axis=0)
        sv = np.linalg.svd(xc, compute_uv=False)
        assert k == min(32, int((sv > 1e-5 * sv[0]).sum()))
    assert result.summary.tokens == len(next(iter(direct.values())))
    assert "pca_converged" in acts.metadata and acts.metadata["pca_tau"] == "0.99"


def test_aliases_for_shared_inputs(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "a.safetensors"
    run_capture(models["llama"], models["data"], out, CaptureOptions(components=4))
    aliases = json.loads(read_activations(out).metadata["aliases"])
    for layer in (0, 1):
        p = f"model.layers.{layer}"
        assert aliases[f"{p}.self_attn.k_proj"] == f"{p}.self_attn.q_proj"
        assert aliases[f"{p}.self_attn.v_proj"] == f"{p}.self_attn.q_proj"
        assert aliases[f"{p}.mlp.up_proj"] == f"{p}.mlp.gate_proj"
        assert f"{p}.self_attn.o_proj" not in aliases and f"{p}.mlp.down_proj" not in aliases
    out2 = tmp_path / "b.safetensors"
    run_capture(models["bert"], models["data"], out2, CaptureOptions(components=4))
    acts = read_activations(out2)
    aliases = json.loads(acts.metadata["aliases"])
    q = "encoder.layer.0.attention.self.query"
    assert aliases["encoder.layer.0.attention.self.key"] == q
    assert aliases["encoder.layer.0.attention.self.value"] == q
    np.testing.assert_array_equal(acts.modules["encoder.layer.0.attention.self.key"].pca_components,
                                  acts.modules[q].pca_components)  # fmt: skip


def test_max_tokens_and_padding(models: dict[str, Path], tmp_path: Path) -> None:
    direct = _direct_inputs(models["llama"], "llama", SENTENCES, 1)
    name = "model.layers.1.self_attn.o_proj"
    run_capture(models["llama"], models["data"], tmp_path / "a.safetensors",
                CaptureOptions(stats="covariance", batch_size=4, max_tokens=23))  # fmt: skip
    m = read_activations(tmp_path / "a.safetensors").modules[name]
    assert m.tokens == 23
    np.testing.assert_allclose(m.input_mean, direct[name][:23].mean(axis=0), atol=1e-6)
    # batches of 6 (padded) and of 1 (no padding) give the same statistics: padding is masked out
    run_capture(
        models["llama"],
        models["data"],
        tmp_path / "b.safetensors",
        CaptureOptions(stats="covariance", batch_size=6),
    )
    run_capture(
        models["llama"],
        models["data"],
        tmp_path / "c.safetensors",
        CaptureOptions(stats="covariance", batch_size=1),
    )
    b = read_activations(tmp_path / "b.safetensors").modules[name]
    c = read_activations(tmp_path / "c.safetensors").modules[name]
    assert b.tokens == c.tokens == len(direct[name])
    np.testing.assert_allclose(b.input_covariance, c.input_covariance, rtol=1e-4, atol=1e-5)


def test_real_minilm_module_paths(tmp_path: Path) -> None:
    from fixtures.real import minilm_dir

    folder = minilm_dir()
    out = tmp_path / "m.safetensors"
    run_capture(folder, text_file(tmp_path / "t.txt"), out,
                CaptureOptions(kinds=("query", "output.dense"), components=4, max_tokens=40))  # fmt: skip
    acts = read_activations(out)
    names = {t.name for t in open_checkpoint(folder).tensors}
    assert "encoder.layer.0.attention.self.query" in acts.modules
    assert "encoder.layer.5.output.dense" in acts.modules
    assert all(f"{m}.weight" in names for m in acts.modules)


# ---- PEFT parity ------------------------------------------------------------------------------------------


def test_eva_parity_with_peft(models: dict[str, Path], tmp_path: Path) -> None:
    """PEFT's get_eva_state_dict on the same tokens: same ranks, same directions up to sign.

    Intended difference: PEFT stops feeding a layer once its components converge (it cycles the data and
    uses ``svd_lowrank``), spectra folds in every token once with an exact SVD. With all the data in one
    batch PEFT sees it twice (then stops), which has the same principal directions; tolerance |cos| ≥ 0.9999.
    """
    from peft import LoraConfig, get_eva_state_dict
    from peft.tuners.lora.config import EvaConfig
    from transformers import LlamaForCausalLM

    texts = SENTENCES * 4
    data = text_file(tmp_path / "t.txt", texts)
    out = tmp_path / "a.safetensors"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    opts = CaptureOptions(kinds=tuple(targets), components=8, batch_size=len(texts))
    run_capture(models["llama"], data, out, opts)
    acts = read_activations(out).modules
    batches = [dict(tiny_tokenizer()(texts, return_tensors="pt", padding=True))]
    model = LlamaForCausalLM.from_pretrained(models["llama"]).eval()
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0)
    )
    sd = get_eva_state_dict(model, batches, cfg, show_progress_bar=False)
    plan = eva_plan_ranks({n: acts[n] for n in sd}, 4, {"rho": 2.0})
    assert {n: v.shape[0] for n, v in sd.items()} == plan
    assert len(set(plan.values())) > 1  # the redistribution did something
    for n, a_peft in sd.items():
        ours, _ = acts[n].pca(plan[n])
        cos = np.abs(np.sum(a_peft.double().numpy() * ours, axis=1))
        assert cos.min() > 0.9999, (n, cos)


def test_corda_capture_parity_with_peft_hooks(models: dict[str, Path], tmp_path: Path) -> None:
    """PEFT's own calibration on one example (its hook needs batch 1 and scales each batch by 1/max x):
    its C is a constant multiple of spectra's mean xᵀx, so B·A and the residual agree; A and B individually
    differ by that constant's square root (recorded as an intended difference)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from transformers import LlamaForCausalLM

    from spectra_cli.spectral.init import InitInput
    from spectra_cli.spectral.init_data import corda_factorize

    text = "the model is small and fast and the rank of the weight matrix is low but the loss is high " * 2
    data = text_file(tmp_path / "one.txt", [text.strip()])
    out = tmp_path / "a.safetensors"
    run_capture(models["llama"], data, out, CaptureOptions(stats="covariance", kinds=("o_proj", "down_proj")))
    acts = read_activations(out).modules
    model = LlamaForCausalLM.from_pretrained(models["llama"]).eval()
    original = {n: model.get_submodule(n).weight.detach().clone() for n in acts}
    enc = tiny_tokenizer()([text.strip()], return_tensors="pt")
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["o_proj", "down_proj"], init_lora_weights="corda",
                     corda_config=CordaConfig(corda_method="ipm"))  # fmt: skip
    preprocess_corda(model, cfg, run_model=lambda: model(input_ids=enc["input_ids"]))
    peft_model = get_peft_model(model, cfg)
    for n in acts:
        layer = peft_model.base_model.model.get_submodule(n)
        ba_peft = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().double().numpy()
        got = corda_factorize(InitInput(n, original[n].double(), 4, 1.0, activations=acts[n]))
        np.testing.assert_allclose((got.B @ got.A).numpy(), ba_peft, atol=2e-4 * np.abs(ba_peft).max())
        assert got.residual is not None
        np.testing.assert_allclose(
            got.residual.numpy(), layer.base_layer.weight.detach().double().numpy(), atol=2e-4
        )


# ---- CLI and the init-adapter round trip ------------------------------------------------------------------


def test_cli_contract(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "a.safetensors"
    data = jsonl_file(tmp_path / "d.jsonl", "prompt")
    res = runner.invoke(app, ["capture", str(models["llama"]), "--data", str(data), "--text-field", "prompt",
                              "--out", str(out), "--components", "4", "--format", "json", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    env = json.loads(res.stdout)
    assert env["command"] == "capture" and env["summary"]["tokens"] > 0
    assert {r["name"] for r in env["rows"]} >= {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
    }
    res = runner.invoke(app, ["capture", str(models["llama"]), "--data", str(data), "--out", str(out)])
    assert res.exit_code == 1 and "--force" in res.stderr
    res = runner.invoke(
        app, ["capture", str(models["llama"]), "--data", str(data), "--out", str(tmp_path / "x.safetensors")]
    )
    assert res.exit_code == 1 and "--text-field" in res.stderr
    res = runner.invoke(
        app, ["capture", str(models["llama"]), "--data", str(data), "--out", str(out), "--stats", "nope"]
    )
    assert res.exit_code == 2
    (tmp_path / "not_a_model").mkdir()
    res = runner.invoke(
        app,
        [
            "capture",
            str(tmp_path / "not_a_model"),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "y.safetensors"),
        ],
    )
    assert res.exit_code == 1 and "config.json" in res.stderr
    monkeypatch.setitem(sys.modules, "transformers", None)
    res = runner.invoke(
        app,
        [
            "capture",
            str(models["llama"]),
            "--data",
            str(data),
            "--text-field",
            "prompt",
            "--out",
            str(tmp_path / "z.safetensors"),
        ],
    )
    assert res.exit_code == 1 and "spectra-cli[hf]" in res.stderr
    assert "Traceback" not in res.output
    assert runner.invoke(app, ["capture", "--help"]).stdout.count("spectra capture") >= 2


def _run_init(ckpt: Path, acts: Path, method: str, out: Path, extra: list[str]) -> None:
    res = runner.invoke(app, ["init-adapter", str(ckpt), "--method", method, "--rank", "4", "--activations",
                              str(acts), "--out", str(out), "-q", "--format", "json", *extra])  # fmt: skip
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_round_trip_through_transformers_and_peft(models: dict[str, Path], tmp_path: Path, kind: str) -> None:
    """corda (ipm, kpm) and eva exports: residual/ with transformers + adapter/ with peft == the original."""
    from peft import PeftModel
    from transformers import BertModel, LlamaForCausalLM

    cls = BertModel if kind == "bert" else LlamaForCausalLM
    acts = tmp_path / "acts.safetensors"
    run_capture(models[kind], models["data"], acts, CaptureOptions(stats="both", components=8))
    enc = tiny_tokenizer()(SENTENCES[:4], return_tensors="pt", padding=True)
    feed = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def outputs(model: Any) -> torch.Tensor:
        with torch.no_grad():
            o = model(**feed)
        return o.last_hidden_state if kind == "bert" else o.logits

    reference = outputs(cls.from_pretrained(models[kind]).eval())
    for method, extra in (("corda", []), ("corda", ["--corda-mode", "kpm"]), ("eva", [])):
        out = tmp_path / f"{method}{len(extra)}"
        _run_init(models[kind], acts, method, out, extra)
        base_dir = out / "residual" if (out / "residual").is_dir() else models[kind]
        base = cls.from_pretrained(base_dir).eval()
        model = PeftModel.from_pretrained(base, out / "adapter").eval()
        lora_a = [p for n, p in model.named_parameters() if "lora_A" in n]
        assert lora_a, "the adapter has no LoRA weights"
        diff = float((outputs(model) - reference).abs().max())
        assert diff <= 1e-4, (method, extra, diff)


def test_data_files(tmp_path: Path) -> None:
    from spectra_cli.checkpoint.text import iter_texts
    from spectra_cli.errors import SpectraError

    txt = tmp_path / "a.txt"
    txt.write_text("one two\n\n  \nthree\r\n")
    assert list(iter_texts(txt)) == ["one two", "three"]
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "x y"}\n\n{"text": "z"}\n{"other": 1}\n')
    with pytest.raises(SpectraError, match=r"a\.jsonl:4: no string field 'text'"):
        list(iter_texts(jl))
    jl.write_text('{"text": "x"}\nnot json\n')
    with pytest.raises(SpectraError, match=r":2: not a JSON line"):
        list(iter_texts(jl))


def test_empty_data_file(models: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    res = runner.invoke(
        app, ["capture", str(models["llama"]), "--data", str(empty), "--out", str(tmp_path / "o.safetensors")]
    )
    assert res.exit_code == 1 and "no examples" in res.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_nan_weights_give_an_error_not_a_nan_file(models: dict[str, Path], tmp_path: Path) -> None:
    """A model with a NaN weight wrote NaN statistics (exit 0) that init-adapter turned into a NaN adapter."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(models["llama"], bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.0.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "a.safetensors"
    res = runner.invoke(app, ["capture", str(bad), "--data", str(models["data"]), "--out", str(out), "-q"])
    assert res.exit_code == 1, res.output
    assert res.stderr.startswith("Error: ") and "NaN or infinite" in res.stderr
    assert "model.layers." in res.stderr  # names the modules whose inputs are not finite
    assert not out.exists()


@pytest.mark.parametrize("case", ["truncated_model", "missing_data", "missing_out_dir"])
def test_bad_paths_are_one_line_errors(models: dict[str, Path], tmp_path: Path, case: str) -> None:
    """These died with tracebacks (SafetensorError from transformers, FileNotFoundError), the last one only
    after the whole run."""
    import shutil

    model, data, out = models["llama"], models["data"], tmp_path / "a.safetensors"
    if case == "truncated_model":
        model = tmp_path / "trunc"
        shutil.copytree(models["llama"], model)
        blob = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(blob[: len(blob) // 2])
        want = "truncated"
    elif case == "missing_data":
        data = tmp_path / "nope.txt"
        want = "no such data file"
    else:
        out = tmp_path / "no" / "dir" / "a.safetensors"
        want = "no such folder"
    res = runner.invoke(app, ["capture", str(model), "--data", str(data), "--out", str(out), "-q"])
    assert res.exit_code == 1, (res.output, res.exception)
    assert res.stderr.startswith("Error: ") and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert want in res.stderr
    assert not out.exists()


def test_outputs_never_land_in_the_model_folder(models: dict[str, Path], tmp_path: Path) -> None:
    """`capture M --out M/model.safetensors --force` replaced the model's weights with the statistics."""
    import shutil

    src = tmp_path / "m"
    shutil.copytree(models["llama"], src)
    blob = (src / "model.safetensors").read_bytes()
    data = str(models["data"])
    for args in (
        ["--out", str(src / "model.safetensors"), "--force"],
        ["--out", str(src / "acts.safetensors")],
        ["--out", str(tmp_path / "a.safetensors"), "-o", str(src / "config.json")],
    ):
        res = runner.invoke(app, ["capture", str(src), "--data", data, "-q", *args])
        assert res.exit_code == 1 and "refusing" in res.stderr, (args, res.output)
    assert (src / "model.safetensors").read_bytes() == blob
    assert not (src / "acts.safetensors").exists() and not (tmp_path / "a.safetensors").exists()


def test_shared_loader_pads_batches_for_a_tokenizer_without_pad_token(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """capture and rankme --model share one loader: a tokenizer with no pad token (GPT-2 style) gets its eos
    as pad, so batches pad; padded batches then give the same embeddings as one text at a time."""
    import shutil

    import transformers

    from spectra_cli.checkpoint.hf_model import embed_texts

    folder = tmp_path / "nopad"
    shutil.copytree(models["llama"], folder)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok.pad_token = None
    tok.eos_token = "[SEP]"
    tok.save_pretrained(str(folder))
    assert transformers.AutoTokenizer.from_pretrained(str(folder)).pad_token is None
    texts = ["a b c", "hello there world again and again"]
    batched = embed_texts(folder, texts, batch_size=2, device="cpu")
    single = embed_texts(folder, texts, batch_size=1, device="cpu")
    np.testing.assert_allclose(batched, single, atol=1e-5)
