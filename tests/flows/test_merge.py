"""`spectra merge` and `spectra reconstruct`: merged checkpoints against W₀ + λΣwᵢΔWᵢ computed here with NumPy,
rmm bundles rebuilt into the tuned checkpoints and into adapters that PEFT loads and that reproduce the original
adapters' outputs, the Eckart–Young optimum for p < n, bad inputs, staging, provenance and plots.

Expected values come from the fixtures' own arrays (``fixtures.merge_cases``) or from the files read with
``fixtures.checkpoints.read_tensor``, never from spectra.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures import checkpoints as fx
from fixtures import merge_cases as mc
from spectra_cli.cli.app import app

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def run(*args: str | Path | float) -> Any:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def merge_json(*args: str | Path | float) -> dict[str, Any]:
    r = run("merge", *args, "-f", "json", "-q")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def named(paths: dict[str, Path]) -> list[str]:
    return [f"{k}={v}" for k, v in paths.items()]


def tensors(folder: Path) -> dict[str, np.ndarray]:
    f = folder / "model.safetensors"
    return {k: fx.read_tensor(f, k) for k in fx.read_header(f)[0] if k != "__metadata__"}


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> mc.FullCase:
    return mc.full_case(tmp_path_factory.mktemp("full"), n=3)


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> mc.LoraCase:
    return mc.lora_case(tmp_path_factory.mktemp("lora"), n=3)


# ---- registry methods: the merged checkpoint -------------------------------------------------------------


def test_task_arithmetic_on_full_checkpoints_equals_w0_plus_lambda_weighted_sum(full, tmp_path):
    out = tmp_path / "merged"
    w = {"t0": 1.0, "t1": 2.0, "t2": 0.5}
    env = merge_json(full.base_path, *named(full.paths), "--method", "task-arithmetic", "--scale", 0.5,
                     "--weights", "1,2,0.5", "--out", out)  # fmt: skip
    got = tensors(out)
    assert set(got) == set(full.base)
    for name, w0 in full.base.items():
        want = w0 + 0.5 * sum(w[t] * (full.tuned[t][name] - w0) for t in full.paths)
        np.testing.assert_allclose(got[name], want.astype(np.float32), rtol=0, atol=2e-6, err_msg=name)
    # the base's layout: config copied, one safetensors file, provenance beside it
    assert (out / "config.json").read_text() == (full.base_path / "config.json").read_text()
    run_rec = json.loads((out / "spectra_run.json").read_text())
    assert run_rec["command"] == "merge" and run_rec["options"]["weights"] == [1.0, 2.0, 0.5]
    assert [t["weight"] for t in env["inputs"]["tuned"]] == [1.0, 2.0, 0.5]
    # one row per module × task with the interference figures, cosines from NumPy
    name = "model.layers.0.self_attn.q_proj.weight"
    d = {t: (full.tuned[t][name] - full.base[name]).ravel() for t in full.paths}
    row = next(r for r in env["rows"] if r["module"] == name and r["task"] == "t0")
    cos = [abs(d["t0"] @ d[o]) / np.linalg.norm(d["t0"]) / np.linalg.norm(d[o]) for o in ("t1", "t2")]
    assert row["max_cos"] == pytest.approx(max(cos), abs=1e-6)
    assert row["delta_norm"] == pytest.approx(np.linalg.norm(d["t0"]), rel=1e-6)
    merged = 0.5 * (d["t0"] + 2 * d["t1"] + 0.5 * d["t2"])
    assert row["rel_error"] == pytest.approx(
        np.linalg.norm(merged - d["t0"]) / np.linalg.norm(d["t0"]), rel=1e-5
    )
    assert row["kept"] == pytest.approx(merged @ d["t0"] / (d["t0"] @ d["t0"]), rel=1e-5)


def test_task_arithmetic_on_adapters_equals_w0_plus_sum_of_scaled_products(lora, tmp_path):
    out = tmp_path / "merged"
    merge_json(lora.base_path, *named(lora.paths), "--out", out)
    got = tensors(out)
    changed = set()
    for name, w0 in lora.base.items():
        mod = name.removesuffix(".weight")
        want = w0 + sum(lora.scale * f[mod][1] @ f[mod][0] for f in lora.factors.values() if mod in f)
        if any(mod in f for f in lora.factors.values()):
            changed.add(mod)
        np.testing.assert_allclose(got[name], want, rtol=0, atol=2e-6, err_msg=name)
    assert "model.layers.0.mlp.up_proj" in changed  # covered by one adapter only
    norm = fx.read_tensor(lora.base_path / "model.safetensors", "model.norm.weight")
    np.testing.assert_array_equal(got["model.norm.weight"], norm)  # adapters change nothing else


@pytest.mark.parametrize("method", ["tsv", "knots", "ties"])
def test_other_methods_write_base_plus_the_methods_update(full, tmp_path, method):
    from spectra_cli.spectral.merge import METHODS, Update

    out = tmp_path / method
    env = merge_json(full.base_path, *named(full.paths), "--method", method, "--out", out)
    assert env["summary"]["method"] == method and env["summary"]["reference"] == METHODS[method].reference
    got = tensors(out)
    name = "model.layers.1.mlp.up_proj.weight"
    ups = [Update(dense=full.tuned[t][name] - full.base[name]) for t in full.paths]
    want = full.base[name] + METHODS[method](ups).update.to_dense()
    np.testing.assert_allclose(got[name], want, rtol=0, atol=2e-6)
    norm = "model.layers.0.input_layernorm.weight"
    deltas = [full.tuned[t][norm] - full.base[norm] for t in full.paths]
    if method == "ties":  # elementwise: the method's own rule on the 1-D tensor
        want1 = (
            full.base[norm] + METHODS["ties"]([Update(dense=d[None]) for d in deltas]).update.to_dense()[0]
        )
    else:  # 1-D parameters averaged, as TSV does
        want1 = full.base[norm] + np.mean(deltas, axis=0)
    np.testing.assert_allclose(got[norm], want1, rtol=0, atol=2e-6)


# ---- rmm: bundle and reconstruct -------------------------------------------------------------------------


def test_rmm_bundle_rebuilds_every_full_checkpoint_at_p_equal_n(full, tmp_path):
    bundle = tmp_path / "bundle"
    env = merge_json(full.base_path, *named(full.paths), "--method", "rmm", "--basis", 3, "--out", bundle)
    assert {p.name for p in bundle.iterdir()} == {
        "basis.safetensors",
        "coefficients.json",
        "spectra_run.json",
    }
    doc = json.loads((bundle / "coefficients.json").read_text())
    assert [t["name"] for t in doc["tasks"]] == ["t0", "t1", "t2"] and {t["kind"] for t in doc["tasks"]} == {
        "full"
    }
    assert env["summary"]["storage"] == pytest.approx(
        env["summary"]["stored_numbers"] / env["summary"]["raw_numbers"]
    )
    for task, want in full.tuned.items():
        out = tmp_path / f"rebuilt-{task}"
        r = run("reconstruct", bundle, "--task", task, "--out", out, "-q", "-f", "json")
        assert r.exit_code == 0, r.stderr
        rec = json.loads(r.stdout)
        assert rec["summary"]["kind"] == "full" and rec["summary"]["max_rel_error"] < 1e-6
        got = tensors(out)
        assert set(got) == set(want)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-6, err_msg=f"{task}: {name}")
        assert (out / "config.json").is_file()
        assert json.loads((out / "spectra_run.json").read_text())["command"] == "reconstruct"


def test_rmm_below_n_reaches_the_eckart_young_optimum(full, tmp_path):
    bundle = tmp_path / "bundle"
    env = merge_json(
        full.base_path, *named(full.paths), "--method", "rmm", "--basis", 1, "--sweep", "--out", bundle
    )
    name = "model.layers.0.mlp.down_proj.weight"
    x = np.stack([(full.tuned[t][name] - full.base[name]).ravel() for t in full.paths])
    mu = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
    proj = mu + (x - mu) @ vt[:1].T @ vt[:1]  # best rank-1 affine fit (PCA around the mean)
    want_err = np.linalg.norm(x - proj, axis=1) / np.linalg.norm(x, axis=1)
    rows = {r["task"]: r for r in env["rows"] if r["module"] == name}
    for i, t in enumerate(full.paths):
        assert rows[t]["rel_error"] == pytest.approx(want_err[i], rel=1e-4, abs=1e-7)
        assert rows[t]["p"] == 1
    out = tmp_path / "t1"
    assert run("reconstruct", bundle, "--task", "t1", "--out", out, "-q").exit_code == 0
    got = tensors(out)[name].ravel()
    np.testing.assert_allclose(got - full.base[name].ravel(), proj[1], rtol=0, atol=2e-6)
    # the sweep: per-module error for p = 1..n from the singular values, falling to zero
    sweep = env["summary"]["sweep"]
    assert sweep["p"] == [1, 2, 3]
    s = np.linalg.svd(x - mu, compute_uv=False)
    per_mod = sweep["modules"][name]
    for p in (1, 2, 3):
        assert per_mod[p - 1] == pytest.approx(
            np.sqrt(np.sum(s[p:] ** 2) / np.sum(x * x)), rel=1e-4, abs=1e-7
        )
    assert sweep["error"][0] > sweep["error"][1] >= sweep["error"][2] and sweep["error"][2] < 1e-6
    # with the mean stored the centred stack of 3 tasks has rank 2: p = 3 writes what p = 2 writes
    assert sweep["storage"][0] < sweep["storage"][1] == sweep["storage"][2]


def test_rmm_energy_picks_the_smallest_basis_per_module(full, tmp_path):
    env = merge_json(
        full.base_path, *named(full.paths), "--method", "rmm", "--energy", 0.6, "--out", tmp_path / "b"
    )
    for name, p in env["summary"]["p"].items():
        x = np.stack([(full.tuned[t][name] - full.base[name]).ravel() for t in full.paths])
        s2 = np.linalg.svd(x - x.mean(axis=0), compute_uv=False) ** 2
        want = int(np.searchsorted(np.cumsum(s2) / s2.sum(), 0.6) + 1)
        assert p == want, name
    exact = merge_json(full.base_path, *named(full.paths), "--method", "rmm", "--out", tmp_path / "e")
    assert env["summary"]["storage"] < exact["summary"]["storage"]
    assert max(exact["summary"]["mean_rel_error"].values()) < 1e-6  # no --basis/--energy: exact


def test_rmm_on_adapters_rebuilds_adapters_with_the_same_updates(lora, tmp_path):
    bundle = tmp_path / "bundle"
    merge_json(lora.base_path, *named(lora.paths), "--method", "rmm", "--out", bundle)
    out = tmp_path / "a0"
    r = run("reconstruct", bundle, "--task", "a0", "--out", out, "-q")
    assert r.exit_code == 0, r.stderr
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "spectra_run.json",
    }
    cfg = json.loads((out / "adapter_config.json").read_text())
    f = out / "adapter_model.safetensors"
    for mod, (a, b) in lora.factors["a0"].items():
        r_, _, s = fx.lora_scale(cfg, mod)
        a2 = fx.read_tensor(f, f"base_model.model.{mod}.lora_A.weight")
        b2 = fx.read_tensor(f, f"base_model.model.{mod}.lora_B.weight")
        assert a2.shape[0] == r_ == 2  # the task's own rank, not the basis's
        np.testing.assert_allclose(s * b2 @ a2, lora.scale * b @ a, rtol=0, atol=1e-5, err_msg=mod)
    assert "model.layers.0.mlp.up_proj" not in {k.split(".lora_")[0] for k in fx.read_header(f)[0]}


def test_task_arithmetic_of_conv1d_adapters_equals_the_sum_of_pefts_own_merges(tmp_path):
    # GPT-2: Conv1D weights stored in×out, adapters with fan_in_fan_out; PEFT's merge_and_unload is the reference
    case = mc.peft_adapters(tmp_path / "peft", "gpt2", n=2, merged=True)
    out = tmp_path / "merged"
    merge_json(case.base, *named(case.adapters), "--out", out)
    got, base = tensors(out), tensors(case.base)
    singles = {t: tensors(case.base.parent / f"{t}-merged") for t in case.adapters}
    changed = 0
    for name, w0 in base.items():
        want = w0 + sum(s[name] - w0 for s in singles.values())
        np.testing.assert_allclose(got[name], want, rtol=0, atol=3e-6, err_msg=name)
        changed += int(np.abs(want - w0).max() > 1e-3)
    assert changed >= 6  # c_attn, c_fc, c_proj of both layers


@pytest.mark.parametrize("arch", ["llama", "llama_embed", "bert", "gpt2"])
def test_rmm_adapters_out_load_in_peft_and_reproduce_the_original_outputs(tmp_path, arch):
    import torch
    from peft import PeftModel
    from transformers import AutoModel, GPT2Model, LlamaForCausalLM

    case = mc.peft_adapters(tmp_path / "peft", arch, n=2)
    bundle = tmp_path / "bundle"
    env = merge_json(case.base, *named(case.adapters), "--method", "rmm", "--basis", 2, "--out", bundle)
    assert env["summary"]["p"] and max(env["summary"]["p"].values()) <= 2
    cls = {"llama": LlamaForCausalLM, "llama_embed": LlamaForCausalLM, "bert": AutoModel, "gpt2": GPT2Model}[
        arch
    ]
    ids = torch.tensor([[1, 5, 7, 2, 9, 11, 3]])
    for task, original in case.adapters.items():
        out = tmp_path / f"rebuilt-{task}"
        assert run("reconstruct", bundle, "--task", task, "--out", out, "-q").exit_code == 0
        outputs = []
        for folder in (original, out):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = PeftModel.from_pretrained(cls.from_pretrained(case.base), folder).eval()
            msgs = [str(w.message).lower() for w in caught]
            assert not [m for m in msgs if "missing" in m or "unexpected" in m], msgs
            with torch.no_grad():
                res = model(input_ids=ids)
            outputs.append(
                (res.logits if arch.startswith("llama") else res.last_hidden_state).double().numpy()
            )
        with torch.no_grad():
            plain = cls.from_pretrained(case.base).eval()(input_ids=ids)
        base_out = (plain.logits if arch.startswith("llama") else plain.last_hidden_state).double().numpy()
        assert np.abs(outputs[0] - base_out).max() > 1e-3  # the adapter does change the outputs
        assert np.abs(outputs[1] - outputs[0]).max() <= 1e-4, task


# ---- bad input -------------------------------------------------------------------------------------------


def test_a_single_model_is_an_error(full, tmp_path):
    r = run("merge", full.base_path, f"t0={full.paths['t0']}", "--out", tmp_path / "o")
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and "at least two" in r.stderr
    assert not (tmp_path / "o").exists()


def test_models_of_different_architectures_are_an_error(full, tmp_path):
    other = mc.other_architecture(tmp_path / "other")
    r = run("merge", full.base_path, f"t0={full.paths['t0']}", f"x={other}", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "different architectures" in r.stderr and "x:" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_adapters_on_different_bases_are_an_error_naming_the_module(lora, tmp_path):
    # an adapter of a wider model: its q_proj update is 16×32 where the base's q_proj is 16×16
    rng = np.random.default_rng(3)
    wide = fx.lora_adapter(tmp_path / "wide", {"model.layers.0.self_attn.q_proj": (rng.standard_normal((2, 32)),
                                                                                   rng.standard_normal((16, 2)))},
                           2, 4.0)  # fmt: skip
    r = run("merge", lora.base_path, f"a0={lora.paths['a0']}", f"wide={wide}", "--out", tmp_path / "o")
    assert r.exit_code == 1 and r.stderr.startswith("Error: wide:")
    assert "model.layers.0.self_attn.q_proj" in r.stderr and "another base" in r.stderr
    # an adapter of another architecture: its modules are not in the base at all
    mod = "encoder.layer.0.attention.self.query"
    bert = fx.lora_adapter(tmp_path / "bert", {mod: (rng.standard_normal((2, 16)), rng.standard_normal((16, 2)))},
                           2, 4.0)  # fmt: skip
    r = run("merge", lora.base_path, f"a0={lora.paths['a0']}", f"bert={bert}", "--out", tmp_path / "o")
    assert r.exit_code == 1 and r.stderr.startswith("Error: bert:")
    assert "encoder.layer.0.attention.self.query" in r.stderr and "does not fit the base" in r.stderr
    assert not (tmp_path / "o").exists()


def test_adapters_naming_different_base_models_get_a_warning(lora, tmp_path):
    a, b = (fx.lora_adapter(tmp_path / k.replace("/", "-"), {m: (f[0], f[1]) for m, f in lora.factors["a0"].items()},
                            2, 4.0, base_model_name_or_path=k) for k in ("org/model-x", "org/model-y"))  # fmt: skip
    r = runner.invoke(app, ["merge", str(lora.base_path), f"a={a}", f"b={b}", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0 and "name different base models (org/model-x, org/model-y)" in r.stderr


def test_basis_larger_than_n_is_an_error(full, tmp_path):
    r = run(
        "merge", full.base_path, *named(full.paths), "--method", "rmm", "--basis", 4, "--out", tmp_path / "o"
    )
    assert r.exit_code == 1 and "--basis 4 is larger than the number of tasks (3)" in r.stderr


@pytest.mark.parametrize(
    ("extra", "code", "fragment"),
    [
        (["--method", "nope"], 2, "not a merge method"),
        (["--method", "tsv", "--basis", "2"], 2, "rmm only"),
        (["--weights", "1,2"], 1, "--weights has 2 values for 3"),
        (["--weights", "1,x,2"], 2, "expected numbers"),
        (["--method", "tsv", "--param", "density=0.3"], 2, "no parameter"),
        (["--method", "rmm", "--energy", "1.5"], 2, "(0, 1]"),
    ],
)
def test_bad_options(full, tmp_path, extra, code, fragment):
    r = run("merge", full.base_path, *named(full.paths), *extra, "--out", tmp_path / "o")
    assert r.exit_code == code, r.stderr
    assert fragment in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_rmm_of_mixed_kinds_is_an_error(lora, tmp_path):
    r = run("merge", lora.base_path, f"a={lora.paths['a0']}", f"b={lora.base_path}", "--method", "rmm",
            "--out", tmp_path / "o")  # fmt: skip
    assert r.exit_code == 1 and "one kind" in r.stderr


def test_reconstruct_errors(full, tmp_path):
    bundle = tmp_path / "bundle"
    merge_json(full.base_path, *named(full.paths), "--method", "rmm", "--basis", 2, "--out", bundle)
    r = run("reconstruct", bundle, "--task", "zz", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "no task named 'zz'" in r.stderr and "t0, t1, t2" in r.stderr
    r = run("reconstruct", full.base_path, "--task", "t0", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "not an rmm bundle" in r.stderr
    other = mc.other_architecture(tmp_path / "other")
    r = run("reconstruct", bundle, "--task", "t0", "--base", other, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "--base" in r.stderr
    assert not (tmp_path / "o").exists()


# ---- output staging, provenance, plots, help -------------------------------------------------------------


def test_existing_output_is_refused_unless_force(full, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = run("merge", full.base_path, *named(full.paths), "--out", out)
    assert r.exit_code == 1 and "already exists" in r.stderr and "--force" in r.stderr
    assert (out / "keep.txt").exists()
    assert run("merge", full.base_path, *named(full.paths), "--out", out, "--force", "-q").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_output_inside_an_input_is_refused(full):
    r = run("merge", full.base_path, *named(full.paths), "--out", full.paths["t0"] / "sub")
    assert r.exit_code == 1 and "must not be inside" in r.stderr


def test_report_into_an_input_folder_is_refused_before_the_run(full, tmp_path):
    config = full.base_path / "config.json"
    before = config.read_bytes()
    r = run("merge", full.base_path, *named(full.paths), "--out", tmp_path / "m", "--format", "json",
            "--output", config)  # fmt: skip
    assert r.exit_code == 1 and "refusing to write into the input model folder" in r.stderr
    assert config.read_bytes() == before and not (tmp_path / "m").exists()
    bundle = tmp_path / "b"
    r = run("merge", full.base_path, *named(full.paths), "--method", "rmm", "--out", bundle, "-q")
    assert r.exit_code == 0
    coeffs = (bundle / "coefficients.json").read_bytes()
    r = run("reconstruct", bundle, "--task", "t0", "--out", tmp_path / "r", "--format", "json",
            "--output", bundle / "coefficients.json")  # fmt: skip
    assert r.exit_code == 1 and "refusing to write into the input model folder" in r.stderr
    assert (bundle / "coefficients.json").read_bytes() == coeffs and not (tmp_path / "r").exists()


@pytest.mark.parametrize("method", ["task-arithmetic", "rmm"])
def test_an_interrupted_merge_leaves_nothing_behind(full, tmp_path, monkeypatch, method):
    import spectra_cli.flows.merge as merging

    calls = {"n": 0}
    real = merging.module_interference

    def interrupt(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(merging, "module_interference", interrupt)
    r = runner.invoke(app, ["merge", str(full.base_path), *named(full.paths), "--method", method,
                            "--out", str(tmp_path / "o")])  # fmt: skip
    assert r.exit_code != 0 and calls["n"] == 3
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging folder


def test_plots_and_sweep(full, tmp_path):
    plots = tmp_path / "plots"
    env = merge_json(full.base_path, *named(full.paths), "--method", "rmm", "--basis", 2, "--sweep",
                     "--plots", plots, "--out", tmp_path / "b")  # fmt: skip
    assert {p.name for p in plots.iterdir()} == {"interference.png", "sweep.png", "spectra_run.json"}
    for p in ("interference.png", "sweep.png"):
        assert (plots / p).read_bytes()[:8] == PNG
    cos = np.asarray(env["summary"]["cosine"])  # mean over the modules where both tasks changed something
    assert cos.shape == (3, 3) and np.allclose(np.diag(cos), 1.0) and np.allclose(cos, cos.T)
    name = "lm_head.weight"  # t2 leaves it unchanged
    d = {t: (full.tuned[t][name] - full.base[name]).ravel() for t in full.paths}
    assert all(r["max_cos"] == pytest.approx(abs(d["t0"] @ d["t1"]) / np.linalg.norm(d["t0"]) / np.linalg.norm(d["t1"]), abs=1e-6)
               for r in env["rows"] if r["module"] == name and r["task"] in ("t0", "t1"))  # fmt: skip


def test_table_output_and_help(full, tmp_path):
    r = run("merge", full.base_path, *named(full.paths), "--method", "tsv", "--out", tmp_path / "m", "-q")
    assert r.exit_code == 0 and "mean relative error per task" in r.stdout and "interference" in r.stdout
    for cmd in ("merge", "reconstruct"):
        h = run(cmd, "--help")
        assert h.exit_code == 0 and "Examples" in h.stdout
    h = run("merge", "--help")
    for m in ("task-arithmetic", "ties", "tsv", "knots", "rmm"):
        assert m in h.stdout


# ---- second-round review -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tsv", "rmm"])
def test_nan_weights_are_a_clear_error(full, tmp_path, method):
    bad = tmp_path / "nan"
    t = {k: v.astype(np.float32) for k, v in full.tuned["t1"].items()}
    t["model.layers.1.mlp.up_proj.weight"][2, 3] = np.nan
    fx.write_safetensors(bad / "model.safetensors", t, {"format": "pt"})
    r = run("merge", full.base_path, f"t0={full.paths['t0']}", f"bad={bad}", "--method", method,
            "--out", tmp_path / "o", "-q")  # fmt: skip
    assert r.exit_code == 1 and r.stderr.startswith("Error: "), r.stderr
    assert "bad" in r.stderr and "model.layers.1.mlp.up_proj.weight" in r.stderr and "NaN" in r.stderr
    assert not (tmp_path / "o").exists()


def test_sweep_storage_equals_the_bundles_written_at_each_p(full, tmp_path):
    """The sweep's storage for p must be what `--basis p` really writes: with the mean stored, p is capped at
    n − 1 (the centred stack's rank), so p = n stores no more than p = n − 1."""
    env = merge_json(
        full.base_path, *named(full.paths), "--method", "rmm", "--sweep", "--out", tmp_path / "s"
    )
    sweep = env["summary"]["sweep"]
    for p in (1, 2, 3):
        got = merge_json(full.base_path, *named(full.paths), "--method", "rmm", "--basis", p,
                         "--out", tmp_path / f"b{p}")  # fmt: skip
        assert sweep["storage"][p - 1] == pytest.approx(got["summary"]["matrix_storage"], rel=1e-9)
        assert sweep["error"][p - 1] == pytest.approx(got["summary"]["overall_error"], abs=1e-6)


def test_rmm_warns_when_the_bundle_is_larger_than_the_inputs_and_about_weights(lora, tmp_path):
    r = run("merge", lora.base_path, *named(lora.paths), "--method", "rmm", "--basis", 2, "--weights", "1,2,1",
            "--out", tmp_path / "b", "-f", "json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    storage = json.loads(r.stdout)["summary"]["storage"]
    assert storage > 1 and f"{storage:.2f}" in r.stderr and "larger than the inputs" in r.stderr
    assert "--weights" in r.stderr
    smaller = run("merge", lora.base_path, *named(lora.paths), "--method", "rmm", "--basis", 1,
                  "--out", tmp_path / "b1", "-f", "json")  # fmt: skip
    assert smaller.exit_code == 0 and "--weights" not in smaller.stderr
    s1 = json.loads(smaller.stdout)["summary"]["storage"]
    assert ("larger than the inputs" in smaller.stderr) == (s1 > 1)


def test_a_task_that_left_a_module_alone_is_rebuilt_exactly_there(full, tmp_path):
    """t2 leaves embed_tokens and lm_head unchanged: at p = 1 the basis is fitted on t0 and t1 only there, the
    table's error 0 for t2 is true (the rebuilt t2 keeps the base's values) and t0/t1 get the optimum of their
    own two-row stack (PCA around their mean, NumPy)."""
    env = merge_json(
        full.base_path, *named(full.paths), "--method", "rmm", "--basis", 1, "--out", tmp_path / "b"
    )
    assert run("reconstruct", tmp_path / "b", "--task", "t2", "--out", tmp_path / "r2", "-q").exit_code == 0
    got = tensors(tmp_path / "r2")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        np.testing.assert_array_equal(got[name], full.tuned["t2"][name].astype(np.float32))
        d = np.stack([(full.tuned[t][name] - full.base[name]).ravel() for t in ("t0", "t1")])
        c = d - d.mean(axis=0)
        s = np.linalg.svd(c, compute_uv=False)  # two centred rows: rank 1, so p = 1 is exact
        rows = {r["task"]: r for r in env["rows"] if r["module"] == name}
        assert rows["t2"]["rel_error"] == 0 and s[1] < 1e-9 * s[0]
        assert rows["t0"]["rel_error"] < 1e-6 and rows["t1"]["rel_error"] < 1e-6


def test_the_table_on_a_case_worked_by_hand(tmp_path):
    """One 4×4 matrix; ΔW₀ = e₁e₁ᵀ, ΔW₁ = e₂e₂ᵀ, ΔW₂ = e₁e₁ᵀ + e₂e₂ᵀ. By hand: cos(0,1) = 0, cos(0,2) = cos(1,2)
    = 1/√2; top-k left subspaces span{e₁}, span{e₂}, span{e₁,e₂}: overlaps 0, 1, 1. Task arithmetic M = 2e₁e₁ᵀ
    + 2e₂e₂ᵀ: error of task 0 ‖e₁e₁ᵀ + 2e₂e₂ᵀ‖ = √5, kept ⟨M, ΔW₀⟩ = 2; task 2 error ‖ΔW₂‖/‖ΔW₂‖ = 1, kept 4/2.
    rmm p = 1 around the mean (2/3, 2/3) in the (e₁e₁ᵀ, e₂e₂ᵀ) coordinates: the centred rows' covariance
    [[6, −3], [−3, 6]]/9 keeps (1, −1)/√2 (λ = 1) and drops (1, 1)/√2 (λ = 1/3): energy kept 3/4, errors
    √(1/18), √(1/18), √(2/9)/√2 = 1/3. tsv keeps ⌊4/3⌋ = 1 triplet per task: energy 1, 1, 1/2 → mean 5/6."""
    name = "model.layers.0.self_attn.q_proj.weight"
    w0 = np.arange(16, dtype=np.float32).reshape(4, 4) / 10
    e = np.eye(4, dtype=np.float32)
    deltas = [np.outer(e[0], e[0]), np.outer(e[1], e[1]), np.outer(e[0], e[0]) + np.outer(e[1], e[1])]
    fx.write_safetensors(tmp_path / "base" / "model.safetensors", {name: w0}, {"format": "pt"})
    ins = []
    for i, d in enumerate(deltas):
        fx.write_safetensors(tmp_path / f"t{i}" / "model.safetensors", {name: w0 + d}, {"format": "pt"})
        ins.append(f"t{i}={tmp_path / f't{i}'}")
    ta = {r["task"]: r for r in merge_json(tmp_path / "base", *ins, "--out", tmp_path / "ta")["rows"]}
    assert ta["t0"]["rel_error"] == pytest.approx(np.sqrt(5)) and ta["t0"]["kept"] == pytest.approx(2)
    assert ta["t2"]["rel_error"] == pytest.approx(1) and ta["t2"]["kept"] == pytest.approx(2)
    assert ta["t0"]["max_cos"] == pytest.approx(1 / np.sqrt(2)) and ta["t2"]["max_cos"] == pytest.approx(
        1 / np.sqrt(2)
    )
    assert ta["t0"]["mean_overlap"] == pytest.approx(0.5)  # mean of overlap(0,1) = 0 and overlap(0,2) = 1
    assert ta["t2"]["mean_overlap"] == pytest.approx(1.0)
    env = merge_json(tmp_path / "base", *ins, "--method", "rmm", "--basis", 1, "--out", tmp_path / "b")
    rm = {r["task"]: r for r in env["rows"]}
    assert rm["t0"]["energy_kept"] == pytest.approx(0.75)
    for t, want in (("t0", np.sqrt(1 / 18)), ("t1", np.sqrt(1 / 18)), ("t2", 1 / 3)):
        assert rm[t]["rel_error"] == pytest.approx(want, rel=1e-6)
    cos = np.asarray(env["summary"]["cosine"])
    np.testing.assert_allclose(cos, [[1, 0, 2**-0.5], [0, 1, 2**-0.5], [2**-0.5, 2**-0.5, 1]], atol=1e-6)
    tsv = merge_json(tmp_path / "base", *ins, "--method", "tsv", "--out", tmp_path / "tsv")["rows"]
    assert tsv[0]["energy_kept"] == pytest.approx(5 / 6)


def test_an_integer_buffer_missing_from_a_fine_tune_is_not_an_architecture_change(full, tmp_path):
    """Newer transformers no longer save BERT's ``embeddings.position_ids``; fine-tunes of the real MiniLM saved
    that way were refused as 'different architectures'. A missing float tensor still is an error."""
    base = tmp_path / "base"
    fx.write_safetensors(base / "model.safetensors",
                         {**{k: v.astype(np.float32) for k, v in full.base.items()},
                          "model.position_ids": np.arange(8, dtype=np.int64)[None]}, {"format": "pt"})  # fmt: skip
    env = merge_json(base, *named(full.paths), "--method", "rmm", "--out", tmp_path / "b")
    assert env["summary"]["modules"] > 0
    fewer = tmp_path / "fewer"
    t = {k: v.astype(np.float32) for k, v in full.tuned["t0"].items() if k != "model.norm.weight"}
    fx.write_safetensors(fewer / "model.safetensors", t, {"format": "pt"})
    r = run("merge", base, f"x={fewer}", f"t1={full.paths['t1']}", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 1 and "model.norm.weight" in r.stderr and "different architectures" in r.stderr


@pytest.mark.parametrize("method", ["tsv", "knots", "ties"])
def test_a_module_no_task_changed_keeps_the_bases_values(full, tmp_path, method):
    """t2 and a renamed copy of it both leave embed_tokens and lm_head alone: those stay the base's, bit for bit
    (they are skipped, not merged from n zero updates), and every other matrix is still merged."""
    env = merge_json(full.base_path, f"a={full.paths['t2']}", f"b={full.paths['t2']}", "--method", method,
                     "--out", tmp_path / "m")  # fmt: skip
    got = tensors(tmp_path / "m")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        np.testing.assert_array_equal(got[name], full.base[name].astype(np.float32))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not np.array_equal(got[name], full.base[name].astype(np.float32))
    assert {r["module"] for r in env["rows"]} >= {"model.embed_tokens.weight", name}


def test_rmm_storage_of_untouched_modules_and_of_an_adapter_only_one_task_has(full, lora, tmp_path):
    """A module no task changed costs a zero rank-1 pair and n coefficients (not a dense zero mean) and is rebuilt
    as the base's; a module only one adapter adapts is stored as that adapter's update (its mean) and compared
    with that adapter's own factors only (the other tasks hold nothing there): storage exactly 1."""
    env = merge_json(full.base_path, f"a={full.paths['t2']}", f"b={full.paths['t2']}", "--method", "rmm",
                     "--out", tmp_path / "b")  # fmt: skip
    row = next(r for r in env["rows"] if r["module"] == "model.embed_tokens.weight")
    v, d = full.base["model.embed_tokens.weight"].shape
    assert row["storage"] == pytest.approx((v + d + 2) / (2 * v * d))
    assert run("reconstruct", tmp_path / "b", "--task", "a", "--out", tmp_path / "ra", "-q").exit_code == 0
    np.testing.assert_array_equal(tensors(tmp_path / "ra")["model.embed_tokens.weight"],
                                  full.base["model.embed_tokens.weight"].astype(np.float32))  # fmt: skip
    env = merge_json(lora.base_path, *named(lora.paths), "--method", "rmm", "--out", tmp_path / "lb")
    up = [r for r in env["rows"] if r["module"] == "model.layers.0.mlp.up_proj.weight"]
    assert all(r["storage"] == pytest.approx(1.0) for r in up)
