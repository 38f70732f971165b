"""Shared fixtures: generated checkpoints (module-scoped, written under tmp_path_factory) and helpers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# The tests decompose small matrices, for which multi-threaded BLAS/OpenMP only adds synchronisation; on a
# shared 2-core machine (pytest-xdist, CI, a benchmark running alongside) OpenBLAS's spinning worker threads
# made the suite 10× slower. One thread each, unless the caller says otherwise. This must run before NumPy
# or PyTorch is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

from fixtures import checkpoints as ckpt_gen  # noqa: E402


class GeneratedCheckpoints:
    """Generates each checkpoint of :data:`fixtures.checkpoints.GENERATORS` on first access, once per module.

    ``ckpts.single`` → a :class:`fixtures.checkpoints.Generated`; ``ckpts.torch`` and ``ckpts.bad`` → dicts.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._cache: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in ckpt_gen.GENERATORS:
            raise AttributeError(
                f"no generated checkpoint named {name!r}; see fixtures.checkpoints.GENERATORS"
            )
        if name not in self._cache:
            self._cache[name] = ckpt_gen.GENERATORS[name](self._root / name)
        return self._cache[name]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> GeneratedCheckpoints:
    """Tiny generated checkpoints, shared by the tests of one module."""
    return GeneratedCheckpoints(tmp_path_factory.mktemp("ckpts"))
