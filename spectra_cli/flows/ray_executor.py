"""Running a flow's tasks on a Ray cluster (``--ray ADDRESS|auto|local``). Being built (issue: spectra track)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from spectra_cli.errors import SpectraError

if TYPE_CHECKING:
    from spectra_cli.flows.executor import TaskProgress, TaskResources

T = TypeVar("T")
R = TypeVar("R")


class RayExecutor:
    name = "ray"

    def __init__(self, address: str) -> None:
        raise SpectraError("--ray is not available in this build yet; run without --ray")

    def map(
        self,
        fn: Callable[[T], R],
        specs: Sequence[T],
        labels: Sequence[str],
        *,
        resources: TaskResources | None = None,
        progress: TaskProgress | None = None,
    ) -> list[R]:
        raise SpectraError("--ray is not available in this build yet")

    def close(self) -> None:
        return None
