"""``spectra capture --gradients``: each selected weight's gradient of the causal-LM loss, averaged over
``batches`` batches of the data, for ``init-adapter --method lora-ga``.

Streamed: the target weights are split into groups whose float32 gradients fit ``max_memory_mb``; for each
group only its weights require a gradient, the model runs forward and backward over the same ``batches``
batches, the group's mean gradients (sum over batches / batches, as PEFT's ``preprocess_loraga`` averages by the
number of backward passes) are written as one shard of the output folder and freed. So at most one group's
gradients are in memory (the price: one pass over the batches per group). The folder is a sharded safetensors
checkpoint laid out like the model — each gradient under its weight's tensor name (``<module>.weight``),
``model.safetensors.index.json`` mapping names to shards — so ``init-adapter --gradients`` reads it as it reads a
model. The loss is the causal-LM loss with labels = input ids, padding masked (−100): the model's
``architectures`` class must have an LM head that takes ``labels``.
"""

from __future__ import annotations

import inspect
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from spectra_cli.checkpoint.safetensors_io import write_safetensors
from spectra_cli.checkpoint.text import iter_texts
from spectra_cli.errors import SpectraError
from spectra_cli.flows.capture import CaptureOptions, plan_capture


@dataclass(frozen=True)
class GradientSummary:
    """Modules whose gradients were written, batches and tokens per pass, groups (passes over the data), the
    output folder, seconds and peak RSS."""

    modules: int
    batches: int
    tokens: int
    groups: int
    out: str
    seconds: float
    peak_rss_mb: float


def _groups(sizes: dict[str, int], budget: int) -> list[list[str]]:
    """Consecutive modules packed into groups of at most ``budget`` bytes (a bigger module is its own group)."""
    groups: list[list[str]] = []
    used = 0
    for name, size in sizes.items():
        if not groups or used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def run_capture_gradients(model_dir: Path, data: Path, out: Path, opts: CaptureOptions, batches: int = 1,
                          max_memory_mb: int | None = None,
                          progress: Callable[[int, int, str], None] | None = None) -> GradientSummary:  # fmt: skip
    """Write the mean gradients of the selected weights to the folder ``out`` (see the module's docstring)."""
    import resource

    import torch

    if batches < 1:
        raise SpectraError(f"--batches {batches}: at least one batch is needed")
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists():
        raise SpectraError(f"{out}: already exists; choose a new folder for the gradients")
    p = plan_capture(model_dir, data, out, replace(opts, stats="covariance"))
    model = p.model
    accepted = set(inspect.signature(model.forward).parameters)
    if "labels" not in accepted:
        raise SpectraError(f"{model_dir}: the model class has no language-model head taking labels; gradients "
                           "need a causal LM (config.json's architectures, e.g. LlamaForCausalLM)")  # fmt: skip
    texts = iter_texts(data, opts.text_field)
    feeds: list[dict[str, Any]] = []
    tokens = 0
    for _ in range(batches):
        chunk = [t for _, t in zip(range(opts.batch_size), texts, strict=False)]
        if not chunk:
            break
        enc = p.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=opts.max_length)
        feed = {k: v.to(p.device) for k, v in enc.items() if k in accepted}
        labels = feed["input_ids"].clone()
        if "attention_mask" in feed:
            labels[feed["attention_mask"] == 0] = -100
        feed["labels"] = labels
        tokens += int((labels != -100).sum())
        feeds.append(feed)
    if not feeds:
        raise SpectraError(f"{data}: no examples")
    params = {name: model.get_submodule(name).weight for name in p.names}
    sizes = {name: w.numel() * 4 for name, w in params.items()}
    groups = _groups(sizes, (1024 if max_memory_mb is None else max_memory_mb) * 2**20)
    for w in model.parameters():
        w.requires_grad_(False)
    model.train()  # as PEFT's estimate_gradients (dropout, if any, is active)
    stage = out.with_name(out.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    weight_map: dict[str, str] = {}
    try:
        for gi, group in enumerate(groups):
            for name in group:
                params[name].requires_grad_(True)
                params[name].grad = None
            for feed in feeds:
                model(**feed).loss.backward()
            shard = f"gradients-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
            arrays = {}
            for name in group:
                w = params[name]
                assert w.grad is not None
                key = f"{p.names[name]}.weight"
                arrays[key] = (w.grad / len(feeds)).detach().to("cpu", torch.float32).numpy()
                weight_map[key] = shard
                w.grad = None
                w.requires_grad_(False)
            write_safetensors(stage / shard, arrays, {"format": "pt"})
            del arrays
            if progress is not None:
                progress(gi + 1, len(groups), group[-1])
        index = {"metadata": {"format": "spectra-gradients", "batches": len(feeds), "tokens": tokens},
                 "weight_map": weight_map}  # fmt: skip
        (stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        model.eval()
    return GradientSummary(
        modules=len(weight_map), batches=len(feeds), tokens=tokens, groups=len(groups), out=str(out),
        seconds=round(time.perf_counter() - t0, 3),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )  # fmt: skip
