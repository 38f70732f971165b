"""The ``README.md`` that ``init-adapter`` writes beside its adapter (and residual): what the folders hold and
how to load them with PEFT.

Output layout (``out/``):

- ``adapter/``: ``adapter_config.json`` + ``adapter_model.safetensors`` (keys
  ``base_model.model.<module>.lora_A.weight`` r×in and ``….lora_B.weight`` out×r, float32 unless the compute
  precision is float64), ``init_lora_weights: true`` so that PEFT loads the factors as they are.
- ``residual/`` (methods that change the base): the input's own layout — same tensor names and order, the same
  shards and index, config/tokenizer files copied — with every target weight replaced by its residual, in the
  stored dtype (or ``dtype``: then every floating tensor is converted and ``config.json``'s ``torch_dtype``
  updated). Safetensors input only (.bin input: convert it first).
- ``README.md`` (how to load it) and ``spectra_run.json`` (provenance).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

README = """\
# LoRA adapter initialised by spectra ({method})

Written by `{argv}` on {created}.

- `adapter/`: a PEFT LoRA adapter ({n} modules, rank {ranks}) with `init_lora_weights: {init}`, so PEFT loads
  the factors as they are.
{residual_line}
Load it with PEFT (base_model_name_or_path in the config points at the base to use):

```python
from transformers import AutoModel  # or AutoModelForCausalLM, … as for the original model
from peft import PeftModel

base = AutoModel.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{adapter}", is_trainable=True)  # is_trainable=False for inference
```

{after}
"""

_AFTER_RESIDUAL = """\
The residual plus the adapter reproduces the original model's weights (W_res + s·B·A = W, up to rounding to the
residual's dtype). Do not load the adapter on the *original* model: it would count the adapter's part twice.
To turn the trained adapter into a plain LoRA for the *original* model, let PEFT subtract this initial
adapter when saving (it writes ΔW = s·(BA − B₀A₀) as A′ = [A; A₀], B′ = [B, −B₀] with r doubled and α doubled,
×√2 with rsLoRA; PEFT refuses rsLoRA together with rank/alpha patterns). Give it a copy of `adapter/`, because PEFT
rewrites the config of the folder it is given:

```python
# after training `model` (loaded as above); cp -r {adapter} initial-adapter
model.save_pretrained("trained-lora", path_initial_model_for_weight_conversion="initial-adapter")
```
"""

_AFTER_BASE = """\
The base model is unchanged: load the adapter on the original checkpoint.
"""


# what differs from the common text, by method
_MICA = """\
MiCA: `init_lora_weights: "mica"` makes PEFT freeze `lora_B` (its MiCA variant): only `lora_A` trains. A = 0, so
the adapter is a no-op until trained. (PEFT recomputes B from the base's SVD when it loads the adapter; the saved
factors then replace it, so the base must be the one named in the config.)
"""
_ORTHOGONAL = """\
orthogonal: as PEFT's `init_lora_weights="orthogonal"`, B·A ≠ 0 and the base is unchanged, so the model with
the adapter differs from the original by s·B·A before training (as it does in PEFT).
"""
_LOFTQ = """\
LoftQ: `residual/` holds the *dequantised* quantised base Q (NF4, blockwise absmax over blocks of 64, or int8
absmax per output row) and Q + s·B·A approximates the original weights better than Q alone. Load it as it is
(full precision, as above), or quantise it again on load — quantising Q gives back exactly the same codes and
scales, so the adapter meets the base it was fitted to:

```python
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
base = AutoModelForCausalLM.from_pretrained("{residual}", quantization_config=BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False))  # 4 bits; load_in_8bit=True for 8
```
"""
_EORA = """\
EoRA: the adapter compensates the *compressed* model named in the config (`base_model_name_or_path`): load it
on that model, not on the original. Each module's row in `spectra_run.json` says how much of the
activation-weighted compression error it recovers.
"""
_NOTES = {"mica": _MICA, "orthogonal": _ORTHOGONAL, "loftq": _LOFTQ, "eora": _EORA}


def write_init_readme(stage: Path, out: Path, method: str, argv: Sequence[str], rank_counts: Mapping[int, int],
                      residual: bool, base: str, init: bool | str = True) -> None:  # fmt: skip
    """Write ``stage/README.md`` for an output that will be renamed to ``out``: ``rank_counts`` maps each rank
    to how many modules have it, ``residual`` whether ``residual/`` is written, ``base`` the path the adapter's
    config names as its base."""
    created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    ranks_text = ", ".join(
        f"{k}×{v}" if len(rank_counts) > 1 else str(k) for k, v in sorted(rank_counts.items())
    )
    adapter = str((out / "adapter").resolve())
    (stage / "README.md").write_text(
        README.format(
            method=method,
            argv=" ".join(["spectra", *argv[1:]]) if argv else "spectra init-adapter",
            created=created,
            n=sum(rank_counts.values()),
            ranks=ranks_text,
            init=str(init).lower() if isinstance(init, bool) else f'"{init}"',
            residual_line=(
                "- `residual/`: the base model with every adapted weight replaced by "
                + ("its dequantised quantisation Q" if method == "loftq" else "W_res = W − s·B·A")
                + " (same layout as the input).\n"
                if residual
                else ""
            ),
            base=base,
            adapter=adapter,
            after=(
                _NOTES[method].format(residual=base) if method in ("loftq", "eora")
                else (_AFTER_RESIDUAL.format(adapter=adapter) if residual else _AFTER_BASE) + _NOTES.get(method, "")
            ),
        )
    )
