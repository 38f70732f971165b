"""The plan of ``init-adapter`` that needs no weight: each module's rank, α and scale (uniform ``--rank``, a
PEFT-style ranks file, an allocation, or the method's own ``plan_ranks``), and the options a method gets."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from spectra_cli.checkpoint.lora_targets import (
    Target,
    file_ranks,
    lora_scale,
    ranks_file_targets,
    read_ranks_file,
    unit_alpha,
)
from spectra_cli.checkpoint.matrices import MatrixSpec
from spectra_cli.checkpoint.naming import module_path
from spectra_cli.errors import SelectionError, ShapeMismatch, SpectraError

if TYPE_CHECKING:
    from pathlib import Path

    from spectra_cli.flows.init_adapter import InitOptions
    from spectra_cli.spectral.init import InitMethod


def explicit_selection(opts: InitOptions) -> bool:
    return bool(opts.kinds or opts.include or opts.exclude or opts.roles)


def plan_targets(
    specs: Sequence[MatrixSpec],
    opts: InitOptions,
    method: InitMethod,
    activations: Mapping[str, Any] | None,
) -> tuple[list[Target], list[str]]:
    """Each module's rank, α and scale; modules given rank 0 are dropped (returned second).
    Raises :class:`ShapeMismatch` for a rank above min(out, in) before any work starts."""
    paths = {s.name: module_path(s.tensor.name) for s in specs}
    rslora = opts.rslora
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    if opts.ranks_file is not None or opts.ranks is not None:  # one source of ranks: InitOptions checks it
        if opts.ranks_file is not None:
            cfg = read_ranks_file(opts.ranks_file)
            specs = ranks_file_targets(cfg, specs, paths, opts.ranks_file, explicit_selection(opts))
            ranks, alphas = file_ranks(cfg, [paths[s.name] for s in specs], rslora, opts.alpha is not None)
        else:
            assert opts.ranks is not None
            for s in specs:
                p = paths[s.name]
                ranks[p] = int(opts.ranks.get(p, 0))
                if opts.alphas and p in opts.alphas:
                    alphas[p] = float(opts.alphas[p])
    elif opts.rank is not None:
        ranks = {paths[s.name]: opts.rank for s in specs}
        if method.plan_ranks is not None:
            assert activations is not None
            planned = method.plan_ranks({p: activations[p] for p in ranks}, opts.rank, method_options(opts))
            ranks = {p: int(planned.get(p, 0)) for p in ranks}
    elif method.needs_tuned and opts.energy is not None:
        ranks = {paths[s.name]: 0 for s in specs}  # chosen per module by the energy threshold
    else:
        raise SpectraError(
            "give --rank R (or --ranks FILE / --allocate STRATEGY, or --energy τ with extract)"
        )
    targets: list[Target] = []
    dropped: list[str] = []
    too_big: list[str] = []
    energy_mode = method.needs_tuned and opts.energy is not None
    for s in specs:
        p = paths[s.name]
        r = ranks[p]
        m, n = s.shape
        if r < 0:
            raise SpectraError(f"{p}: rank {r} is negative")
        if r > min(m, n):
            too_big.append(f"{p} ({m}×{n}, rank {r})")
            continue
        if r == 0 and not energy_mode:
            dropped.append(p)
            continue
        base_r = max(r, 1)
        if p in alphas and alphas[p] > 0:
            alpha = alphas[p]
        elif opts.alpha is None:
            alpha = unit_alpha(base_r, rslora)
        elif opts.rank is not None and base_r != opts.rank:  # keep α/r (α/√r) constant when ranks change
            alpha = opts.alpha * (base_r / opts.rank if not rslora else math.sqrt(base_r / opts.rank))
        else:
            alpha = opts.alpha
        targets.append(Target(s, p, r, alpha, lora_scale(alpha, base_r, rslora)))
    if too_big:
        more = f" and {len(too_big) - 3} more" if len(too_big) > 3 else ""
        raise ShapeMismatch(
            f"rank larger than min(out, in) for {', '.join(too_big[:3])}{more}; lower --rank (or the ranks file)"
        )
    if not targets:
        raise SelectionError("every target module got rank 0; nothing to initialise")
    return targets, dropped


def method_options(opts: InitOptions) -> dict[str, Any]:
    out: dict[str, Any] = dict(opts.method_options)
    if opts.fast is not None:
        out["niter"] = opts.fast
    if opts.energy is not None:
        out["energy"] = opts.energy
    return out


def allocate_ranks(path: str | Path, opts: InitOptions) -> InitOptions:
    """Ranks and α from ``spectra allocate`` (strategy ``opts.allocate``, average rank ``opts.budget_rank``)."""
    import dataclasses

    from spectra_cli.flows.allocate import AllocateOptions, run_allocate

    a_opts = AllocateOptions(
        include=opts.include, exclude=opts.exclude, kinds=opts.kinds, roles=opts.roles, min_dim=opts.min_dim,
        strategy=opts.allocate or "energy", budget_rank=opts.budget_rank, lora_alpha=opts.alpha,
        activations=opts.activations, device=opts.device, precision=opts.precision,
    )  # fmt: skip
    result = run_allocate(path, a_opts)
    return dataclasses.replace(opts, ranks=dict(result.ranks), alphas=dict(result.alphas))
