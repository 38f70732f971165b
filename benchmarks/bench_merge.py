"""Speed / memory benchmark of ``spectra merge``: 4 LoRA adapters (r = 16, every linear module of the blocks) of
the 1 GB LLaMA-like checkpoint merged with ``tsv``, with ``rmm`` (a bundle), and with PEFT's
``add_weighted_adapter(combination_type="svd")``, in one run.

Run by hand (not in CI), from the repository root, with the project's venv::

    . .venv/bin/activate
    python -m fixtures.llama_like benchmarks/data/llama_like      # once (≈1 GB, bf16)
    python benchmarks/bench_merge.py                               # the real run
    python benchmarks/bench_merge.py --tiny                        # smoke test on a tiny LLaMA (seconds)

Inputs (generated once into benchmarks/data/merge_<case>/, git-ignored): ``a0…a3``, PEFT LoRA adapter folders
with r = 16, α = 32 on q/k/v/o/gate/up/down_proj of every layer; A ~ N(0, 1/in), B ~ N(0, 0.02²), one seed per
adapter, float32.

Each tool runs as its own subprocess, one after the other; wall time covers the whole process (start-up,
reading, writing the output) and peak RSS is the child's ``ru_maxrss``:
- ``spectra_tsv``: ``spectra merge BASE a0=… a1=… a2=… a3=… --method tsv --out DIR`` (writes a merged full
  checkpoint in the base's layout, bf16);
- ``spectra_rmm``: the same with ``--method rmm --basis P`` (writes a bundle; factors stay factored);
- ``peft_svd``: load the base with transformers (bf16), the four adapters with ``PeftModel``, then
  ``add_weighted_adapter(names, [1]*4, "merged", combination_type="svd")`` (PEFT densifies every ΔW and runs a
  full SVD per module), and save the merged adapter. The time of ``add_weighted_adapter`` alone is reported too.
Results go to benchmarks/results/merge.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_compare import timed  # noqa: E402  (one way to time a child process: wall + ru_maxrss)

DATA = ROOT / "benchmarks" / "data"
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PEFT = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
torch.set_grad_enabled(False)
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16)
pm = PeftModel.from_pretrained(model, names[0], adapter_name="a0")
for i, p in enumerate(names[1:], 1):
    pm.load_adapter(p, adapter_name=f"a{i}")
t1 = time.perf_counter()
pm.add_weighted_adapter([f"a{i}" for i in range(len(names))], [1.0] * len(names), "merged",
                        combination_type="svd")
t2 = time.perf_counter()
pm.save_pretrained(out, selected_adapters=["merged"])
print(json.dumps({"load_s": t1 - t0, "add_weighted_adapter_s": t2 - t1, "save_s": time.perf_counter() - t2}))
"""


def make_adapters(base: Path, out: Path, n: int, r: int) -> list[Path]:
    """n PEFT LoRA adapters on every block's linear modules of ``base`` (once; reused when present)."""
    from spectra_cli.checkpoint.matrices import Selection, select_matrices
    from spectra_cli.checkpoint.safetensors_io import write_safetensors
    from spectra_cli.checkpoint.source import open_checkpoint

    paths = [out / f"a{i}" for i in range(n)]
    if all((p / "adapter_model.safetensors").is_file() for p in paths):
        return paths
    shutil.rmtree(out, ignore_errors=True)
    specs, _ = select_matrices(open_checkpoint(base), Selection(kinds=TARGETS))
    specs = [s for s in specs if s.depth is not None]
    for i, folder in enumerate(paths):
        rng = np.random.default_rng(100 + i)
        tensors: dict[str, np.ndarray] = {}
        for s in specs:
            mod = s.tensor.name.removesuffix(".weight")
            m, k = s.shape
            tensors[f"base_model.model.{mod}.lora_A.weight"] = (
                rng.standard_normal((r, k)) / np.sqrt(k)
            ).astype(np.float32)
            tensors[f"base_model.model.{mod}.lora_B.weight"] = (rng.standard_normal((m, r)) * 0.02).astype(
                np.float32
            )
        folder.mkdir(parents=True)
        write_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
        cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(TARGETS), "bias": "none",
               "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "task_type": "CAUSAL_LM",
               "base_model_name_or_path": str(base), "lora_dropout": 0.0, "inference_mode": True,
               "rank_pattern": {}, "alpha_pattern": {}}  # fmt: skip
        (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return paths


TINY = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)).save_pretrained(sys.argv[1])
"""


def tiny_base(out: Path) -> Path:
    """A tiny LLaMA (hidden 32, 2 layers) written by transformers, so PEFT can load it too. Made in a child
    process: a parent that imported torch would inflate every later child's peak RSS (fork copies it)."""
    import subprocess

    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-c", TINY, str(out)], check=True, capture_output=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="smoke test on a tiny LLaMA instead of the 1 GB one")
    ap.add_argument("--base", type=Path, default=DATA / "llama_like")
    ap.add_argument("--n", type=int, default=4, help="number of adapters")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--basis", type=int, default=2, help="rmm basis size p")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tsv", "rmm", "peft"])
    args = ap.parse_args()
    case = "tiny" if args.tiny else "llama"
    if args.tiny:
        base = tiny_base(DATA / "merge_tiny" / "base")
        rank = min(args.rank, 4)
    else:
        base = args.base
        rank = args.rank
        if not (base / "config.json").is_file():
            raise SystemExit(f"{base}: generate it first: python -m fixtures.llama_like {base}")
    adapters = make_adapters(base, DATA / f"merge_{case}" / f"r{rank}", args.n, rank)
    named = [f"a{i}={p}" for i, p in enumerate(adapters)]
    res: dict[str, Any] = {
        "case": case, "base": str(base), "adapters": args.n, "rank": rank, "targets": list(TARGETS),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(dir=DATA) as tmp:
        spectra = [sys.executable, "-m", "spectra_cli", "merge", str(base), *named, "-f", "json", "-q"]
        if "tsv" not in args.skip:
            wall, rss, out = timed([*spectra, "--method", "tsv", "--out", f"{tmp}/tsv"])
            env = json.loads(out)
            res["spectra_tsv"] = {"wall_s": wall, "rss_mb": rss, "modules": env["summary"]["modules"],
                                  "core_s": env["summary"]["seconds"]}  # fmt: skip
        if "rmm" not in args.skip:
            wall, rss, out = timed(
                [*spectra, "--method", "rmm", "--basis", str(args.basis), "--out", f"{tmp}/rmm"]
            )
            s = json.loads(out)["summary"]
            res["spectra_rmm"] = {"wall_s": wall, "rss_mb": rss, "core_s": s["seconds"], "p": args.basis,
                                  "storage": s["storage"], "overall_error": s["overall_error"],
                                  "mean_rel_error": s["mean_rel_error"]}  # fmt: skip
        if "peft" not in args.skip:
            wall, rss, out = timed(
                [sys.executable, "-c", PEFT, str(base), f"{tmp}/peft", *map(str, adapters)]
            )
            res["peft_svd"] = {"wall_s": wall, "rss_mb": rss, **json.loads(out.strip().splitlines()[-1])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"merge_{case}.json").write_text(json.dumps(res, indent=2))
    print(f"| tool ({case}, {args.n} adapters, r = {rank}) | wall | peak RSS | notes |")
    print("| --- | ---: | ---: | --- |")
    for key, note in (("spectra_tsv", "merged full checkpoint written"),
                      ("spectra_rmm", f"bundle, p = {args.basis}"),
                      ("peft_svd", "add_weighted_adapter svd + save")):  # fmt: skip
        if key in res:
            r = res[key]
            extra = ""
            if key == "peft_svd":
                extra = f"; add_weighted_adapter {r['add_weighted_adapter_s']:.1f} s"
            if key == "spectra_rmm":
                extra = f"; storage {r['storage']:.3g}, error {r['overall_error']:.3g}"
            print(f"| {key} | {r['wall_s']:.1f} s | {r['rss_mb']:.0f} MB | {note}{extra} |")


if __name__ == "__main__":
    main()
