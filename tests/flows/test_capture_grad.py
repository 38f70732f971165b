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

from fixtures.capture_data import (
    SENTENCES,
    text_file,
    tiny_bert_mlm,
    tiny_llama,
    tiny_mlm_tokenizer,
    tiny_tokenizer,
)
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


# ---- masked LMs: BERT's masking, the collator's draws ---------------------------------------------------------


@pytest.mark.parametrize("budget", [0, None])
def test_masked_lm_gradients_equal_a_plain_loop_with_the_collators_masks(tmp_path, budget):
    """The reference: transformers' DataCollatorForLanguageModeling (15%, 80/10/10) with the same seed over the
    same batches, BertForMaskedLM's loss, plain autograd, the mean over batches."""
    from transformers import BertForMaskedLM, DataCollatorForLanguageModeling

    model_dir = tiny_bert_mlm(tmp_path / "bert")
    data = text_file(tmp_path / "d.txt", repeat=2)
    kinds = ("query", "intermediate.dense")
    s = run_capture_gradients(model_dir, data, tmp_path / "g", CaptureOptions(kinds=kinds, batch_size=6),
                              batches=3, max_memory_mb=budget, seed=7)  # fmt: skip
    assert (s.loss, s.modules, s.batches) == ("masked-lm", 4, 3)
    got = _read(tmp_path / "g")
    tok = tiny_mlm_tokenizer()
    collator = DataCollatorForLanguageModeling(tok, seed=7)  # 15%, 80% [MASK], 10% random: the defaults
    model = BertForMaskedLM.from_pretrained(model_dir)
    model.train()
    texts = SENTENCES * 2
    targets = 0
    for b in range(3):
        batch = collator([tok(t) for t in texts[6 * b : 6 * b + 6]])
        n = int((batch["labels"] != -100).sum())
        assert n > 0  # every batch has targets, so none is skipped on either side
        targets += n
        model(**batch).loss.backward()
    assert s.tokens == targets
    checked = 0
    for n, m in model.named_modules():
        if n.endswith(("attention.self.query", "intermediate.dense")):
            np.testing.assert_allclose(got[f"{n}.weight"], (m.weight.grad / 3).numpy(), rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == 4 and len(got) == 4


def test_the_masking_follows_berts_recipe():
    """Independent of the collator: 15% of the non-special tokens are targets, never a special one; of the
    targets ~80% become [MASK], ~10% a random id, ~10% stay."""
    from spectra_cli.flows.capture_grad import mask_tokens

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (200, 500), generator=torch.Generator().manual_seed(1))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -50:] = True  # [CLS] and padding
    inputs, labels = mask_tokens(ids, special, mask_id=5, vocab=1000, generator=g)
    target = labels != -100
    assert not target[special].any()
    assert (labels[target] == ids[target]).all()  # a label is the original token
    assert (inputs[~target] == ids[~target]).all()  # non-targets are untouched
    frac = target.sum() / (~special).sum()
    assert abs(float(frac) - 0.15) < 0.005
    n = int(target.sum())
    masked = int((inputs[target] == 5).sum()) / n
    kept = int((inputs[target] == ids[target]).sum()) / n
    # ~13,500 targets: a binomial proportion's standard deviation is below 0.0035, so 0.02 is ~6σ
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(1 - masked - kept - 0.1) < 0.02


def test_a_model_without_an_lm_head_is_refused(tmp_path):
    from spectra_cli.errors import SpectraError

    model_dir = tiny_bert_mlm(tmp_path / "enc", head=False)  # BertModel: the encoder alone
    with pytest.raises(SpectraError, match=r"architectures is BertModel, neither a causal LM \(…ForCausalLM\) nor "
                                           r"a masked LM \(…ForMaskedLM\).*e\.g\. BertForMaskedLM"):  # fmt: skip
        run_capture_gradients(model_dir, text_file(tmp_path / "d.txt"), tmp_path / "g", CaptureOptions(kinds=("query",)))
    assert not (tmp_path / "g").exists() and not (tmp_path / "g.partial").exists()


def test_cli_masked_lm_gradients_feed_lora_ga_that_peft_loads(tmp_path):
    from peft import PeftModel
    from transformers import BertForMaskedLM

    model_dir = tiny_bert_mlm(tmp_path / "bert")
    data = text_file(tmp_path / "d.txt", repeat=2)
    r = runner.invoke(app, ["capture", str(model_dir), "--data", str(data), "--gradients", "--batches", "2",
                            "--seed", "3", "--kinds", "query,value", "--out", str(tmp_path / "g")])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "of the masked-lm loss (2 batches," in r.stderr and "masked tokens" in r.stderr
    meta = json.loads((tmp_path / "g" / "model.safetensors.index.json").read_text())["metadata"]
    assert (meta["loss"], meta["seed"], meta["mlm_probability"]) == ("masked-lm", 3, 0.15)
    r = runner.invoke(app, ["init-adapter", str(model_dir), "--method", "lora-ga", "--gradients", str(tmp_path / "g"),
                            "--rank", "2", "--kinds", "query,value", "--out", str(tmp_path / "ga"), "-q"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    ids = torch.randint(4, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = BertForMaskedLM.from_pretrained(model_dir).eval()(input_ids=ids).logits
        base = BertForMaskedLM.from_pretrained(tmp_path / "ga" / "residual").eval()
        peft = PeftModel.from_pretrained(base, tmp_path / "ga" / "adapter").eval()
        got = peft(input_ids=ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    lora = [n for n, _ in peft.named_parameters() if "lora_A" in n]
    assert len(lora) == 4  # query and value in both layers carry the adapter


def test_fewer_batches_than_asked_are_said(tmp_path):
    model_dir = tiny_llama(tmp_path / "llama")
    data = text_file(tmp_path / "d.txt")  # 12 lines: 3 batches of 4
    r = runner.invoke(app, ["capture", str(model_dir), "--data", str(data), "--gradients", "--batches", "5",
                            "--batch-size", "4", "--kinds", "v_proj", "--out", str(tmp_path / "g")])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "only 3 of the 5 batches were used: the data ran out\n" in r.stderr
    assert "wrote 2 gradients of the causal-lm loss (3 batches," in r.stderr
