"""The options every command shares, defined once: which matrices (:class:`SelectionOptions`) and how to compute
(:class:`EngineOptions`). Each command's options class in ``flows/`` inherits the ones it needs."""

from __future__ import annotations

from dataclasses import dataclass

from spectra_cli.checkpoint.matrices import Selection

METHODS = ("auto", "svd", "gram")
PRECISIONS = ("float32", "float64")
BACKENDS = ("auto", "numpy", "torch")


@dataclass(frozen=True)
class SelectionOptions:
    """The selection options every command shares (``--include``, ``--exclude``, ``--kinds``, ``--min-dim``);
    command option classes inherit them. Strings and lists are normalised to tuples."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    min_dim: int = 1

    def __post_init__(self) -> None:
        for name in ("include", "exclude", "kinds"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))

    def selection(self, split_fused: bool = False) -> Selection:
        return Selection(self.include, self.exclude, self.kinds, self.min_dim, split_fused)


@dataclass(frozen=True)
class EngineOptions:
    """How to compute. ``max_memory`` is in bytes (None: a default from free memory)."""

    device: str = "auto"
    precision: str = "float32"
    method: str = "auto"
    backend: str = "auto"
    max_memory: int | None = None

    @property
    def engine(self) -> EngineOptions:
        """These options alone: command option classes inherit them beside their own fields."""
        return EngineOptions(self.device, self.precision, self.method, self.backend, self.max_memory)
