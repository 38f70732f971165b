"""``rankme``: how rich are these representations, and which input is best (Garrido et al. 2022)?

Flow, per input: open the embedding file (or embed a text file with a local model) → stream float64 row
chunks into a :class:`~spectra_cli.spectral.rankme.GramAccumulator` (memory O(K²) + one chunk, whatever N
is) → eigenvalues → scores. Rows are sorted by RankMe, highest first; the summary names the best input.
No printing: warnings (too few samples) are returned in the summary for the CLI to show.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.embeddings import EmbeddingSource, chunk_rows_for, open_embeddings
from spectra_cli.errors import SpectraError
from spectra_cli.options import ComputeOptions, EngineOptions
from spectra_cli.results import RunResult, options_record
from spectra_cli.spectral.engine import ResolvedEngine, blas_threads, resolve
from spectra_cli.spectral.rankme import (
    RANKME_EPS,
    GramAccumulator,
    RankScores,
    dtype_eps,
    scores_from_accumulator,
    scores_wide,
)

#: warn when N < SAMPLE_FACTOR·K: the score is then limited by the sample count, not the representation
SAMPLE_FACTOR = 10
#: the paper's sample count
PAPER_N = 25_600
#: default memory for one chunk when neither chunk_rows nor max_memory is given
DEFAULT_CHUNK_BYTES = 256 * 1024**2

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class RankmeOptions(ComputeOptions):
    """Options of ``rankme`` (the CLI flags of the same names)."""

    key: str | None = None
    chunk_rows: int | None = None
    sample_factor: int = SAMPLE_FACTOR
    texts: Path | None = None
    batch_size: int = 32
    max_length: int | None = None
    normalize: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise SpectraError(f"--chunk-rows {self.chunk_rows}: must be at least 1")
        if self.batch_size < 1:
            raise SpectraError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.max_length is not None and self.max_length < 1:
            raise SpectraError(f"--max-length {self.max_length}: must be at least 1")

    def rows_per_chunk(self, k: int, budget: int | None = None) -> int:
        """``chunk_rows``, else as many rows as fit ``budget`` bytes (default: ``max_memory``, else 256 MB)."""
        if self.chunk_rows:
            return self.chunk_rows
        return chunk_rows_for(k, budget or self.max_memory or DEFAULT_CHUNK_BYTES)


@dataclass(frozen=True)
class RankmeSummary:
    """The summary of ``rankme``: how many inputs, the best one (None when no score is finite) with its RankMe
    and RankMe/max-rank, whether every input has the same K and N, and the warnings for the CLI to show."""

    inputs: int
    best: str | None
    best_rankme: float | None
    best_rankme_fraction: float | None
    same_K: bool  # the JSON key
    same_N: bool
    warnings: list[str]
    seconds: float


@dataclass(frozen=True)
class RankmePlan:
    """The opened inputs: embedding files (name, source), models to embed (name, folder) and their texts, the
    resolved engine and the accumulation device (None: NumPy)."""

    sources: list[tuple[str, EmbeddingSource]]
    models: list[tuple[str, Path]]
    texts: list[str]
    engine: ResolvedEngine
    acc_device: str | None

    @property
    def total(self) -> int:
        """Rows to stream over every input (for the progress bar)."""
        return sum(s.n for _, s in self.sources) + len(self.texts) * len(self.models)


@dataclass
class RankmeResult(RunResult[RankmeSummary]):
    """Rows (one per input, best first), summary, inputs, options; ``spectra``: input name → σ of Z
    (descending, min(N, K) values) for the figures."""

    spectra: dict[str, np.ndarray] = field(default_factory=dict)


def _row(name: str, s: RankScores, source: str, dtype: str, seconds: float) -> dict[str, Any]:
    return {
        "input": name,
        "N": s.n,
        "K": s.k,
        "rankme": s.rankme,
        "rankme_fraction": s.rankme_fraction,
        "effective_rank": s.effective_rank,
        "stable_rank": s.stable_rank,
        "participation_ratio": s.participation_ratio,
        "alpha_req": s.alpha_req,
        "numerical_rank": s.numerical_rank,
        "max_rank": s.max_rank,
        "alpha_req_points": s.alpha_req_points,
        "dtype": dtype,
        "source": source,
        "seconds": round(seconds, 4),
    }


def score_source(
    src: EmbeddingSource,
    rows: int,
    progress: Callable[[int, int], None] | None = None,
    device: str | None = None,
) -> RankScores:
    """Scores of one embedding file, streamed in chunks of ``rows`` rows; ``device``: None for NumPy, else the
    torch device of the float64 Gram accumulation. A wide input (N < K) that fits one chunk is scored through
    its N×N Gram matrices instead (:func:`~spectra_cli.spectral.rankme.scores_wide`, same answers, O(N²K))."""
    if src.n < src.k and src.n <= rows:
        z = np.concatenate(list(src.chunks(rows, progress)))
        return scores_wide(z, dtype_eps(src.dtype), device)
    acc = GramAccumulator(src.k, device)
    for chunk in src.chunks(rows, progress):
        acc.update(chunk)
    return scores_from_accumulator(acc, dtype_eps(src.dtype))


def _score_model(
    model: Path,
    texts: list[str],
    opts: RankmeOptions,
    progress: Callable[[int, int], None],
    device: str,
    acc_device: str | None,
) -> RankScores:
    from spectra_cli.checkpoint.hf_model import iter_embeddings

    acc: GramAccumulator | None = None
    for batch in iter_embeddings(model, texts, batch_size=opts.batch_size, max_length=opts.max_length,
                                 device=device, normalize=opts.normalize, progress=progress):  # fmt: skip
        if acc is None:
            acc = GramAccumulator(batch.shape[1], acc_device)
        if not np.isfinite(batch).all():
            raise SpectraError(f"{model}: the model produced NaN/Inf embeddings; check the weights")
        acc.update(batch)
    assert acc is not None
    return scores_from_accumulator(acc, dtype_eps("float32"))


def _sort_key(row: dict[str, Any]) -> tuple[int, float]:
    v = row["rankme"]
    return (1, 0.0) if v is None or not math.isfinite(v) else (0, -v)


def run_rankme(
    inputs: Sequence[tuple[str, Path]],
    opts: RankmeOptions,
    models: Sequence[tuple[str, Path]] = (),
    progress: Progress | None = None,
) -> RankmeResult:
    """Score every embedding file in ``inputs`` ((name, path) pairs) and every model in ``models`` (embedding
    ``opts.texts``). Rows sorted by RankMe, highest first; ``summary.best`` names the best input."""
    t0 = time.perf_counter()
    p = plan_rankme(inputs, opts, models)
    rows, spectra = score(p, opts, progress)
    summary = summarize(rows, opts.sample_factor, round(time.perf_counter() - t0, 4))
    rows.sort(key=_sort_key)
    inputs_out: dict[str, Any] = {
        "embeddings": [
            {
                "name": name,
                "path": str(src.path),
                "format": src.format,
                "key": src.key,
                "shape": [src.n, src.k],
                "dtype": src.dtype,
                "bytes": src.path.stat().st_size,
            }
            for name, src in p.sources
        ],
        "models": [{"name": name, "path": str(path)} for name, path in p.models],
    }
    if p.models:
        inputs_out["texts"] = {"path": str(opts.texts), "count": len(p.texts)}
    options = options_record(opts)
    options["rankme_eps"] = RANKME_EPS
    options["resolved_device"] = p.engine.device
    options["resolved_backend"] = p.engine.backend
    return RankmeResult(rows=rows, summary=summary, inputs=inputs_out, options=options, spectra=spectra)


def plan_rankme(
    inputs: Sequence[tuple[str, Path]], opts: RankmeOptions, models: Sequence[tuple[str, Path]] = ()
) -> RankmePlan:
    """Open (and validate) every input before the long work starts; read the texts the models embed."""
    if not inputs and not models:
        raise SpectraError("nothing to score: give embedding files, or --model DIR with --texts FILE")
    if models and opts.texts is None:
        raise SpectraError("--model needs --texts FILE (one text per line) to embed")
    names = [n for n, _ in inputs] + [n for n, _ in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpectraError(f"two inputs are named {dup[0]!r}; name them apart with NAME=PATH")
    engine = resolve(EngineOptions(device=opts.device, backend=opts.backend, max_memory=opts.max_memory))
    acc_device = engine.device if engine.backend == "torch" else None
    sources = [(name, open_embeddings(path, opts.key)) for name, path in inputs]
    texts: list[str] = []
    if models:
        from spectra_cli.checkpoint.text import read_texts

        assert opts.texts is not None
        texts = read_texts(opts.texts)
    return RankmePlan(sources, list(models), texts, engine, acc_device)


def score(
    p: RankmePlan, opts: RankmeOptions, progress: Progress | None = None
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Stream every input into its Gram accumulator; one row per input (in input order) and its σ."""
    rows: list[dict[str, Any]] = []
    spectra: dict[str, np.ndarray] = {}
    total = p.total
    done = 0

    def tick(name: str) -> Callable[[int, int], None]:
        base = done

        def update(d: int, _n: int) -> None:
            if progress is not None:
                progress(base + d, total, name)

        return update

    for name, src in p.sources:
        t = time.perf_counter()
        # --max-memory as given; by default at most 256 MB a chunk (GEMM speed is flat well below that)
        budget = min(p.engine.budget, DEFAULT_CHUNK_BYTES) if opts.max_memory is None else p.engine.budget
        if p.acc_device:
            budget //= 2  # the chunk has a device copy as well
        with blas_threads((src.n, src.k)):  # one BLAS thread for small inputs (engine.SMALL_WORK)
            sc = score_source(src, opts.rows_per_chunk(src.k, budget), tick(name), p.acc_device)
        done += src.n
        rows.append(_row(name, sc, src.label, src.dtype, time.perf_counter() - t))
        spectra[name] = sc.singular_values
    for name, model in p.models:
        t = time.perf_counter()
        sc = _score_model(model, p.texts, opts, tick(name), p.engine.device, p.acc_device)
        done += len(p.texts)
        rows.append(_row(name, sc, f"{model} ← {opts.texts}", "float32", time.perf_counter() - t))
        spectra[name] = sc.singular_values
    return rows, spectra


def summarize(rows: list[dict[str, Any]], sample_factor: int, seconds: float) -> RankmeSummary:
    """The best input and a warning per (N, K) with too few samples (``rows`` in input order)."""
    warnings: list[str] = []
    short: dict[tuple[int, int], list[str]] = {}
    for r in rows:
        if r["N"] < sample_factor * r["K"]:
            short.setdefault((r["N"], r["K"]), []).append(r["input"])
    for (n, k), names_nk in short.items():
        who = ", ".join(names_nk[:4]) + (f" and {len(names_nk) - 4} more" if len(names_nk) > 4 else "")
        warnings.append(
            f"{who}: N = {n:,} samples < {sample_factor}·K = {sample_factor * k:,}; the scores are "
            f"capped by the sample count (RankMe ≤ min(N, K) = {min(n, k):,}) and noisy: use more samples "
            f"(the paper uses N = {PAPER_N:,})"
        )
    ranked = sorted(rows, key=_sort_key)
    best = ranked[0]["input"] if ranked and _sort_key(ranked[0])[0] == 0 else None
    ks = sorted({r["K"] for r in rows})
    ns = sorted({r["N"] for r in rows})
    return RankmeSummary(
        inputs=len(rows),
        best=best,
        best_rankme=ranked[0]["rankme"] if best else None,
        best_rankme_fraction=ranked[0]["rankme_fraction"] if best else None,
        same_K=len(ks) == 1,
        same_N=len(ns) == 1,
        warnings=warnings,
        seconds=seconds,
    )
