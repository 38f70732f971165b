"""Running a flow's tasks on a Ray cluster (``--ray ADDRESS|auto|local``).

:class:`RayExecutor` implements the executor contract of :mod:`spectra_cli.flows.executor` on Ray
(https://docs.ray.io): every spec becomes one Ray task running the flow's module-level function, with the
GPUs and memory of :class:`~spectra_cli.flows.executor.TaskResources`; the results come back in the order
of the specs, each exactly once, with progress reported as tasks finish.

- ``local`` starts a private one-machine cluster bound to 127.0.0.1 (no dashboard, no usage statistics) and
  stops it on :meth:`RayExecutor.close`.
- ``auto`` joins the cluster this machine is part of (``RAY_ADDRESS``, or the one ``ray start`` started);
  ``HOST:PORT`` joins the cluster whose head is there (this machine must be a node of it);
  ``ray://HOST:PORT`` connects through the Ray Client server of a remote head.

Failures: a worker or node that dies takes its tasks with it, and Ray runs them again (``max_retries``
times); an error *raised* by the task is never retried — a ``SpectraError`` (a truncated checkpoint, a bad
shape) fails the run at once with its own one-line message, any other exception keeps its remote traceback.
Ctrl-C cancels the tasks still queued or running.

Ray is an optional dependency (``pip install 'spectra-cli[ray]'``); it is imported only here, and only when
``--ray`` is given.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from spectra_cli.errors import SpectraError

if TYPE_CHECKING:
    from spectra_cli.flows.executor import TaskProgress, TaskResources

T = TypeVar("T")
R = TypeVar("R")

INSTALL_HINT = "pip install 'spectra-cli[ray]'"
#: how many times Ray runs a task again after its worker (or node) died
MAX_RETRIES = 3
#: the local cluster's object store: tasks return singular values, never weights, so a small one is enough
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20

#: how long the check that a HOST:PORT answers waits
CONNECT_TIMEOUT_S = 5.0

_HOST_PORT = re.compile(r"^(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


def check_address(address: str) -> str:
    """``--ray``'s value, checked without importing Ray: ``local``, ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``."""
    value = address.strip()
    if value in ("local", "auto") or _HOST_PORT.match(value):
        return value
    raise SpectraError(
        f"--ray {address!r}: expected local (a private cluster on this machine), auto (the cluster this "
        "machine belongs to), HOST:PORT (a head's GCS address) or ray://HOST:PORT (a Ray Client server)"
    )


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise SpectraError(f"--ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


class RayExecutor:
    """Runs a flow's tasks as Ray tasks. ``num_cpus``: the size of a ``local`` cluster (default: this
    machine's CPUs); ``max_retries``: reruns of a task whose worker died."""

    name = "ray"

    def __init__(self, address: str, *, num_cpus: int | None = None, max_retries: int = MAX_RETRIES) -> None:
        self.address = check_address(address)
        self.max_retries = max_retries
        self._started = False  # True when this executor called ray.init (and so must call ray.shutdown)
        if self.address == "local":
            _prepare_local_env()  # before the first `import ray`: Ray reads some settings at import
        ray = import_ray()
        self._ray = ray
        if ray.is_initialized():
            return  # the caller (a library user, a test) already connected: use that, and leave it open
        if self.address == "local":
            self._start_local(num_cpus)
        else:
            self._connect()
        self._started = True
        _notices_to_stderr()

    # -- connecting ---------------------------------------------------------------------------------------

    def _start_local(self, num_cpus: int | None) -> None:
        ray = self._ray
        cpus = num_cpus if num_cpus is not None else _machine_cpus()
        # The workers must import the same spectra as this process (a source tree on sys.path, not some
        # other install): they inherit the raylet's environment, which is this one at ray.init.
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([_package_root(), *([saved] if saved else [])])
        # Ray reads "may this node be reached from others" at import; when Ray was imported before
        # _prepare_local_env ran (a library user, a test), say no for the start of this cluster too.
        constants = _ray_constants()
        cluster_flag = getattr(constants, "ENABLE_RAY_CLUSTER", None)
        if cluster_flag:
            constants.ENABLE_RAY_CLUSTER = False
        try:
            ctx = ray.init(
                address="local",
                num_cpus=cpus,
                num_gpus=None,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                log_to_driver=False,
                configure_logging=False,
            )
        except Exception as e:  # Ray raises RuntimeError/ConnectionError/OSError/ValueError here
            raise SpectraError(f"--ray local: could not start a local Ray cluster ({_one_line(e)})") from e
        finally:
            if cluster_flag:
                constants.ENABLE_RAY_CLUSTER = cluster_flag
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved
        node_ip = ctx.address_info.get("node_ip_address")
        if node_ip != "127.0.0.1":
            ray.shutdown()
            raise SpectraError(
                f"--ray local: the local Ray cluster came up on {node_ip}, not 127.0.0.1 (Ray was imported "
                "before spectra could configure it); start it with `ray start --head "
                "--node-ip-address 127.0.0.1` and use --ray auto"
            )

    def _connect(self) -> None:
        ray = self._ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.address != "auto":
            self._check_reachable()
        try:
            ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        except Exception as e:  # ConnectionError, RuntimeError (no cluster found), TimeoutError, ValueError
            where = "the Ray cluster of this machine" if self.address == "auto" else self.address
            raise SpectraError(
                f"--ray {self.address}: could not connect to {where} ({_one_line(e)}); start one with "
                "`ray start --head`, or use --ray local for a cluster on this machine only"
            ) from e

    def _check_reachable(self) -> None:
        """Fail at once when nothing listens at HOST:PORT (Ray itself retries for minutes)."""
        host, port = _host_port(self.address)
        hosts = [host]
        if host in ("127.0.0.1", "localhost", "::1"):  # Ray dials this node's own address instead
            with contextlib.suppress(Exception):
                hosts.append(self._ray.util.get_node_ip_address())
        errors = []
        for h in hosts:
            try:
                socket.create_connection((h, port), timeout=CONNECT_TIMEOUT_S).close()
                return
            except OSError as e:
                errors.append(f"{h}:{port}: {e.strerror or e}")
        raise SpectraError(
            f"--ray {self.address}: nothing answers at {'; '.join(errors)}; start the head with "
            f"`ray start --head --port {port}` (or give its address), or use --ray local"
        )

    # -- running ------------------------------------------------------------------------------------------

    def map(
        self,
        fn: Callable[[T], R],
        specs: Sequence[T],
        labels: Sequence[str],
        *,
        resources: TaskResources | None = None,
        progress: TaskProgress | None = None,
    ) -> list[R]:
        """``fn(spec)`` for every spec as a Ray task; the results in spec order, each exactly once."""
        if len(specs) != len(labels):
            raise ValueError(f"{len(specs)} specs but {len(labels)} labels")
        if not specs:
            return []
        ray = self._ray
        num_gpus = resources.num_gpus if resources else 0.0
        memory = resources.memory_bytes if resources else None
        self._check_feasible(num_gpus, memory)
        options: dict[str, Any] = {
            "num_cpus": 1,
            "num_gpus": num_gpus,
            "max_retries": self.max_retries,
            "retry_exceptions": False,  # raised errors fail fast; only a dead worker's tasks are rerun
        }
        if memory:
            options["memory"] = int(memory)
        task = ray.remote(_call).options(**options)
        fn_ref = ray.put(fn)  # the function travels once (by reference: its module must import on the workers)
        refs = [task.remote(fn_ref, spec) for spec in specs]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i = index[ref]
                    results[i] = self._get(ref, labels[i])
                    if progress:
                        progress(len(refs) - len(pending), len(refs), labels[i])
        except BaseException:  # an error, or Ctrl-C: nothing more of this run is wanted
            self._cancel(pending)
            raise
        return results

    def _get(self, ref: Any, label: str) -> Any:
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, SpectraError):
                raise cause from None  # its one-line message, as in-process
            if "failed to import on the worker" in str(cause):
                raise SpectraError(
                    f"task {label}: a Ray worker could not import spectra's task function; install the same "
                    "spectra-cli version on every node of the cluster (with its [ray] extra)"
                ) from None
            raise  # a bug in the task: keep the remote traceback Ray carries
        except ray.exceptions.TaskCancelledError:
            raise KeyboardInterrupt from None
        except ray.exceptions.RayError as e:
            raise SpectraError(
                f"task {label} failed on the Ray cluster after {self.max_retries} retries: "
                f"{type(e).__name__}: {_one_line(e)}; check the workers' logs (memory, disk, node health)"
            ) from None

    def _cancel(self, refs: Sequence[Any]) -> None:
        for ref in refs:
            with contextlib.suppress(Exception):  # already finished or already gone: nothing to cancel
                self._ray.cancel(ref, force=True)

    def _check_feasible(self, num_gpus: float, memory: int | None) -> None:
        """Refuse, before submitting, tasks that no node of the cluster could ever run (Ray would wait)."""
        nodes = [n.get("Resources", {}) for n in self._ray.nodes() if n.get("Alive")]
        if any(
            r.get("CPU", 0) >= 1 and r.get("GPU", 0) >= num_gpus and (not memory or r.get("memory", 0) >= memory)
            for r in nodes
        ):
            return
        most_gpus = max((r.get("GPU", 0) for r in nodes), default=0)
        most_mem = max((r.get("memory", 0) for r in nodes), default=0)
        wanted = [f"{num_gpus:g} GPU"] if num_gpus else []
        if memory:
            wanted.append(f"{memory / 2**30:.1f} GiB of memory")
        raise SpectraError(
            f"--ray {self.address}: no node of the cluster can run a task needing 1 CPU"
            f"{', ' + ', '.join(wanted) if wanted else ''} (largest node: {most_gpus:g} GPU, "
            f"{most_mem / 2**30:.1f} GiB for tasks); lower --max-memory, or run without GPUs"
        )

    def close(self) -> None:
        """Stop the local cluster, or disconnect from a remote one — only what this executor opened."""
        if self._started:
            self._started = False
            self._ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _call(fn: Callable[[T], R], spec: T) -> R:
    """The one Ray task: any callable (a function, a partial, a builtin) applied to one spec."""
    return fn(spec)


def _prepare_local_env() -> None:
    """Settings of a private local cluster, read by Ray at import and inherited by its processes: bind every
    server to 127.0.0.1 (Ray otherwise listens on all interfaces of a Linux machine), send no usage
    statistics."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray ≥ 2.5x turns token authentication on for a new local cluster and says so on stderr, where
    # spectra's progress goes: keep the authentication, drop the notice.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def _notices_to_stderr() -> None:
    """Send the cluster's notices ("a worker died…, the task will be retried") to stderr.

    The driver prints them from a background thread, on stdout, even with ``log_to_driver=False`` — where
    spectra writes its data (``--format json | jq``). The printer is looked up by name at each call, so
    replacing it with one that marks every batch as an error line routes them to stderr."""
    try:
        worker: Any = importlib.import_module("ray._private.worker")
    except ImportError:
        return
    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "spectra_stderr", False):
        return

    def to_stderr(data: dict[str, Any], ignore_prefix: bool) -> None:
        printer({**data, "is_err": True}, ignore_prefix)

    to_stderr.spectra_stderr = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = to_stderr


def _ray_constants() -> Any:
    try:
        return importlib.import_module("ray._private.ray_constants")
    except ImportError:  # another Ray layout: the node-IP check after ray.init still holds
        return None


def _host_port(address: str) -> tuple[str, int]:
    """``ray://HOST:PORT`` or ``HOST:PORT`` (HOST may be ``[v6]``) → (host, port)."""
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


def _package_root() -> str:
    """The folder that holds this ``spectra_cli`` package."""
    from pathlib import Path

    return str(Path(__file__).resolve().parents[2])


def _machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
