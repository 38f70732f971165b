"""The registry of adapter initialisations (``spectra init-adapter --method``).

Each method is a small object: its name, its paper reference, whether it changes the base (and so ships a
residual W_res = W − s·B·A), what it needs (activations of the module's inputs, a tuned checkpoint), and a
pure ``factorize`` function on one module. The SVD-based methods live in
:mod:`spectra_cli.spectral.init_svd`, the data-driven ones in :mod:`spectra_cli.spectral.init_data`; both
register themselves here when imported, and :func:`methods` imports them.

Conventions: W is out×in (``nn.Linear`` layout); ``lora_A`` is r×in, ``lora_B`` is out×r; s = α/r (α/√r with
rsLoRA) is the scale PEFT applies, so W = W_res + s·B·A.

Importing this module and the method modules does not import PyTorch (the method functions import it when
they run), so ``spectra init-adapter --help`` can list the registry cheaply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the registry's metadata (names, summaries, references) must import without PyTorch
    import torch

    from spectra_cli.checkpoint.activations import ModuleActivations
    from spectra_cli.spectral.linalg import Backend


@dataclass(frozen=True)
class InitInput:
    """What a method gets for one module. Tensors are on the compute device, float32 or float64."""

    name: str  # module path, e.g. model.layers.0.self_attn.q_proj
    weight: torch.Tensor  # out×in
    rank: int
    scale: float  # s = α/r
    activations: ModuleActivations | None = None
    tuned: torch.Tensor | None = None  # out×in: the fine-tune (extract), compressed weight (eora), gradient (lora-ga)
    options: Mapping[str, Any] = field(default_factory=dict)  # method parameters (niter, mode, …)
    # where the top-k Gram route runs (None: where ``weight`` is); exact SVDs and QRs run where the weight is
    backend: Backend | None = None


@dataclass(frozen=True)
class InitFactors:
    """A method's answer for one module: lora_A (r×in), lora_B (out×r), and the residual base.

    ``residual`` is None when the method leaves the base unchanged (EVA, extract). ``info`` carries
    per-module figures for the report (e.g. a relative reconstruction error).
    """

    A: torch.Tensor
    B: torch.Tensor
    residual: torch.Tensor | None
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InitMethod:
    """One initialisation method.

    ``plan_ranks``, when given, decides the rank of every module before any is factorised (EVA's
    redistribution): it gets the modules' activations, the requested rank and the options, and returns
    module → rank (0 drops the module).
    """

    name: str
    summary: str
    reference: str
    factorize: Callable[[InitInput], InitFactors]
    changes_base: bool = True
    needs_activations: bool = False
    needs_tuned: bool = False
    plan_ranks: Callable[[Mapping[str, ModuleActivations], int, Mapping[str, Any]], dict[str, int]] | None = None
    needs_compressed: bool = False  # EoRA: the compressed checkpoint (``InitInput.tuned`` holds its weight)
    needs_gradients: bool = False  # LoRA-GA: the gradients file (``InitInput.tuned`` holds the gradient)
    # what the adapter config's ``init_lora_weights`` says: True for an exported init, a PEFT variant's name
    # where the name changes training (MiCA: "mica" makes PEFT freeze lora_B)
    peft_init: bool | str = True
    parameters: str = ""  # the method's own flags, for --list-methods and the docs


_METHODS: dict[str, InitMethod] = {}


def checked_rank(inp: InitInput, limit: int | None = None, allow_zero: bool = False) -> int:
    """``inp.rank`` when it fits the module (1 ≤ r ≤ ``limit``, by default min(out, in); 0 too with
    ``allow_zero``), else a :class:`ShapeMismatch` naming the module and what to do."""
    from spectra_cli.errors import ShapeMismatch

    m, n = inp.weight.shape
    top = min(m, n) if limit is None else limit
    r = int(inp.rank)
    if r > top or (r < 1 and not (allow_zero and r == 0)):
        raise ShapeMismatch(
            f"{inp.name}: rank {r} is not possible for a {m}×{n} weight (1 ≤ r ≤ {top}); "
            "lower --rank or give this module a smaller rank in --ranks"
        )
    return r


def register(method: InitMethod) -> InitMethod:
    """Add a method to the registry (its name must be new)."""
    if method.name in _METHODS:
        raise ValueError(f"init method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def methods() -> dict[str, InitMethod]:
    """All registered methods, name → method (imports the modules that define them)."""
    import importlib

    for module in (
        "spectra_cli.spectral.init_svd",
        "spectra_cli.spectral.init_data",
        "spectra_cli.spectral.init_peft",
        "spectra_cli.spectral.loftq",
        "spectra_cli.spectral.eora",
        "spectra_cli.spectral.lora_ga",
    ):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return dict(_METHODS)
