"""Finding the checkpoints of a training run, and the step of each (``spectra track``).

Recognised names, in a run folder (or given one by one):

- Hugging Face Trainer: ``checkpoint-500/`` (full weights, or a PEFT adapter: ``adapter_model.safetensors``);
- DeepSpeed: ``global_step2000/`` (its ``mp_rank_00_model_states.pt``), also inside a Trainer checkpoint;
- Lightning: ``epoch=3-step=1500.ckpt`` (``last.ckpt`` is a copy of another one and is left out);
- generic: ``step_1000/``, ``step-1000.safetensors``, ``ckpt_1000.pt``, ``model_01000.safetensors``, … (the
  last number in the name).

The step is parsed from the name: ``step=N`` / ``step_N`` / ``global_stepN`` / ``checkpoint-N`` first, else the
last number. Checkpoints are ordered by step (``checkpoint-500`` before ``checkpoint-1000``), then by name.
Only headers are read here: nothing is loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from spectra_cli.checkpoint.source import TORCH_SUFFIXES
from spectra_cli.errors import CheckpointError, SelectionError

_STEP_PATTERNS = (
    re.compile(r"(?:^|[^a-z])step[=_-]?(\d+)", re.IGNORECASE),  # epoch=3-step=1500, step_1000, global_step2000
    re.compile(r"checkpoint[-_](\d+)", re.IGNORECASE),
)
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")
_WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
#: file names that are copies or side files, never a checkpoint of their own
_NOT_CHECKPOINTS = {"last.ckpt", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}
_DEEPSPEED_MODEL = "mp_rank_00_model_states.pt"
#: Lightning's folders of checkpoints (``lightning_logs/version_0/checkpoints/``), searched too
_LIGHTNING_DIRS = re.compile(r"checkpoints|lightning_logs|version_\d+")


@dataclass(frozen=True)
class RunCheckpoint:
    """One checkpoint of a run: its name (as shown in the rows), its path, its step (None: not in the name)
    and how it was laid out (``hf``, ``peft``, ``deepspeed``, ``lightning`` or ``file``)."""

    name: str
    path: Path
    step: int | None
    layout: str


def parse_step(name: str) -> int | None:
    """The training step in a checkpoint's name: ``step=N``/``step_N``/``global_stepN``/``checkpoint-N``,
    else the last number in the name; None when it has no number."""
    stem = name
    for suffix in _WEIGHT_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    for pat in _STEP_PATTERNS:
        found = pat.findall(stem)
        if found:
            return int(found[-1])
    last = _LAST_NUMBER.search(stem)
    return int(last.group(1)) if last else None


def _has_weights(folder: Path) -> str | None:
    """The layout of a checkpoint folder, or None when it holds no weights spectra reads."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return None
    if "adapter_model.safetensors" in names or "adapter_model.bin" in names:
        return "peft"
    if any(n.endswith(".safetensors") or n.endswith(".index.json") for n in names) or "pytorch_model.bin" in names:
        return "hf"
    if _DEEPSPEED_MODEL in names:
        return "deepspeed"
    return None


def checkpoint_at(path: Path, name: str | None = None) -> RunCheckpoint | None:
    """The checkpoint at ``path`` (a folder or a weights file), or None when it is neither. A bare DeepSpeed
    ``global_stepN/`` folder is read through its ``mp_rank_00_model_states.pt``."""
    shown = name or path.name
    if path.is_dir():
        layout = _has_weights(path)
        if layout is None:
            inner = sorted(path.glob("global_step*"))  # one: a Trainer checkpoint saved by DeepSpeed; more: a run
            if len(inner) == 1 and (inner[0] / _DEEPSPEED_MODEL).is_file():
                return RunCheckpoint(shown, inner[0] / _DEEPSPEED_MODEL, parse_step(shown), "deepspeed")
            return None
        target = path / _DEEPSPEED_MODEL if layout == "deepspeed" else path
        return RunCheckpoint(shown, target, parse_step(shown), layout)
    if path.is_file() and path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in _NOT_CHECKPOINTS:
        layout = "lightning" if path.name.endswith(".ckpt") else "file"
        return RunCheckpoint(shown, path, parse_step(shown), layout)
    return None


def discover(run_dir: Path) -> list[RunCheckpoint]:
    """Every checkpoint directly inside ``run_dir`` (and inside Lightning's ``lightning_logs/version_N/
    checkpoints/`` folders), ordered by step; entries without a step in their name are left out."""
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: not a folder; give a run folder, checkpoints, or NAME=PATH pairs")
    found: list[RunCheckpoint] = []
    for child in sorted(run_dir.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir() and _LIGHTNING_DIRS.fullmatch(child.name):
            found += discover(child)
            continue
        ck = checkpoint_at(child)
        if ck is not None and ck.step is not None:
            found.append(ck)
    return order(found)


def order(checkpoints: Sequence[RunCheckpoint]) -> list[RunCheckpoint]:
    """By step (those without one last), then by name."""
    return sorted(checkpoints, key=lambda c: (c.step is None, c.step or 0, c.name))


def resolve_inputs(
    inputs: Sequence[tuple[str | None, Path]], steps: Sequence[int] | None = None
) -> list[RunCheckpoint]:
    """The checkpoints to track from the positional inputs: one run folder, or checkpoints (``PATH`` or
    ``NAME=PATH``). ``steps``: with a run folder, keep the checkpoints at those steps; with checkpoints, their
    steps in the order given."""
    if not inputs:
        raise SelectionError("give a run folder, or checkpoints as PATH or NAME=PATH")
    if len(inputs) == 1 and inputs[0][0] is None and inputs[0][1].is_dir() and checkpoint_at(inputs[0][1]) is None:
        run = inputs[0][1]
        found = discover(run)
        if not found:
            raise SelectionError(
                f"{run}: no checkpoints found (looked for checkpoint-N/, global_stepN/, *step=N*.ckpt, step_N/ and "
                "weights files with a step number); give the checkpoints themselves, as PATH or NAME=PATH"
            )
        if steps:
            have = {c.step for c in found}
            missing = [s for s in steps if s not in have]
            if missing:
                raise SelectionError(
                    f"--steps: no checkpoint at step {', '.join(map(str, missing))} in {run} "
                    f"(steps found: {', '.join(str(c.step) for c in found[:12])}{' …' if len(found) > 12 else ''})"
                )
            found = [c for c in found if c.step in set(steps)]
        return found
    out: list[RunCheckpoint] = []
    for name, path in inputs:
        ck = checkpoint_at(path, name)
        if ck is None:
            if not path.exists():
                raise CheckpointError(f"{path}: no such file or directory")
            raise CheckpointError(f"{path}: not a checkpoint (no weights file spectra reads in it)")
        out.append(ck)
    if steps:
        if len(steps) != len(out):
            raise SelectionError(
                f"--steps gives {len(steps)} steps for {len(out)} checkpoints; give one step per checkpoint, in order"
            )
        out = [RunCheckpoint(c.name, c.path, s, c.layout) for c, s in zip(out, steps, strict=True)]
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise SelectionError(f"checkpoints need distinct names (got {', '.join(names)}); name them NAME=PATH")
    return order(out)


def file_identity(path: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime_ns) of every file of a checkpoint (a folder: its files, recursively, but not
    optimizer state): what the cache is keyed by. A checkpoint rewritten in place gets a new identity."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = []
    for f in files:
        if f.name in _NOT_CHECKPOINTS or f.name.startswith(("optimizer", "scheduler", "rng_state")):
            continue
        st = f.stat()
        out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


__all__ = ["RunCheckpoint", "checkpoint_at", "discover", "file_identity", "order", "parse_step", "resolve_inputs"]
