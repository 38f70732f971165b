"""The options every command shares, defined once: which matrices (:class:`SelectionOptions`) and how to compute
(:class:`EngineOptions`). Each command's options class in ``flows/`` inherits the ones it needs."""

from __future__ import annotations

from dataclasses import dataclass

from spectra_cli.checkpoint.matrices import Selection
from spectra_cli.checkpoint.naming import ROLES
from spectra_cli.errors import SpectraError

METHODS = ("auto", "svd", "gram")
PRECISIONS = ("float32", "float64")
BACKENDS = ("auto", "numpy", "torch")


class _Validated:
    """Cooperative ``__post_init__`` for the option mix-ins below (each validates its own fields once)."""

    def __post_init__(self) -> None:
        pass


@dataclass(frozen=True)
class SelectionOptions(_Validated):
    """Which matrices: ``--include``, ``--exclude``, ``--kinds``, ``--roles``, ``--min-dim`` (every command that
    reads a checkpoint). Strings and lists are normalised to tuples; ``roles`` must be values of
    :data:`~spectra_cli.checkpoint.naming.ROLES`."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    min_dim: int = 1
    roles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("include", "exclude", "kinds", "roles"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.min_dim < 1:
            raise SpectraError(f"--min-dim {self.min_dim}: must be at least 1")
        bad = [r for r in self.roles if r not in ROLES]
        if bad:
            raise SpectraError(f"--roles {','.join(bad)}: not a role; choose from {', '.join(ROLES)}")

    def selection(self, split_fused: bool = False) -> Selection:
        return Selection(self.include, self.exclude, self.kinds, self.min_dim, split_fused, self.roles)


@dataclass(frozen=True)
class ComputeOptions(_Validated):
    """Where and how precisely to compute: ``--device``, ``--precision``, ``--backend``, ``--max-memory`` (every
    command that decomposes). ``max_memory`` is in bytes (None: a default from free memory, or half the free GPU
    memory on CUDA). The device itself is checked when it is resolved (:func:`spectra_cli.spectral.engine.resolve`),
    since that needs the hardware."""

    device: str = "auto"
    precision: str = "float32"
    backend: str = "auto"
    max_memory: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.precision not in PRECISIONS:
            raise SpectraError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if self.backend not in BACKENDS:
            raise SpectraError(f"--backend {self.backend}: choose one of {', '.join(BACKENDS)}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise SpectraError(f"--max-memory {self.max_memory}: the memory budget must be positive")

    @property
    def engine(self) -> EngineOptions:
        """The compute options alone, as the engine takes them (``method`` auto)."""
        return EngineOptions(device=self.device, precision=self.precision, backend=self.backend,
                             max_memory=self.max_memory)  # fmt: skip


@dataclass(frozen=True)
class EngineOptions(ComputeOptions):
    """The compute options plus how singular values are computed (``--method`` of analyze and allocate: exact
    ``svd``, the float64 ``gram`` route, or ``auto``)."""

    method: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise SpectraError(f"--method {self.method}: choose one of {', '.join(METHODS)}")

    @property
    def engine(self) -> EngineOptions:
        return EngineOptions(device=self.device, precision=self.precision, backend=self.backend,
                             max_memory=self.max_memory, method=self.method)  # fmt: skip
