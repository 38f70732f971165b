"""``init-adapter``: export an initialised PEFT LoRA adapter (PiSSA, MiLoRA, OLoRA, CorDA, EVA, extract) and,
for methods that change the base, the residual model W_res = W − s·B·A.

Flow: open the checkpoint → select the target modules (2-D ``…weight`` tensors; by default every linear
weight but embeddings and the output head) → decide each module's rank and α (uniform ``rank``, a PEFT-style
``ranks_file``, an allocation, or the method's own ``plan_ranks``) and check them all before any work →
stage the output folder → stream the checkpoint in read order, one module's weights in memory at a time
(each byte read once): target modules are factorised on the compute device by the registered method, their
residual is written in place of the weight; every other tensor is copied bit for bit → write the adapter,
a README and ``spectra_run.json`` → rename the staging folder into place. No printing.

Output layout (``out/``):

- ``adapter/``: ``adapter_config.json`` + ``adapter_model.safetensors`` (keys
  ``base_model.model.<module>.lora_A.weight`` r×in and ``….lora_B.weight`` out×r, float32 unless the compute
  precision is float64), ``init_lora_weights: true`` so that PEFT loads the factors as they are.
- ``residual/`` (methods that change the base): the input's own layout — same tensor names and order, the same
  shards and index, config/tokenizer files copied — with every target weight replaced by its residual, in the
  stored dtype (or ``dtype``: then every floating tensor is converted and ``config.json``'s ``torch_dtype``
  updated). Safetensors input only (.bin input: convert it first).
- ``README.md`` (how to load it) and ``spectra_run.json`` (provenance).
"""

from __future__ import annotations

import contextlib
import math
import re
import resource
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spectra_cli.checkpoint.adapter import is_adapter, pattern_value
from spectra_cli.checkpoint.loader import MatrixLoader
from spectra_cli.checkpoint.matrices import MatrixSpec, select_matrices
from spectra_cli.checkpoint.naming import matches_kind, module_path, parse_names
from spectra_cli.checkpoint.source import Checkpoint, open_checkpoint
from spectra_cli.checkpoint.tensors import (
    DTYPE_CODES,
    DTYPE_NAMES,
    RawTensor,
    TensorInfo,
)
from spectra_cli.errors import CheckpointError, SelectionError, ShapeMismatch, SpectraError
from spectra_cli.options import SelectionOptions
from spectra_cli.results import RunResult

if TYPE_CHECKING:
    import torch

    from spectra_cli.spectral.init import InitMethod

#: --dtype names → safetensors codes
_DEFAULT_SKIP_ROLES = ("embedding", "lm_head")


@dataclass(frozen=True)
class InitOptions(SelectionOptions):
    """Options of ``init-adapter`` (the CLI flags of the same names).

    ``alpha`` None means s = 1 (α = r, or √r with rsLoRA). ``method_options`` are passed to the method as
    ``InitInput.options`` together with ``niter`` (``fast``) and ``energy``.
    """

    method: str = "pissa"
    rank: int | None = None
    alpha: float | None = None
    rslora: bool = False
    ranks_file: Path | None = None
    allocate: str | None = None  # an allocation strategy of ``spectra allocate`` (with ``budget_rank``)
    budget_rank: float | None = None
    ranks: Mapping[str, int] | None = None  # module → rank, e.g. from an allocation
    alphas: Mapping[str, float] | None = None  # module → α (with ``ranks``)
    tuned: Path | None = None
    energy: float | None = None
    fast: int | None = None
    activations: Path | None = None
    method_options: Mapping[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    precision: str = "float32"
    device: str = "auto"
    force: bool = False


@dataclass
class InitResult(RunResult):
    """Rows (one per target module), summary, inputs, options; ``out`` is the written folder."""

    out: Path | None = None


@dataclass(frozen=True)
class Target:
    """One module to initialise: its matrix, rank, α and scale s."""

    spec: MatrixSpec
    path: str  # module path (tensor name without .weight)
    rank: int
    alpha: float
    scale: float


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _unit_alpha(rank: int, rslora: bool) -> float:
    """α giving s = 1."""
    return math.sqrt(rank) if rslora else float(rank)


# ---- choosing the targets ---------------------------------------------------------------------------------


def select_targets(ckpt: Checkpoint, opts: InitOptions) -> list[MatrixSpec]:
    """The target weights: 2-D ``<module>.weight`` matrices passing the filters, in read order.

    With no ``--kinds``/``--include`` every linear weight but embeddings and the output head is a target
    (PEFT's ``all-linear``). Every ``--kinds`` entry must match something; embeddings, conv kernels and fused
    parts cannot be targets (PEFT gives them other factor shapes)."""
    specs, _ = select_matrices(ckpt, opts.selection(split_fused=False))
    explicit = bool(opts.kinds or opts.include)
    out: list[MatrixSpec] = []
    for s in specs:
        two_d = len(s.tensor.shape) == 2 and s.tensor.name.endswith(".weight")
        if not explicit:
            if two_d and s.role not in _DEFAULT_SKIP_ROLES:
                out.append(s)
            continue
        if not two_d:
            raise SelectionError(
                f"{s.name}: a {len(s.tensor.shape)}-D tensor cannot get a LoRA adapter here (only linear "
                "<module>.weight matrices); narrow --kinds / --include or add --exclude"
            )
        if s.role == "embedding":
            raise SelectionError(
                f"{s.name}: embeddings are not supported as init-adapter targets; add --exclude '{s.name}'"
            )
        out.append(s)
    if not out:
        raise SelectionError(f"{ckpt.path}: no linear weight matrices to initialise; name them with --kinds")
    names = parse_names([t.name for t in ckpt.tensors])
    for k in opts.kinds:
        if not any(matches_kind(s.tensor.name, names[s.tensor.name].kind, k) for s in out):
            raise SelectionError(
                f"--kinds {k}: matches no linear weight in {ckpt.path}; "
                f"kinds present: {', '.join(sorted({s.kind for s in out})[:12])}"
            )
    if len({s.transposed for s in out}) > 1:
        raise SelectionError(
            "the targets mix Conv1D (in×out) and Linear weights, which one adapter config cannot describe "
            "(fan_in_fan_out); select one kind of layer with --kinds"
        )
    return out


def _read_ranks_file(path: Path) -> dict[str, Any]:
    from spectra_cli.checkpoint.adapter import check_lora_config
    from spectra_cli.checkpoint.validate import load_json

    hint = "give a PEFT-style JSON (what `spectra allocate --peft-config` writes)"
    cfg = check_lora_config(load_json(path, "ranks file", hint, SpectraError), str(path), hint, SpectraError)
    if "r" not in cfg and not cfg.get("rank_pattern"):
        raise SpectraError(
            f"{path}: not a ranks file: expected a JSON object with 'r' and optionally 'lora_alpha', "
            "'rank_pattern', 'alpha_pattern' (what `spectra allocate --peft-config` writes)"
        )
    return cfg


def _peft_targets(target_modules: Any, path: str) -> bool:
    """PEFT's ``target_modules`` rule: a string is a full regex (or "all-linear"), a list matches a module whose
    path equals an entry or ends with ``.entry``; None (absent) matches everything."""
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, path) is not None
    return path in target_modules or any(path.endswith(f".{t}") for t in target_modules)


def _ranks_file_targets(
    cfg: Mapping[str, Any], specs: Sequence[MatrixSpec], paths: Mapping[str, str], opts: InitOptions
) -> list[MatrixSpec]:
    """The modules a ranks file adapts: its ``target_modules`` (as PEFT reads them) among the selected ones.
    Without --kinds/--include/--exclude, a ``rank_pattern``/``alpha_pattern`` key matching no module means the
    file was written for another model: refused."""
    tm = cfg.get("target_modules")
    kept = [s for s in specs if _peft_targets(tm, paths[s.name])]
    if not kept:
        raise SelectionError(
            f"{opts.ranks_file}: its target_modules ({tm}) match none of the selected modules; the ranks file "
            "was written for another model or another selection (check --kinds)"
        )
    if not (opts.kinds or opts.include or opts.exclude):
        known = [paths[s.name] for s in kept]
        for field_name in ("rank_pattern", "alpha_pattern"):
            for key in cfg.get(field_name) or {}:
                if not any(re.match(rf"(.*\.)?({key})$", p) for p in known):
                    raise SelectionError(
                        f"{opts.ranks_file}: {field_name} key {key!r} matches no module of the checkpoint's "
                        "targets; the ranks file was written for another model"
                    )
    return kept


def plan_targets(
    specs: Sequence[MatrixSpec],
    opts: InitOptions,
    method: InitMethod,
    activations: Mapping[str, Any] | None,
) -> tuple[list[Target], list[str]]:
    """Each module's rank, α and scale; modules given rank 0 are dropped (returned second).
    Raises :class:`ShapeMismatch` for a rank above min(out, in) before any work starts."""
    paths = {s.name: module_path(s.tensor.name) for s in specs}
    rslora = opts.rslora
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    if opts.ranks_file is not None or opts.ranks is not None:
        if opts.rank is not None:
            raise SpectraError("give either --rank or a rank allocation (--ranks / --allocate), not both")
        if opts.ranks_file is not None:
            cfg = _read_ranks_file(opts.ranks_file)
            r0 = int(cfg.get("r", 8))
            a0 = cfg.get("lora_alpha")
            specs = _ranks_file_targets(cfg, specs, paths, opts)
            for s in specs:
                p = paths[s.name]
                r = int(pattern_value(cfg.get("rank_pattern"), p, r0))
                ranks[p] = r
                default_alpha = (
                    float(a0) * (r / r0 if not rslora else math.sqrt(r / r0))
                    if a0 is not None and r0
                    else None
                )
                a = pattern_value(cfg.get("alpha_pattern"), p, default_alpha)
                alphas[p] = (
                    float(a) if a is not None else _unit_alpha(r, rslora) if opts.alpha is None else 0.0
                )
        else:
            assert opts.ranks is not None
            for s in specs:
                p = paths[s.name]
                ranks[p] = int(opts.ranks.get(p, 0))
                if opts.alphas and p in opts.alphas:
                    alphas[p] = float(opts.alphas[p])
    elif opts.rank is not None:
        ranks = {paths[s.name]: opts.rank for s in specs}
        if method.plan_ranks is not None:
            assert activations is not None
            planned = method.plan_ranks({p: activations[p] for p in ranks}, opts.rank, _method_options(opts))
            ranks = {p: int(planned.get(p, 0)) for p in ranks}
    elif method.needs_tuned and opts.energy is not None:
        ranks = {paths[s.name]: 0 for s in specs}  # chosen per module by the energy threshold
    else:
        raise SpectraError(
            "give --rank R (or --ranks FILE / --allocate STRATEGY, or --energy τ with extract)"
        )
    targets: list[Target] = []
    dropped: list[str] = []
    too_big: list[str] = []
    energy_mode = method.needs_tuned and opts.energy is not None
    for s in specs:
        p = paths[s.name]
        r = ranks[p]
        m, n = s.shape
        if r < 0:
            raise SpectraError(f"{p}: rank {r} is negative")
        if r > min(m, n):
            too_big.append(f"{p} ({m}×{n}, rank {r})")
            continue
        if r == 0 and not energy_mode:
            dropped.append(p)
            continue
        base_r = max(r, 1)
        if p in alphas and alphas[p] > 0:
            alpha = alphas[p]
        elif opts.alpha is None:
            alpha = _unit_alpha(base_r, rslora)
        elif opts.rank is not None and base_r != opts.rank:  # keep α/r (α/√r) constant when ranks change
            alpha = opts.alpha * (base_r / opts.rank if not rslora else math.sqrt(base_r / opts.rank))
        else:
            alpha = opts.alpha
        targets.append(Target(s, p, r, alpha, _scale(alpha, base_r, rslora)))
    if too_big:
        more = f" and {len(too_big) - 3} more" if len(too_big) > 3 else ""
        raise ShapeMismatch(
            f"rank larger than min(out, in) for {', '.join(too_big[:3])}{more}; lower --rank (or the ranks file)"
        )
    if not targets:
        raise SelectionError("every target module got rank 0; nothing to initialise")
    return targets, dropped


def _method_options(opts: InitOptions) -> dict[str, Any]:
    out: dict[str, Any] = dict(opts.method_options)
    if opts.fast is not None:
        out["niter"] = opts.fast
    if opts.energy is not None:
        out["energy"] = opts.energy
    return out


# ---- writing the residual ---------------------------------------------------------------------------------






# ---- the adapter ------------------------------------------------------------------------------------------


README = """\
# LoRA adapter initialised by spectra ({method})

Written by `{argv}` on {created}.

- `adapter/`: a PEFT LoRA adapter ({n} modules, rank {ranks}) with `init_lora_weights: true`, so PEFT loads
  the factors as they are.
{residual_line}
Load it with PEFT (base_model_name_or_path in the config points at the base to use):

```python
from transformers import AutoModel  # or AutoModelForCausalLM, … as for the original model
from peft import PeftModel

base = AutoModel.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{adapter}", is_trainable=True)  # is_trainable=False for inference
```

{after}
"""

_AFTER_RESIDUAL = """\
The residual plus the adapter reproduces the original model's weights (W_res + s·B·A = W, up to rounding to the
residual's dtype). Do not load the adapter on the *original* model: it would count the adapter's part twice.
To turn the trained adapter into a plain LoRA for the *original* model, let PEFT subtract this initial
adapter when saving (it writes ΔW = s·(BA − B₀A₀) as A′ = [A; A₀], B′ = [B, −B₀] with r doubled and α doubled,
×√2 with rsLoRA; PEFT refuses rsLoRA together with rank/alpha patterns). Give it a copy of `adapter/`, because PEFT
rewrites the config of the folder it is given:

```python
# after training `model` (loaded as above); cp -r {adapter} initial-adapter
model.save_pretrained("trained-lora", path_initial_model_for_weight_conversion="initial-adapter")
```
"""

_AFTER_BASE = """\
The base model is unchanged: load the adapter on the original checkpoint.
"""


# ---- the run ----------------------------------------------------------------------------------------------


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[name]  # fmt: skip


def _to_device(raw: RawTensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    import torch

    if raw.dtype == "BF16":
        t = torch.from_numpy(np.ascontiguousarray(raw.data).view(np.int16)).view(torch.bfloat16)
    elif raw.dtype in ("F16", "F32", "F64"):
        t = torch.from_numpy(np.ascontiguousarray(raw.data))
    else:
        raise ShapeMismatch(f"cannot initialise from {raw.dtype} weights")
    return t.to(device).to(dtype)


def _from_device(t: torch.Tensor, code: str) -> RawTensor:
    import torch

    if code == "BF16":
        return RawTensor(
            t.to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().view(np.uint16), code
        )
    name = DTYPE_NAMES[code]
    return RawTensor(t.to(_torch_dtype(name)).cpu().contiguous().numpy(), code)


@contextlib.contextmanager
def _threads(shape: tuple[int, int], device: str) -> Iterator[None]:
    """One CPU thread for small matrices (the analyze engine's rule, ``engine.is_small``), for PyTorch and for
    the NumPy/SciPy BLAS of the Gram route (:func:`~spectra_cli.spectral.init_svd.gram_top`,
    ``engine.blas_threads``): threads gain little there, and on a busy machine their spinning made the
    decompositions several times slower."""
    import torch

    from spectra_cli.spectral.engine import blas_threads, is_small

    if device != "cpu" or not is_small(shape):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with blas_threads(shape):
            yield
    finally:
        torch.set_num_threads(before)


def _device(opts: InitOptions) -> str:
    from spectra_cli.options import EngineOptions
    from spectra_cli.spectral.engine import resolve

    return resolve(EngineOptions(opts.device, opts.precision, "svd", "torch")).device


def get_method(name: str) -> InitMethod:
    from spectra_cli.spectral.init import methods

    reg = methods()
    if name not in reg:
        raise SelectionError(f"unknown init method {name!r}; choose one of {', '.join(sorted(reg))}")
    return reg[name]


def run_init(
    path: str | Path,
    out: str | Path,
    options: InitOptions | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    argv: Sequence[str] = (),
) -> InitResult:
    """Initialise an adapter for the checkpoint at ``path`` and write it (with the residual) to ``out``."""
    import torch

    from spectra_cli.checkpoint.provenance import write_run_record
    from spectra_cli.checkpoint.writers import (
        LoraFactors,
        ResidualWriter,
        commit_output,
        json_number,
        prepare_output,
        write_lora_adapter,
    )
    from spectra_cli.spectral.init import InitInput

    opts = options or InitOptions()
    t0 = time.perf_counter()
    out = Path(out)
    method = get_method(opts.method)
    if opts.dtype is not None and opts.dtype not in DTYPE_CODES:
        raise SpectraError(f"--dtype {opts.dtype}: choose one of {', '.join(DTYPE_CODES)}")
    if is_adapter(path):
        raise CheckpointError(f"{path}: a PEFT adapter folder; init-adapter needs a full model checkpoint")
    if opts.tuned is not None and not method.needs_tuned:
        raise SpectraError(
            f"--tuned is only used by methods that start from a fine-tune (extract), not {method.name}"
        )
    if opts.energy is not None and not method.needs_tuned:
        raise SpectraError(f"--energy is only used by extract, not {method.name}")
    if method.needs_tuned and opts.tuned is None:
        raise SpectraError(f"{method.name} needs the fine-tuned checkpoint: add --tuned TUNED")
    if opts.activations is not None and not method.needs_activations and opts.allocate is None:
        raise SpectraError(
            f"--activations is not used by {method.name} (only by methods that need them, and --allocate eva)"
        )
    if method.needs_activations and opts.activations is None:
        raise SpectraError(
            f"{method.name} needs the inputs' statistics: capture them with `spectra capture` and pass "
            "--activations FILE"
        )
    if opts.dtype is not None and not method.changes_base:
        raise SpectraError(f"--dtype sets the residual's dtype; {method.name} leaves the base unchanged")
    ckpt = open_checkpoint(path)
    specs = select_targets(ckpt, opts)
    if opts.ranks_file is not None:  # the file's target_modules narrow the selection before anything is read
        paths = {sp.name: module_path(sp.tensor.name) for sp in specs}
        specs = _ranks_file_targets(_read_ranks_file(opts.ranks_file), specs, paths, opts)
    acts = None
    if opts.activations is not None and method.needs_activations:
        from spectra_cli.checkpoint.activations import read_activations

        acts_file = read_activations(opts.activations)
        all_modules = [module_path(t.name) for t in ckpt.tensors if len(t.shape) >= 2]
        acts_file.check_modules(all_modules, {module_path(s.tensor.name): s.shape[1] for s in specs})
        acts_file.require(module_path(s.tensor.name) for s in specs)
        acts = acts_file.modules
    tuned_ckpt: Checkpoint | None = None
    tuned_infos: dict[str, TensorInfo] = {}
    if opts.tuned is not None:
        if is_adapter(opts.tuned):
            raise CheckpointError(
                f"{opts.tuned}: already a PEFT adapter; extract needs a full fine-tuned checkpoint"
            )
        tuned_ckpt = open_checkpoint(opts.tuned)
        by_name = {t.name: t for t in tuned_ckpt.tensors}
        for s in specs:
            info = by_name.get(s.tensor.name)
            if info is None or info.shape != s.tensor.shape:
                raise ShapeMismatch(
                    f"{opts.tuned}: tensor {s.tensor.name} is "
                    + (
                        "missing"
                        if info is None
                        else f"{list(info.shape)}, the base has {list(s.tensor.shape)}"
                    )
                    + "; the tuned checkpoint must be a fine-tune of this base"
                )
            tuned_infos[s.name] = info
    if opts.allocate is not None:
        opts = _allocate(path, opts)
    targets, dropped = plan_targets(specs, opts, method, acts)
    device = _device(opts)
    cdtype = _torch_dtype(opts.precision)
    fifo = bool(targets[0].spec.transposed)
    inputs_list = [Path(ckpt.path)] + ([Path(opts.tuned)] if opts.tuned else [])
    stage = prepare_output(out, opts.force, inputs_list)
    writer: ResidualWriter | None = None
    rows: list[dict[str, Any]] = []
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    alphas: dict[str, float] = {}
    try:
        (stage / "adapter").mkdir()
        if method.changes_base:
            (stage / "residual").mkdir()
            writer = ResidualWriter(ckpt, stage / "residual", opts.dtype)
        loader = MatrixLoader(ckpt)
        tuned_loader = MatrixLoader(tuned_ckpt) if tuned_ckpt is not None else None
        m_opts = _method_options(opts)
        for i, tg in enumerate(targets):
            t1 = time.perf_counter()
            spec = tg.spec
            w = _to_device(loader.load(spec), device, cdtype)
            w = w.T if spec.transposed else w
            tuned_w = None
            if tuned_loader is not None:
                import dataclasses

                tw = _to_device(
                    tuned_loader.load(dataclasses.replace(spec, tensor=tuned_infos[spec.name])),
                    device,
                    cdtype,
                )
                tuned_w = tw.T if spec.transposed else tw
            for where, t in ((ckpt.path, w), (opts.tuned, tuned_w)):
                if t is not None and not bool(t.isfinite().all()):
                    raise CheckpointError(
                        f"{where}: {spec.tensor.name} holds NaN or infinite values; an adapter cannot be "
                        "initialised from it (exclude it with --exclude or repair the checkpoint)"
                    )
            inp = InitInput(
                name=tg.path, weight=w, rank=tg.rank, scale=tg.scale,
                activations=acts[tg.path] if acts is not None else None, tuned=tuned_w, options=m_opts,
            )  # fmt: skip
            with _threads(spec.shape, device):
                res = method.factorize(inp)
            r = int(res.A.shape[0])
            if tuple(res.A.shape) != (r, spec.shape[1]) or tuple(res.B.shape) != (spec.shape[0], r):
                raise RuntimeError(
                    f"{method.name} returned A {tuple(res.A.shape)} and B {tuple(res.B.shape)} for {tg.path} "
                    f"({spec.shape[0]}×{spec.shape[1]})"
                )
            if writer is not None:
                if res.residual is None:
                    raise RuntimeError(
                        f"{method.name} changes the base but returned no residual for {tg.path}"
                    )
                resid = res.residual.T if spec.transposed else res.residual
                writer.put(spec.tensor, _from_device(resid, writer.code_for(spec.tensor)))
            alpha = tg.alpha
            if r != tg.rank and r > 0:  # the method chose the rank (extract --energy): keep s as planned
                alpha = tg.scale * (math.sqrt(r) if opts.rslora else r)
            m, n = spec.shape
            row: dict[str, Any] = {
                "name": tg.path, "kind": spec.kind, "depth": spec.depth, "shape": f"{m}x{n}",
                "dtype": spec.dtype_name, "rank": r, "alpha": json_number(alpha) if r else None,
                "scale": (tg.scale if r else None),
            }  # fmt: skip
            row.update(
                {
                    k: (float(v) if isinstance(v, float | int | np.floating) else v)
                    for k, v in res.info.items()
                }
            )
            row["seconds"] = round(time.perf_counter() - t1, 4)
            rows.append(row)
            if r == 0:
                dropped.append(tg.path)
            else:
                adt = np.float64 if opts.precision == "float64" else np.float32
                factors[tg.path] = (
                    res.A.detach().to("cpu").numpy().astype(adt, copy=False),
                    res.B.detach().to("cpu").numpy().astype(adt, copy=False),
                )
                alphas[tg.path] = alpha
            del w, tuned_w, res, inp
            if progress:
                progress(i + 1, len(targets), tg.path)
        if not factors:
            raise SelectionError("every target module got rank 0 (ΔW is zero); nothing to write")
        if writer is not None:
            writer.finish()
        base_for_adapter = (
            str((out / "residual").resolve()) if writer is not None else str(Path(ckpt.path).resolve())
        )
        write_lora_adapter(
            stage / "adapter",
            {p: LoraFactors(a, b, alphas[p]) for p, (a, b) in factors.items()},
            base=base_for_adapter, rslora=opts.rslora, fan_in_fan_out=fifo,
        )  # fmt: skip
        rank_counts = Counter(int(f[0].shape[0]) for f in factors.values())
        seconds = round(time.perf_counter() - t0, 3)
        untracked = (
            _untracked_changes(ckpt, tuned_ckpt, {t.spec.tensor.name for t in targets}) if tuned_ckpt else []
        )
        summary: dict[str, Any] = {
            "method": method.name,
            "reference": method.reference,
            "modules": len(factors),
            "dropped": sorted(dropped),
            "ranks": {str(k): v for k, v in sorted(rank_counts.items())},
            "adapter_parameters": int(sum(a.size + b.size for a, b in factors.values())),
            "residual": writer is not None,
            "residual_dtype": (opts.dtype or "as stored") if writer is not None else None,
            "skipped_files": writer.skipped_files if writer is not None else [],
            "untracked_changes": untracked,
            "device": device,
            "seconds": seconds,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        if device.startswith("cuda"):
            summary["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        errs = [r["relative_error"] for r in rows if isinstance(r.get("relative_error"), float)]
        if errs:
            summary["max_relative_error"] = max(errs)
        inputs = {
            "checkpoint": str(ckpt.path),
            "format": ckpt.format,
            "bytes": ckpt.total_bytes,
            "tuned": str(Path(opts.tuned).resolve()) if opts.tuned else None,
            "activations": str(Path(opts.activations).resolve()) if opts.activations else None,
            "ranks_file": str(Path(opts.ranks_file).resolve()) if opts.ranks_file else None,
        }
        opts_dict = _options_dict(opts)
        opts_dict["resolved"] = {"device": device, "precision": opts.precision}
        created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        ranks_text = ", ".join(
            f"{k}×{v}" if len(rank_counts) > 1 else str(k) for k, v in sorted(rank_counts.items())
        )
        (stage / "README.md").write_text(
            README.format(
                method=method.name,
                argv=" ".join(["spectra", *argv[1:]]) if argv else "spectra init-adapter",
                created=created,
                n=len(factors),
                ranks=ranks_text,
                residual_line=(
                    "- `residual/`: the base model with every adapted weight replaced by W_res = W − s·B·A "
                    "(same layout as the input).\n"
                    if writer is not None
                    else ""
                ),
                base=base_for_adapter,
                adapter=str((out / "adapter").resolve()),
                after=(
                    _AFTER_RESIDUAL.format(adapter=str((out / "adapter").resolve()))
                    if writer is not None
                    else _AFTER_BASE
                ),
            )
        )
        artifacts = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "README.md"]
        if writer is not None:
            artifacts.append("residual/")
        write_run_record(stage, "init-adapter", list(argv), inputs, opts_dict, {"seconds": seconds}, artifacts,
                         {"modules": rows, "summary": summary})  # fmt: skip
        commit_output(stage, out)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return InitResult(rows, summary, inputs, opts_dict, out=out)


def _allocate(path: str | Path, opts: InitOptions) -> InitOptions:
    """Ranks and α from ``spectra allocate`` (strategy ``opts.allocate``, average rank ``opts.budget_rank``)."""
    import dataclasses

    from spectra_cli.flows.allocate import AllocateOptions, run_allocate

    if opts.budget_rank is None:
        raise SpectraError("--allocate needs --budget-rank R (the average rank over the target modules)")
    if opts.rank is not None or opts.ranks_file is not None:
        raise SpectraError("give one of --rank, --ranks FILE and --allocate STRATEGY")
    a_opts = AllocateOptions(
        include=opts.include, exclude=opts.exclude, kinds=opts.kinds, min_dim=opts.min_dim,
        strategy=opts.allocate or "energy", budget_rank=opts.budget_rank, lora_alpha=opts.alpha,
        activations=opts.activations, device=opts.device, precision=opts.precision,
    )  # fmt: skip
    result = run_allocate(path, a_opts)
    return dataclasses.replace(opts, ranks=dict(result.ranks), alphas=dict(result.alphas))


def _options_dict(opts: InitOptions) -> dict[str, Any]:
    d = asdict(opts)
    for k, v in d.items():
        if isinstance(v, Path):
            d[k] = str(v)
        elif isinstance(v, tuple):
            d[k] = list(v)
    d["method_options"] = dict(opts.method_options)
    if opts.ranks is not None:
        d["ranks"] = dict(opts.ranks)
    return d


def _untracked_changes(base: Checkpoint, tuned: Checkpoint, targets: set[str]) -> list[str]:
    """Tensors other than the targets that differ between base and tuned (or exist on one side only): the
    extracted adapter does not carry them."""
    by_name = {t.name: t for t in tuned.tensors}
    changed: list[str] = []
    for t in base.tensors:
        if t.name in targets:
            continue
        u = by_name.get(t.name)
        if u is None or u.shape != t.shape or u.dtype != t.dtype:
            changed.append(t.name)
            continue
        if not np.array_equal(base.read(t).data, tuned.read(u).data):
            changed.append(t.name)
    base_names = {t.name for t in base.tensors}
    changed += [n for n in by_name if n not in base_names]
    return changed
