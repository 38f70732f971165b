"""Where a flow's independent tasks run: in this process, or (``--ray``) as tasks on a Ray cluster.

A flow that has many independent pieces of work (``spectra track``: one task per checkpoint shard or batch of
matrices) describes each piece as a small, picklable *task spec* and hands a module-level function plus the
specs to an :class:`Executor`. The function must be pure: it reads what it needs from paths every node sees
and returns small results (singular values, per-matrix metrics), never weights. The executor returns one
result per spec, in the order of the specs, each exactly once, whatever retries happened on the way.

:class:`InProcess` is the default and the reference: a plain loop. The Ray executor
(:mod:`spectra_cli.flows.ray_executor`) gives the same results on a cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: ``progress(done, total, label)``, called after each finished task (in completion order)
TaskProgress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TaskResources:
    """What one task may use: GPUs (Ray's ``num_gpus``; 0 = CPU only) and memory in bytes (None = no bound)."""

    num_gpus: float = 0.0
    memory_bytes: int | None = None


class Executor(Protocol):
    """Runs ``fn(spec)`` for every spec; returns the results in the order of ``specs``."""

    name: str

    def map(
        self,
        fn: Callable[[T], R],
        specs: Sequence[T],
        labels: Sequence[str],
        *,
        resources: TaskResources | None = None,
        progress: TaskProgress | None = None,
    ) -> list[R]: ...

    def close(self) -> None: ...


class InProcess:
    """The plain loop: every task in this process, one after the other."""

    name = "in-process"

    def map(
        self,
        fn: Callable[[T], R],
        specs: Sequence[T],
        labels: Sequence[str],
        *,
        resources: TaskResources | None = None,
        progress: TaskProgress | None = None,
    ) -> list[R]:
        out: list[R] = []
        for i, (spec, label) in enumerate(zip(specs, labels, strict=True)):
            out.append(fn(spec))
            if progress:
                progress(i + 1, len(specs), label)
        return out

    def close(self) -> None:
        return None


def open_executor(ray: str | None) -> Executor:
    """The executor for ``--ray``: None → :class:`InProcess`; ``local``, ``auto`` or an address → Ray."""
    if ray is None:
        return InProcess()
    from spectra_cli.flows.ray_executor import RayExecutor

    return RayExecutor(ray)
