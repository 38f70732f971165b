"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

Per module the update is ΔW = s·B·A (out×in) with A = ``lora_A`` (r×in), B = ``lora_B`` (out×r) and
s = α/r (α/√r with ``use_rslora``); ``rank_pattern`` / ``alpha_pattern`` keys are matched as PEFT does,
``re.match(rf"(.*\\.)?({key})$", module)``, first match wins. ``fan_in_fan_out`` (GPT-2 ``Conv1D``) means the
base weight is stored in×out, so the stored update is (B·A)ᵀ. Embedding adapters (``lora_embedding_A`` r×vocab,
``lora_embedding_B`` dim×r) update the vocab×dim weight by (B·A)ᵀ.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.source import Checkpoint, open_checkpoint
from spectra_cli.checkpoint.tensors import TensorInfo, to_float
from spectra_cli.errors import CheckpointError, ShapeMismatch

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<path>.+?)\.(?P<which>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$"
)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors are, its rank and scale, and how ΔW maps onto the base weight."""

    path: str  # module path relative to the base model, e.g. model.layers.0.self_attn.q_proj
    a: TensorInfo  # r×in   (embedding: r×vocab)
    b: TensorInfo  # out×r  (embedding: dim×r)
    rank: int
    alpha: float
    scale: float
    transposed: bool  # the base weight stores ΔWᵀ (fan_in_fan_out, or an embedding)
    embedding: bool = False  # lora_embedding_A/B: B·A is the transpose of the vocab×dim update


@dataclass
class Adapter:
    """A PEFT LoRA adapter opened lazily."""

    path: Path
    config: dict[str, Any]
    checkpoint: Checkpoint
    modules: list[LoraModule]
    ignored: list[str]  # tensors that are not LoRA factors (modules_to_save, biases, …)

    def factors(self, mod: LoraModule) -> tuple[np.ndarray, np.ndarray]:
        """(B, A) in float64, B out×r and A r×in in the base weight's *logical* orientation."""
        a = to_float(self.checkpoint.read(mod.a), np.float64).reshape(mod.a.shape[0], -1)
        b = to_float(self.checkpoint.read(mod.b), np.float64).reshape(mod.b.shape[0], -1)
        return b, a


def is_adapter(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").is_file()


def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rule: the first key with ``re.match(rf"(.*\\.)?({key})$", module)`` wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def open_adapter(path: str | Path) -> Adapter:
    """Open a PEFT LoRA adapter folder; clear errors for other PEFT types and for inconsistent files."""
    folder = Path(path)
    cfg_path = folder / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read the adapter config ({e})") from e
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{folder}: a {peft_type} adapter; only LoRA adapters are supported")
    if cfg.get("use_dora"):
        raise CheckpointError(f"{folder}: DoRA adapters (use_dora) are not supported yet")
    ckpt = open_checkpoint(folder)
    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    rslora = bool(cfg.get("use_rslora", False))
    fifo = bool(cfg.get("fan_in_fan_out", False))
    found: dict[str, dict[str, TensorInfo]] = {}
    ignored: list[str] = []
    for t in ckpt.tensors:
        m = _KEY.match(t.name)
        if not m:
            ignored.append(t.name)
            continue
        found.setdefault(m.group("path"), {})[m.group("which")] = t
    modules: list[LoraModule] = []
    for mod_path, parts in found.items():
        emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if emb else "lora_A")
        b = parts.get("lora_embedding_B" if emb else "lora_B")
        if a is None or b is None:
            raise CheckpointError(
                f"{folder}: module {mod_path} has only one of its LoRA factors (A and B needed)"
            )
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise CheckpointError(
                f"{folder}: module {mod_path}: only linear/embedding LoRA factors are supported (got A {a.shape}, B {b.shape})"
            )
        rank = int(pattern_value(cfg.get("rank_pattern"), mod_path, r_default))
        alpha = float(pattern_value(cfg.get("alpha_pattern"), mod_path, alpha_default))
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ShapeMismatch(
                f"{folder}: module {mod_path}: adapter_config.json gives rank {rank} but lora_A is {a.shape} and lora_B {b.shape}"
            )
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        modules.append(LoraModule(mod_path, a, b, rank, alpha, scale, transposed=emb or fifo, embedding=emb))
    if not modules:
        raise CheckpointError(f"{folder}: no LoRA factors (lora_A / lora_B tensors) found in the adapter")
    return Adapter(folder, cfg, ckpt, modules, ignored)


def match_base(
    modules: list[LoraModule], base_names: list[str], allow_missing: bool = False
) -> dict[str, str]:
    """Map each adapter module path to the base weight tensor it updates.

    Exact ``<path>.weight`` first; otherwise a unique suffix match either way, so an adapter trained on
    ``BertModel`` (``encoder.layer.0…``) fits a ``BertForSequenceClassification`` checkpoint (``bert.encoder…``)
    and vice versa. Raises :class:`CheckpointError` naming the modules that fit nothing or fit ambiguously
    (unless ``allow_missing``: those modules are then left out of the mapping).
    """
    weights = [n for n in base_names if n.endswith(".weight")]
    mods = {n[: -len(".weight")]: n for n in weights}
    out: dict[str, str] = {}
    missing: list[str] = []
    for m in modules:
        if m.path in mods:
            out[m.path] = mods[m.path]
            continue
        cands = [
            full for mod, full in mods.items() if mod.endswith("." + m.path) or m.path.endswith("." + mod)
        ]
        if len(cands) == 1:
            out[m.path] = cands[0]
        else:
            missing.append(m.path + (f" (ambiguous: {', '.join(cands[:3])})" if cands else ""))
    if missing and not allow_missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            f"the adapter does not fit the base: no base weight for {', '.join(missing[:3])}{more}; "
            "check that the adapter was trained on this base model (or use --allow-missing)"
        )
    return out
