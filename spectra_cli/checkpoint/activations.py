"""The activations file: per-module statistics of the inputs of a model's linear modules.

Written by ``spectra capture`` and read by ``init-adapter --method corda|eva`` and ``allocate --strategy eva``.
Users of other frameworks can write it themselves: it is one safetensors file whose metadata holds
``{"format": "spectra-activations", "version": "1"}`` and, for each module (its full path in the base
checkpoint, e.g. ``model.layers.0.self_attn.q_proj``), any of these tensors:

========================================  ==========  ===================================================
key                                       shape       meaning
========================================  ==========  ===================================================
``<module>.input_covariance``             (in, in)    mean of xᵀx over the tokens (uncentred second moment)
``<module>.input_mean``                   (in,)       mean of x over the tokens
``<module>.input_variance``               (in,)       variance of each input feature over the tokens
                                                      (population: mean of (x − mean)²)
``<module>.pca_components``               (k, in)     top-k principal directions of the mean-centred
                                                      inputs, orthonormal rows, largest variance first
``<module>.pca_explained_variance_ratio`` (k,)        variance along each direction / total variance
``<module>.input_samples``                (N, in)     raw input rows (spectra derives the rest from them)
``<module>.tokens``                       (1,)        number of input rows the statistics were taken over
========================================  ==========  ===================================================

A module needs ``input_covariance`` or ``input_samples`` for CorDA, and ``pca_*``, ``input_covariance``
(with ``input_mean``) or ``input_samples`` for EVA. EVA's ``--whiten`` divides each direction by √σₖ with
σₖ = √(ratioₖ · Σ input_variance · tokens), the singular value of the centred tokens×in input matrix (PEFT's
``IncrementalPCA.singular_values_``), so with ``pca_*`` alone it also needs ``input_variance`` and ``tokens``
(the total variance is otherwise derived from ``input_covariance`` + ``input_mean`` or ``input_samples``).
The optional metadata entry ``aliases`` (a JSON object ``{"module": "module it shares its input with"}``)
lets q/k/v projections share one set of statistics.
Float tensors may be F32 or F64 and must be finite (a file with NaN or infinite values is refused).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spectra_cli.checkpoint.safetensors_io import read_header, read_rows, write_safetensors
from spectra_cli.checkpoint.tensors import SUPPORTED_FLOATS, RawTensor, to_float
from spectra_cli.checkpoint.validate import parse_json, require_regular_file, str_map
from spectra_cli.errors import CheckpointError, SelectionError, ShapeMismatch

FORMAT = "spectra-activations"
VERSION = "1"
FIELDS = (
    "input_covariance",
    "input_mean",
    "input_variance",
    "pca_components",
    "pca_explained_variance_ratio",
    "input_samples",
    "tokens",
)


@dataclass(frozen=True)
class ModuleActivations:
    """Input statistics of one module; any field may be missing (None). Arrays are float64."""

    module: str
    input_covariance: np.ndarray | None = None
    input_mean: np.ndarray | None = None
    input_variance: np.ndarray | None = None  # (in,) per-feature population variance
    pca_components: np.ndarray | None = None
    pca_explained_variance_ratio: np.ndarray | None = None
    input_samples: np.ndarray | None = None
    tokens: int = 0
    # top-k PCA computed from the covariance or the samples, largest k so far: EVA asks for ρ·r directions to
    # plan the ranks, then for r per module, and each must not decompose the module's statistics again
    # (aliases share it: the same input)
    _pca_cache: dict[int, tuple[np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def in_features(self) -> int:
        for a in (self.input_covariance, self.pca_components, self.input_samples):
            if a is not None:
                return int(a.shape[-1])
        if self.input_mean is not None:
            return int(self.input_mean.shape[0])
        raise CheckpointError(f"activations for {self.module} hold no input statistics")

    def second_moment(self) -> np.ndarray:
        """C = mean xᵀx (in×in), as CorDA uses it."""
        if self.input_covariance is not None:
            return self.input_covariance
        if self.input_samples is not None:
            x = self.input_samples
            return (x.T @ x) / max(len(x), 1)
        raise CheckpointError(
            f"activations for {self.module} have no input_covariance (or input_samples), which CorDA "
            "needs; capture them with `spectra capture … --stats covariance`"
        )

    def pca(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k principal directions (k×in, orthonormal rows) and their explained-variance ratios (k,).

        Taken from the stored components when there are at least k of them, otherwise computed exactly
        from the covariance (centred with the mean when it is given) or from the samples.
        """
        comps, ratios = self.pca_components, self.pca_explained_variance_ratio
        if comps is not None and ratios is not None and len(comps) >= k:
            return comps[:k], ratios[:k]
        for have, (c, r) in self._pca_cache.items():
            if have >= k:
                return c[:k], r[:k]
        comps, ratios = self._computed_pca(k)
        self._pca_cache.clear()
        self._pca_cache[k] = (comps, ratios)
        return comps, ratios

    def _computed_pca(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.input_samples is not None:
            x = self.input_samples - self.input_samples.mean(axis=0)
            _, s, vt = np.linalg.svd(x, full_matrices=False)
            var = s**2
            total = var.sum()
            return vt[:k].copy(), (var[:k] / total if total > 0 else np.zeros(min(k, len(var))))
        if self.input_covariance is not None:
            c = self.input_covariance
            if self.input_mean is not None:
                c = c - np.outer(self.input_mean, self.input_mean)
            w, v = np.linalg.eigh(c)
            w = np.clip(w[::-1], 0.0, None)
            v = v[:, ::-1]
            total = w.sum()
            return v[:, :k].T.copy(), (w[:k] / total if total > 0 else np.zeros(min(k, len(w))))
        have = 0 if self.pca_components is None else len(self.pca_components)
        raise CheckpointError(
            f"activations for {self.module} hold {have} principal components, {k} are needed; capture "
            "again with a larger `--components` or with `--stats covariance`"
        )


@dataclass(frozen=True)
class Activations:
    """A whole activations file: module path → statistics (aliases resolved), plus its metadata."""

    path: Path
    modules: Mapping[str, ModuleActivations]
    metadata: Mapping[str, str]

    def check_modules(self, names: Iterable[str], in_features: Mapping[str, int] | None = None) -> None:
        """Raise unless every module in the file is one of ``names`` (and has the right input width)."""
        known = set(names)
        stray = sorted(m for m in self.modules if m not in known)
        if stray:
            shown = ", ".join(stray[:3]) + (f" and {len(stray) - 3} more" if len(stray) > 3 else "")
            raise SelectionError(
                f"{self.path}: activations for modules that are not in the checkpoint: {shown}; "
                "capture them from the same model (module paths must match the checkpoint's tensor names)"
            )
        for name, acts in self.modules.items():
            want = (in_features or {}).get(name)
            if want is not None and acts.in_features != want:
                raise ShapeMismatch(
                    f"{self.path}: activations for {name} have {acts.in_features} input features, the "
                    f"module takes {want}; they were captured from another model"
                )

    def require(self, modules: Iterable[str]) -> None:
        """Raise unless the file has statistics for every one of ``modules``."""
        missing = sorted(m for m in modules if m not in self.modules)
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise SelectionError(
                f"{self.path}: no activations for {shown}; capture them for every target module"
            )


_HINT = "write it with `spectra capture` or as documented in the README"
_INTS = ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8")
#: the number of dimensions of each field (the last one is the module's input width, except for the ratios
#: and the token count)
_NDIM = {"input_covariance": 2, "input_mean": 1, "input_variance": 1, "pca_components": 2,
         "pca_explained_variance_ratio": 1, "input_samples": 2, "tokens": 1}  # fmt: skip


def read_activations(path: str | Path) -> Activations:
    """Read an activations file (see the module docstring for its format). Names, dtypes, shapes (a module's
    fields must agree on its input width), values (finite) and the aliases are checked before use: one
    :class:`CheckpointError` naming the file otherwise."""
    path = Path(path)
    require_regular_file(path, "activations file")
    infos, meta = read_header(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a spectra activations file (metadata format is {str(meta.get('format'))[:40]!r}, "
            f"expected {FORMAT!r}); {_HINT}"
        )
    fields: dict[str, dict[str, object]] = {}
    for info in infos:
        module, _, field = info.name.rpartition(".")
        if field not in FIELDS or not module:
            raise CheckpointError(
                f"{path}: unexpected tensor {info.name[:80]!r}; keys are <module>.<field> with field one of "
                + ", ".join(FIELDS)
            )
        if info.dtype not in SUPPORTED_FLOATS + _INTS or (field == "tokens" and info.dtype not in _INTS):
            want = "a whole number (I64)" if field == "tokens" else "float32 or float64"
            raise CheckpointError(f"{path}: {info.name[:80]} is {info.dtype}, not {want}; {_HINT}")
        if len(info.shape) != _NDIM[field] or (field == "tokens" and info.shape != (1,)):
            want = "(1,)" if field == "tokens" else f"{_NDIM[field]}-D"
            raise CheckpointError(
                f"{path}: {info.name[:80]} has shape {list(info.shape)}, not {want}; {_HINT}"
            )
        raw = read_rows(info)
        arr = to_float(raw) if raw.dtype in SUPPORTED_FLOATS else raw.data
        if raw.dtype in SUPPORTED_FLOATS and not np.isfinite(arr).all():
            raise CheckpointError(
                f"{path}: {info.name} holds NaN or infinite values; capture the activations again from a model "
                "whose weights and outputs are finite"
            )
        if field == "tokens":
            tokens = int(np.asarray(arr).reshape(-1)[0])
            if tokens < 0:
                raise CheckpointError(f"{path}: {info.name} is {tokens}, not a token count ≥ 0; {_HINT}")
            fields.setdefault(module, {})[field] = tokens
        else:
            fields.setdefault(module, {})[field] = np.asarray(arr, dtype=np.float64)
    for module, f in fields.items():
        _check_widths(path, module, f)
    modules = {m: ModuleActivations(module=m, **f) for m, f in fields.items()}  # type: ignore[arg-type]
    aliases = parse_json(meta.get("aliases", "{}"), str(path), "metadata 'aliases'", _HINT)
    if not str_map(aliases):
        raise CheckpointError(f"{path}: metadata 'aliases' must map module names to module names; {_HINT}")
    for alias, target in aliases.items():
        if target not in modules:
            raise CheckpointError(
                f"{path}: alias {alias[:80]} points at {target[:80]}, which has no statistics"
            )
        modules[alias] = ModuleActivations(**{**modules[target].__dict__, "module": alias})
    return Activations(path=path, modules=modules, metadata=meta)


def _check_widths(path: Path, module: str, f: Mapping[str, object]) -> None:
    """The fields of one module agree: covariance in×in, mean/variance (in,), components k×in with k ratios,
    samples N×in."""
    widths = {}
    for name in ("input_covariance", "input_mean", "input_variance", "pca_components", "input_samples"):
        arr = f.get(name)
        if isinstance(arr, np.ndarray):
            widths[name] = arr.shape[-1]
    cov = f.get("input_covariance")
    problem = ""
    if isinstance(cov, np.ndarray) and cov.shape[0] != cov.shape[1]:
        problem = f"input_covariance is {cov.shape[0]}×{cov.shape[1]}, not square"
    elif len(set(widths.values())) > 1:
        problem = (
            "its fields disagree on the input width ("
            + ", ".join(f"{k} {v}" for k, v in widths.items())
            + ")"
        )
    comps, ratios = f.get("pca_components"), f.get("pca_explained_variance_ratio")
    if (
        not problem
        and isinstance(ratios, np.ndarray)
        and (not isinstance(comps, np.ndarray) or len(ratios) != len(comps))
    ):
        problem = "pca_explained_variance_ratio needs pca_components with one row per ratio"
    if problem:
        raise CheckpointError(f"{path}: activations for {module[:80]}: {problem}; {_HINT}")


def write_activations(
    path: str | Path,
    modules: Mapping[str, ModuleActivations],
    aliases: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write an activations file atomically; arrays are stored as float32 unless they are float64."""
    tensors: dict[str, RawTensor | np.ndarray] = {}
    for name, acts in modules.items():
        for field in FIELDS:
            value = getattr(acts, field)
            if field == "tokens":
                tensors[f"{name}.tokens"] = RawTensor(np.array([value], dtype=np.int64), "I64")
            elif value is not None:
                arr = np.asarray(value)
                tensors[f"{name}.{field}"] = arr if arr.dtype == np.float64 else arr.astype(np.float32)
    meta = {"format": FORMAT, "version": VERSION, **(metadata or {})}
    if aliases:
        meta["aliases"] = json.dumps(dict(aliases), sort_keys=True)
    write_safetensors(Path(path), tensors, meta)
