"""`spectra align`: on tiny transformers built from configs (BERT, LLaMA with grouped-query attention, GPT-2,
random weights, two seeds) the permuted B computes B's outputs (to 1e-5, run by transformers), comes closer to
A, and keeps B's names, dtypes and side files; a planted permutation (B = permuted A + small noise, the
permutation built here with torch) is recovered exactly and its singular vectors then agree with A's; mismatched
inputs are refused with one line."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from spectra_cli.cli.app import app
from spectra_cli.errors import SelectionError, ShapeMismatch, SpectraError
from spectra_cli.flows.align import AlignOptions, run_align

transformers = pytest.importorskip("transformers")
runner = CliRunner()

DH = 8  # head size of every model here


def model(kind: str, seed: int, hidden: int = 32) -> Any:
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=hidden // DH,
                                      intermediate_size=48, max_position_embeddings=32)  # fmt: skip
        return transformers.BertModel(cfg).float().eval()
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=hidden // DH, num_key_value_heads=hidden // DH // 2,
                                       max_position_embeddings=32, tie_word_embeddings=False)  # fmt: skip
        return transformers.LlamaForCausalLM(cfg).float().eval()
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=hidden, n_layer=2, n_head=hidden // DH, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).float().eval()


def save(m: Any, path: Path) -> Path:
    m.save_pretrained(path, safe_serialization=True)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 32}\n')
    return path


def outputs(m: Any) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


KINDS = ["bert", "llama", "gpt2"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Any]]:
    root = tmp_path_factory.mktemp("align")
    out = {}
    for kind in KINDS:
        b = model(kind, 1)
        out[kind] = (save(model(kind, 0), root / f"{kind}-a"), save(b, root / f"{kind}-b"), b)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_permuted_b_computes_b_and_is_closer_to_a(pairs, kind, tmp_path):
    a, b, b_model = pairs[kind]
    res = run_align(a, b, tmp_path / "out")
    s = res.summary
    assert s.architecture == kind and s.layers == 2 and s.converged and s.sweeps == 2
    c = type(b_model).from_pretrained(tmp_path / "out").eval()
    ref = outputs(b_model)
    torch.testing.assert_close(outputs(c), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert s.mlp_units_moved > 0.5  # two random inits: almost every unit moves
    # ‖A − P(B)‖ < ‖A − B‖, recomputed here from the files
    from safetensors.numpy import load_file

    ta, tb, tc = (load_file(p / "model.safetensors") for p in (a, b, tmp_path / "out"))
    assert set(tc) == set(tb) and all(tc[n].dtype == tb[n].dtype and tc[n].shape == tb[n].shape for n in tb)
    moved = [n for n in tb if not np.array_equal(tb[n], tc[n])]
    assert moved and all(".h." in n or "layer" in n for n in moved)  # embeddings, norms, heads untouched

    def dist(x: dict[str, np.ndarray]) -> float:
        return float(np.sqrt(sum(np.sum((ta[n] - x[n]) ** 2) for n in moved)))

    assert dist(tc) < dist(tb)
    assert s.rel_distance_after < s.rel_distance_before
    for r in res.rows:
        assert r["rel_distance_after"] <= r["rel_distance_before"] + 1e-9 or r["role"] in ("q", "k", "v", "o")
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "tokenizer_config.json").is_file()
    record = json.loads((tmp_path / "out" / "spectra_run.json").read_text())
    assert record["command"] == "align" and len(record["permutations"]) == 2


def _plant(m: Any, kind: str, seed: int) -> dict[str, np.ndarray]:
    """Permute m's MLP units and heads (and head dimensions where allowed) in place; returns per layer the MLP
    permutation. Indices are built here, in torch terms, independently of spectra."""
    g = torch.Generator().manual_seed(seed)
    perms = {}
    sd = m.state_dict()
    with torch.no_grad():
        for i in range(2):
            if kind == "bert":
                pre = f"encoder.layer.{i}."
                ins, ins_b, outs = [pre + "intermediate.dense.weight"], [pre + "intermediate.dense.bias"], [pre + "output.dense.weight"]
            elif kind == "llama":
                pre = f"model.layers.{i}."
                ins, ins_b, outs = [pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"], [], [pre + "mlp.down_proj.weight"]
            else:
                pre = f"transformer.h.{i}."
                ins, ins_b, outs = [], [pre + "mlp.c_fc.bias"], [pre + "mlp.c_fc.weight"]  # Conv1D: in×out
                ins_b.append(None)
            n = sd[ins[0]].shape[0] if ins else sd[ins_b[0]].shape[0]
            pi = torch.randperm(n, generator=g)
            perms[i] = pi.numpy()
            for name in ins:
                sd[name].copy_(sd[name][pi])
            for name in ins_b:
                if name is not None:
                    sd[name].copy_(sd[name][pi])
            for name in outs:
                sd[name].copy_(sd[name][:, pi])
            if kind == "gpt2":
                w = sd[pre + "mlp.c_proj.weight"]
                w.copy_(w[pi])
            _plant_heads(sd, kind, pre, g)
    return perms


def _plant_heads(sd: dict[str, torch.Tensor], kind: str, pre: str, g: torch.Generator) -> None:
    if kind == "bert":
        h = sd[pre + "attention.self.query.weight"].shape[0]
        heads = h // DH
        sigma = torch.randperm(heads, generator=g)
        rho = [torch.randperm(DH, generator=g) for _ in range(heads)]
        tau = [torch.randperm(DH, generator=g) for _ in range(heads)]
        qk = torch.cat([sigma[j] * DH + rho[j] for j in range(heads)])
        vo = torch.cat([sigma[j] * DH + tau[j] for j in range(heads)])
        for n in ("query", "key"):
            for p in ("weight", "bias"):
                t = sd[f"{pre}attention.self.{n}.{p}"]
                t.copy_(t[qk])
        for p in ("weight", "bias"):
            t = sd[f"{pre}attention.self.value.{p}"]
            t.copy_(t[vo])
        t = sd[pre + "attention.output.dense.weight"]
        t.copy_(t[:, vo])
    elif kind == "llama":  # grouped-query: move the key/value groups, reorder the queries inside each
        kv = sd[pre + "self_attn.k_proj.weight"].shape[0] // DH
        grp = sd[pre + "self_attn.q_proj.weight"].shape[0] // DH // kv
        groups = torch.randperm(kv, generator=g)
        tau = [torch.randperm(DH, generator=g) for _ in range(kv)]
        inner = [torch.randperm(grp, generator=g) for _ in range(kv)]
        k_idx = torch.cat([groups[j] * DH + torch.arange(DH) for j in range(kv)])
        v_idx = torch.cat([groups[j] * DH + tau[j] for j in range(kv)])
        q_idx = torch.cat([(groups[j] * grp + inner[j][a]) * DH + torch.arange(DH) for j in range(kv) for a in range(grp)])
        o_idx = torch.cat([(groups[j] * grp + inner[j][a]) * DH + tau[j] for j in range(kv) for a in range(grp)])
        for n, idx in (("q", q_idx), ("k", k_idx), ("v", v_idx)):
            t = sd[f"{pre}self_attn.{n}_proj.weight"]
            t.copy_(t[idx])
        t = sd[pre + "self_attn.o_proj.weight"]
        t.copy_(t[:, o_idx])
    else:  # GPT-2: c_attn is in × [q | k | v] (Conv1D)
        w, bias = sd[pre + "attn.c_attn.weight"], sd[pre + "attn.c_attn.bias"]
        h = w.shape[0]
        heads = h // DH
        sigma = torch.randperm(heads, generator=g)
        rho = [torch.randperm(DH, generator=g) for _ in range(heads)]
        tau = [torch.randperm(DH, generator=g) for _ in range(heads)]
        qk = torch.cat([sigma[j] * DH + rho[j] for j in range(heads)])
        vo = torch.cat([sigma[j] * DH + tau[j] for j in range(heads)])
        cols = torch.cat([qk, h + qk, 2 * h + vo])
        w.copy_(w[:, cols])
        bias.copy_(bias[cols])
        t = sd[pre + "attn.c_proj.weight"]
        t.copy_(t[vo])


@pytest.mark.parametrize("kind", KINDS)
def test_planted_permutation_is_recovered_exactly(kind, tmp_path):
    a_model = model(kind, 0, hidden=48)
    if kind == "llama":  # LLaMA's init is N(0, 0.02²) for every matrix: spread the spectra so σ are distinct
        with torch.no_grad():
            for p in a_model.parameters():
                if p.ndim == 2:
                    p.normal_(0.0, 0.2)
    a = save(a_model, tmp_path / "a")
    b_model = model(kind, 0, hidden=48)
    b_model.load_state_dict(a_model.state_dict())
    planted = _plant(b_model, kind, seed=5)
    torch.testing.assert_close(outputs(b_model), outputs(a_model), rtol=1e-4, atol=1e-5)  # the plant keeps the function
    with torch.no_grad():
        gen = torch.Generator().manual_seed(9)
        for p in b_model.parameters():
            p.add_(1e-5 * torch.randn(p.shape, generator=gen))
    b = save(b_model, tmp_path / "b")
    res = run_align(a, b, tmp_path / "out", AlignOptions(top_k=6))
    s = res.summary
    for i, p in enumerate(res.matching.perms):
        assert p.mlp.tolist() == np.argsort(planted[i]).tolist()
    assert s.rel_distance_before > 0.5 and s.rel_distance_after < 1e-3
    assert s.agreement_after > 0.99 and s.overlap_after > 0.99
    assert min(s.agreement_by_index_after) > 0.98
    assert s.agreement_before < 0.9
    assert all(r["agreement_after"] > 0.95 for r in res.rows)


def test_mismatched_inputs_are_refused_with_one_line(pairs, tmp_path):
    bert_a, _, _ = pairs["bert"]
    llama_a, _, _ = pairs["llama"]
    with pytest.raises(ShapeMismatch, match="A is a bert model and B a llama model"):
        run_align(bert_a, llama_a, tmp_path / "o1")
    wide = save(model("bert", 3, hidden=48), tmp_path / "wide")
    with pytest.raises(ShapeMismatch, match=r"\[48, 32\] in A but \[48, 48\] in B|in A but .* in B"):
        run_align(bert_a, wide, tmp_path / "o2")
    from safetensors.numpy import save_file

    save_file({"conv.weight": np.ones((3, 3), np.float32)}, tmp_path / "odd.safetensors")
    with pytest.raises(SelectionError, match=r"unknown architecture.*supported: BERT"):
        run_align(tmp_path / "odd.safetensors", tmp_path / "odd.safetensors", tmp_path / "o3")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    with pytest.raises(SpectraError, match="--max-iter 0"):
        AlignOptions(max_iter=0)


def test_a_bare_safetensors_file_needs_heads(pairs, tmp_path):
    a, b, _ = pairs["bert"]
    with pytest.raises(SelectionError, match="pass --heads N"):
        run_align(a / "model.safetensors", b / "model.safetensors", tmp_path / "o")
    with pytest.raises(ShapeMismatch, match="not a multiple of 5 heads"):
        run_align(a / "model.safetensors", b / "model.safetensors", tmp_path / "o", AlignOptions(heads=5))
    res = run_align(a / "model.safetensors", b / "model.safetensors", tmp_path / "o", AlignOptions(heads=4))
    assert res.summary.heads == 4


def test_cli_json_html_plots_and_errors(pairs, tmp_path):
    a, b, _ = pairs["gpt2"]
    r = runner.invoke(app, ["align", str(a), str(b), "--out", str(tmp_path / "o"), "-f", "json", "-q", "--html",
                            str(tmp_path / "r.html"), "--plots", str(tmp_path / "plots"), "-k", "4"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    env = json.loads(r.stdout)
    assert env["command"] == "align" and env["summary"]["top_k"] == 4 and len(env["rows"]) == 2 * 6
    assert {row["role"] for row in env["rows"]} == {"q", "k", "v", "o", "mlp_in", "mlp_out"}
    assert (tmp_path / "plots" / "agreement.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "r.html").read_text()
    assert "agreement" in page and "data:image/png" in page
    r = runner.invoke(app, ["align", str(a), str(pairs["bert"][0]), "--out", str(tmp_path / "o2")])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "A is a gpt2 model and B a bert model" in r.stderr
    r = runner.invoke(app, ["align", str(a), str(b), "--out", str(tmp_path / "o3"), "--top-k", "0"])
    assert r.exit_code == 2 and "--top-k 0" in r.stderr
    r = runner.invoke(app, ["align", "--help"])
    assert r.exit_code == 0 and "spectra align seed0/ seed1/ --out seed1-aligned/" in r.stdout
    r = runner.invoke(app, ["align", str(a), str(b), "--out", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 1 and "already exists" in r.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_residual_permutation_keeps_logits_and_permutes_hidden_states(pairs, kind, tmp_path):
    a, b, b_model = pairs[kind]
    res = run_align(a, b, tmp_path / "out", AlignOptions(residual=True, max_iter=4))
    r = res.matching.residual
    assert r is not None and sorted(r.tolist()) == list(range(32)) and (r != np.arange(32)).any()
    assert res.summary.residual_permuted and res.summary.rel_distance_after < res.summary.rel_distance_before
    c = type(b_model).from_pretrained(tmp_path / "out").eval()
    ref = outputs(b_model)
    got = outputs(c)
    if kind == "bert":  # a headless encoder returns the hidden states: permuted by r; the pooler's output is not
        got = got[..., np.argsort(r)]
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(c(ids).pooler_output, b_model(ids).pooler_output, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    obj = res.matching.objective
    assert all(y >= x - 1e-9 * abs(x) for x, y in itertools.pairwise(obj))


def test_planted_residual_permutation_is_recovered(tmp_path):
    """GPT-2 with its residual stream permuted (every tensor that reads or writes it, listed here) on top of
    planted MLP and head permutations: --residual recovers all of them."""
    a_model = model("gpt2", 0, hidden=48)
    a = save(a_model, tmp_path / "a")
    b_model = model("gpt2", 0, hidden=48)
    b_model.load_state_dict(a_model.state_dict())
    planted = _plant(b_model, "gpt2", seed=5)
    pi = torch.randperm(48, generator=torch.Generator().manual_seed(11))
    sd = b_model.state_dict()
    with torch.no_grad():
        for name, t in sd.items():
            if name.endswith(("wte.weight", "wpe.weight")):
                t.copy_(t[:, pi])
            elif ".ln_" in name or "ln_f" in name or name.endswith(
                ("attn.c_proj.bias", "mlp.c_proj.bias", "attn.c_attn.weight", "mlp.c_fc.weight")
            ):  # norms, the output biases, and Conv1D (in×out) inputs: their rows
                t.copy_(t[pi])
            elif name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):  # columns write it
                t.copy_(t[:, pi])
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b_model(ids).logits, a_model(ids).logits, rtol=1e-4, atol=1e-5)
    b = save(b_model, tmp_path / "b")
    res = run_align(a, b, tmp_path / "out", AlignOptions(residual=True, top_k=6))
    assert res.matching.residual.tolist() == np.argsort(pi.numpy()).tolist()
    for i, p in enumerate(res.matching.perms):
        assert p.mlp.tolist() == np.argsort(planted[i]).tolist()
    assert res.summary.rel_distance_after < 1e-6 and res.summary.agreement_after > 0.999
    assert all(r["residual_agreement_after"] > 0.999 for r in res.rows)


def test_residual_refuses_a_tensor_it_cannot_place(pairs, tmp_path):
    from safetensors.numpy import load_file, save_file

    a, b, _ = pairs["bert"]
    for src, dst in ((a, tmp_path / "a"), (b, tmp_path / "b")):
        dst.mkdir()
        t = load_file(src / "model.safetensors")
        t["classifier.weight"] = np.ones((2, 32), np.float32)
        save_file(t, dst / "model.safetensors")
        (dst / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(SelectionError, match=r"--residual: classifier\.weight is not a tensor align knows"):
        run_align(tmp_path / "a", tmp_path / "b", tmp_path / "o", AlignOptions(residual=True))
    assert run_align(tmp_path / "a", tmp_path / "b", tmp_path / "o").summary.residual_permuted is False


def test_bfloat16_b_keeps_its_dtype_and_values(pairs, tmp_path):
    """A bfloat16 B: the output is bfloat16 and each permuted tensor holds exactly B's values, reordered."""
    from safetensors import safe_open

    a, _, _ = pairs["llama"]
    b_model = model("llama", 1).to(torch.bfloat16)
    b = save(b_model, tmp_path / "b16")
    run_align(a, b, tmp_path / "out")
    with safe_open(b / "model.safetensors", "pt") as fb, safe_open(tmp_path / "out" / "model.safetensors", "pt") as fo:
        assert set(fb.keys()) == set(fo.keys())
        changed = 0
        for name in fb.keys():  # noqa: SIM118 (safe_open has no __iter__)
            x, y = fb.get_tensor(name), fo.get_tensor(name)
            assert y.dtype == torch.bfloat16 and y.shape == x.shape
            assert torch.equal(x.flatten().sort().values, y.flatten().sort().values), name
            changed += int(not torch.equal(x, y))
    assert changed > 0


def test_no_within_head_keeps_every_head_dimension_in_place(pairs, tmp_path):
    a, b, _ = pairs["bert"]
    res = run_align(a, b, tmp_path / "out", AlignOptions(within_head=False))
    for p in res.matching.perms:
        assert (p.heads.qk == np.arange(DH)).all() and (p.heads.vo == np.arange(DH)).all()
    assert not res.summary.qk_dims_permuted and not res.summary.vo_dims_permuted
    r = runner.invoke(app, ["align", str(a), str(b), "--out", str(tmp_path / "o2"), "--no-within-head", "-q"])
    assert r.exit_code == 0 and "no dimensions inside a head" in r.stdout
