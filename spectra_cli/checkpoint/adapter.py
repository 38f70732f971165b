"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

Per module the update is ΔW = s·B·A (out×in) with A = ``lora_A`` (r×in), B = ``lora_B`` (out×r) and
s = α/r (α/√r with ``use_rslora``); ``rank_pattern`` / ``alpha_pattern`` keys are matched as PEFT does,
``re.match(rf"(.*\\.)?({key})$", module)``, first match wins. ``fan_in_fan_out`` (GPT-2 ``Conv1D``) means the
base weight is stored in×out, so the stored update is (B·A)ᵀ. Embedding adapters (``lora_embedding_A`` r×vocab,
``lora_embedding_B`` dim×r) update the vocab×dim weight by (B·A)ᵀ.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.source import Checkpoint, open_checkpoint
from spectra_cli.checkpoint.tensors import SUPPORTED_FLOATS, TensorInfo, to_float
from spectra_cli.checkpoint.validate import Fields, check_int, check_number, first_line, load_json, type_name
from spectra_cli.errors import CheckpointError, ShapeMismatch, SpectraError

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


_CONFIG_HINT = "fix it or re-save the adapter with PEFT (save_pretrained)"


def check_lora_config(cfg: Any, source: str, hint: str = _CONFIG_HINT,
                      error: type[SpectraError] = CheckpointError) -> dict[str, Any]:  # fmt: skip
    """Check the types and ranges of the fields of a PEFT LoRA config (``adapter_config.json``, or a ranks file
    from ``allocate --peft-config``) that spectra reads; return it. ``r`` and ``rank_pattern`` values are whole
    numbers ≥ 1, ``lora_alpha`` and ``alpha_pattern`` values finite numbers, pattern keys valid regular
    expressions, ``target_modules`` a name/regex or a list of names; one ``error`` naming ``source`` otherwise."""
    f = Fields(cfg, source, hint, error)
    f.text("peft_type", None)
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        f.flag(key, None)
    f.integer("r", None, minimum=1)
    f.number("lora_alpha", None)
    f.text("base_model_name_or_path", None)
    tm = f.obj.get("target_modules")
    if isinstance(tm, str):
        if tm != "all-linear":
            _compile(f, "target_modules", tm, tm)
    elif tm is not None and not (isinstance(tm, list) and all(isinstance(t, str) for t in tm)):
        f.fail(f"must be a module name, a regular expression or a list of names, not {type_name(tm)}",
               "target_modules")  # fmt: skip
    for key, ranks in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = f.mapping(key, None) or {}
        for k, v in patterns.items():
            _compile(f, key, k, rf"(.*\.)?({k})$")
            fail = lambda m, k=k, key=key: f.fail(f"value of {k[:60]!r} {m}", key)  # noqa: E731
            if ranks:
                check_int(v, fail, minimum=1)
            else:
                check_number(v, fail)
    return f.obj


def _compile(f: Fields, key: str, shown: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        f.fail(f"{shown[:60]!r} is not a valid regular expression ({first_line(e, 80)})", key)


def open_adapter(path: str | Path) -> Adapter:
    """Open a PEFT LoRA adapter folder; clear errors for other PEFT types and for inconsistent files."""
    folder = Path(path)
    cfg_path = folder / "adapter_config.json"
    cfg = check_lora_config(load_json(cfg_path, "adapter config", _CONFIG_HINT), str(cfg_path))
    peft_type = (cfg.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{folder}: a {peft_type[:40]} adapter; only LoRA adapters are supported")
    if cfg.get("use_dora"):
        raise CheckpointError(f"{folder}: DoRA adapters (use_dora) are not supported yet")
    ckpt = open_checkpoint(folder)
    r_default = cfg.get("r") or 8
    alpha_default = float(cfg["lora_alpha"] if cfg.get("lora_alpha") is not None else r_default)
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
        if not (a.dtype in SUPPORTED_FLOATS and b.dtype in SUPPORTED_FLOATS):
            raise CheckpointError(
                f"{folder}: module {mod_path}: LoRA factors must be float32/float16/bfloat16/float64 "
                f"(got {a.dtype} and {b.dtype}); re-save the adapter"
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
