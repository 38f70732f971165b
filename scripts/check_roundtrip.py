"""Load what `spectra init-adapter` wrote and compare it with the original model (used by scripts/examples.sh).

    python scripts/check_roundtrip.py MODEL OUT_DIR…

For each OUT_DIR: transformers loads OUT_DIR/residual (or MODEL when the method left the base unchanged),
PEFT loads OUT_DIR/adapter on top, and the last hidden states of the (non-padding) tokens of a few sentences are compared with MODEL's.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging

logging.disable_progress_bar()

TEXTS = ["Spectral analysis of weights.", "A LoRA adapter starts from the weights' own SVD.", "Hello"]


def main() -> None:
    model, outs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    tok = AutoTokenizer.from_pretrained(model)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = AutoModel.from_pretrained(model).eval()(**batch).last_hidden_state
        for out in outs:
            base_dir = out / "residual" if (out / "residual").is_dir() else model
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                peft = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), out / "adapter").eval()
            keys = [str(w.message) for w in caught if "key" in str(w.message).lower()]
            real = batch["attention_mask"].bool()  # padded positions' outputs mean nothing
            diff = (peft(**batch).last_hidden_state - ref)[real].abs().max().item()
            print(f"{out}: base {base_dir}, max |Δ output| = {diff:.2e}" + (f"; warnings: {keys}" if keys else ""))


if __name__ == "__main__":
    main()
