"""``track``: what training did to the spectra, checkpoint by checkpoint.

Flow: find the checkpoints (a run folder or a list: :mod:`spectra_cli.checkpoint.run_folder`) and order them by
step → open each (headers only) and select its matrices → look up what the cache (``--cache``) or an earlier
round (``--watch``) already has → describe what is missing as task specs (:mod:`spectra_cli.flows.track_tasks`)
→ run them through the executor (in this process, or ``--ray``) → long-format rows (one per checkpoint ×
matrix: analyze's metrics, and with ``--base``/``--against previous`` compare's intruders and drift) and a
summary that states the findings (:mod:`spectra_cli.flows.track_findings`). No printing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectra_cli.checkpoint.matrices import MatrixSpec
from spectra_cli.checkpoint.run_folder import RunCheckpoint, discover, file_identity, resolve_inputs
from spectra_cli.checkpoint.source import open_checkpoint
from spectra_cli.checkpoint.spectra_cache import CachedMatrix, SpectraCache, identity_key
from spectra_cli.checkpoint.tuned import open_tuned
from spectra_cli.errors import SelectionError, SpectraError
from spectra_cli.flows.analyze import matrix_row
from spectra_cli.flows.executor import Executor, TaskResources, open_executor
from spectra_cli.flows.track_findings import TrackSummary, summarize
from spectra_cli.flows.track_tasks import (
    CompareTask,
    Source,
    TaskOutput,
    ValuesTask,
    compare_task,
    pick,
    values_task,
)
from spectra_cli.options import EngineOptions, SelectionOptions
from spectra_cli.results import RunResult, options_record
from spectra_cli.spectral.engine import check_module_budget, resolve


@dataclass(frozen=True)
class TrackOptions(SelectionOptions, EngineOptions):
    """Options of ``track`` (the CLI flags of the same names)."""

    base: str | None = None
    #: ``previous``: also compare each checkpoint with the one before it
    against: str | None = None
    steps: tuple[int, ...] = ()
    top_k: int = 10
    epsilons: tuple[float, ...] = (0.5,)
    cache: str | None = None
    #: None: in this process; ``local``, ``auto`` or an address: a Ray cluster
    ray: str | None = None
    split_fused: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        eps = self.epsilons
        object.__setattr__(self, "epsilons", (eps,) if isinstance(eps, float | int) else tuple(eps))
        object.__setattr__(self, "steps", tuple(self.steps))
        if self.against is not None and self.against not in ("previous",):
            raise SpectraError(f"--against {self.against}: the only choice is 'previous' (use --base BASE for a base)")
        if self.top_k < 1:
            raise SpectraError(f"--top-k {self.top_k}: must be at least 1")
        if not self.epsilons or not all(0 < e <= 1 for e in self.epsilons):
            raise SpectraError(f"--epsilon {','.join(f'{e:g}' for e in self.epsilons)}: every epsilon must be in (0, 1]")
        if any(s < 0 for s in self.steps):
            raise SpectraError("--steps: steps are whole numbers ≥ 0")
        if self.ray is not None and not self.ray.strip():
            raise SpectraError("--ray: give local, auto or a cluster address (HOST:PORT or ray://HOST:PORT)")

    @property
    def compares(self) -> bool:
        return self.base is not None or self.against == "previous"

    @property
    def settings(self) -> str:
        """What changes the numbers (the cache's settings key): precision, method, top-k, ε, fused split."""
        return identity_key([self.precision, self.method, self.top_k, list(self.epsilons), self.split_fused])[:12]


@dataclass
class TrackResult(RunResult[TrackSummary]):
    """Rows (one per checkpoint × matrix, in step order), the summary, and the checkpoints tracked."""

    checkpoints: list[RunCheckpoint] = field(default_factory=list)
    tasks: int = 0


@dataclass(frozen=True)
class _Opened:
    ck: RunCheckpoint
    source: Source
    names: list[str]
    shards: dict[str, list[str]]  # shard file → matrix names (the values route's tasks)
    meta: dict[str, dict[str, Any]]
    specs: list[MatrixSpec]


Progress = Callable[[int, int, str], None]


class Tracker:
    """The state of one ``track`` run across rounds (``--watch`` adds checkpoints): every result computed or
    read back so far, by checkpoint key and matrix name."""

    def __init__(self, opts: TrackOptions, executor: Executor | None = None) -> None:
        self.opts = opts
        self.executor = executor
        self.cache = SpectraCache(opts.cache, opts.settings) if opts.cache else None
        self.known: dict[str, dict[str, list[CachedMatrix]]] = {}
        self.opened: dict[tuple[str, str], _Opened] = {}
        self.skipped: list[dict[str, str]] = []
        self.warnings: list[str] = []
        self.base: Source | None = None
        if opts.base is not None:
            bpath = Path(opts.base)
            open_checkpoint(bpath)  # a bad base stops the run at once
            self.base = Source("base", str(bpath), identity_key(file_identity(bpath)))
        self.computed = 0
        self._disk: set[int] = set()  # ids of the results read back from the cache
        self.tasks = 0
        self._owned = False

    def close(self) -> None:
        """Close the executor if this tracker opened it (a Ray connection is kept across ``--watch`` rounds)."""
        if self._owned and self.executor is not None:
            self.executor.close()
            self.executor = None
            self._owned = False

    def _open(self, ck: RunCheckpoint) -> _Opened | None:
        try:
            key = identity_key(file_identity(ck.path))
        except OSError as e:
            self._skip(ck, f"cannot read ({e.strerror or e})")
            return None
        if (ck.name, key) in self.opened:
            return self.opened[(ck.name, key)]
        try:
            if ck.layout == "peft":
                specs = self._adapter_specs(ck)
            else:
                specs = pick(open_checkpoint(ck.path), self.opts.selection(self.opts.split_fused))
        except SpectraError as e:
            self._skip(ck, str(e))
            return None
        shards: dict[str, list[str]] = {}
        for s in specs.values():
            shards.setdefault(str(s.tensor.file), []).append(s.name)
        meta = {n: {"depth": s.depth, "kind": s.kind, "role": s.role} for n, s in specs.items()}
        got = _Opened(ck, Source(ck.name, str(ck.path), key, ck.layout == "peft"), list(specs), shards, meta,
                      list(specs.values()))  # fmt: skip
        self.opened[(ck.name, key)] = got
        return got

    def _adapter_specs(self, ck: RunCheckpoint) -> dict[str, MatrixSpec]:
        """The base matrices a PEFT adapter checkpoint changes (its matrices are W₀ + s·B·A)."""
        if self.base is None:
            raise SelectionError(f"{ck.path}: a PEFT adapter checkpoint; give the model it adapts with --base BASE")
        base = open_checkpoint(self.base.path)
        specs = pick(base, self.opts.selection(self.opts.split_fused))
        t = open_tuned(ck.name, ck.path, base, list(specs.values()), True)
        return {n: s for n, s in specs.items() if t.covers(n)}

    def _skip(self, ck: RunCheckpoint, reason: str) -> None:
        if not any(s["name"] == ck.name for s in self.skipped):
            self.skipped.append({"name": ck.name, "path": str(ck.path), "reason": reason})

    def _results(self, key: str) -> dict[str, list[CachedMatrix]]:
        if key not in self.known:
            self.known[key] = self.cache.lookup(key) if self.cache else {}
            self._disk |= {id(r) for rs in self.known[key].values() for r in rs}
        return self.known[key]

    def _find(self, key: str, name: str, prev_key: str | None) -> CachedMatrix | None:
        """A result of (checkpoint, matrix) that has everything this run needs."""
        for r in self._results(key).get(name, []):
            if self.base is not None and r.base_key != self.base.key:
                continue
            if prev_key is not None and r.previous_key != prev_key:
                continue
            return r
        return None

    def update(self, checkpoints: Sequence[RunCheckpoint], progress: Progress | None = None) -> TrackResult:
        """Compute what is missing for ``checkpoints`` (step order) and return the rows of all of them."""
        t0 = time.perf_counter()
        runs = [o for o in (self._open(c) for c in checkpoints) if o is not None]
        if not runs:
            raise SelectionError("no readable checkpoint to track: " + "; ".join(
                f"{s['name']}: {s['reason']}" for s in self.skipped[:3]) if self.skipped else "no checkpoints given")
        against_prev = self.opts.against == "previous"
        missing: list[tuple[int, str]] = []
        for i, o in enumerate(runs):
            prev_key = runs[i - 1].source.key if against_prev and i > 0 else None
            missing += [(i, n) for n in o.names if self._find(o.source.key, n, prev_key) is None]
        if missing and self.opts.compares:  # a layer task holds the base, previous and current matrix and their SVDs
            needed = {n for _, n in missing}
            check_module_budget([s for s in runs[0].specs if s.name in needed], resolve(self._engine()).budget, 6, 8)
        specs, labels, fn = self._tasks(runs, missing)
        self.tasks += len(specs)
        if specs:
            if self.executor is None:  # opened on first need (a rerun from the cache never connects to Ray)
                self.executor = open_executor(self.opts.ray)
                self._owned = True
            gpus = 1.0 if self.opts.device.startswith("cuda") else 0.0
            outs: list[TaskOutput] = self.executor.map(fn, specs, labels, progress=progress,
                                                       resources=TaskResources(gpus, self.opts.max_memory))  # fmt: skip
            for out in outs:
                for key, results in out.results.items():
                    have = self._results(key)
                    for r in results:
                        have.setdefault(r.name, []).insert(0, r)
                        self.computed += 1
        rows, from_cache = self._rows(runs)
        summary = summarize(rows, runs_info(runs), self.opts, self.skipped, self.computed, from_cache,
                            self.tasks, round(time.perf_counter() - t0, 3))  # fmt: skip
        inputs = {"checkpoints": [{"name": o.ck.name, "path": str(o.ck.path), "step": o.ck.step,
                                   "layout": o.ck.layout} for o in runs],
                  "base": self.opts.base}  # fmt: skip
        return TrackResult(rows, summary, inputs, _options(self.opts), [o.ck for o in runs], len(specs))

    def _tasks(self, runs: list[_Opened], missing: list[tuple[int, str]]
               ) -> tuple[list[Any], list[str], Callable[[Any], TaskOutput]]:  # fmt: skip
        sel = self.opts.selection(self.opts.split_fused)
        eng = self._engine()
        if not self.opts.compares:
            per: dict[tuple[int, str], list[str]] = {}
            names_missing: dict[int, set[str]] = {}
            for i, n in missing:
                names_missing.setdefault(i, set()).add(n)
            for i, names in names_missing.items():
                for shard, shard_names in runs[i].shards.items():
                    got = [n for n in shard_names if n in names]
                    if got:
                        per[(i, shard)] = got
            vtasks = [ValuesTask(runs[i].source, tuple(ns), sel, eng, self.opts.cache, self.opts.settings)
                      for (i, _), ns in per.items()]  # fmt: skip
            labels = [f"{t.source.name} ({len(t.matrices)} matrices)" for t in vtasks]
            return vtasks, labels, values_task
        # one task per layer (depth) over the checkpoints that miss any of its matrices
        groups: dict[Any, dict[str, set[int]]] = {}
        for i, n in missing:
            depth = runs[i].meta[n]["depth"]
            groups.setdefault(depth, {}).setdefault(n, set()).add(i)
        ctasks: list[CompareTask] = []
        for _depth, by_name in sorted(groups.items(), key=lambda g: (g[0] is None, g[0] or 0)):
            need = set().union(*by_name.values())
            idx = set(need)
            if self.opts.against == "previous":
                idx |= {i - 1 for i in need if i > 0}
            order = sorted(idx)
            ctasks.append(CompareTask(
                tuple(by_name), tuple(runs[i].source for i in order), tuple(i in need for i in order), self.base,
                self.opts.against == "previous", sel, eng, self.opts.top_k, self.opts.epsilons, self.opts.cache,
                self.opts.settings))  # fmt: skip
        labels = [f"layer {runs[0].meta.get(t.matrices[0], {}).get('depth', '-')} × {sum(t.emit)} checkpoints"
                  for t in ctasks]  # fmt: skip
        return ctasks, labels, compare_task

    def _engine(self) -> EngineOptions:
        o = self.opts
        return EngineOptions(device=o.device, precision=o.precision, backend=o.backend, max_memory=o.max_memory,
                             method=o.method)  # fmt: skip

    def _rows(self, runs: list[_Opened]) -> tuple[list[dict[str, Any]], int]:
        """The rows, and how many of them were read back from the cache."""
        rows: list[dict[str, Any]] = []
        from_cache = 0
        against_prev = self.opts.against == "previous"
        for i, o in enumerate(runs):
            prev_key = runs[i - 1].source.key if against_prev and i > 0 else None
            for n in o.names:
                r = self._find(o.source.key, n, prev_key)
                if r is None:  # pragma: no cover - every missing result was computed above
                    raise SpectraError(f"{o.ck.name}: {n} was not computed (a task returned no result for it)")
                rows.append(track_row(o.ck, r, self.opts))
                from_cache += id(r) in self._disk
        return rows, from_cache


def runs_info(runs: Sequence[_Opened]) -> list[dict[str, Any]]:
    return [{"name": o.ck.name, "step": o.ck.step} for o in runs]


def _eps_fields(prefix: str, epsilons: Sequence[float]) -> list[str]:
    return [f"{prefix}intruders", *(f"{prefix}intruders@{e:g}" for e in epsilons), f"{prefix}intruder_ranks",
            f"{prefix}min_max_cos"]  # fmt: skip


DRIFT_FIELDS = ("relative_delta", "delta_frobenius", "delta_spectral_norm", "delta_effective_rank",
                "delta_stable_rank", "effective_rank_change", "spectral_norm_change", "subspace_overlap",
                "max_principal_angle")  # fmt: skip


def track_row(ck: RunCheckpoint, r: CachedMatrix, opts: TrackOptions) -> dict[str, Any]:
    """One long-format row: checkpoint, step, then analyze's fields; with a base its comparison fields (as
    compare names them); with ``--against previous`` the same fields prefixed ``step_``."""
    rec = r.record
    row: dict[str, Any] = {"checkpoint": ck.name, "step": ck.step}
    row.update(matrix_row(dict(rec), r.values, int(rec.get("nan_count", 0)), int(rec.get("inf_count", 0)), opts.precision,
                          r.metrics))  # fmt: skip
    for prefix, on, vs in (("", opts.base is not None, r.vs_base), ("step_", opts.against == "previous", r.vs_previous)):
        if not on:
            continue
        for k in (*_eps_fields(prefix, opts.epsilons), *(prefix + d for d in DRIFT_FIELDS)):
            row[k] = vs.get(k[len(prefix):]) if vs is not None else None
    return row


def _options(opts: TrackOptions) -> dict[str, Any]:
    d = options_record(opts)
    d["epsilons"] = list(opts.epsilons)
    d["steps"] = list(opts.steps)
    return d


def run_track(
    inputs: Sequence[tuple[str | None, str | Path]],
    options: TrackOptions | None = None,
    progress: Progress | None = None,
    executor: Executor | None = None,
) -> TrackResult:
    """Track the checkpoints given as one run folder or (name, path) pairs (name None: from the path)."""
    opts = options or TrackOptions()
    cks = resolve_inputs([(n, Path(p)) for n, p in inputs], opts.steps)
    tracker = Tracker(opts, executor)
    try:
        return tracker.update(cks, progress)
    finally:
        tracker.close()


def watch_track(
    run_dir: str | Path,
    options: TrackOptions | None = None,
    on_update: Callable[[TrackResult], None] | None = None,
    poll_seconds: float = 30.0,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
    executor: Executor | None = None,
) -> TrackResult | None:
    """Poll ``run_dir`` every ``poll_seconds`` and track every checkpoint that appears, until ``stop`` is set
    (or Ctrl-C: a ``KeyboardInterrupt`` ends the watch cleanly and returns the last result). ``on_update`` gets
    the result after each round that added checkpoints. A checkpoint still being written (it cannot be opened
    yet) is tried again at the next poll."""
    opts = options or TrackOptions()
    tracker = Tracker(opts, executor)
    stop = stop or threading.Event()
    seen: tuple[tuple[str, str], ...] = ()
    last: TrackResult | None = None
    try:
        while not stop.is_set():
            found = discover(Path(run_dir))
            if opts.steps:
                found = [c for c in found if c.step in set(opts.steps)]
            tracker.skipped.clear()
            now = tuple((c.name, str(c.path)) for c in found)
            if found and now != seen:
                last = tracker.update(found, progress)
                seen = tuple((c.name, str(c.path)) for c in last.checkpoints)
                if on_update:
                    on_update(last)
            stop.wait(poll_seconds)
    except KeyboardInterrupt:
        pass
    finally:
        tracker.close()
    return last


__all__ = ["TrackOptions", "TrackResult", "Tracker", "run_track", "track_row", "watch_track"]
