"""The Ray executor on a real local Ray cluster (127.0.0.1 only, one per module): the same results as the
in-process loop, in spec order, each once; a killed worker's task rerun; a SpectraError raised, not retried;
Ctrl-C cancels; clear errors without Ray, for a bad address and for tasks no node can run.

The tasks are module-level functions of this file: the workers import this module, which is why the
fixture puts the repository root on their PYTHONPATH.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fixtures.checkpoints import write_safetensors
from fixtures.matrices import expected_singular_values, matrix_with_singular_values
from spectra_cli.checkpoint.source import open_checkpoint
from spectra_cli.checkpoint.tensors import to_float
from spectra_cli.errors import CheckpointError, SpectraError
from spectra_cli.flows.executor import InProcess, TaskResources, open_executor
from spectra_cli.spectral import linalg

ray = pytest.importorskip("ray", reason="the Ray tests need the [ray] extra (part of [dev])")

from spectra_cli.flows.ray_executor import INSTALL_HINT, RayExecutor, check_address  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

#: name → (shape, singular values) of the matrices in the test checkpoint
MATRICES = {
    f"layers.{i}.{kind}.weight": ((24 + 4 * i, 16), [float(10 - i), 3.0, 1.0 + 0.1 * i])
    for i in range(4)
    for kind in ("q_proj", "up_proj")
}


@dataclass(frozen=True)
class Spec:
    """One task: one matrix of one checkpoint, and a folder for the task's attempt markers."""

    path: str
    name: str
    marks: str = ""
    crash: bool = False  # die (os._exit) on the first attempt
    sleep: float = 0.0


def _attempt(spec: Spec) -> int:
    """Record one more attempt of ``spec`` (a line in its marker file); the number of this attempt."""
    mark = Path(spec.marks) / spec.name
    with open(mark, "a") as f:
        f.write(f"{os.getpid()}\n")
    return len(mark.read_text().splitlines())


def spectrum(spec: Spec) -> np.ndarray:
    """The task: σ of one matrix, read with spectra's reader, decomposed with spectra's linalg."""
    if spec.marks:
        attempt = _attempt(spec)
        if spec.crash and attempt == 1:
            os._exit(1)  # the worker dies mid-run, as if killed
    if spec.sleep:
        time.sleep(spec.sleep)
    ckpt = open_checkpoint(spec.path)
    x = to_float(ckpt.read(ckpt.info(spec.name)))
    return np.asarray(linalg.singular_values(x, method="svd"))


def always_dies(spec: Spec) -> None:
    os._exit(1)


def buggy(spec: Spec) -> None:
    raise ValueError(f"a bug in the task for {spec.name}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tensors = {
        name: matrix_with_singular_values(s, *shape, seed=k).astype(np.float32)
        for k, (name, (shape, s)) in enumerate(MATRICES.items())
    }
    return write_safetensors(tmp_path_factory.mktemp("ray") / "model.safetensors", tensors)


@pytest.fixture(scope="module")
def cluster() -> RayExecutor:
    """One local cluster (2 CPUs, 127.0.0.1) for the module; the workers can import this test module."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([saved] if saved else [])])
    try:
        ex = RayExecutor("local", num_cpus=2)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    yield ex
    ex.close()
    assert not ray.is_initialized()


def specs_for(ckpt: Path, marks: Path | None = None, crash: set[str] = frozenset()) -> list[Spec]:
    return [Spec(str(ckpt), name, str(marks) if marks else "", name in crash) for name in MATRICES]


def test_local_cluster_listens_on_loopback_only(cluster: RayExecutor) -> None:
    ctx = ray.get_runtime_context()
    assert ctx.gcs_address.startswith("127.0.0.1:")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert [n["NodeManagerAddress"] for n in nodes] == ["127.0.0.1"]
    assert ray.cluster_resources()["CPU"] == 2


def test_same_results_as_in_process_in_spec_order(cluster: RayExecutor, ckpt: Path) -> None:
    specs = specs_for(ckpt)
    labels = [s.name for s in specs]
    seen: list[tuple[int, int, str]] = []
    got = cluster.map(spectrum, specs, labels, progress=lambda d, n, label: seen.append((d, n, label)))
    ref = InProcess().map(spectrum, specs, labels)
    assert len(got) == len(specs)
    for spec, g, r in zip(specs, got, ref, strict=True):
        shape, s = MATRICES[spec.name]
        np.testing.assert_allclose(g, expected_singular_values(s, *shape), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(g, r)  # same reader, same linalg: bit for bit
    # progress: once per task, counting up, each label once
    assert [d for d, _, _ in seen] == list(range(1, len(specs) + 1))
    assert {n for _, n, _ in seen} == {len(specs)}
    assert sorted(label for _, _, label in seen) == sorted(labels)


def test_a_killed_worker_loses_and_duplicates_nothing(
    cluster: RayExecutor, ckpt: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    crash = {"layers.1.up_proj.weight", "layers.2.q_proj.weight", "layers.3.up_proj.weight"}
    specs = specs_for(ckpt, tmp_path, crash)
    seen: list[str] = []
    got = cluster.map(spectrum, specs, [s.name for s in specs], progress=lambda d, n, label: seen.append(label))
    assert len(got) == len(specs)
    for spec, g in zip(specs, got, strict=True):
        shape, s = MATRICES[spec.name]
        np.testing.assert_allclose(g, expected_singular_values(s, *shape), rtol=1e-5, atol=1e-5)
    assert sorted(seen) == sorted(MATRICES)  # each task reported once
    for spec in specs:  # the killed tasks ran twice (died, then rerun), the others once
        pids = (tmp_path / spec.name).read_text().split()
        assert len(pids) == (2 if spec.name in crash else 1), spec.name
        if spec.name in crash:
            assert pids[0] != pids[1]  # the rerun is on a new worker: the first one is dead
    # the cluster's notice of the dead workers goes to stderr, never to stdout (spectra's data)
    out, err = "", ""
    deadline = time.monotonic() + 10
    while "(raylet)" not in err and time.monotonic() < deadline:
        time.sleep(0.2)
        o, e = capfd.readouterr()
        out, err = out + o, err + e
    assert "(raylet)" in err and "died" in err
    assert "(raylet)" not in out


def test_a_task_whose_worker_always_dies_fails_after_the_retries(cluster: RayExecutor, ckpt: Path) -> None:
    cluster.max_retries = 1
    try:
        with pytest.raises(SpectraError, match=r"task only failed on the Ray cluster after 1 retries"):
            cluster.map(always_dies, [Spec(str(ckpt), "x")], ["only"])
    finally:
        cluster.max_retries = 3


def test_a_spectra_error_fails_fast_with_its_message(cluster: RayExecutor, ckpt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(ckpt.read_bytes()[:200])
    (tmp_path / "marks").mkdir()
    specs = [*specs_for(ckpt)[:2], Spec(str(bad), "layers.0.q_proj.weight", str(tmp_path / "marks"))]
    labels = [s.name + str(i) for i, s in enumerate(specs)]
    with pytest.raises(CheckpointError) as in_process:
        InProcess().map(spectrum, specs, labels)
    (tmp_path / "marks" / "layers.0.q_proj.weight").unlink()
    with pytest.raises(CheckpointError) as on_ray:
        cluster.map(spectrum, specs, labels)
    assert str(on_ray.value) == str(in_process.value)  # the one-line message, not a remote traceback
    assert "\n" not in str(on_ray.value)
    assert (tmp_path / "marks" / "layers.0.q_proj.weight").read_text().count("\n") == 1  # not retried


def test_a_bug_in_a_task_keeps_its_type_and_traceback(cluster: RayExecutor, ckpt: Path) -> None:
    with pytest.raises(ValueError, match="a bug in the task for w") as err:
        cluster.map(buggy, [Spec(str(ckpt), "w")], ["w"])
    assert 'in buggy\n    raise ValueError(f"a bug in the task for {spec.name}")' in str(err.value)  # remote


def test_ctrl_c_cancels_the_outstanding_tasks(cluster: RayExecutor, ckpt: Path) -> None:
    quick, slow = specs_for(ckpt)[:2]
    specs = [quick] + [Spec(slow.path, slow.name, sleep=60.0)] * 3

    def interrupt(done: int, total: int, label: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cluster.map(spectrum, specs, [f"t{i}" for i in range(len(specs))], progress=interrupt)
    # both CPUs would be busy for a minute had the sleepers not been cancelled
    start = time.monotonic()
    assert len(cluster.map(spectrum, [quick, quick], ["a", "b"])) == 2
    assert time.monotonic() - start < 30


def test_tasks_no_node_can_run_are_refused_before_submitting(cluster: RayExecutor, ckpt: Path) -> None:
    specs = specs_for(ckpt)[:1]
    with pytest.raises(SpectraError, match=r"no node of the cluster can run a task needing 1 CPU, 1 GPU"):
        cluster.map(spectrum, specs, ["a"], resources=TaskResources(num_gpus=1))
    with pytest.raises(SpectraError, match=r"4096.0 GiB of memory.*lower --max-memory"):
        cluster.map(spectrum, specs, ["a"], resources=TaskResources(memory_bytes=4096 * 2**30))
    got = cluster.map(spectrum, specs, ["a"], resources=TaskResources(memory_bytes=2**20))
    shape, s = MATRICES[specs[0].name]
    np.testing.assert_allclose(got[0], expected_singular_values(s, *shape), rtol=1e-5, atol=1e-5)


def test_an_empty_map_and_mismatched_labels(cluster: RayExecutor) -> None:
    assert cluster.map(spectrum, [], []) == []
    with pytest.raises(ValueError, match="2 specs but 1 labels"):
        cluster.map(spectrum, [Spec("a", "b"), Spec("a", "c")], ["x"])


def test_an_existing_connection_is_reused_and_left_open(cluster: RayExecutor) -> None:
    other = open_executor("auto")  # ray is initialised: this executor joins it and must not shut it down
    assert other.name == "ray"
    other.close()
    assert ray.is_initialized()


def test_an_address_where_nothing_listens_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as if no cluster were joined yet
    with socket.socket() as s:  # a port nobody listens on (bound, then released)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(SpectraError, match=rf"--ray 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}: "):
        RayExecutor(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 15  # Ray alone retries for minutes


@pytest.mark.parametrize("address", ["local", "auto", "10.0.0.5:6379", "ray://head.example:10001", "[::1]:6379"])
def test_addresses_accepted(address: str) -> None:
    assert check_address(address) == address


@pytest.mark.parametrize("address", ["", "head.example", "http://x:1", "local cluster", "x:port"])
def test_addresses_refused(address: str) -> None:
    with pytest.raises(SpectraError, match=r"expected local .*auto .*HOST:PORT .*ray://HOST:PORT"):
        check_address(address)


def test_without_ray_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    for address in ("local", "auto"):
        with pytest.raises(SpectraError) as err:
            open_executor(address)
        assert str(err.value) == f"--ray needs Ray, which is not installed here: {INSTALL_HINT}"
    assert INSTALL_HINT == "pip install 'spectra-cli[ray]'"
