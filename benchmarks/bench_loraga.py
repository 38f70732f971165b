"""LoRA-GA's gradients: ``spectra capture --gradients`` + ``spectra init-adapter --method lora-ga`` against PEFT's
in-process path (``preprocess_loraga`` + ``get_peft_model(init_lora_weights="lora_ga")``), whole process each:
wall time and peak RSS, same model, same number of batches of the same size.

The model is a LLaMA-style causal LM built from a config (random weights, nothing downloaded; 8 layers,
hidden 1024, intermediate 2816, vocabulary 30522 so that MiniLM's tokenizer serves), written once to
``benchmarks/data/loraga_llama`` (git-ignored). Targets: every linear module of the blocks (q/k/v/o, gate/up/down).

    python benchmarks/bench_loraga.py [--batches 4] [--batch-size 4] [--max-length 128] [--rank 8] [--max-memory 64MB]

Run by hand on an idle machine; results in ``benchmarks/results/loraga.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data" / "loraga_llama"
KINDS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def build_model(out: Path) -> Path:
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spectra_cli.checkpoint.demo import demo_checkpoint

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=30522, max_position_embeddings=512)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(demo_checkpoint()) / f, out / f)
    return out


def texts(n: int) -> list[str]:
    import importlib

    out: list[str] = []
    for mod in ("argparse", "asyncio", "collections", "json", "logging", "pathlib", "subprocess", "typing"):
        doc = importlib.import_module(mod).__doc__ or ""
        out += [ln.strip() for ln in doc.splitlines() if len(ln.strip()) > 30]
    return (out * (n // max(len(out), 1) + 1))[:n]


def measure(cmd: list[str]) -> dict[str, Any]:
    """Wall time and peak RSS of one child process (run alone: RUSAGE_CHILDREN's max is per process)."""
    code = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
            "rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(json.dumps({'rc': rc, 'wall_s': time.perf_counter() - t, "
            "'rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=False)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    if got["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return dict(got)


def peft_worker(model: str, data: str, batches: int, batch_size: int, max_length: int, rank: int) -> None:
    import torch
    from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lines = Path(data).read_text().splitlines()
    net = AutoModelForCausalLM.from_pretrained(model)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=KINDS.split(","), init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig())  # fmt: skip

    def train_step() -> None:
        for b in range(batches):
            enc = tok(lines[b * batch_size:(b + 1) * batch_size], return_tensors="pt", padding=True,
                      truncation=True, max_length=max_length)  # fmt: skip
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            net(**enc, labels=labels).loss.backward()

    preprocess_loraga(net, cfg, train_step)
    peft_model = get_peft_model(net, cfg)
    with torch.no_grad():
        n = sum(p.numel() for n_, p in peft_model.named_parameters() if "lora_" in n_)
    print(f"PEFT LoRA-GA: {n} adapter parameters")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_peft":
        a = sys.argv[2:]
        peft_worker(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), int(a[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-memory", default="64MB", help="a second capture run with this gradient budget (streamed)")
    args = ap.parse_args()
    model = build_model(DATA)
    size_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "text.txt"
        data.write_text("\n".join(texts(args.batches * args.batch_size)) + "\n")
        spectra = [sys.executable, "-m", "spectra_cli"]
        cap = measure([*spectra, "capture", str(model), "--gradients", "--data", str(data), "--kinds", KINDS,
                       "--batches", str(args.batches), "--batch-size", str(args.batch_size), "--max-length",
                       str(args.max_length), "--out", f"{d}/grads", "-q"])  # fmt: skip
        small = measure([*spectra, "capture", str(model), "--gradients", "--data", str(data), "--kinds", KINDS,
                         "--batches", str(args.batches), "--batch-size", str(args.batch_size), "--max-length",
                         str(args.max_length), "--out", f"{d}/grads-small", "-q", "--max-memory", args.max_memory])  # fmt: skip
        init = measure([*spectra, "init-adapter", str(model), "--method", "lora-ga", "--gradients", f"{d}/grads",
                        "--rank", str(args.rank), "--kinds", KINDS, "--out", f"{d}/ga", "-q"])  # fmt: skip
        peft = measure([sys.executable, __file__, "_peft", str(model), str(data), str(args.batches),
                        str(args.batch_size), str(args.max_length), str(args.rank)])  # fmt: skip
    out = {"model_mb": round(size_mb, 1), **vars(args), "spectra_capture": cap, "spectra_capture_budget": small, "spectra_init": init,
           "spectra_total_s": cap["wall_s"] + init["wall_s"], "spectra_peak_rss_mb": max(cap["rss_mb"], init["rss_mb"]),
           "peft": peft, "load": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    res = ROOT / "benchmarks" / "results"
    res.mkdir(exist_ok=True)
    (res / "loraga.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
