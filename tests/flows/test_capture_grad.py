"""`spectra capture --gradients`: the streamed mean gradients against plain autograd, split in groups or not,
and the file feeding `init-adapter --method lora-ga` (whose base + adapter is the original model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from fixtures.capture_data import SENTENCES, text_file, tiny_llama, tiny_tokenizer
from spectra_cli.cli.app import app
from spectra_cli.flows.capture import CaptureOptions
from spectra_cli.flows.capture_grad import run_capture_gradients

runner = CliRunner()


def _read(folder: Path) -> dict[str, np.ndarray]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for name, shard in index["weight_map"].items():
        with safe_open(folder / shard, "np") as f:
            out[name] = f.get_tensor(name)
    return out


@pytest.mark.parametrize("budget", [0, None])  # 0: every module its own group (one pass each); None: one group
def test_gradients_equal_plain_autograd(tmp_path, budget):
    from transformers import LlamaForCausalLM

    model_dir = tiny_llama(tmp_path / "llama")
    data = text_file(tmp_path / "d.txt")
    out = tmp_path / "grads"
    s = run_capture_gradients(model_dir, data, out, CaptureOptions(kinds=("q_proj", "down_proj"), batch_size=4),
                              batches=2, max_memory_mb=budget)  # fmt: skip
    assert s.modules == 4 and s.batches == 2 and s.groups == (4 if budget == 0 else 1)
    got = _read(out)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    model.train()
    tok = tiny_tokenizer()
    for chunk in (SENTENCES[:4], SENTENCES[4:8]):
        enc = tok(chunk, return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss.backward()
    for n, m in model.named_modules():
        if n.split(".")[-1] in ("q_proj", "down_proj"):
            np.testing.assert_allclose(got[f"{n}.weight"], (m.weight.grad / 2).numpy(), rtol=1e-4, atol=1e-7)
    assert not any(k.endswith("k_proj.weight") for k in got)


def test_cli_gradients_feed_lora_ga(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model_dir = tiny_llama(tmp_path / "llama")
    data = text_file(tmp_path / "d.txt")
    r = runner.invoke(app, ["capture", str(model_dir), "--data", str(data), "--gradients", "--batches", "2",
                            "--kinds", "v_proj", "--out", str(tmp_path / "g"), "-q"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["init-adapter", str(model_dir), "--method", "lora-ga", "--gradients", str(tmp_path / "g"),
                            "--rank", "2", "--kinds", "v_proj", "--out", str(tmp_path / "ga"), "-q"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    ids = torch.randint(4, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = LlamaForCausalLM.from_pretrained(model_dir).eval()(input_ids=ids).logits
        base = LlamaForCausalLM.from_pretrained(tmp_path / "ga" / "residual").eval()
        got = PeftModel.from_pretrained(base, tmp_path / "ga" / "adapter").eval()(input_ids=ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    r = runner.invoke(app, ["capture", str(model_dir), "--data", str(data), "--gradients", "--kinds", "v_proj",
                            "--out", str(tmp_path / "g"), "-q"])  # fmt: skip
    assert r.exit_code != 0  # an existing folder is refused, never overwritten
