"""Reading one matrix (or one chunk of it) as the engine needs it.

The data returned is the matrix in its *stored* orientation (a GPT-2 ``Conv1D`` weight stays in×out: singular
values do not care) with conv kernels flattened to 2-D and fused-projection parts already cut out, so each
byte of a tensor is read once per run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from spectra_cli.checkpoint.matrices import MatrixSpec
from spectra_cli.checkpoint.source import Checkpoint
from spectra_cli.checkpoint.tensors import RawTensor, to_float

T = TypeVar("T")
R = TypeVar("R")


def prefetched(items: Iterable[T], read: Callable[[T], R], ahead: int = 1) -> Iterator[tuple[T, R]]:
    """``(item, read(item))`` in the order of ``items``, reading up to ``ahead`` items ahead on one background
    thread while the caller works on the current one (I/O and host→device staging overlap the compute). An
    exception raised by ``read`` is raised here, at the item it belongs to, after the items before it were
    yielded; closing the generator early cancels what was not started and waits for the read in flight."""
    it = iter(items)
    queue: list[tuple[T, Future[R]]] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spectra-prefetch") as pool:
        try:
            for _ in range(max(1, ahead)):
                nxt = next(it, _END)
                if nxt is _END:
                    break
                queue.append((nxt, pool.submit(read, nxt)))  # type: ignore[arg-type]
            while queue:
                item, fut = queue.pop(0)
                nxt = next(it, _END)
                if nxt is not _END:
                    queue.append((nxt, pool.submit(read, nxt)))  # type: ignore[arg-type]
                yield item, fut.result()
        finally:
            for _, fut in queue:
                fut.cancel()


_END = object()


class MatrixLoader:
    """Loads matrices of one checkpoint; keeps the last whole tensor when a fused split needs an index."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self._last: tuple[str, RawTensor] | None = None

    def _region(self, spec: MatrixSpec) -> tuple[int, int, int, int]:
        rows, cols = spec.stored_2d
        if spec.part is None:
            return 0, rows, 0, cols
        a, b = spec.part
        return (0, rows, a, b) if spec.transposed else (a, b, 0, cols)

    def _whole(self, spec: MatrixSpec) -> RawTensor:
        if self._last and self._last[0] == spec.tensor.name:
            return self._last[1]
        raw = self.ckpt.read(spec.tensor)
        raw = RawTensor(raw.data.reshape(spec.stored_2d), raw.dtype)
        self._last = (spec.tensor.name, raw)
        return raw

    def load(self, spec: MatrixSpec) -> RawTensor:
        """The whole matrix (2-D, stored orientation)."""
        if spec.part_index is not None:
            raw = self._whole(spec)
            idx = np.asarray(spec.part_index)
            data = raw.data[:, idx] if spec.transposed else raw.data[idx]
            return RawTensor(np.ascontiguousarray(data), raw.dtype)
        r0, r1, c0, c1 = self._region(spec)
        if (c0, c1) != (0, spec.stored_2d[1]):
            raw = self.ckpt.read_columns(spec.tensor, spec.stored_2d, c0, c1)
        else:
            raw = self.ckpt.read(spec.tensor, r0, r1)
        return RawTensor(raw.data.reshape(r1 - r0, c1 - c0), raw.dtype)

    def dense(self, spec: MatrixSpec, dtype: type[np.floating] = np.float64) -> np.ndarray:
        """The whole matrix as floats in its logical out×in orientation (a GPT-2 ``Conv1D`` weight transposed
        back), for the commands that use the weights themselves rather than their singular values. float64
        weights that ``dtype`` cannot hold (finite values beyond float32's range) stay float64, so that only
        real NaN/Inf are found non-finite."""
        raw = self.load(spec)
        x = to_float(raw, dtype).reshape(spec.stored_2d)
        if raw.dtype == "F64" and x.dtype != np.float64 and not np.isfinite(x).all():
            x = to_float(raw, np.float64).reshape(spec.stored_2d)
        return x.T if spec.transposed else x

    def chunks(self, spec: MatrixSpec, lines: int) -> Iterator[tuple[RawTensor, str]]:
        """The matrix in pieces of at most ``lines`` rows (axis "rows": accumulate XᵀX) or columns
        (axis "cols": accumulate XXᵀ), cut along its longer side."""
        if spec.part_index is not None:
            whole = self.load(spec)
            yield from split_lines(whole, lines)
            return
        r0, r1, c0, c1 = self._region(spec)
        if r1 - r0 >= c1 - c0:
            for a in range(r0, r1, lines):
                b = min(r1, a + lines)
                raw = self.ckpt.read(spec.tensor, a, b)
                data = raw.data.reshape(b - a, -1)[:, c0:c1]
                yield RawTensor(data, raw.dtype), "rows"
        else:
            for a in range(c0, c1, lines):
                b = min(c1, a + lines)
                raw = self.ckpt.read_columns(spec.tensor, spec.stored_2d, a, b, r0, r1)
                yield raw, "cols"


def split_lines(raw: RawTensor, lines: int) -> Iterator[tuple[RawTensor, str]]:
    """A matrix in blocks of ``lines`` rows (tall) or columns (wide), as the engine's chunked route takes them."""
    rows, cols = raw.data.shape
    if rows >= cols:
        for a in range(0, rows, lines):
            yield RawTensor(raw.data[a : a + lines], raw.dtype), "rows"
    else:
        for a in range(0, cols, lines):
            yield RawTensor(raw.data[:, a : a + lines], raw.dtype), "cols"
