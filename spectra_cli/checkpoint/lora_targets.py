"""Which modules of a checkpoint get a LoRA adapter, and with which rank and α, as PEFT reads them.

- :func:`select_targets`: the linear ``<module>.weight`` matrices of a selection that an adapter can target;
- a PEFT-style ranks file (``init-adapter --ranks FILE``; what ``spectra allocate --peft-config`` writes): a
  JSON object with ``r`` and optionally ``lora_alpha``, ``target_modules``, ``rank_pattern``, ``alpha_pattern``,
  read and matched to the modules as PEFT matches them;
- the scale s = α/r (α/√r with rsLoRA)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectra_cli.checkpoint.adapter import pattern_value
from spectra_cli.checkpoint.matrices import MatrixSpec, Selection, select_matrices
from spectra_cli.checkpoint.naming import matches_kind, parse_names
from spectra_cli.checkpoint.source import Checkpoint
from spectra_cli.errors import SelectionError, SpectraError

#: roles left out when no --kinds / --include names the targets (PEFT's ``all-linear``)
DEFAULT_SKIP_ROLES = ("embedding", "lm_head")


@dataclass(frozen=True)
class Target:
    """One module that gets an adapter: its matrix, rank, α and scale s."""

    spec: MatrixSpec
    path: str  # module path (tensor name without .weight)
    rank: int
    alpha: float
    scale: float


def select_targets(ckpt: Checkpoint, selection: Selection) -> list[MatrixSpec]:
    """The target weights: 2-D ``<module>.weight`` matrices passing the filters (``selection``, fused matrices
    whole), in read order.

    With no ``--kinds``/``--include``/``--roles`` every linear weight but embeddings and the output head is a target
    (PEFT's ``all-linear``). Every ``--kinds`` entry must match something; embeddings, conv kernels and fused
    parts cannot be targets (PEFT gives them other factor shapes)."""
    specs, _ = select_matrices(ckpt, selection)
    explicit = bool(selection.kinds or selection.include or selection.roles)
    out: list[MatrixSpec] = []
    for s in specs:
        two_d = len(s.tensor.shape) == 2 and s.tensor.name.endswith(".weight")
        if not explicit:
            if two_d and s.role not in DEFAULT_SKIP_ROLES:
                out.append(s)
            continue
        if not two_d:
            raise SelectionError(
                f"{s.name}: a {len(s.tensor.shape)}-D tensor cannot get a LoRA adapter here (only linear "
                "<module>.weight matrices); narrow --kinds / --include or add --exclude"
            )
        if s.role == "embedding":
            raise SelectionError(
                f"{s.name}: embeddings are not supported as init-adapter targets; add --exclude '{s.name}'"
            )
        out.append(s)
    if not out:
        raise SelectionError(f"{ckpt.path}: no linear weight matrices to initialise; name them with --kinds")
    names = parse_names([t.name for t in ckpt.tensors])
    for k in selection.kinds:
        if not any(matches_kind(s.tensor.name, names[s.tensor.name].kind, k) for s in out):
            raise SelectionError(
                f"--kinds {k}: matches no linear weight in {ckpt.path}; "
                f"kinds present: {', '.join(sorted({s.kind for s in out})[:12])}"
            )
    if len({s.transposed for s in out}) > 1:
        raise SelectionError(
            "the targets mix Conv1D (in×out) and Linear weights, which one adapter config cannot describe "
            "(fan_in_fan_out); select one kind of layer with --kinds"
        )
    return out


def read_ranks_file(path: Path) -> dict[str, Any]:
    """The parsed ranks file; a :class:`SpectraError` naming the file when it is not one (or its fields are of
    the wrong type: ``r`` a positive int, patterns maps of valid regexes to positive numbers, …)."""
    from spectra_cli.checkpoint.adapter import check_lora_config
    from spectra_cli.checkpoint.validate import load_json

    hint = "give a PEFT-style JSON (what `spectra allocate --peft-config` writes)"
    cfg = check_lora_config(load_json(path, "ranks file", hint, SpectraError), str(path), hint, SpectraError)
    if "r" not in cfg and not cfg.get("rank_pattern"):
        raise SpectraError(
            f"{path}: not a ranks file: expected a JSON object with 'r' and optionally 'lora_alpha', "
            "'rank_pattern', 'alpha_pattern' (what `spectra allocate --peft-config` writes)"
        )
    return cfg


def peft_targets(target_modules: Any, path: str) -> bool:
    """PEFT's ``target_modules`` rule: a string is a full regex (or "all-linear"), a list matches a module whose
    path equals an entry or ends with ``.entry``; None (absent) matches everything."""
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, path) is not None
    return path in target_modules or any(path.endswith(f".{t}") for t in target_modules)


def ranks_file_targets(cfg: Mapping[str, Any], specs: Sequence[MatrixSpec], paths: Mapping[str, str],
                       ranks_file: Path | None, explicit: bool) -> list[MatrixSpec]:  # fmt: skip
    """The modules a ranks file adapts: its ``target_modules`` (as PEFT reads them) among the selected ones
    (``paths``: matrix name → module path). Without an explicit selection (``explicit`` False: no --kinds /
    --include / --exclude), a ``rank_pattern``/``alpha_pattern`` key matching no module means the file was
    written for another model: refused."""
    tm = cfg.get("target_modules")
    kept = [s for s in specs if peft_targets(tm, paths[s.name])]
    if not kept:
        raise SelectionError(
            f"{ranks_file}: its target_modules ({tm}) match none of the selected modules; the ranks file "
            "was written for another model or another selection (check --kinds)"
        )
    if not explicit:
        known = [paths[s.name] for s in kept]
        for field_name in ("rank_pattern", "alpha_pattern"):
            for key in cfg.get(field_name) or {}:
                if not any(re.match(rf"(.*\.)?({key})$", p) for p in known):
                    raise SelectionError(
                        f"{ranks_file}: {field_name} key {key!r} matches no module of the checkpoint's "
                        "targets; the ranks file was written for another model"
                    )
    return kept


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's LoRA scale s = α/r (α/√r with rsLoRA)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def unit_alpha(rank: int, rslora: bool) -> float:
    """The α giving s = 1 at this rank."""
    return math.sqrt(rank) if rslora else float(rank)


def file_ranks(cfg: Mapping[str, Any], modules: Sequence[str], rslora: bool,
               alpha_given: bool) -> tuple[dict[str, int], dict[str, float]]:  # fmt: skip
    """Each module's rank (its ``rank_pattern`` entry, else ``r``) and α (its ``alpha_pattern`` entry, else
    ``lora_alpha`` scaled with the rank so that α/r — α/√r with rsLoRA — stays the file's; without
    ``lora_alpha``: 0.0 when ``--alpha`` is given (the caller applies it), else the α giving s = 1)."""
    r0 = int(cfg.get("r", 8))
    a0 = cfg.get("lora_alpha")
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for p in modules:
        r = int(pattern_value(cfg.get("rank_pattern"), p, r0))
        ranks[p] = r
        default_alpha = (
            float(a0) * (r / r0 if not rslora else math.sqrt(r / r0)) if a0 is not None and r0 else None
        )
        a = pattern_value(cfg.get("alpha_pattern"), p, default_alpha)
        alphas[p] = float(a) if a is not None else unit_alpha(r, rslora) if not alpha_given else 0.0
    return ranks, alphas
