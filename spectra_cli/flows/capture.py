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
from dataclasses import dataclass
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
from spectra_cli.options import ComputeOptions, EngineOptions, SelectionOptions
from spectra_cli.results import RunResult, options_record
from spectra_cli.spectral.engine import resolve
from spectra_cli.spectral.linalg import Backend
from spectra_cli.spectral.pca import DEFAULT_TAU, IncrementalPCA

STATS = ("pca", "covariance", "both")
_NEEDS_HF = "spectra capture runs the model with transformers"


class _Stats:
    """Streaming statistics of one module's inputs (float64 on the compute device)."""

    def __init__(self, dim: int, components: int, covariance: bool, device: torch.device, chunk: int,
                 backend: Backend | None = None) -> None:  # fmt: skip
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dtype=torch.float64, device=device)  # Σ (x − mean)² per feature
        self.cov = torch.zeros(dim, dim, dtype=torch.float64, device=device) if covariance else None
        self.pca = IncrementalPCA(components, dim, device, backend) if components > 0 else None
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
class CaptureOptions(SelectionOptions, ComputeOptions):
    """What ``spectra capture`` does. ``max_tokens`` None = the whole file."""

    text_field: str = "text"
    max_tokens: int | None = None
    batch_size: int = 8
    max_length: int = 512
    components: int = 32
    stats: str = "pca"
    tau: float = DEFAULT_TAU
    tokenizer: str | None = None
    chunk: int = 1024  # rows per incremental-PCA update (bounds the SVD size)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stats not in STATS:
            raise SpectraError(f"--stats {self.stats!r} is not one of {', '.join(STATS)}")
        if self.stats != "covariance" and self.components < 1:
            raise SpectraError(f"--components {self.components}: must be at least 1 when the PCA is captured")
        for flag, value in (("--max-tokens", self.max_tokens), ("--batch-size", self.batch_size),
                            ("--max-length", self.max_length)):  # fmt: skip
            if value is not None and value < 1:
                raise SpectraError(f"{flag} {value}: must be at least 1")
        if not 0 <= self.tau <= 1:
            raise SpectraError(f"--tau {self.tau}: the cosine threshold must be in [0, 1]")
        if self.chunk < 1:
            raise SpectraError(f"chunk {self.chunk}: the rows per PCA update must be at least 1")


@dataclass(frozen=True)
class CaptureSummary:
    """The summary of ``capture``: modules captured and distinct inputs among them, tokens and examples read,
    the file written, the PCA convergence threshold τ and the inputs whose components had not settled, the
    selected modules the forward pass never reached."""

    modules: int
    unique_inputs: int
    tokens: int
    examples: int
    out: str
    tau: float
    not_converged: list[str]
    not_reached: list[str]
    seconds: float


@dataclass
class CaptureResult(RunResult[CaptureSummary]):
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


@dataclass(frozen=True)
class CapturePlan:
    """The loaded model and tokenizer on the compute device, where the PCA's decompositions run
    (``--backend``), the selected modules (model module name → checkpoint module path), and the data: its
    examples and how many there are."""

    model: Any
    tokenizer: Any
    device: str
    backend: Backend
    names: dict[str, str]
    texts: Iterator[str]
    examples: int


@dataclass
class Captured:
    """What the forward passes gave: the per-module statistics (and shared inputs), tokens and examples read."""

    hooks: _Hooks
    tokens: int
    examples: int


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
    p = plan_capture(model_dir, data, out, opts)
    got = capture(p, opts, progress)
    if got.tokens == 0:
        raise SpectraError(f"{data}: the examples gave no tokens")
    acts = _finite_results(got.hooks, model_dir)
    aliases = {a: t for a, t in got.hooks.aliases.items() if t in acts}
    converged = {name: st.pca.converged(opts.tau) for name, st in got.hooks.stats.items() if st.pca is not None}
    seconds = time.perf_counter() - t0
    inputs_rec = {
        "model": str(model_dir),
        "data": str(data),
        "data_sha256": _file_hash(data),
        "examples": got.examples,
        "tokens": got.tokens,
    }
    options_rec = options_record(opts)
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
    rows, summary = summarize(p.names, got, acts, aliases, converged, out, opts.tau, seconds)
    return CaptureResult(rows, summary, inputs_rec, options_rec, activations=acts, aliases=aliases)


def plan_capture(model_dir: Path, data: Path, out: Path, opts: CaptureOptions) -> CapturePlan:
    """Check the inputs (the options were checked by :class:`CaptureOptions`), load the model and tokenizer,
    choose the modules to hook; nothing is run."""
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
    backend = resolve(EngineOptions(device=opts.device, backend=opts.backend)).compute  # where the PCA runs
    model = load_hf_model(model_dir, device, _NEEDS_HF, architecture=True, complete=True)
    tokenizer = load_hf_tokenizer(
        Path(opts.tokenizer) if opts.tokenizer else model_dir, _NEEDS_HF, "pass --tokenizer DIR"
    )
    return CapturePlan(model, tokenizer, device, backend, target_modules(model, model_dir, opts), texts, total)


@torch.no_grad()
def capture(p: CapturePlan, opts: CaptureOptions, progress: Callable[[int, int, str], None] | None = None
            ) -> Captured:  # fmt: skip
    """Run the model over the examples in batches with a forward hook on every planned module, until the data
    or ``max_tokens`` runs out; padding (and tokens past the budget) are masked out."""
    want_pca = opts.stats in ("pca", "both")
    want_cov = opts.stats in ("covariance", "both")
    dev = torch.device(p.device)
    hooks = _Hooks(
        p.names, lambda dim: _Stats(dim, opts.components if want_pca else 0, want_cov, dev, opts.chunk, p.backend)
    )
    handles = [p.model.get_submodule(n).register_forward_hook(hooks(n)) for n in p.names]
    accepted = set(inspect.signature(p.model.forward).parameters)
    used = 0
    examples = 0
    budget = opts.max_tokens
    try:
        for batch in _batches(p.texts, opts.batch_size):
            if budget is not None and used >= budget:
                break
            enc = p.tokenizer(
                batch, return_tensors="pt", padding=True, truncation=True, max_length=opts.max_length
            )
            inputs = {k: v.to(p.device) for k, v in enc.items() if k in accepted}
            mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
            if budget is not None:
                flat = mask.reshape(-1)
                keep = torch.cumsum(flat.long(), 0) <= budget - used
                mask = (flat & keep).reshape(mask.shape)
            hooks.start_batch(mask)
            p.model(**inputs)
            hooks.end_batch()
            used += int(mask.sum())
            examples += len(batch)
            if progress is not None:
                progress(examples, p.examples, f"{used} tokens")
    finally:
        for h in handles:
            h.remove()
    return Captured(hooks, used, examples)


def _finite_results(hooks: _Hooks, model_dir: Path) -> dict[str, ModuleActivations]:
    """Each captured input's statistics; refuses NaN/Inf (nothing is written then)."""
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
    return acts


def summarize(names: dict[str, str], got: Captured, acts: dict[str, ModuleActivations], aliases: dict[str, str],
              converged: dict[str, int], out: Path, tau: float,
              seconds: float) -> tuple[list[dict[str, Any]], CaptureSummary]:  # fmt: skip
    """One row per captured module (model order) and the summary."""
    hooks = got.hooks
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
    summary = CaptureSummary(
        modules=len(rows),
        unique_inputs=len(acts),
        tokens=got.tokens,
        examples=got.examples,
        out=str(out),
        tau=tau,
        not_converged=sorted(
            n for n, c in converged.items() if c < _count(acts[n].pca_explained_variance_ratio)
        ),
        not_reached=sorted(set(names.values()) - {r["name"] for r in rows}),
        seconds=seconds,
    )
    return rows, summary
