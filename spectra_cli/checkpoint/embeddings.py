"""Reading embedding matrices (N samples × K features) for ``rankme``, in float64 row chunks.

Formats, by suffix:

* ``.npy``: memory-mapped (``np.load(mmap_mode="r")``), so N may exceed memory; ``.npz``: the array named by
  ``key`` (or the only one).
* ``.pt`` / ``.pth`` / ``.bin``: ``torch.load(weights_only=True)`` (memory-mapped when the file is a zip
  archive): a tensor, or a dict of tensors (nested dicts flattened with dots) → the one named by ``key``.
* ``.safetensors``: the header is parsed by :mod:`spectra_cli.checkpoint.safetensors_io` and only the rows
  of one chunk are read at a time.
* ``.csv`` / ``.tsv`` / ``.parquet``: pandas (parquet needs pyarrow), read whole. Every column must be numeric
  (one column per feature; a header row is optional: a first row of numbers is data unless it reads
  0, 1, …, K−1 or 1, …, K, which is pandas' header for unnamed columns), or ``key`` names one column whose cells are vectors
  (a common way to store embeddings in parquet).

Errors (all :class:`SpectraError`, one line, saying what to do): 1-D or >2-D arrays, no rows or columns,
non-numeric data, several tensors and no ``key`` (the names are listed), an unknown ``key``, and NaN/Inf
values (how many, and the first row and column).
"""

from __future__ import annotations

import contextlib
import mmap
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.source import flatten_tensors
from spectra_cli.checkpoint.validate import first_line, require_regular_file
from spectra_cli.errors import CheckpointError, SelectionError, ShapeMismatch, SpectraError

SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".bin", ".safetensors", ".csv", ".tsv", ".parquet")

RowReader = Callable[[int, int], np.ndarray]


@dataclass(frozen=True)
class EmbeddingSource:
    """One embedding matrix on disk: N×K, its stored dtype, and a reader of row ranges.

    ``read(start, stop)`` returns rows ``start:stop`` in any real dtype; use :meth:`chunks` for validated
    float64 chunks.
    """

    path: Path
    format: str
    n: int
    k: int
    dtype: str
    key: str | None
    read: RowReader
    release: Callable[[int, int], None] | None = None

    @property
    def label(self) -> str:
        return f"{self.path}[{self.key}]" if self.key else str(self.path)

    def chunks(self, rows: int, progress: Callable[[int, int], None] | None = None) -> Iterator[np.ndarray]:
        """Yield float64 chunks of at most ``rows`` rows, in order. After the last chunk, raise
        :class:`SpectraError` if any value was NaN or ±Inf (with the count and the first position)."""
        if rows < 1:
            raise ValueError("rows must be at least 1")
        bad = 0
        first: tuple[int, int] | None = None
        for start in range(0, self.n, rows):
            stop = min(start + rows, self.n)
            x = np.asarray(self.read(start, stop), dtype=np.float64)
            finite = np.isfinite(x)
            if not finite.all():
                bad += int(x.size - np.count_nonzero(finite))
                if first is None:
                    r, c = np.argwhere(~finite)[0]
                    first = (start + int(r), int(c))
            elif bad == 0:
                yield x
            if self.release is not None:
                self.release(start, stop)
            if progress is not None:
                progress(stop, self.n)
        if bad:
            assert first is not None
            raise SpectraError(
                f"{self.label}: {bad} NaN/Inf value{'s' if bad != 1 else ''} (first at row {first[0]}, "
                f"column {first[1]}, 0-based); drop or fix those rows before scoring"
            )


def _check_shape(label: str, shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 1:
        raise ShapeMismatch(
            f"{label}: is 1-D (shape ({shape[0]},)); rankme needs an N×K matrix with one embedding per row "
            "(stack the vectors, e.g. np.stack(list_of_vectors))"
        )
    if len(shape) == 0:
        raise ShapeMismatch(f"{label}: is a scalar; rankme needs an N×K matrix with one embedding per row")
    if len(shape) > 2:
        raise ShapeMismatch(
            f"{label}: has shape {tuple(shape)}; rankme needs a 2-D N×K matrix (one embedding per row): "
            f"pool the extra axes or reshape to ({'×'.join(map(str, shape[:-1]))}, {shape[-1]})"
        )
    n, k = int(shape[0]), int(shape[1])
    if n == 0 or k == 0:
        raise ShapeMismatch(f"{label}: is empty (shape ({n}, {k})); it needs at least one row and one column")
    return n, k


def _check_numeric_np(label: str, dtype: np.dtype) -> str:
    if dtype.kind not in "fiub":
        raise CheckpointError(
            f"{label}: dtype {dtype} is not real numbers; save the embeddings as float32 or float64"
        )
    return str(dtype)


def _pick(label: str, names: list[str], key: str | None, what: str = "tensors") -> str:
    if key is not None:
        if key not in names:
            raise SelectionError(f"{label}: no {what[:-1]} named {key!r}; it holds: {', '.join(names[:20])}"
                                 + (f" … ({len(names)} in all)" if len(names) > 20 else ""))  # fmt: skip
        return key
    if len(names) == 1:
        return names[0]
    shown = ", ".join(names[:20]) + (f" … ({len(names)} in all)" if len(names) > 20 else "")
    raise SelectionError(f"{label}: holds {len(names)} {what} ({shown}); choose one with --key NAME")


def _open_npy(path: Path, key: str | None) -> EmbeddingSource:
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    if magic and magic != b"\x93NUMPY":
        raise CheckpointError(f"{path}: not a .npy file (no NumPy header); save the matrix with np.save")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read as .npy ({e}); re-save it with np.save") from e
    dtype = _check_numeric_np(str(path), arr.dtype)
    n, k = _check_shape(str(path), arr.shape)
    return EmbeddingSource(path, "npy", n, k, dtype, None, lambda a, b: arr[a:b], _releaser(arr))


def _releaser(arr: np.ndarray) -> Callable[[int, int], None] | None:
    """Drop the pages of rows a:b from this process's mapping once read (``madvise(MADV_DONTNEED)``; they stay
    in the page cache), so the resident size stays at one chunk however large the memory-mapped file."""
    mm = getattr(arr, "_mmap", None)
    if (
        mm is None
        or not hasattr(mm, "madvise")
        or not hasattr(mmap, "MADV_DONTNEED")
        or not arr.flags.c_contiguous
    ):
        return None
    row = arr.strides[0] if arr.ndim == 2 else 0
    base = int(getattr(arr, "offset", 0)) % mmap.ALLOCATIONGRANULARITY  # where the data starts in mm
    page = mmap.PAGESIZE

    def release(a: int, b: int) -> None:
        start = (base + a * row) // page * page
        stop = (base + b * row) // page * page
        if stop > start:
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(mmap.MADV_DONTNEED, start, stop - start)

    return release


def _open_npz(path: Path, key: str | None) -> EmbeddingSource:
    try:
        z = np.load(path, allow_pickle=False)
        names = list(z.files)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: cannot read as .npz ({e}); re-save it with np.savez") from e
    if not names:
        raise ShapeMismatch(f"{path}: the .npz archive holds no arrays")
    name = _pick(str(path), names, key, "arrays")
    label = f"{path}[{name}]"
    try:
        arr = z[name]
    except ValueError as e:  # an object array needs pickle, which is never allowed
        raise CheckpointError(
            f"{label}: cannot read ({first_line(e, 120)}); object arrays are refused (they would run pickled "
            "code): save a numeric array with np.savez"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise CheckpointError(f"{label}: cannot read ({first_line(e, 120)}); re-save it with np.savez") from None
    dtype = _check_numeric_np(label, arr.dtype)
    n, k = _check_shape(label, arr.shape)
    return EmbeddingSource(
        path, "npz", n, k, dtype, name if len(names) > 1 or key else None, lambda a, b: arr[a:b]
    )


def _open_torch(path: Path, key: str | None) -> EmbeddingSource:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises many types: all mean "not a readable weights-only pickle"
        text = str(e).strip().splitlines()
        raise CheckpointError(
            f"{path}: cannot load as a PyTorch file ({(text[0] if text else type(e).__name__)[:200]}); "
            "save a tensor or a dict of tensors with torch.save"
        ) from e
    if isinstance(obj, torch.Tensor):
        name, t = None, obj
    else:
        flat: dict[str, Any] = {}
        flatten_tensors("", obj, flat)
        if not flat:
            raise CheckpointError(
                f"{path}: holds no tensor (got {type(obj).__name__}); save a tensor or a dict of tensors"
            )
        name = _pick(str(path), list(flat), key)
        t = flat[name]
    label = f"{path}[{name}]" if name else str(path)
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32,
                                                                   torch.int64, torch.uint8, torch.bool)):  # fmt: skip
        raise CheckpointError(
            f"{label}: dtype {t.dtype} is not real numbers; save float32 or float64 embeddings"
        )
    if str(t.dtype).startswith("torch.float8"):
        raise CheckpointError(f"{label}: float8 embeddings are not supported; upcast to float32 first")
    n, k = _check_shape(label, tuple(t.shape))
    dtype = str(t.dtype).replace("torch.", "")
    t = t.detach()

    def read(a: int, b: int) -> np.ndarray:
        return np.asarray(t[a:b].to(torch.float64).numpy())

    return EmbeddingSource(path, "torch", n, k, dtype, name, read)


def _open_safetensors(path: Path, key: str | None) -> EmbeddingSource:
    from spectra_cli.checkpoint.safetensors_io import read_header, read_rows
    from spectra_cli.checkpoint.tensors import DTYPE_NAMES, SUPPORTED_FLOATS, to_float

    infos, _ = read_header(path)
    if not infos:
        raise ShapeMismatch(f"{path}: the safetensors file holds no tensors")
    by_name = {i.name: i for i in infos}
    name = _pick(str(path), list(by_name), key)
    info = by_name[name]
    label = f"{path}[{name}]" if len(infos) > 1 or key else str(path)
    if info.dtype.startswith("F8"):
        raise CheckpointError(f"{label}: float8 embeddings are not supported; upcast to float32 first")
    n, k = _check_shape(label, info.shape)
    floating = info.dtype in SUPPORTED_FLOATS

    def read(a: int, b: int) -> np.ndarray:
        raw = read_rows(info, a, b)
        return to_float(raw, np.float64) if floating else raw.data.astype(np.float64)

    dtype = DTYPE_NAMES.get(info.dtype, info.dtype.lower())
    return EmbeddingSource(path, "safetensors", n, k, dtype, name if len(infos) > 1 or key else None, read)


def _is_number(text: Any) -> bool:
    try:
        float(str(text))
    except ValueError:
        return False
    return True


def _open_table(path: Path, key: str | None) -> EmbeddingSource:
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            try:
                df = pd.read_parquet(path)
            except ImportError as e:
                raise CheckpointError(
                    f"{path}: reading parquet needs pyarrow; install the parquet extra: "
                    "pip install 'spectra-cli[parquet]'"
                ) from e
        else:
            sep = "\t" if suffix == ".tsv" else ","
            df = pd.read_csv(path, sep=sep)
            names = [str(c) for c in df.columns]
            counting = names in (
                [str(i) for i in range(len(names))],
                [str(i) for i in range(1, len(names) + 1)],
            )
            if names and all(_is_number(c) for c in names) and not counting:  # no header row
                df = pd.read_csv(path, sep=sep, header=None)
    except SpectraError:
        raise
    except pd.errors.EmptyDataError as e:
        raise ShapeMismatch(f"{path}: is empty; it needs at least one row and one column") from e
    except Exception as e:  # pandas/pyarrow parse errors have many types
        raise CheckpointError(f"{path}: cannot read as {suffix[1:]} ({str(e)[:200]})") from e
    label = str(path)
    if key is not None:
        if key not in df.columns:
            cols = ", ".join(map(str, df.columns[:20]))
            raise SelectionError(f"{path}: no column named {key!r}; columns: {cols}")
        try:
            arr = (
                np.stack([np.asarray(v, dtype=np.float64) for v in df[key]]) if len(df) else np.empty((0, 0))
            )
        except (ValueError, TypeError) as e:
            raise CheckpointError(
                f"{path}: column {key!r} does not hold equal-length numeric vectors ({e}); "
                "store one number per column, or one vector per cell"
            ) from e
        n, k = _check_shape(f"{path}[{key}]", arr.shape)
        return EmbeddingSource(path, suffix[1:], n, k, "float64", key, lambda a, b: arr[a:b])
    bad = [str(c) for c in df.columns if not pd.api.types.is_numeric_dtype(df[c].dtype)]
    if bad:
        vectors = [c for c in bad if len(df) and isinstance(df[c].iloc[0], list | tuple | np.ndarray)]
        hint = (f"; column {vectors[0]!r} holds vectors: use --key {vectors[0]}" if vectors
                else "; drop them (keep only the embedding columns)")  # fmt: skip
        raise CheckpointError(
            f"{path}: non-numeric column{'s' if len(bad) > 1 else ''} {', '.join(repr(b) for b in bad[:10])}"
            + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
            + hint
        )
    index_like = [str(c) for c in df.columns if str(c).startswith("Unnamed: ")]
    if index_like:
        raise CheckpointError(
            f"{path}: column {index_like[0]!r} looks like a saved row index, not a feature; "
            "write the file with index=False (or drop that column)"
        )
    n, k = _check_shape(label, df.shape)
    arr = df.to_numpy(dtype=np.float64)
    dtypes = {str(d) for d in df.dtypes}
    dtype = "float32" if dtypes == {"float32"} else "float64"
    return EmbeddingSource(path, suffix[1:], n, k, dtype, None, lambda a, b: arr[a:b])


_OPENERS: dict[str, Callable[[Path, str | None], EmbeddingSource]] = {
    ".npy": _open_npy,
    ".npz": _open_npz,
    ".pt": _open_torch,
    ".pth": _open_torch,
    ".bin": _open_torch,
    ".safetensors": _open_safetensors,
    ".csv": _open_table,
    ".tsv": _open_table,
    ".parquet": _open_table,
}


def open_embeddings(path: str | Path, key: str | None = None) -> EmbeddingSource:
    """Open an embedding file (format by suffix, see the module docstring); nothing but headers and small
    tables is read until :meth:`EmbeddingSource.chunks` is iterated."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a folder; give an embedding file ({', '.join(SUFFIXES)}), or a model folder with "
            "--model DIR --texts FILE"
        )
    opener = _OPENERS.get(path.suffix.lower())
    if opener is None:
        raise CheckpointError(
            f"{path}: unknown embedding format {path.suffix or '(no suffix)'!r}; use one of {', '.join(SUFFIXES)}"
        )
    require_regular_file(path, "embedding file")
    return opener(path, key)


def chunk_rows_for(k: int, budget_bytes: int) -> int:
    """Rows per chunk so that one chunk in flight fits ``budget_bytes``: the stored rows (≤ 8·K bytes a row), their
    float64 copy and its shifted copy in the accumulator (8·K each), 24·K bytes a row in all."""
    return max(1, budget_bytes // (24 * max(k, 1)))
