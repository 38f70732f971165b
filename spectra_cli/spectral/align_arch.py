"""Which tensors of a transformer weight matching permutes, by architecture, from tensor names alone.

Each layer's weights are described as :class:`Slot` s: a key of the layer dict of
:mod:`spectra_cli.spectral.align` (``mlp_in.0``, ``q``, ``q_bias``, …), the stored tensor, whether it is
stored transposed (GPT-2's ``Conv1D`` holds in×out) and, for a fused tensor, which third of its logical rows
(GPT-2's ``c_attn`` = [q; k; v]). Supported:

- ``bert``: BERT / MiniLM naming, ``[prefix]encoder.layer.N.attention.self.{query,key,value}``,
  ``attention.output.dense``, ``intermediate.dense``, ``output.dense`` (with biases);
- ``llama``: LLaMA-like, ``[prefix]layers.N.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj`` (biases
  where present, grouped-query attention), rotary position embeddings (no q/k dimension permutation);
- ``gpt2``: ``[prefix]h.N.attn.c_attn`` (fused q/k/v, Conv1D), ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from spectra_cli.errors import SelectionError

SUPPORTED = ("BERT (encoder.layer.N.attention.self.query …, intermediate.dense, output.dense), LLaMA-like "
             "(layers.N.self_attn.q_proj …, mlp.gate_proj/up_proj/down_proj) and GPT-2 (h.N.attn.c_attn, "
             "mlp.c_fc, mlp.c_proj)")  # fmt: skip

_PATTERNS = {
    "bert": re.compile(r"^(.*?)encoder\.layer\.(\d+)\.attention\.self\.query\.weight$"),
    "llama": re.compile(r"^(.*?)layers\.(\d+)\.self_attn\.q_proj\.weight$"),
    "gpt2": re.compile(r"^(.*?)h\.(\d+)\.attn\.c_attn\.weight$"),
}


@dataclass(frozen=True)
class Slot:
    """One array of a layer dict and where it is stored. ``side``: which side of the matrix the permutation
    moves (``left`` rows, ``right`` columns, ``bias``)."""

    key: str
    tensor: str
    side: str
    transposed: bool = False
    part: int | None = None  # a third (0 q, 1 k, 2 v) of a fused tensor's logical rows


@dataclass(frozen=True)
class Arch:
    """A recognised architecture: its name, the tensor-name prefix, the number of layers, and whether rotary
    position embeddings forbid permuting q/k dimensions."""

    name: str
    prefix: str
    layers: int
    rope: bool

    def slots(self, i: int, names: Collection[str]) -> list[Slot]:
        """Layer ``i``'s slots (optional biases only where ``names`` holds them)."""
        p = self.prefix
        if self.name == "bert":
            lay = f"{p}encoder.layer.{i}."
            att = lay + "attention.self."
            out = [Slot("mlp_in.0", lay + "intermediate.dense.weight", "left"),
                   Slot("mlp_in_bias.0", lay + "intermediate.dense.bias", "bias"),
                   Slot("mlp_out.0", lay + "output.dense.weight", "right"),
                   Slot("o", lay + "attention.output.dense.weight", "right"),
                   Slot("o_bias", lay + "attention.output.dense.bias", "res_bias"),
                   Slot("mlp_out_bias.0", lay + "output.dense.bias", "res_bias")]  # fmt: skip
            for key, mod in (("q", "query"), ("k", "key"), ("v", "value")):
                out += [Slot(key, f"{att}{mod}.weight", "left"), Slot(f"{key}_bias", f"{att}{mod}.bias", "bias")]
        elif self.name == "llama":
            lay = f"{p}layers.{i}."
            out = [Slot("mlp_in.0", lay + "mlp.gate_proj.weight", "left"),
                   Slot("mlp_in.1", lay + "mlp.up_proj.weight", "left"),
                   Slot("mlp_in_bias.0", lay + "mlp.gate_proj.bias", "bias"),
                   Slot("mlp_in_bias.1", lay + "mlp.up_proj.bias", "bias"),
                   Slot("mlp_out.0", lay + "mlp.down_proj.weight", "right"),
                   Slot("o", lay + "self_attn.o_proj.weight", "right"),
                   Slot("o_bias", lay + "self_attn.o_proj.bias", "res_bias"),
                   Slot("mlp_out_bias.0", lay + "mlp.down_proj.bias", "res_bias")]  # fmt: skip
            for key in "qkv":
                out += [Slot(key, f"{lay}self_attn.{key}_proj.weight", "left"),
                        Slot(f"{key}_bias", f"{lay}self_attn.{key}_proj.bias", "bias")]  # fmt: skip
        else:
            lay = f"{p}h.{i}."
            out = [Slot("mlp_in.0", lay + "mlp.c_fc.weight", "left", transposed=True),
                   Slot("mlp_in_bias.0", lay + "mlp.c_fc.bias", "bias"),
                   Slot("mlp_out.0", lay + "mlp.c_proj.weight", "right", transposed=True),
                   Slot("o", lay + "attn.c_proj.weight", "right", transposed=True),
                   Slot("o_bias", lay + "attn.c_proj.bias", "res_bias"),
                   Slot("mlp_out_bias.0", lay + "mlp.c_proj.bias", "res_bias")]  # fmt: skip
            for part, key in enumerate("qkv"):
                out += [Slot(key, lay + "attn.c_attn.weight", "left", transposed=True, part=part),
                        Slot(f"{key}_bias", lay + "attn.c_attn.bias", "bias", part=part)]  # fmt: skip
        required = [s for s in out if s.side not in ("bias", "res_bias") or self.name != "llama"]
        missing = [s.tensor for s in required if s.tensor not in names]
        if missing:
            raise SelectionError(f"{self.name} layer {i}: no tensor {missing[0]}; the checkpoint looks like a "
                                 f"{self.name} model but is incomplete")  # fmt: skip
        return [s for s in out if s.tensor in names]


    def residual_axes(self, names: Collection[str], in_layers: Collection[str]) -> dict[str, int]:
        """For a permutation of the residual stream: every tensor outside the layers' slots (``in_layers``)
        that reads or carries the hidden states, with the stored axis that indexes them (embeddings and
        heads: 1; norms: 0). Buffers that do not (position ids, rotary frequencies, GPT-2's causal mask) are
        left out; any other tensor is refused, since how it uses the hidden states is not known."""
        p = re.escape(self.prefix)
        n = r"\d+"
        known = {
            "bert": [(rf"{p}embeddings\.(word|position|token_type)_embeddings\.weight", 1),
                     (rf"{p}embeddings\.LayerNorm\.(weight|bias)", 0),
                     (rf"{p}encoder\.layer\.{n}\.(attention\.output|output)\.LayerNorm\.(weight|bias)", 0),
                     (rf"{p}pooler\.dense\.weight", 1)],
            "llama": [(rf"{p}embed_tokens\.weight", 1), (rf"{p}norm\.weight", 0), (r"lm_head\.weight", 1),
                      (rf"{p}layers\.{n}\.(input_layernorm|post_attention_layernorm)\.weight", 0)],
            "gpt2": [(rf"{p}(wte|wpe)\.weight", 1), (rf"{p}h\.{n}\.ln_[12]\.(weight|bias)", 0),
                     (rf"{p}ln_f\.(weight|bias)", 0), (r"lm_head\.weight", 1)],
        }[self.name]  # fmt: skip
        ignored = re.compile(r".*(position_ids|inv_freq|\.attn\.bias|\.attn\.masked_bias|pooler\.dense\.bias)$")
        out: dict[str, int] = {}
        for name in names:
            if name in in_layers or ignored.match(name):
                continue
            axis = next((ax for pat, ax in known if re.fullmatch(pat, name)), None)
            if axis is None:
                raise SelectionError(f"--residual: {name} is not a tensor align knows how to permute with the "
                                     "hidden states; align without --residual, or drop that head")  # fmt: skip
            out[name] = axis
        return out


def detect(names: Collection[str], config: dict[str, object] | None = None) -> Arch:
    """The architecture of a checkpoint with tensors ``names`` (config.json, when given, tells rotary
    embeddings and BERT's relative position scores). Raises :class:`SelectionError` naming what is supported."""
    for arch, pattern in _PATTERNS.items():
        found: dict[str, set[int]] = {}
        for n in names:
            m = pattern.match(n)
            if m:
                found.setdefault(m.group(1), set()).add(int(m.group(2)))
        if not found:
            continue
        if len(found) > 1:
            raise SelectionError(f"{len(found)} {arch} stacks under different prefixes ({', '.join(sorted(found))}); "
                                 "align works on one model")  # fmt: skip
        prefix, idx = next(iter(found.items()))
        layers = max(idx) + 1
        if sorted(idx) != list(range(layers)):
            gap = min(set(range(layers)) - idx)
            raise SelectionError(f"{arch}: layer {gap} is missing ({prefix or ''}…{gap}…); give a complete model")
        rope = arch == "llama"
        if arch == "bert" and config and config.get("position_embedding_type", "absolute") != "absolute":
            rope = True  # relative position scores read q's dimensions: keep them fixed
        return Arch(arch, prefix, layers, rope)
    raise SelectionError(f"unknown architecture: no attention and MLP weights align recognises; supported: {SUPPORTED}")
