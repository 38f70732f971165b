"""The batched singular-value engine.

The engine is given the matrices to decompose (:class:`~spectra_cli.checkpoint.matrices.MatrixSpec`) and
two loader callables; it plans batches within a memory budget, prefetches the next batch on a background
thread while the current one computes, upcasts on the compute device, and yields one
:class:`MatrixValues` per matrix. It does no file I/O of its own and never prints.

Backends: ``numpy`` (CPU; LAPACK through NumPy, no PyTorch import, so start-up stays lean) and ``torch``
(CUDA, or CPU on request). Methods (values only):

- ``gram``: σ = √eig(XᵀX) of the smaller Gram matrix, formed and decomposed in float64. One BLAS-3 product
  plus a symmetric eigensolve: about 2–3× faster than ``svd`` on CPU here (see benchmarks/README.md).
  Accurate to ~1e-16·σ₁²/σ relative, i.e. better than a float32 SVD for σ ≳ 1e-7·σ₁ and reliable down to
  ~1e-8·σ₁. It can be accumulated over row (or column) chunks, so a matrix larger than the memory budget is
  still processed.
- ``svd``: exact ``svdvals`` in the compute precision (LAPACK gesdd / cuSOLVER). Accurate to ~ε·σ₁
  absolute for every σ. The whole matrix must fit in the budget.
- ``auto``: ``gram`` for ``--precision float32`` (its error is below float32 SVD's over the range that
  matters) and ``svd`` for ``--precision float64`` (the Gram route cannot give float64 accuracy for small σ).

The decompositions themselves are :func:`spectra_cli.spectral.linalg.singular_values` (a stack of same-shape
matrices at once with PyTorch) and :class:`~spectra_cli.spectral.linalg.GramSum` (chunks); both scale a float64
matrix whose entries are far outside float32's range by a power of two first, so its values stay finite and
right. Float64 weights are kept in float64 until then, also with ``--precision float32``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint import torch_tensors
from spectra_cli.checkpoint.matrices import MatrixSpec
from spectra_cli.checkpoint.tensors import RawTensor, to_float
from spectra_cli.errors import BudgetError, DeviceError
from spectra_cli.options import EngineOptions
from spectra_cli.spectral import linalg

Loader = Callable[[MatrixSpec], RawTensor]
ChunkLoader = Callable[[MatrixSpec, int], Iterator[tuple[RawTensor, str]]]


@dataclass(frozen=True)
class ResolvedEngine:
    device: str  # "cpu" or "cuda:N"
    backend: str  # "numpy" or "torch"
    method: str  # "svd" or "gram"
    precision: str
    budget: int  # bytes

    @property
    def compute(self) -> linalg.Backend:
        """Where :mod:`spectra_cli.spectral.linalg` runs the decompositions of this run."""
        return linalg.Backend(self.backend, self.device)


@dataclass(frozen=True)
class MatrixValues:
    """Singular values of one matrix (descending, float64), or None when it holds NaN/Inf."""

    spec: MatrixSpec
    values: np.ndarray | None
    nan_count: int
    inf_count: int
    seconds: float
    chunks: int = 1


# ---- device and budget ------------------------------------------------------------------------------------


def _cuda_present() -> bool:
    """Cheap check before importing torch: is there an NVIDIA driver on this machine?"""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3


def resolve(opts: EngineOptions) -> ResolvedEngine:
    """Pick device, backend, method and memory budget; raise :class:`DeviceError` for an unusable device. (The
    option values themselves were validated when ``opts`` was made.)"""
    dev = opts.device.lower()
    if dev == "auto":
        dev = "cuda" if opts.backend != "numpy" and _cuda_present() and _torch_cuda_ok() else "cpu"
    if dev.startswith("cuda"):
        if opts.backend == "numpy":
            raise DeviceError("--backend numpy runs on the CPU only; use --backend torch (or auto) with CUDA")
        import_ok = _torch_cuda_ok()
        if not import_ok:
            raise DeviceError(
                f"--device {opts.device}: CUDA is not available (no NVIDIA GPU, or a CPU-only PyTorch build); "
                "use --device cpu"
            )
        import torch

        if ":" in dev:
            text = dev.split(":", 1)[1]
            if not text.isdigit():
                raise DeviceError(f"--device {opts.device}: expected cuda:N with N a device index")
            idx = int(text)
        else:
            idx = torch.cuda.current_device()
        if idx >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {opts.device}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        dev = f"cuda:{idx}"
        backend = "torch"
        default_budget = default_budget_for(dev, cuda_free_bytes(idx))
    elif dev == "cpu":
        backend = "torch" if opts.backend == "torch" else "numpy"
        default_budget = default_budget_for(dev, _available_ram())
    else:
        raise DeviceError(f"--device {opts.device}: expected auto, cpu, cuda or cuda:N")
    method = opts.method
    if method == "auto":
        method = "gram" if opts.precision == "float32" else "svd"
    return ResolvedEngine(dev, backend, method, opts.precision, opts.max_memory or default_budget)


def default_budget_for(device: str, free: int) -> int:
    """The memory budget without ``--max-memory``: half the free GPU memory on CUDA (``--max-memory`` is GPU
    memory there), a quarter of the available RAM (at most 4 GB) on the CPU."""
    if device.startswith("cuda"):
        return int(free * 0.5)
    return min(int(free * 0.25), 4 * 1024**3)


def cuda_free_bytes(idx: int) -> int:
    """Free memory of CUDA device ``idx`` in bytes (``torch.cuda.mem_get_info``)."""
    import torch

    free, _ = torch.cuda.mem_get_info(idx)
    return int(free)


def _torch_cuda_ok() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# ---- memory model and plan ----------------------------------------------------------------------------------


def working_bytes(spec: MatrixSpec, method: str, precision: str) -> int:
    """Peak bytes to decompose ``spec`` whole: stored data, float64 (or compute-dtype) copy, Gram + workspace."""
    m, n = spec.shape
    k = min(m, n)
    stored = spec.tensor.nbytes if spec.part_index else spec.nbytes_stored
    if method == "gram":
        # upcast copies (≤ 12 bytes per entry), the Gram matrix, the eigensolver's copy and a product temporary
        return stored + 12 * m * n + 24 * k * k
    pb = 8 if precision == "float64" else 4
    return stored + 3 * pb * m * n + 8 * pb * k * k


def chunk_rows(spec: MatrixSpec, budget: int) -> int:
    """Rows (along the long side) per chunk so that one Gram accumulation step fits ``budget``."""
    long_side, short = max(spec.shape), min(spec.shape)
    fixed = 24 * short * short
    per_line = short * (spec.tensor.itemsize + 12)
    if fixed + per_line > budget:
        raise BudgetError(
            f"{spec.name}: its {short}×{short} Gram matrix alone needs {_fmt(fixed)}, over the memory budget of "
            f"{_fmt(budget)}; raise --max-memory"
        )
    return int(max(1, min(long_side, (budget - fixed) // per_line)))


def plan_batches(specs: Sequence[MatrixSpec], eng: ResolvedEngine) -> list[list[MatrixSpec]]:
    """Group matrices by file and shape into batches whose working memory fits half the budget
    (the other half holds the next batch being read). A matrix larger than that is a batch of its own,
    processed in chunks with the whole budget and nothing read alongside (Gram route) — or refused with
    :class:`BudgetError` for ``svd``."""
    half = eng.budget // 2
    batches: list[list[MatrixSpec]] = []
    by_key: dict[tuple[Any, ...], list[MatrixSpec]] = {}
    order: list[tuple[Any, ...]] = []
    for s in specs:
        key = (s.tensor.file, s.shape, s.stored_2d, s.tensor.dtype, s.transposed)
        if key not in by_key:
            by_key[key] = []
            order.append(key)
        by_key[key].append(s)
    for key in order:
        cur: list[MatrixSpec] = []
        used = 0
        for s in by_key[key]:
            w = working_bytes(s, eng.method, eng.precision)
            if w > half:
                if eng.method != "gram":
                    raise BudgetError(
                        f"{s.name} ({s.shape[0]}×{s.shape[1]}) needs about {_fmt(w)} with --method svd, over half "
                        f"the memory budget ({_fmt(eng.budget)}); raise --max-memory or use --method gram, "
                        "which works in chunks"
                    )
                if cur:
                    batches.append(cur)
                    cur, used = [], 0
                batches.append([s])
                continue
            if cur and used + w > half:
                batches.append(cur)
                cur, used = [], 0
            cur.append(s)
            used += w
        if cur:
            batches.append(cur)
    return batches


def check_module_budget(specs: Sequence[MatrixSpec], budget: int, copies: int, itemsize: int) -> None:
    """For the commands that hold one module at a time (init-adapter): ``copies`` m×n arrays of ``itemsize``
    bytes plus two k×k float64 ones (a Gram matrix and its eigenvectors) must fit ``budget`` (``--max-memory``:
    GPU memory on CUDA); raise :class:`BudgetError` naming the first module that does not."""
    for s in specs:
        m, n = s.shape
        need = copies * itemsize * m * n + 16 * min(m, n) ** 2
        if need > budget:
            raise BudgetError(
                f"{s.name} ({m}×{n}) needs about {_fmt(need)}, over the memory budget of {_fmt(budget)} "
                "(--max-memory; on CUDA half the free GPU memory by default); raise --max-memory"
            )


def _fmt(n: int) -> str:
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# ---- the numeric kernels ------------------------------------------------------------------------------------


def nonfinite_counts(x: np.ndarray) -> tuple[int, int]:
    """(NaN count, Inf count), with one cheap pass when everything is finite."""
    if np.isfinite(x).all():
        return 0, 0
    nan = int(np.isnan(x).sum())
    return nan, int(np.isinf(x).sum())


#: below this much work (m·n·min(m, n), ~768³), BLAS/LAPACK run on one thread: threads gain little on
#: small matrices, and on a busy machine OpenBLAS's spinning threads made a 384² eigensolve 50× slower here
SMALL_WORK = 768**3
_controller: Any = None


def is_small(shape: tuple[int, int]) -> bool:
    m, n = shape
    return m * n * min(m, n) < SMALL_WORK


def blas_threads(shape: tuple[int, int], openmp: bool = False) -> contextlib.AbstractContextManager[Any]:
    """One BLAS thread for small matrices, the library's default for large ones. With ``openmp`` the OpenMP
    pool is limited too (PyTorch's CPU ``eigh``/``svd`` run under OpenMP; on a busy machine several threads
    make a 200×200 eigh ~100× slower)."""
    global _controller
    if not is_small(shape):
        return contextlib.nullcontext()
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # optional: without it the default thread count is kept
            _controller = False
        else:
            _controller = ThreadpoolController()
    if _controller is False:
        return contextlib.nullcontext()
    return _controller.limit(limits=1) if openmp else _controller.limit(limits=1, user_api="blas")


class _NumpyKernel:
    """LAPACK through NumPy (:func:`spectra_cli.spectral.linalg.singular_values`). A batch of small matrices is
    spread over one Python thread per core, each with one BLAS thread (NumPy releases the GIL in LAPACK): the
    parallelism of BLAS threads without their spinning on a busy machine."""

    def __init__(self, eng: ResolvedEngine) -> None:
        self.eng = eng
        self.workers = max(1, min(4, os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None
        self.cdtype = np.float64 if (eng.method == "gram" or eng.precision == "float64") else np.float32

    def _one(self, raw: RawTensor) -> tuple[np.ndarray | None, int, int]:
        # float64 weights stay float64 until linalg has scaled them into float32's range
        x = to_float(raw, np.float64 if raw.dtype == "F64" else self.cdtype)
        x = x.reshape(x.shape[0], -1)
        nan, inf = nonfinite_counts(x)
        if (nan or inf) and raw.dtype == "F64" and x.dtype != np.float64:
            # the cast to float32, not the data, may have made them infinite: count and decompose the float64
            x = to_float(raw, np.float64).reshape(x.shape)
            nan, inf = nonfinite_counts(x)
        if nan or inf:
            return None, nan, inf
        return linalg.singular_values(x, self.eng.method, dtype=self.cdtype), 0, 0

    def values(
        self, raws: list[RawTensor], specs: list[MatrixSpec]
    ) -> list[tuple[np.ndarray | None, int, int]]:
        small = all(is_small(s.shape) for s in specs)
        with blas_threads(specs[0].shape if small else (1 << 20, 1 << 20)):
            if small and len(raws) > 1 and self.workers > 1:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="spectra-lapack")
                return list(self._pool.map(self._one, raws))
            return [self._one(raw) for raw in raws]

    def stage(self, raw: RawTensor) -> RawTensor:
        """On the reader thread: nothing to do for NumPy (the upcast is the kernel's)."""
        return raw

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def chunked(self, chunks: Iterator[tuple[RawTensor, str]]) -> tuple[np.ndarray | None, int, int, int]:
        acc = linalg.GramSum()
        nan = inf = count = 0
        for raw, axis in chunks:
            x = to_float(raw, np.float64)
            x = x.reshape(x.shape[0], -1)
            count += 1
            a, b = nonfinite_counts(x)
            nan, inf = nan + a, inf + b
            if nan or inf:
                continue
            acc.add(x, axis)
        if nan or inf or acc.g is None:
            return None, nan, inf, count
        with blas_threads(acc.g.shape):
            return acc.values(), 0, 0, count


class _TorchKernel:
    """Same computations with PyTorch on ``eng.device``: data moves in its stored dtype, upcast on device."""

    def __init__(self, eng: ResolvedEngine) -> None:
        import torch

        self.torch = torch
        self.eng = eng
        self.device = torch.device(eng.device)
        self.cdtype = torch.float64 if (eng.method == "gram" or eng.precision == "float64") else torch.float32

    def close(self) -> None:
        """Nothing to release (the CUDA caching allocator keeps its blocks for the next batch)."""

    def stage(self, raw: RawTensor) -> Any:
        """On the reader thread: a host tensor in the stored dtype, pinned for CUDA (see ``torch_tensors``)."""
        return torch_tensors.stage(raw, self.eng.device)

    def _dtype_for(self, t: Any) -> Any:
        # float64 weights stay float64 until linalg has scaled them into float32's range
        return self.torch.float64 if t.dtype == self.torch.float64 else self.cdtype

    def _to_device(self, raw: RawTensor) -> Any:
        """On the device in the compute dtype: moved in the stored dtype, upcast there."""
        host = self.stage(raw)
        return torch_tensors.upload(host, self.eng.device, self._dtype_for(host))

    def values(
        self, raws: list[Any], specs: list[MatrixSpec]
    ) -> list[tuple[np.ndarray | None, int, int]]:
        """``raws``: staged host tensors (or RawTensors), all of one shape and dtype: one device tensor holds
        the stack, each matrix moved in its stored dtype and upcast into its slot (no extra stacking copy)."""
        torch = self.torch
        hosts = [r if not isinstance(r, RawTensor) else self.stage(r) for r in raws]
        first = hosts[0].reshape(hosts[0].shape[0], -1)
        # float64 for the whole stack when any of its matrices is kept in float64 (see _dtype_for)
        x = torch.empty((len(hosts), *first.shape), dtype=max((self._dtype_for(h) for h in hosts), key=lambda d: d.itemsize), device=self.device)
        for slot, h in zip(x, hosts, strict=True):
            slot.copy_(torch_tensors.upload(h.reshape(first.shape), self.eng.device))
        del hosts
        finite = torch.isfinite(x).flatten(1).all(dim=1).cpu().numpy()
        results: list[tuple[np.ndarray | None, int, int]] = [(None, 0, 0)] * x.shape[0]
        ok = np.flatnonzero(finite)
        if ok.size:
            sub = x[torch.as_tensor(ok, device=self.device)] if ok.size < x.shape[0] else x
            vals = linalg.singular_values(sub, self.eng.method, dtype=self.cdtype)
            host = vals.to("cpu", torch.float64).numpy()
            for j, i in enumerate(ok):
                results[i] = (host[j], 0, 0)
        for i in np.flatnonzero(~finite):
            xi = x[int(i)]
            results[i] = (None, int(torch.isnan(xi).sum()), int(torch.isinf(xi).sum()))
        return results

    def chunked(self, chunks: Iterator[tuple[RawTensor, str]]) -> tuple[np.ndarray | None, int, int, int]:
        torch = self.torch
        acc = linalg.GramSum()
        nan = inf = count = 0
        for raw, axis in chunks:
            x = self._to_device(raw).to(torch.float64)
            x = x.reshape(x.shape[0], -1)
            count += 1
            if not bool(torch.isfinite(x).all()):
                nan += int(torch.isnan(x).sum())
                inf += int(torch.isinf(x).sum())
                continue
            acc.add(x, axis)
        if nan or inf or acc.g is None:
            return None, nan, inf, count
        return acc.values().cpu().numpy().astype(np.float64), 0, 0, count


# ---- the streaming loop -------------------------------------------------------------------------------------


def singular_values(
    specs: Sequence[MatrixSpec],
    eng: ResolvedEngine,
    load: Loader,
    load_chunks: ChunkLoader,
) -> Iterator[MatrixValues]:
    """Decompose every matrix in ``specs`` (values only), streaming batches; yields in plan order."""
    kernel: _NumpyKernel | _TorchKernel = _TorchKernel(eng) if eng.backend == "torch" else _NumpyKernel(eng)
    batches = plan_batches(specs, eng)
    half = eng.budget // 2

    def is_chunked(batch: list[MatrixSpec]) -> bool:
        return len(batch) == 1 and working_bytes(batch[0], eng.method, eng.precision) > half

    def read(batch: list[MatrixSpec]) -> list[Any]:
        return [kernel.stage(load(s)) for s in batch]

    def prefetch(i: int) -> Future[list[Any]] | None:
        if i >= len(batches) or is_chunked(batches[i]):
            return None
        return pool.submit(read, batches[i])

    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="spectra-read") as pool,
        contextlib.closing(kernel),
    ):
        pending = prefetch(0)
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            if pending is None:  # a matrix over half the budget: chunks, whole budget, nothing in flight
                spec = batch[0]
                vals, nan, inf, n = kernel.chunked(load_chunks(spec, chunk_rows(spec, eng.budget)))
                pending = prefetch(i + 1)
                yield MatrixValues(spec, vals, nan, inf, time.perf_counter() - t0, chunks=n)
                continue
            raws = pending.result()
            pending = prefetch(i + 1)
            t0 = time.perf_counter()
            results = kernel.values(raws, batch)
            del raws
            dt = (time.perf_counter() - t0) / max(1, len(batch))
            for spec, (vals, nan, inf) in zip(batch, results, strict=True):
                yield MatrixValues(spec, vals, nan, inf, dt)


def engine_info(eng: ResolvedEngine) -> dict[str, Any]:
    return {"device": eng.device, "backend": eng.backend, "method": eng.method, "precision": eng.precision,
            "max_memory": eng.budget}  # fmt: skip
