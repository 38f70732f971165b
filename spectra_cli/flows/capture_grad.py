"""``spectra capture --gradients``: each selected weight's gradient of the language-model loss, averaged over
``batches`` batches of the data, for ``init-adapter --method lora-ga``.

Streamed: the target weights are split into groups whose float32 gradients fit ``max_memory_mb``; for each
group only its weights require a gradient, the model runs forward and backward over the same ``batches``
batches, the group's mean gradients (sum over batches / batches, as PEFT's ``preprocess_loraga`` averages by the
number of backward passes) are written as one shard of the output folder and freed. So at most one group's
gradients are in memory (the price: one pass over the batches per group). The folder is a sharded safetensors
checkpoint laid out like the model — each gradient under its weight's tensor name (``<module>.weight``),
``model.safetensors.index.json`` mapping names to shards — so ``init-adapter --gradients`` reads it as it reads a
model.

The loss is the one the model's head was trained with, told by config.json's ``architectures`` class:

- a causal LM (``LlamaForCausalLM``, ``GPT2LMHeadModel``, …): next-token loss, labels = input ids, padding −100;
- a masked LM (``BertForMaskedLM``, ``RobertaForMaskedLM``, …): BERT's masked-LM loss (Devlin et al. 2019) with
  the standard masking of transformers' ``DataCollatorForLanguageModeling``: 15% of the tokens that are not
  special (never [CLS]/[SEP]/padding) become targets; of those 80% are replaced by [MASK], 10% by a random
  token, 10% kept; the loss is the mean cross-entropy over the targets. The draws come from one
  ``torch.Generator`` seeded with ``seed``, in the collator's order, so the masks are those of
  ``DataCollatorForLanguageModeling(tokenizer, seed=seed)`` over the same batches (a test checks). They are drawn
  once: every group's pass sees the same masks.

A model without such a head (``BertModel``, a sentence encoder) is refused: a head initialised at random would
make the gradients — and the LoRA-GA adapter built from them — follow noise.
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
    """Modules whose gradients were written, the loss (``causal-lm`` or ``masked-lm``), batches and tokens per
    pass (for a masked LM: the masked tokens, the loss's targets), groups (passes over the data), the output
    folder, seconds and peak RSS."""

    modules: int
    loss: str
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


#: the masked-LM recipe of BERT (and transformers' DataCollatorForLanguageModeling's defaults)
MLM_PROBABILITY = 0.15
MASK_REPLACE = 0.8
RANDOM_REPLACE = 0.1


def lm_loss_kind(model: Any, model_dir: Path) -> str:
    """``causal-lm`` or ``masked-lm``: the language-model head of the model's class (transformers' auto
    mappings); a SpectraError for a class without one."""
    from transformers.models.auto import modeling_auto as auto

    def names(mapping: Any) -> set[str]:
        out: set[str] = set()
        for v in mapping.values():
            out.update((v,) if isinstance(v, str) else v)
        return out

    cls = type(model).__name__
    if cls in names(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) or cls.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if cls in names(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) or cls.endswith("ForMaskedLM"):
        return "masked-lm"
    raise SpectraError(
        f"{model_dir}: config.json's architectures is {cls}, neither a causal LM (…ForCausalLM) nor a masked LM "
        "(…ForMaskedLM); gradients are taken of the loss of the model's own LM head (a head added at random would "
        "give gradients of noise): give the checkpoint with its head, e.g. BertForMaskedLM for a BERT encoder"
    )


def mask_tokens(input_ids: Any, special: Any, mask_id: int, vocab: int, generator: Any) -> tuple[Any, Any]:
    """BERT's masking of a batch (CPU int64 ``input_ids``; ``special`` true where a token must not be a target):
    (masked inputs, labels with −100 off the targets). The draws, in this order, are those of transformers'
    ``DataCollatorForLanguageModeling.torch_mask_tokens`` with the same generator."""
    import torch

    labels = input_ids.clone()
    inputs = input_ids.clone()
    prob = torch.full(labels.shape, MLM_PROBABILITY)
    prob.masked_fill_(special, 0.0)
    targets = torch.bernoulli(prob, generator=generator).bool()
    labels[~targets] = -100
    replaced = torch.bernoulli(torch.full(labels.shape, MASK_REPLACE), generator=generator).bool() & targets
    inputs[replaced] = mask_id
    scaled = RANDOM_REPLACE / (1 - MASK_REPLACE)
    randomised = torch.bernoulli(torch.full(labels.shape, scaled), generator=generator).bool() & targets & ~replaced
    words = torch.randint(vocab, labels.shape, dtype=torch.long, generator=generator)
    inputs[randomised] = words[randomised]
    return inputs, labels


def _labelled(enc: Any, loss: str, tokenizer: Any, generator: Any) -> dict[str, Any]:
    """The batch ``enc`` (tokenizer output, CPU) with its labels for ``loss``."""
    import torch

    feed = dict(enc)
    if loss == "causal-lm":
        labels = feed["input_ids"].clone()
        if "attention_mask" in feed:
            labels[feed["attention_mask"] == 0] = -100
        feed["labels"] = labels
        return feed
    special = torch.tensor([tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
                            for row in feed["input_ids"].tolist()], dtype=torch.bool)  # fmt: skip
    if "attention_mask" in feed:
        special |= feed["attention_mask"] == 0
    feed["input_ids"], feed["labels"] = mask_tokens(feed["input_ids"], special, tokenizer.mask_token_id,
                                                    len(tokenizer), generator)  # fmt: skip
    return feed


def run_capture_gradients(model_dir: Path, data: Path, out: Path, opts: CaptureOptions, batches: int = 1,
                          max_memory_mb: int | None = None,
                          progress: Callable[[int, int, str], None] | None = None, seed: int = 0
                          ) -> GradientSummary:  # fmt: skip
    """Write the mean gradients of the selected weights to the folder ``out`` (see the module's docstring).
    ``seed``: the masking's seed (masked LMs)."""
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
    loss = lm_loss_kind(model, model_dir)
    accepted = set(inspect.signature(model.forward).parameters)
    if loss == "masked-lm" and p.tokenizer.mask_token_id is None:
        raise SpectraError(f"{opts.tokenizer or model_dir}: the tokenizer has no mask token, which masked-LM "
                           "gradients need; give the model's own tokenizer (--tokenizer DIR)")  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    texts = iter_texts(data, opts.text_field)
    feeds: list[dict[str, Any]] = []
    tokens = 0
    for _ in range(batches):
        chunk = [t for _, t in zip(range(opts.batch_size), texts, strict=False)]
        if not chunk:
            break
        enc = p.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=opts.max_length)
        feed = _labelled({k: v for k, v in enc.items() if k in accepted}, loss, p.tokenizer, generator)
        targets = int((feed["labels"] != -100).sum())
        if targets == 0:
            continue  # a masked-LM batch whose draw masked nothing has no loss (mean over no target)
        tokens += targets
        feeds.append({k: v.to(p.device) for k, v in feed.items()})
    if not feeds:
        raise SpectraError(f"{data}: no examples" if loss == "causal-lm" else
                           f"{data}: no token was masked in {batches} batches; give more text or more --batches")
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
        meta = {"format": "spectra-gradients", "loss": loss, "batches": len(feeds), "tokens": tokens,
                **({"seed": seed, "mlm_probability": MLM_PROBABILITY} if loss == "masked-lm" else {})}  # fmt: skip
        index = {"metadata": meta,
                 "weight_map": weight_map}  # fmt: skip
        (stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        model.eval()
    return GradientSummary(
        modules=len(weight_map), loss=loss, batches=len(feeds), tokens=tokens, groups=len(groups), out=str(out),
        seconds=round(time.perf_counter() - t0, 3),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )  # fmt: skip
