"""Build the inputs of the README's examples on the real all-MiniLM-L6-v2 checkpoint (run by scripts/examples.sh).

Writes into OUT (default ``examples-output/inputs``):

- ``sentences.txt``: 600 sentences, the first lines of Python standard-library docstrings (deterministic);
- ``lora-a``, ``lora-b``, ``lora-c``: PEFT LoRA adapters (r = 8, α = 16) on MiniLM's query/value, with random
  factors of a realistic size (‖s·B·A‖ ≈ 5% of ‖W‖), standing in for three fine-tunes of one base;
- ``lora-broken``: the same with a much larger update and a NaN in one factor, for the CI gate example;
- ``layer0.npy`` … ``layer6.npy``: mean-pooled hidden states of MiniLM after the embeddings (0) and after blocks
  2, 4 and 6 for the sentences (float32, 600 × 384), for ``spectra rankme``;
- ``minilm-planted``: MiniLM with every layer's 1536 MLP units and 12 attention heads shuffled at random (a model
  that computes exactly MiniLM's function) plus noise of 1e-4, for ``spectra align``;
- ``run/checkpoint-{250,500,750,1000}``: a training run's output folder for ``spectra track``: MiniLM plus a
  rank-1 update of the query and value projections of layers 2 and 3 that grows with the step (c·σ₁·u·vᵀ with
  c = step/500 and random unit u, v), so intruder dimensions appear part-way through.

Random factors stand in for trained ones; nothing here is downloaded.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.checkpoints import lora_adapter  # noqa: E402
from spectra_cli.checkpoint.demo import demo_checkpoint  # noqa: E402
from spectra_cli.checkpoint.source import open_checkpoint  # noqa: E402
from spectra_cli.checkpoint.tensors import to_float  # noqa: E402

STDLIB = (
    "abc", "argparse", "array", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib",
    "copy", "csv", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "gzip", "hashlib",
    "heapq", "hmac", "html", "inspect", "io", "ipaddress", "itertools", "json", "logging", "math",
    "mimetypes", "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "shutil",
    "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "typing", "unittest", "uuid", "warnings", "weakref", "zipfile", "zlib",
)


def sentences(n: int = 600) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for mod in STDLIB:
        if len(out) >= n:
            break
        module = importlib.import_module(mod)
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name, None), "__doc__", None)
            if not isinstance(doc, str):
                continue
            line = doc.strip().split("\n")[0].strip()
            if 20 <= len(line) <= 200 and line not in seen:
                seen.add(line)
                out.append(line)
            if len(out) >= n:
                break
    return out


def adapters(out: Path, model: Path) -> None:
    ckpt = open_checkpoint(model)
    names = [t.name for t in ckpt.tensors if t.name.endswith(("query.weight", "value.weight"))]
    weights = {n[: -len(".weight")]: to_float(ckpt.read(ckpt.info(n))) for n in names}
    r, alpha = 8, 16.0
    s = alpha / r
    for i, name in enumerate(("lora-a", "lora-b", "lora-c", "lora-broken")):
        rng = np.random.default_rng(100 + i)
        factors = {}
        for module, w in weights.items():
            out_f, in_f = w.shape
            a = rng.standard_normal((r, in_f)) / np.sqrt(in_f)
            b = rng.standard_normal((out_f, r))
            target = (0.05 if name != "lora-broken" else 1.5) * np.linalg.norm(w)
            b *= target / (s * np.linalg.norm(b @ a))
            if name == "lora-broken" and module.endswith("layer.3.attention.self.value"):
                b[0, 0] = np.nan
            factors[module] = (a.astype(np.float32), b.astype(np.float32))
        lora_adapter(out / name, factors, r=r, alpha=alpha, base_model_name_or_path=str(model))


def layer_embeddings(out: Path, model: Path, texts: list[str]) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    net = AutoModel.from_pretrained(model).eval()
    pooled: dict[int, list[np.ndarray]] = {i: [] for i in (0, 2, 4, 6)}
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            batch = tok(texts[i : i + 64], padding=True, truncation=True, return_tensors="pt")
            hidden = net(**batch, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].unsqueeze(-1).float()
            for layer in pooled:
                pooled[layer].append(((hidden[layer] * mask).sum(1) / mask.sum(1)).numpy())
    for layer, parts in pooled.items():
        np.save(out / f"layer{layer}.npy", np.concatenate(parts).astype(np.float32))


def planted(out: Path, model: Path, heads: int = 12, noise: float = 1e-4) -> None:
    import shutil

    from safetensors.numpy import load_file, save_file

    w = load_file(str(model / "model.safetensors"))
    rng = np.random.default_rng(7)
    layers = sorted({int(k.split(".")[2]) for k in w if k.startswith("encoder.layer.")})
    for i in layers:
        pre = f"encoder.layer.{i}."
        units = rng.permutation(w[pre + "intermediate.dense.weight"].shape[0])
        w[pre + "intermediate.dense.weight"] = w[pre + "intermediate.dense.weight"][units]
        w[pre + "intermediate.dense.bias"] = w[pre + "intermediate.dense.bias"][units]
        w[pre + "output.dense.weight"] = w[pre + "output.dense.weight"][:, units]
        d = w[pre + "attention.self.query.weight"].shape[0] // heads
        rows = (rng.permutation(heads)[:, None] * d + np.arange(d)).ravel()
        for m in ("query", "key", "value"):
            for part in ("weight", "bias"):
                w[f"{pre}attention.self.{m}.{part}"] = w[f"{pre}attention.self.{m}.{part}"][rows]
        w[pre + "attention.output.dense.weight"] = w[pre + "attention.output.dense.weight"][:, rows]
    for k, v in w.items():
        w[k] = np.ascontiguousarray(v + noise * rng.standard_normal(v.shape).astype(v.dtype))
    dest = out / "minilm-planted"
    dest.mkdir(parents=True, exist_ok=True)
    save_file(w, str(dest / "model.safetensors"))
    for side in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model / side).exists():
            shutil.copy(model / side, dest / side)


def run(out: Path, model: Path, steps: tuple[int, ...] = (250, 500, 750, 1000)) -> None:
    import shutil

    from safetensors.numpy import load_file, save_file

    base = load_file(str(model / "model.safetensors"))
    rng = np.random.default_rng(11)
    targets = [f"encoder.layer.{i}.attention.self.{m}.weight" for i in (2, 3) for m in ("query", "value")]
    directions = {}
    for name in targets:
        m, n = base[name].shape
        u, v = rng.standard_normal(m), rng.standard_normal(n)
        sigma1 = float(np.linalg.norm(base[name].astype(np.float64), 2))
        directions[name] = sigma1 * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    for step in steps:
        dest = out / "run" / f"checkpoint-{step}"
        dest.mkdir(parents=True, exist_ok=True)
        w = dict(base)
        for name, d in directions.items():
            w[name] = (base[name] + (step / 500) * d).astype(base[name].dtype)
        save_file(w, str(dest / "model.safetensors"))
        shutil.copy(model / "config.json", dest / "config.json")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "examples-output/inputs")
    out.mkdir(parents=True, exist_ok=True)
    texts = sentences()
    (out / "sentences.txt").write_text("\n".join(texts) + "\n")
    adapters(out, demo_checkpoint())
    layer_embeddings(out, demo_checkpoint(), texts)
    planted(out, demo_checkpoint())
    run(out, demo_checkpoint())
    print(out)


if __name__ == "__main__":
    main()
