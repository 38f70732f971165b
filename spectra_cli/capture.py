"""``spectra capture``: run a Hugging Face model over text and keep statistics of its linear modules' inputs.

For every selected linear module the forward hooks stream, in float64 on the compute device:

- the token mean of its input x (``input_mean``) and the variance of each feature (``input_variance``),
- with ``stats`` "covariance"/"both", the uncentred second moment C = mean xᵀx (in×in, CorDA's C),
- with ``stats`` "pca"/"both", an incremental, mean-centred PCA of up to ``components`` directions
  (:class:`IncrementalPCA`, the update of scikit-learn's / PEFT's ``IncrementalPCA``) with explained-variance
  ratios λₖ / Σ(per-feature variance), as PEFT's EVA defines them.

Activations are never stored. Padding tokens are left out through the attention mask; ``max_tokens`` stops
after that many tokens. Modules that receive the very same input tensor object in one forward pass (q/k/v,
gate/up) are computed once and written as aliases. Module paths are the checkpoint's tensor names minus
``.weight``. The result is written with :func:`spectra_cli.checkpoint.activations.write_activations`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spectra_cli import __version__
from spectra_cli.checkpoint.activations import ModuleActivations, write_activations
from spectra_cli.checkpoint.matrices import SelectionFields, select_matrices
from spectra_cli.checkpoint.naming import module_path
from spectra_cli.checkpoint.source import open_checkpoint
from spectra_cli.errors import CheckpointError, SelectionError, SpectraError
from spectra_cli.hf_embed import load_hf_model, load_hf_tokenizer
from spectra_cli.results import RunResult
from spectra_cli.spectral.engine import EngineOptions, blas_threads, resolve

STATS = ("pca", "covariance", "both")
_NEEDS_HF = "spectra capture runs the model with transformers"
DEFAULT_TAU = 0.99  # EVA's convergence threshold on the cosine of consecutive estimates


# ---- incremental PCA --------------------------------------------------------------------------------------


def _flip_signs(vt: torch.Tensor) -> torch.Tensor:
    """Make the largest-magnitude entry of every row positive (PEFT's ``_svd_flip(u_based_decision=False)``)."""
    idx = torch.argmax(vt.abs(), dim=1)
    signs = torch.sign(vt[torch.arange(vt.shape[0], device=vt.device), idx])
    signs[signs == 0] = 1
    return vt * signs[:, None]


_GRAM_RTOL = 1e-12  # λ (= σ²) below this fraction of λ₁ is at the float64 Gram route's noise floor


def _top_right_singular(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k singular values (descending) and right singular vectors (k×d rows) of a float64 m×d matrix.

    By the Gram route on the smaller side (one GEMM + a symmetric eigensolve, 2-5× faster than an SVD on CPU
    and more on CUDA): eigh(AᵀA) gives V directly; eigh(AAᵀ) gives U, and Vᵀ = diag(1/σ)·UᵀA. Directions whose
    σ² is below 1e-12·σ₁² (nothing left of the data there) are dropped, so fewer than k may come back.
    Small problems run on one BLAS thread (as the engine does: several threads only add contention there).
    """
    m, d = a.shape
    with blas_threads((m, d), openmp=True) if a.device.type == "cpu" else contextlib.nullcontext():
        return _top_right_singular_gram(a, k)


def _top_right_singular_gram(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, d = a.shape
    if m >= d:
        lam, vecs = torch.linalg.eigh(a.T @ a)
        lam, vecs = lam.flip(0), vecs.flip(1)
        keep = int((lam > _GRAM_RTOL * lam[0].clamp(min=0)).sum()) if float(lam[0]) > 0 else 0
        keep = min(k, keep)
        return lam[:keep].clamp(min=0).sqrt(), vecs[:, :keep].T.contiguous()
    lam, u = torch.linalg.eigh(a @ a.T)
    lam, u = lam.flip(0), u.flip(1)
    keep = int((lam > _GRAM_RTOL * lam[0].clamp(min=0)).sum()) if float(lam[0]) > 0 else 0
    keep = min(k, keep)
    s = lam[:keep].sqrt()
    vt = (u[:, :keep].T @ a) / s[:, None]
    return s, vt


class IncrementalPCA:
    """Mean-centred incremental PCA of a stream of row batches (n×d), float64.

    Each :meth:`update` takes the SVD of [diag(σ)·V_kᵀ; X − x̄_batch; √(n₀n/(n₀+n))·(μ₀ − x̄_batch)] and keeps
    the top k right singular vectors (Ross et al. 2008, as in scikit-learn and PEFT's ``IncrementalPCA``, but
    with an exact decomposition, :func:`_top_right_singular`, instead of PEFT's ``svd_lowrank``). ``explained_variance_ratio`` is σₖ² / Σ‖x − μ‖²
    over all rows seen, i.e. λₖ over the total (population) variance. ``cosines`` holds, per component, the
    cosine between the last two estimates (NaN before the second update).
    """

    def __init__(self, k: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.k = min(k, dim)
        self.dim = dim
        self.device = torch.device(device)
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.ss = 0.0  # Σ‖x − μ‖² over the rows seen
        self.components = torch.zeros(0, dim, dtype=torch.float64, device=self.device)
        self.singular_values = torch.zeros(0, dtype=torch.float64, device=self.device)
        self.cosines = torch.full((self.k,), float("nan"), dtype=torch.float64)
        self.updates = 0

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch of rows (n×d) into the estimate."""
        n = int(x.shape[0])
        if n == 0:
            return
        x = x.to(device=self.device, dtype=torch.float64)
        batch_mean = x.mean(dim=0)
        xc = x - batch_mean
        batch_ss = float((xc * xc).sum())
        if self.n == 0:
            stacked = xc
            total_ss = batch_ss
        else:
            factor = (self.n * n / (self.n + n)) ** 0.5
            correction = factor * (self.mean - batch_mean)
            stacked = torch.cat([self.singular_values[:, None] * self.components, xc, correction[None, :]])
            total_ss = self.ss + batch_ss + float(correction @ correction)
        s, vt = _top_right_singular(stacked, self.k)
        keep = int(s.shape[0])
        vt = _flip_signs(vt)
        previous = self.components
        common = min(len(previous), keep)
        if common:
            cos = (vt[:common] * previous[:common]).sum(dim=1)
            cos = cos / (torch.linalg.norm(vt[:common], dim=1) * torch.linalg.norm(previous[:common], dim=1))
            self.cosines = torch.full((self.k,), float("nan"), dtype=torch.float64)
            self.cosines[:common] = cos.cpu()
        self.mean = (self.mean * self.n + batch_mean * n) / (self.n + n)
        self.n += n
        self.ss = total_ss
        self.components = vt
        self.singular_values = s[:keep]
        self.updates += 1

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        if self.ss <= 0:
            return torch.zeros_like(self.singular_values)
        return self.singular_values**2 / self.ss

    def converged(self, tau: float = DEFAULT_TAU) -> int:
        """How many leading components have a last-step cosine ≥ τ (0 before the second update)."""
        ok = (self.cosines[: len(self.components)] >= tau).tolist()
        count = 0
        for flag in ok:
            if not flag:
                break
            count += 1
        return count


class _Stats:
    """Streaming statistics of one module's inputs (float64 on the compute device)."""

    def __init__(self, dim: int, components: int, covariance: bool, device: torch.device, chunk: int) -> None:
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dtype=torch.float64, device=device)  # Σ (x − mean)² per feature
        self.cov = torch.zeros(dim, dim, dtype=torch.float64, device=device) if covariance else None
        self.pca = IncrementalPCA(components, dim, device) if components > 0 else None
        self.chunk = chunk

    def update(self, x: torch.Tensor) -> None:
        x = x.to(torch.float64)
        n0, n = self.n, int(x.shape[0])
        if n == 0:
            return
        batch_mean = x.mean(dim=0)
        xc = x - batch_mean
        # Chan et al.'s pairwise merge of the per-feature sums of squared deviations
        delta = batch_mean - self.sum / max(n0, 1)
        self.m2 += (xc * xc).sum(dim=0) + (delta * delta) * (n0 * n / (n0 + n))
        self.n += n
        self.sum += x.sum(dim=0)
        if self.cov is not None:
            self.cov += x.T @ x
        if self.pca is not None:
            for start in range(0, int(x.shape[0]), self.chunk):
                self.pca.update(x[start : start + self.chunk])

    def result(self, name: str) -> ModuleActivations:
        n = max(self.n, 1)
        cov = None if self.cov is None else (self.cov / n).cpu().numpy().astype(np.float32)
        comps = ratios = None
        if self.pca is not None and self.pca.n > 0:
            comps = self.pca.components.cpu().numpy().astype(np.float32)
            ratios = self.pca.explained_variance_ratio.cpu().numpy()
        return ModuleActivations(
            module=name,
            input_covariance=cov,
            input_mean=(self.sum / n).cpu().numpy(),
            input_variance=(self.m2 / n).cpu().numpy(),
            pca_components=comps,
            pca_explained_variance_ratio=ratios,
            tokens=self.n,
        )


# ---- options, data, model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptureOptions(SelectionFields):
    """What ``spectra capture`` does. ``max_tokens`` None = the whole file."""

    text_field: str = "text"
    max_tokens: int | None = None
    batch_size: int = 8
    max_length: int = 512
    components: int = 32
    stats: str = "pca"
    tau: float = DEFAULT_TAU
    device: str = "auto"
    tokenizer: str | None = None
    chunk: int = 1024  # rows per incremental-PCA update (bounds the SVD size)


@dataclass
class CaptureResult(RunResult):
    """Rows (one per captured module), summary, inputs, options; ``activations`` is what was written."""

    activations: dict[str, ModuleActivations] | None = None
    aliases: dict[str, str] | None = None


def iter_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """Examples from a text file (one per non-empty line) or a JSONL file (``text_field`` of every object),
    read lazily line by line (the file may be larger than memory)."""
    if not path.is_file():
        raise SpectraError(f"{path}: no such data file")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not jsonl:
                yield line.rstrip("\r\n")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SpectraError(
                    f"{path}:{i}: not a JSON line ({e.msg}); use one JSON object per line"
                ) from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise SpectraError(
                    f"{path}:{i}: no string field {text_field!r}; name the field with --text-field"
                )
            yield obj[text_field]


def _count_examples(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def target_modules(model: Any, model_dir: Path, opts: CaptureOptions) -> dict[str, str]:
    """model module name → checkpoint module path, for the selected linear modules.

    A module qualifies when it is an ``nn.Linear`` (or transformers' GPT-2 ``Conv1D``) whose weight is a
    selected matrix of the checkpoint; the checkpoint path may differ from the model's by the base-model
    prefix (``bert.``), which is resolved here so that the file's keys are the checkpoint's.
    """
    ckpt = open_checkpoint(model_dir)
    specs, _ = select_matrices(ckpt, opts.selection())
    wanted = {module_path(s.tensor.name) for s in specs if s.tensor.name.endswith(".weight")}
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    try:
        from transformers.pytorch_utils import Conv1D

        kinds: tuple[type, ...] = (torch.nn.Linear, Conv1D)
    except ImportError:  # pragma: no cover
        kinds = (torch.nn.Linear,)
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, kinds) or not name:
            continue
        candidates = [name]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :])
        elif prefix:
            candidates.append(f"{prefix}.{name}")
        for c in candidates:
            if c in wanted:
                out[name] = c
                break
    if not out:
        raise SelectionError(
            f"{model_dir}: no linear module of the model matches the selection; check --kinds/--include/--exclude"
        )
    return out


def _count(a: np.ndarray | None) -> int:
    return 0 if a is None else len(a)


def _batches(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- the run ----------------------------------------------------------------------------------------------


class _Hooks:
    """Forward hooks that route each module's (unpadded) input rows into its statistics."""

    def __init__(self, names: dict[str, str], make: Callable[[int], _Stats]) -> None:
        self.names = names
        self.make = make
        self.stats: dict[str, _Stats] = {}
        self.aliases: dict[str, str] = {}  # checkpoint path → checkpoint path it shares its input with
        self.mask: torch.Tensor | None = None
        self.first = True
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        self.unmasked: set[str] = set()

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.reshape(-1).bool()
        self._seen = {}

    def end_batch(self) -> None:
        self.first = False
        self._seen = {}

    def __call__(self, hf_name: str) -> Callable[..., None]:
        name = self.names[hf_name]

        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            if self.first:
                prev = self._seen.get(id(x))
                if prev is not None and prev[0]() is x and prev[1] != name:
                    self.aliases[name] = prev[1]
                    return
                self._seen[id(x)] = (weakref.ref(x), name)
            elif name in self.aliases:
                return
            rows = x.detach().reshape(-1, x.shape[-1])
            if self.mask is not None and rows.shape[0] == self.mask.numel():
                rows = rows[self.mask.to(rows.device)]
            else:
                self.unmasked.add(name)
            if name not in self.stats:
                self.stats[name] = self.make(int(x.shape[-1]))
            self.stats[name].update(rows)

        return hook


@torch.no_grad()
def run_capture(
    model_dir: Path,
    data: Path,
    out: Path,
    opts: CaptureOptions,
    progress: Callable[[int, int, str], None] | None = None,
    argv: list[str] | None = None,
) -> CaptureResult:
    """Run the model over ``data`` and write the activations file ``out`` (see the module docstring)."""
    t0 = time.perf_counter()
    if opts.stats not in STATS:
        raise SpectraError(f"stats must be one of {', '.join(STATS)} (got {opts.stats!r})")
    if opts.stats != "covariance" and opts.components < 1:
        raise SpectraError("--components must be at least 1 when the PCA is captured")
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    if not Path(data).is_file():
        raise SpectraError(f"{data}: no such data file")
    if not Path(out).parent.is_dir():
        raise SpectraError(f"{Path(out).parent}: the output folder does not exist; create it first")
    # reading every header now makes a truncated or corrupt file a one-line error, not transformers' traceback
    open_checkpoint(model_dir)
    texts = iter_texts(data, opts.text_field)
    total = _count_examples(data)
    if total == 0:
        raise SpectraError(f"{data}: no examples (the file is empty)")
    device = resolve(EngineOptions(device=opts.device, backend="torch")).device
    model = load_hf_model(model_dir, device, _NEEDS_HF, architecture=True)
    tokenizer = load_hf_tokenizer(
        Path(opts.tokenizer) if opts.tokenizer else model_dir, _NEEDS_HF, "pass --tokenizer DIR"
    )
    names = target_modules(model, model_dir, opts)
    want_pca = opts.stats in ("pca", "both")
    want_cov = opts.stats in ("covariance", "both")
    dev = torch.device(device)
    hooks = _Hooks(
        names, lambda dim: _Stats(dim, opts.components if want_pca else 0, want_cov, dev, opts.chunk)
    )
    handles = [model.get_submodule(n).register_forward_hook(hooks(n)) for n in names]
    accepted = set(inspect.signature(model.forward).parameters)
    used = 0
    examples = 0
    budget = opts.max_tokens
    try:
        for batch in _batches(texts, opts.batch_size):
            if budget is not None and used >= budget:
                break
            enc = tokenizer(
                batch, return_tensors="pt", padding=True, truncation=True, max_length=opts.max_length
            )
            inputs = {k: v.to(device) for k, v in enc.items() if k in accepted}
            mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
            if budget is not None:
                flat = mask.reshape(-1)
                keep = torch.cumsum(flat.long(), 0) <= budget - used
                mask = (flat & keep).reshape(mask.shape)
            hooks.start_batch(mask)
            model(**inputs)
            hooks.end_batch()
            used += int(mask.sum())
            examples += len(batch)
            if progress is not None:
                progress(examples, total, f"{used} tokens")
    finally:
        for h in handles:
            h.remove()
    if used == 0:
        raise SpectraError(f"{data}: the examples gave no tokens")
    acts = {name: st.result(name) for name, st in hooks.stats.items()}
    bad = [
        name
        for name, m in acts.items()
        if any(
            v is not None and not np.isfinite(v).all()
            for v in (m.input_mean, m.input_variance, m.input_covariance, m.pca_components)
        )
    ]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise SpectraError(
            f"{model_dir}: the inputs of {shown} hold NaN or infinite values (NaN weights, or an overflow in "
            "this dtype); nothing was written"
        )
    aliases = {a: t for a, t in hooks.aliases.items() if t in acts}
    converged = {name: st.pca.converged(opts.tau) for name, st in hooks.stats.items() if st.pca is not None}
    seconds = time.perf_counter() - t0
    inputs_rec = {
        "model": str(model_dir),
        "data": str(data),
        "data_sha256": _file_hash(data),
        "examples": examples,
        "tokens": used,
    }
    options_rec = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()}
    meta = {
        "spectra_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": json.dumps(list(argv or [])),
        "inputs": json.dumps(inputs_rec, sort_keys=True),
        "options": json.dumps(options_rec, sort_keys=True),
        "pca_tau": str(opts.tau),
        "pca_converged": json.dumps(converged, sort_keys=True),
    }
    write_activations(out, acts, aliases, meta)
    rows: list[dict[str, Any]] = []
    for name in names.values():
        target = aliases.get(name, name)
        st = hooks.stats.get(target)
        if st is None:
            continue
        ratios = acts[target].pca_explained_variance_ratio
        rows.append(
            {
                "name": name,
                "in_features": st.dim,
                "tokens": st.n,
                "alias_of": aliases.get(name),
                "components": 0 if ratios is None else len(ratios),
                "explained_variance": None if ratios is None else float(np.sum(ratios)),
                "top_ratio": None if ratios is None or not len(ratios) else float(ratios[0]),
                "converged": converged.get(target),
                "masked": target not in hooks.unmasked,
            }
        )
    not_run = sorted(set(names.values()) - {r["name"] for r in rows})
    summary = {
        "modules": len(rows),
        "unique_inputs": len(acts),
        "tokens": used,
        "examples": examples,
        "out": str(out),
        "tau": opts.tau,
        "not_converged": sorted(
            n for n, c in converged.items() if c < _count(acts[n].pca_explained_variance_ratio)
        ),
        "not_reached": not_run,
        "seconds": seconds,
    }
    return CaptureResult(rows, summary, inputs_rec, options_rec, activations=acts, aliases=aliases)
