"""``align``: permute the hidden units and attention heads of model B to match model A (weight matching, Git
Re-Basin), write the permuted B — the same function — and report how far apart the two are before and after,
and how well their singular vectors agree.

Flow: plan (open A and B, refuse different tensors or shapes, recognise the architecture from the names,
read the head counts from config.json or the options) → match (coordinate descent of
:func:`~spectra_cli.spectral.align.weight_matching`, one layer of A and B in memory at a time) → rows (per
layer and matrix: ‖A − B‖/‖A‖ and ‖A − P(B)‖/‖A‖, singular-vector agreement before and after) → write the
permuted B in B's layout (same tensor names, dtypes and shards; config.json, tokenizer and other side files
copied) → summarize → ``spectra_run.json`` → rename the staging folder into place. No printing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.source import Checkpoint, checkpoint_inputs, open_checkpoint
from spectra_cli.checkpoint.tensors import RawTensor, from_float, to_float
from spectra_cli.errors import CheckpointError, SelectionError, ShapeMismatch, SpectraError
from spectra_cli.results import RunResult, options_record
from spectra_cli.spectral.align import Heads, LayerPerm, LayerWeights
from spectra_cli.spectral.align_arch import Arch, Slot, detect
from spectra_cli.spectral.align_descent import Globals, Matching, apply_b, weight_matching
from spectra_cli.spectral.align_report import agreement_of, finding, permuted, rel_distance, top_vectors


@dataclass(frozen=True)
class AlignOptions:
    """Options of ``align``: ``max_iter`` sweeps of the coordinate descent at most, its ``seed`` (the order
    the layers are visited), ``top_k`` singular vectors compared, ``heads``/``kv_heads`` when config.json does
    not give them, ``within_head``: also permute the dimensions inside a head (q/k jointly where the position
    encoding allows, v/o jointly); ``residual``: also permute the residual stream (embeddings, norms, every
    layer; the hidden states a model returns then come out permuted, its logits do not)."""

    max_iter: int = 10
    seed: int = 0
    top_k: int = 8
    heads: int | None = None
    kv_heads: int | None = None
    within_head: bool = True
    residual: bool = False

    def __post_init__(self) -> None:
        if self.max_iter < 1:
            raise SpectraError(f"--max-iter {self.max_iter}: must be at least 1")
        if self.top_k < 1:
            raise SpectraError(f"--top-k {self.top_k}: must be at least 1")
        for flag, v in (("--heads", self.heads), ("--kv-heads", self.kv_heads)):
            if v is not None and v < 1:
                raise SpectraError(f"{flag} {v}: must be at least 1")
        if self.heads and self.kv_heads and self.heads % self.kv_heads:
            raise SpectraError(f"--kv-heads {self.kv_heads}: must divide --heads {self.heads}")


@dataclass(frozen=True)
class AlignSummary:
    """The summary of ``align``: the architecture and attention geometry, the descent (sweeps, converged,
    objective Σ⟨A, P(B)⟩ before and after), the model-level relative distance before and after, what moved,
    the mean agreement of the permuted side (per index and overall) before and after, and the finding."""

    architecture: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    qk_dims_permuted: bool
    vo_dims_permuted: bool
    residual_permuted: bool
    residual_moved: float | None
    sweeps: int
    converged: bool
    objective_before: float
    objective_after: float
    rel_distance_before: float
    rel_distance_after: float
    mlp_units_moved: float
    heads_moved: float
    top_k: int
    agreement_before: float
    agreement_after: float
    overlap_before: float
    overlap_after: float
    agreement_by_index_before: list[float]
    agreement_by_index_after: list[float]
    finding: str
    output: str
    seconds: float


@dataclass
class AlignResult(RunResult[AlignSummary]):
    matching: Matching | None = None


def _heads(arch: Arch, ck: Checkpoint, slots: list[Slot], opts: AlignOptions) -> Heads:
    cfg = ck.config or {}
    heads = opts.heads or cfg.get("num_attention_heads") or cfg.get("n_head")
    if not isinstance(heads, int) or heads < 1:
        raise SelectionError(f"{ck.path}: the number of attention heads is unknown (no config.json with "
                             "num_attention_heads / n_head); pass --heads N (and --kv-heads for grouped-query attention)")  # fmt: skip
    kv = opts.kv_heads or cfg.get("num_key_value_heads") or heads
    if not isinstance(kv, int) or heads % kv:
        raise SelectionError(f"{ck.path}: {kv} key/value heads do not divide {heads} heads; pass --kv-heads")
    q = next(s for s in slots if s.key == "q")
    rows = ck.info(q.tensor).shape[1 if q.transposed else 0] // (3 if q.part is not None else 1)
    if rows % heads:
        raise ShapeMismatch(f"{q.tensor}: {rows} query rows are not a multiple of {heads} heads; check --heads")
    dh = rows // heads
    k = next(s for s in slots if s.key == "k")
    krows = ck.info(k.tensor).shape[1 if k.transposed else 0] // (3 if k.part is not None else 1)
    if krows != kv * dh:
        raise ShapeMismatch(f"{k.tensor}: {krows} key rows, not {kv} key/value heads × {dh}; check --kv-heads")
    return Heads(heads, kv, dh, qk_dims=opts.within_head and not arch.rope, vo_dims=opts.within_head)


def _check_pair(a: Checkpoint, b: Checkpoint) -> tuple[Arch, Arch]:
    arch_a = detect([t.name for t in a.tensors], a.config)
    arch_b = detect([t.name for t in b.tensors], b.config)
    if arch_a.name != arch_b.name:
        raise ShapeMismatch(f"A is a {arch_a.name} model and B a {arch_b.name} model; align needs two models of "
                            "one architecture")  # fmt: skip
    if arch_a.layers != arch_b.layers:
        raise ShapeMismatch(f"A has {arch_a.layers} layers and B {arch_b.layers}; align needs the same architecture")
    return arch_a, arch_b


class _Reader:
    """A model's layer weights as the layer dicts of :mod:`spectra_cli.spectral.align` (float64, out×in)."""

    def __init__(self, ck: Checkpoint, arch: Arch) -> None:
        self.ck, self.arch = ck, arch
        self.names = {t.name for t in ck.tensors}

    def slots(self, i: int) -> list[Slot]:
        return self.arch.slots(i, self.names)

    def tensor(self, s: Slot) -> np.ndarray:
        return self.tensor_named(s.tensor)

    def tensor_named(self, name: str) -> np.ndarray:
        info = self.ck.info(name)
        if not info.is_float:
            raise CheckpointError(f"{self.ck.path}: {name} is {info.dtype}, not a float tensor")
        x = to_float(self.ck.read(info), np.float64)
        if not np.all(np.isfinite(x)):
            raise CheckpointError(f"{self.ck.path}: {name} holds NaN or Inf; align needs finite weights")
        return x

    def layer(self, i: int) -> LayerWeights:
        w: LayerWeights = {"mlp_in": [], "mlp_in_bias": [], "mlp_out": []}
        cache: dict[str, np.ndarray] = {}
        for s in self.slots(i):
            if s.tensor not in cache:
                cache[s.tensor] = self.tensor(s)
            x = cache[s.tensor]
            x = x.T if s.transposed and x.ndim == 2 else x
            if s.part is not None:
                x = np.split(x, 3, axis=0)[s.part]
            _put(w, s.key, x)
        n = len(w["mlp_in"])
        w["mlp_in_bias"] = (w["mlp_in_bias"] + [None] * n)[:n]
        return w


def _put(w: LayerWeights, key: str, x: np.ndarray) -> None:
    base, _, idx = key.partition(".")
    if idx:
        lst = w.setdefault(base, [])
        j = int(idx)
        while len(lst) <= j:
            lst.append(None)
        lst[j] = x
    else:
        w[key] = x


def _get(w: LayerWeights, key: str) -> np.ndarray:
    base, _, idx = key.partition(".")
    return np.asarray(w[base][int(idx)] if idx else w[key])


def stored_tensors(w: LayerWeights, slots: list[Slot]) -> dict[str, np.ndarray]:
    """The stored tensors (name → array in the stored orientation) of a layer dict: the inverse of reading."""
    by_tensor: dict[str, list[Slot]] = {}
    for s in slots:
        by_tensor.setdefault(s.tensor, []).append(s)
    out: dict[str, np.ndarray] = {}
    for name, group in by_tensor.items():
        if group[0].part is not None:
            x = np.concatenate([_get(w, s.key) for s in sorted(group, key=lambda s: s.part or 0)], axis=0)
        else:
            x = _get(w, group[0].key)
        out[name] = x.T if group[0].transposed and x.ndim == 2 else x
    return out


def run_align(a_path: str | Path, b_path: str | Path, out: str | Path, opts: AlignOptions | None = None,
              force: bool = False, argv: Sequence[str] = (),
              progress: Callable[[int, int, str], None] | None = None) -> AlignResult:  # fmt: skip
    """Align B to A (see the module docstring) and write the permuted B to ``out``."""
    from spectra_cli.checkpoint.provenance import write_run_record
    from spectra_cli.checkpoint.writers import ResidualWriter, commit_output, discard_output, prepare_output

    opts = opts or AlignOptions()
    t0 = time.perf_counter()
    a, b = open_checkpoint(a_path), open_checkpoint(b_path)
    arch, _ = _check_pair(a, b)
    ra, rb = _Reader(a, arch), _Reader(b, arch)
    slots = [ra.slots(i) for i in range(arch.layers)]
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    for i in range(arch.layers):
        for s in slots[i] + rb.slots(i):
            ia, ib = ta.get(s.tensor), tb.get(s.tensor)
            if ia is None or ib is None:
                raise ShapeMismatch(f"{s.tensor} is in {'B' if ia is None else 'A'} but not in {'A' if ia is None else 'B'}; "
                                    "align needs two models of one architecture")  # fmt: skip
            if ia.shape != ib.shape:
                raise ShapeMismatch(f"{s.tensor}: {list(ia.shape)} in A but {list(ib.shape)} in B; align needs the "
                                    "same architecture and sizes")  # fmt: skip
    heads = _heads(arch, b, slots[0], opts)
    if any(t.offset is None for t in b.tensors):
        raise CheckpointError(f"{b.path}: writing the permuted B needs safetensors input; convert it first (e.g. "
                              "save_pretrained(..., safe_serialization=True))")  # fmt: skip
    axes: dict[str, int] = {}
    globals_: tuple[Globals, Globals] | None = None
    if opts.residual:
        in_layers = {s.tensor for sl in slots for s in sl}
        axes = arch.residual_axes([t.name for t in b.tensors if t.is_float], in_layers)
        hidden = ra.layer(0)["q"].shape[1]
        globals_ = ({}, {})
        for name, axis in axes.items():
            ia, ib = ta.get(name), tb.get(name)
            if ia is None or ia.shape != tb[name].shape or tb[name].shape[axis] != hidden:
                raise ShapeMismatch(f"--residual: {name} is {list(ib.shape) if ib else None} in B and "
                                    f"{list(ia.shape) if ia else None} in A; it must be in both, with {hidden} "
                                    "hidden coordinates")  # fmt: skip
            for g, reader in zip(globals_, (ra, rb), strict=True):
                g[name] = np.moveaxis(reader.tensor_named(name), axis, 0).reshape(hidden, -1)
    stage = prepare_output(Path(out), force, [Path(a.path), Path(b.path)])
    try:
        matching = weight_matching(lambda i: (ra.layer(i), rb.layer(i)), arch.layers, heads,
                                   opts.max_iter, opts.seed, progress, globals_)  # fmt: skip
        r = matching.residual
        rows: list[dict[str, Any]] = []
        patched: dict[str, np.ndarray] = {}
        sq = {"before": 0.0, "after": 0.0, "norm": 0.0}
        for i in range(arch.layers):
            wa, wb = ra.layer(i), rb.layer(i)
            pb = apply_b(wb, matching.perms[i], heads, r)
            rows += _layer_rows(i, wa, wb, pb, slots[i], _indices(matching.perms[i], heads), r, opts.top_k, sq)
            patched.update(stored_tensors(pb, rb.slots(i)))
            if progress:
                progress(i + 1, arch.layers, f"report layer {i}")
        if r is not None:
            for name, axis in axes.items():
                patched[name] = np.take(rb.tensor_named(name), r, axis=axis)
        writer = ResidualWriter(b, stage, None)
        try:
            for info in b.tensors:
                if info.name in patched:
                    raw: RawTensor = from_float(patched[info.name].reshape(info.shape), info.dtype)
                    writer.put(info, raw)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        summary = _summary(arch, heads, matching, rows, sq, opts, str(out), time.perf_counter() - t0)
        inputs = {"a": checkpoint_inputs(a), "b": checkpoint_inputs(b)}
        options = options_record(opts)
        artifacts = sorted(p.name for p in stage.iterdir())
        write_run_record(stage, "align", list(argv), inputs, options, {"seconds": summary.seconds}, artifacts,
                         {"permutations": permutations_record(matching, heads)})  # fmt: skip
        commit_output(stage, Path(out))
    except BaseException:
        discard_output(stage, Path(out))
        raise
    return AlignResult(rows, summary, inputs, options, matching)


def permutations_record(matching: Matching, h: Heads) -> list[dict[str, Any]]:
    """Per layer the permutations as lists (new position i takes B's old index), for ``spectra_run.json``."""
    return [{"layer": i, "mlp": p.mlp.tolist(), "kv_groups": p.heads.groups.tolist(),
             "query_heads": p.heads.queries.tolist(), "qk_dims": p.heads.qk.tolist(),
             "vo_dims": p.heads.vo.tolist()} for i, p in enumerate(matching.perms)] + (
        [] if matching.residual is None else [{"residual": matching.residual.tolist()}])  # fmt: skip


_ORDER = ("q", "k", "v", "o", "mlp_in", "mlp_out")


def _indices(perm: LayerPerm, h: Heads) -> dict[str, np.ndarray]:
    """Per role, the index the permutation takes B's rows (q, k, v, mlp_in) or columns (o, mlp_out) at."""
    return {**perm.heads.indices(h), "mlp_in": perm.mlp, "mlp_out": perm.mlp}


def _layer_rows(i: int, wa: LayerWeights, wb: LayerWeights, pb: LayerWeights, slots: list[Slot],
                index: dict[str, np.ndarray], r: np.ndarray | None, k: int,
                sq: dict[str, float]) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for s in sorted(slots, key=lambda s: _ORDER.index(s.key.partition(".")[0]) if s.side in ("left", "right") else -1):
        if s.side in ("bias", "res_bias"):
            continue
        xa, xb, xp = _get(wa, s.key), _get(wb, s.key), _get(pb, s.key)
        sq["before"] += float(np.sum((xa - xb) ** 2))
        sq["after"] += float(np.sum((xa - xp) ** 2))
        sq["norm"] += float(np.sum(xa**2))
        side = s.side
        other = "right" if side == "left" else "left"
        role = s.key.partition(".")[0]
        sa, sb = top_vectors(xa, k), top_vectors(xb, k)
        sp = permuted(sb, index[role], side)
        if r is not None:
            sp = permuted(sp, r, other)
        before, after = agreement_of(sa, sb), agreement_of(sa, sp)
        cb, ob = before.side(side)
        ca, oa = after.side(side)
        module = s.tensor + (f"[{'qkv'[s.part]}]" if s.part is not None else "")
        rows.append({
            "layer": i, "module": module, "role": role,
            "shape": f"{xa.shape[0]}x{xa.shape[1]}", "permuted_side": side,
            "rel_distance_before": rel_distance(xa, xb), "rel_distance_after": rel_distance(xa, xp),
            "agreement_before": float(np.mean(cb)), "agreement_after": float(np.mean(ca)),
            "overlap_before": ob, "overlap_after": oa,
            "residual_agreement_before": float(np.mean(before.side(other)[0])),
            "residual_agreement_after": float(np.mean(after.side(other)[0])),
            "residual_overlap_before": before.side(other)[1], "residual_overlap_after": after.side(other)[1],
            "agreement_by_index_before": [float(x) for x in cb],
            "agreement_by_index_after": [float(x) for x in ca],
        })  # fmt: skip
    return rows


def _summary(arch: Arch, h: Heads, m: Matching, rows: list[dict[str, Any]], sq: dict[str, float],
             opts: AlignOptions, out: str, seconds: float) -> AlignSummary:  # fmt: skip
    k = max((len(r["agreement_by_index_after"]) for r in rows), default=0)
    full = [r for r in rows if len(r["agreement_by_index_after"]) == k]
    by_b = np.mean([r["agreement_by_index_before"] for r in full], axis=0) if full else np.zeros(0)
    by_a = np.mean([r["agreement_by_index_after"] for r in full], axis=0) if full else np.zeros(0)
    norm = math.sqrt(sq["norm"]) or 1.0
    units = sum(p.mlp.size for p in m.perms)
    moved = sum(int(np.sum(p.mlp != np.arange(p.mlp.size))) for p in m.perms)
    heads_moved = sum(p.heads.changed(h) for p in m.perms)
    mean = lambda key: float(np.mean([r[key] for r in rows])) if rows else 0.0  # noqa: E731
    return AlignSummary(
        architecture=arch.name, layers=arch.layers, heads=h.heads, kv_heads=h.kv_heads, head_dim=h.head_dim,
        qk_dims_permuted=h.qk_dims, vo_dims_permuted=h.vo_dims, residual_permuted=m.residual is not None,
        residual_moved=None if m.residual is None else float(np.mean(m.residual != np.arange(m.residual.size))),
        sweeps=m.sweeps, converged=m.converged,
        objective_before=m.objective[0] if m.objective else 0.0,
        objective_after=m.objective[-1] if m.objective else 0.0,
        rel_distance_before=math.sqrt(sq["before"]) / norm, rel_distance_after=math.sqrt(sq["after"]) / norm,
        mlp_units_moved=moved / units if units else 0.0, heads_moved=heads_moved / (h.heads * arch.layers),
        top_k=k, agreement_before=mean("agreement_before"), agreement_after=mean("agreement_after"),
        overlap_before=mean("overlap_before"), overlap_after=mean("overlap_after"),
        agreement_by_index_before=[float(x) for x in by_b], agreement_by_index_after=[float(x) for x in by_a],
        finding=finding(by_b, by_a).text if k else "no matrices compared",
        output=out, seconds=round(seconds, 3),
    )  # fmt: skip
