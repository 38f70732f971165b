"""``spectra_run.json``: written beside every artifact (argv, version, inputs, options, timings)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from spectra_cli import __version__
from spectra_cli.checkpoint.output import write_text


def write_run_record(folder: Path, command: str, argv: list[str], inputs: dict[str, Any],
                     options: dict[str, Any], timings: dict[str, Any], artifacts: list[str],
                     extra: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write ``folder/spectra_run.json`` atomically and return its path."""
    record = {
        "command": command,
        "argv": list(argv),
        "spectra_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "inputs": inputs,
        "options": options,
        "timings": timings,
        "artifacts": artifacts,
        **(extra or {}),
    }
    path = folder / "spectra_run.json"
    write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    return path
