"""`spectra track --ray local` on a real local Ray cluster (127.0.0.1, one per module): the same rows and
findings as the in-process run, with and without --base, JSON on stdout untouched by Ray; a cache written by
the Ray workers is what a later in-process run reads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fixtures.track_runs import write_run
from spectra_cli.cli.app import app

ray = pytest.importorskip("ray", reason="the Ray tests need the [ray] extra (part of [dev])")

from spectra_cli.flows.ray_executor import RayExecutor  # noqa: E402

#: keys of the summary that measure the run rather than describe the checkpoints
TIMINGS = {"seconds"}


@pytest.fixture(scope="module")
def cluster() -> RayExecutor:
    """The module's one local cluster: `--ray local` joins it instead of starting its own."""
    ex = RayExecutor("local", num_cpus=2)
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(tmp_path_factory.mktemp("track-ray") / "run", layers=3)


def track(*args: Any) -> dict[str, Any]:
    res = CliRunner().invoke(app, ["track", *map(str, args), "--device", "cpu", "--format", "json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)  # stdout is the JSON document and nothing else


def described(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in TIMINGS}


@pytest.mark.parametrize("with_base", [False, True], ids=["values", "vs-base"])
def test_ray_gives_the_rows_of_the_in_process_run(cluster: RayExecutor, run: Path, with_base: bool) -> None:
    extra = ["--base", run.parent / "base"] if with_base else []
    here = track(run, *extra)
    on_ray = track(run, *extra, "--ray", "local")
    assert on_ray["options"]["ray"] == "local" and here["options"]["ray"] is None
    assert len(on_ray["rows"]) == len(here["rows"]) == 4 * 3 * 7  # checkpoints × layers × matrices
    assert on_ray["rows"] == here["rows"]  # same values, same order, each row once
    assert described(on_ray["summary"]) == described(here["summary"])
    if with_base:
        assert on_ray["summary"]["findings"][0].startswith("intruders at ε=0.5 first appear at step 1500")
    assert ray.is_initialized()  # `--ray local` joined the module's cluster and left it running


def test_a_cache_written_on_ray_is_read_in_process(cluster: RayExecutor, run: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = track(run, "--cache", cache, "--ray", "local")
    assert any(os.scandir(cache))  # the workers wrote it, at a path this process sees
    again = track(run, "--cache", cache)
    assert again["rows"] == first["rows"]
    assert again["summary"]["computed"] == 0 and again["summary"]["from_cache"] == len(first["rows"])
