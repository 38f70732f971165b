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
from spectra_cli.checkpoint.hf_model import load_hf_model, load_hf_tokenizer
from spectra_cli.checkpoint.matrices import select_matrices
from spectra_cli.checkpoint.naming import module_path
from spectra_cli.checkpoint.source import open_checkpoint
from spectra_cli.checkpoint.text import iter_texts
from spectra_cli.errors import CheckpointError, SelectionError, SpectraError
from spectra_cli.options import EngineOptions, SelectionOptions
from spectra_cli.results import RunResult
from spectra_cli.spectral.engine import resolve
from spectra_cli.spectral.pca import DEFAULT_TAU, IncrementalPCA

STATS = ("pca", "covariance", "both")
_NEEDS_HF = "spectra capture runs the model with transformers"


# ---- incremental PCA --------------------------------------------------------------------------------------












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
class CaptureOptions(SelectionOptions):
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
    model = load_hf_model(model_dir, device, _NEEDS_HF, architecture=True, complete=True)
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
