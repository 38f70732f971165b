"""From tensor names to (block depth, module kind, role).

``model.layers.12.self_attn.q_proj.weight`` -> depth 12, kind ``q_proj``, role ``attention``. The depth is the
first all-digit path component; the kind is the shortest trailing part of the path inside the block that is
unique in the model (so BERT's ``attention.output.dense`` and ``output.dense`` stay apart, and LLaMA's
``self_attn.q_proj`` is just ``q_proj``). Encoder-decoder models (T5, BART, CLIP) prefix the kind with the
stack that differs (``encoder.SelfAttention.q``).
"""

from __future__ import annotations

from dataclasses import dataclass

_EMBED = {
    "embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
    "embed_positions", "shared", "tok_embeddings", "embedding", "embeddings", "patch_embedding",
    "patch_embed", "position_embedding", "token_embedding", "relative_attention_bias",
}  # fmt: skip
_LM_HEAD = {"lm_head", "embed_out", "output_projection"}
_ATTN_HINTS = ("attn", "attention", "query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj", "qkv")
_ATTN_EXACT = {"q", "k", "v", "o", "wq", "wk", "wv", "wo_attn", "out_proj", "W_pack"}
_MLP_HINTS = ("mlp", "ffn", "feed_forward", "feedforward", "intermediate", "densereludense", "fc", "gate", "up_proj",
              "down_proj", "experts")  # fmt: skip
_MLP_EXACT = {"wi", "wo", "wi_0", "wi_1", "w1", "w2", "w3", "c_fc", "dense_h_to_4h", "dense_4h_to_h"}
_SUFFIXES = ("weight", "kernel")

#: every role :func:`role_of` gives (``conv`` is given to conv kernels by ``checkpoint/matrices.py``); the choices
#: of ``--roles``
ROLES = ("embedding", "lm_head", "attention", "mlp", "conv", "other")


@dataclass(frozen=True)
class NameInfo:
    """What a tensor name says about its place in the model."""

    depth: int | None
    kind: str
    role: str  # embedding | lm_head | attention | mlp | conv | other
    stack: str  # prefix before the block index ('' when none), e.g. "model.layers"


def _split(name: str) -> tuple[str, int | None, tuple[str, ...]]:
    parts = name.split(".")
    if parts and parts[-1] in _SUFFIXES:
        parts = parts[:-1]
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i]), int(p), tuple(parts[i + 1 :])
    return "", None, tuple(parts)


def role_of(name: str) -> str:
    """Classify a tensor name as embedding, lm_head, attention, mlp, conv or other."""
    parts = [p for p in name.split(".") if p not in _SUFFIXES]
    low = [p.lower() for p in parts]
    last = parts[-1] if parts else ""
    if last in _LM_HEAD or (len(parts) == 1 and last in {"output", "head", "classifier"}):
        return "lm_head"
    if any(p in _EMBED for p in parts) or "embed" in last.lower():
        return "embedding"
    if any(any(h in p for h in _ATTN_HINTS) for p in low) or last in _ATTN_EXACT:
        return "attention"
    if any(any(h in p for h in _MLP_HINTS) for p in low) or last in _MLP_EXACT:
        return "mlp"
    if "conv" in name.lower() or "downsample" in name.lower():
        return "conv"
    if _split(name)[1] is not None and last in {"dense"} and "output" in low:
        return "mlp"
    return "other"


def _shortest_unique_suffixes(paths: set[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    out: dict[tuple[str, ...], str] = {}
    for p in paths:
        others = [q for q in paths if q != p]
        for k in range(1, len(p) + 1):
            suf = p[-k:]
            if not any(len(q) >= k and q[-k:] == suf for q in others):
                break
        out[p] = ".".join(p[-k:]) if p else ""
    return out


def _stack_labels(stacks: set[str]) -> dict[str, str]:
    if len(stacks) <= 1:
        return {s: "" for s in stacks}
    split = {s: s.split(".") for s in stacks}
    common = 0
    while all(len(v) > common for v in split.values()) and len({v[common] for v in split.values()}) == 1:
        common += 1
    labels: dict[str, str] = {}
    for s, v in split.items():
        rest = [c for c in v[common:] if c not in {"layers", "layer", "block", "blocks", "h"}]
        labels[s] = ".".join(rest) if rest else s
    return labels


def _generic(path: tuple[str, ...]) -> tuple[str, ...]:
    """Inner indices (MoE experts, T5's layer.N) do not make a kind of their own."""
    return tuple("*" if p.isdigit() else p for p in path)


def parse_names(names: list[str]) -> dict[str, NameInfo]:
    """Depth, kind and role for every name; kinds are the shortest path suffixes unique in the model, with
    inner indices ignored, and prefixed by the stack label when there are several stacks (encoder/decoder)."""
    split = {n: _split(n) for n in names}
    stacks = {stack for (stack, depth, _) in split.values() if depth is not None}
    block_kind = _shortest_unique_suffixes({_generic(p) for (_, d, p) in split.values() if d is not None})
    flat_kind = _shortest_unique_suffixes({path for (_, depth, path) in split.values() if depth is None})
    labels = _stack_labels(stacks)
    out: dict[str, NameInfo] = {}
    for n, (stack, depth, path) in split.items():
        if depth is None:
            kind = flat_kind[path] or n
        else:
            kind = block_kind[_generic(path)].replace("*.", "").replace(".*", "") or (
                stack.split(".")[-1] if stack else n
            )
            if labels.get(stack):
                kind = f"{labels[stack]}.{kind}"
        out[n] = NameInfo(depth=depth, kind=kind, role=role_of(n), stack=stack)
    return out


def module_path(tensor_name: str) -> str:
    """The module path of a weight tensor (``a.b.q_proj.weight`` -> ``a.b.q_proj``)."""
    parts = tensor_name.split(".")
    return ".".join(parts[:-1]) if len(parts) > 1 and parts[-1] in _SUFFIXES else tensor_name


def matches_kind(tensor_name: str, kind: str, wanted: str) -> bool:
    """PEFT-style target matching: the kind itself, or the module path ending in ``.wanted``."""
    mod = module_path(tensor_name)
    return wanted == kind or mod == wanted or mod.endswith("." + wanted)
