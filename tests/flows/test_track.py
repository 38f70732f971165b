"""`spectra track`: a run folder of tiny checkpoints whose spectra change in known ways (fixtures.track_runs: a
rank-1 update growing with the step on the value projections of layers 1–2, planted so that intruders appear
at step 1500). Expected values come from NumPy on the fixture's own weights, never from spectra."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures.track_runs import weights, write_checkpoint, write_run
from spectra_cli.cli.app import app
from spectra_cli.errors import CheckpointError, SelectionError, SpectraError
from spectra_cli.flows.executor import InProcess, TaskResources
from spectra_cli.flows.track import TrackOptions, run_track, watch_track

STEPS = (500, 1000, 1500, 2000)
V1 = "model.layers.1.self_attn.v_proj.weight"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(tmp_path_factory.mktemp("track") / "run")


def _np_intruders(w0: np.ndarray, wt: np.ndarray, k: int = 10, eps: float = 0.5) -> int:
    u0 = np.linalg.svd(w0.astype(np.float64), full_matrices=False)[0]
    ut = np.linalg.svd(wt.astype(np.float64), full_matrices=False)[0][:, :k]
    return int((np.abs(u0.T @ ut).max(axis=0) < eps).sum())


class Counting(InProcess):
    """The in-process executor, counting the tasks it ran; ``fail_after``: raise after that many tasks."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.ran = 0
        self.fail_after = fail_after

    def map(self, fn: Callable[[Any], Any], specs: Sequence[Any], labels: Sequence[str], *,
            resources: TaskResources | None = None, progress: Any = None) -> list[Any]:  # fmt: skip
        def counted(spec: Any) -> Any:
            if self.fail_after is not None and self.ran >= self.fail_after:
                raise KeyboardInterrupt
            self.ran += 1
            return fn(spec)

        return super().map(counted, specs, labels, resources=resources, progress=progress)


# ---- rows and ordering ---------------------------------------------------------------------------------


def test_rows_are_long_format_in_step_order_with_the_fixtures_singular_values(run: Path) -> None:
    r = run_track([(None, run)], TrackOptions(device="cpu", kinds=("v_proj",)))
    assert [c.step for c in r.checkpoints] == list(STEPS)
    assert [row["step"] for row in r.rows] == [s for s in STEPS for _ in range(4)]
    assert {row["checkpoint"] for row in r.rows} == {f"checkpoint-{s}" for s in STEPS}
    for row in r.rows:
        w = weights(row["step"])[row["name"]]
        s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
        assert row["spectral_norm"] == pytest.approx(s[0], rel=1e-5)
        assert row["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-4)
        assert row["depth"] == int(row["name"].split(".")[2]) and row["kind"] == "v_proj"


def test_step_order_is_numeric_not_by_name(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (10000, 500, 1000):
        write_checkpoint(run, step, layers=1)
    r = run_track([(None, run)], TrackOptions(device="cpu", kinds=("q_proj",)))
    assert [c.name for c in r.checkpoints] == ["checkpoint-500", "checkpoint-1000", "checkpoint-10000"]


@pytest.mark.parametrize("layout", ["lightning", "deepspeed"])
def test_lightning_and_deepspeed_layouts(tmp_path: Path, layout: str) -> None:
    run = write_run(tmp_path / "run", steps=(1000, 500), layout=layout, layers=2, base=False)
    if layout == "lightning":
        shutil.copy(run / "epoch=1-step=1000.ckpt", run / "last.ckpt")  # a copy: not a checkpoint of its own
    r = run_track([(None, run)], TrackOptions(device="cpu", kinds=("v_proj",)))
    assert [c.step for c in r.checkpoints] == [500, 1000]
    row = next(x for x in r.rows if x["step"] == 1000 and x["name"].endswith("1.self_attn.v_proj.weight"))
    s = np.linalg.svd(weights(1000, layers=2)["model.layers.1.self_attn.v_proj.weight"].astype(np.float64),
                      compute_uv=False)  # fmt: skip
    assert row["spectral_norm"] == pytest.approx(s[0], rel=1e-5)


def test_peft_adapter_checkpoints_are_tracked_as_base_plus_ba(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", layout="peft")
    base = str(tmp_path / "base")
    r = run_track([(None, run)], TrackOptions(device="cpu", base=base, against="previous"))
    assert {x["name"] for x in r.rows} == {V1, V1.replace("layers.1", "layers.2")}  # the adapted modules
    w0 = weights(None)
    for row in r.rows:
        wt = weights(row["step"])[row["name"]]
        assert row["intruders"] == _np_intruders(w0[row["name"]], wt)
        s = np.linalg.svd(wt.astype(np.float64), compute_uv=False)
        assert row["spectral_norm"] == pytest.approx(s[0], rel=1e-5)
    assert r.summary.findings[0].startswith("intruders at ε=0.5 first appear at step 1500 in layers 1–2 (v_proj)")
    with pytest.raises(SelectionError, match="PEFT adapter checkpoint; give the model it adapts with --base"):
        run_track([(None, run)], TrackOptions(device="cpu"))


def test_named_checkpoints_take_their_steps_from_steps(run: Path) -> None:
    inputs = [("late", run / "checkpoint-2000"), ("early", run / "checkpoint-500")]
    r = run_track(inputs, TrackOptions(device="cpu", kinds=("v_proj",), steps=(2000, 500)))
    assert [c.name for c in r.checkpoints] == ["early", "late"]
    with pytest.raises(SelectionError, match="--steps gives 1 steps for 2 checkpoints"):
        run_track(inputs, TrackOptions(device="cpu", steps=(1,)))
    r = run_track([(None, run)], TrackOptions(device="cpu", kinds=("v_proj",), steps=(1000, 2000)))
    assert [c.step for c in r.checkpoints] == [1000, 2000]


# ---- comparisons and findings --------------------------------------------------------------------------


def test_intruders_and_drift_against_the_base_and_the_previous_checkpoint(run: Path) -> None:
    base = run.parent / "base"
    r = run_track([(None, run)], TrackOptions(device="cpu", kinds=("v_proj",), base=str(base), against="previous"))
    w0 = weights(None)
    for row in r.rows:
        wt = weights(row["step"])[row["name"]]
        assert row["intruders"] == _np_intruders(w0[row["name"]], wt)
        d = np.linalg.norm(wt.astype(np.float64) - w0[row["name"]]) / np.linalg.norm(w0[row["name"]])
        assert row["relative_delta"] == pytest.approx(d, rel=1e-4, abs=1e-6)
        if row["step"] == 500:
            assert row["step_relative_delta"] is None
        else:
            wp = weights(row["step"] - 500)[row["name"]].astype(np.float64)
            assert row["step_relative_delta"] == pytest.approx(np.linalg.norm(wt - wp) / np.linalg.norm(wp),
                                                               rel=1e-4, abs=1e-6)  # fmt: skip
    by = {(row["step"], row["depth"]): row["intruders"] for row in r.rows}
    assert by[(1000, 1)] == 0 and by[(1500, 1)] == 1 and by[(1500, 2)] == 1 and by[(2000, 0)] == 0
    text = r.summary.findings
    assert text[0] == "intruders at ε=0.5 first appear at step 1500 in layers 1–2 (v_proj); at step 2000: 2 in 2 matrices"
    assert any(f.startswith("effective-rank ratio of attention fell from") for f in text)
    assert any("the largest step-to-step change is between step 500 and step 1000" in f for f in text)


def test_findings_when_no_intruders_and_alpha_crossing_two(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", steps=(500, 1000), layers=1, gain=0.1)
    r = run_track([(None, run)], TrackOptions(device="cpu", base=str(tmp_path / "base")))
    assert r.summary.findings[0] == "no intruder dimensions at ε=0.5 at any step (up to step 1000)"
    assert any(f.startswith("mean α of attention") for f in r.summary.findings)


# ---- cache, resume, watch ------------------------------------------------------------------------------


def test_interrupted_run_resumes_from_the_cache_computing_only_what_is_missing(run: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    opts = TrackOptions(device="cpu", cache=str(cache))
    full = run_track([(None, run)], TrackOptions(device="cpu"))
    first = Counting(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_track([(None, run)], opts, executor=first)
    assert first.ran == 2  # one task per checkpoint (single shard): 2 of 4 finished and were cached
    again = Counting()
    r = run_track([(None, run)], opts, executor=again)
    assert again.ran == 2 and r.summary.from_cache == 2 * 28
    assert [x["spectral_norm"] for x in r.rows] == pytest.approx([x["spectral_norm"] for x in full.rows])
    third = Counting()
    run_track([(None, run)], opts, executor=third)
    assert third.ran == 0
    # a checkpoint rewritten in place (new mtime) is computed again; the others are not
    target = run / "checkpoint-1000" / "model.safetensors"
    st = target.stat()
    import os

    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    fourth = Counting()
    run_track([(None, run)], opts, executor=fourth)
    assert fourth.ran == 1


def test_a_rerun_from_the_cache_reads_the_metrics_instead_of_fitting_again(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import spectra_cli.flows.analyze as analyze_flow

    for opts in (TrackOptions(device="cpu", cache=str(tmp_path / "a")),
                 TrackOptions(device="cpu", cache=str(tmp_path / "b"), base=str(run.parent / "base"),
                              kinds=("v_proj",))):  # fmt: skip
        first = run_track([(None, run)], opts)
        with monkeypatch.context() as m:  # the α fit is most of a rerun's time: it must not run again

            def no_fit(*a: Any, **k: Any) -> Any:
                raise AssertionError("metrics computed again on a rerun from the cache")

            m.setattr(analyze_flow, "compute_metrics", no_fit)
            again = run_track([(None, run)], opts, executor=Counting())
        assert again.summary.from_cache == len(first.rows)
        assert json.dumps(again.rows, sort_keys=True) == json.dumps(first.rows, sort_keys=True)


def test_cache_keeps_comparisons_per_base_and_previous(run: Path, tmp_path: Path) -> None:
    opts = TrackOptions(device="cpu", cache=str(tmp_path / "c"), base=str(run.parent / "base"), against="previous",
                        kinds=("v_proj",))  # fmt: skip
    a = Counting()
    r1 = run_track([(None, run)], opts, executor=a)
    b = Counting()
    r2 = run_track([(None, run)], opts, executor=b)
    assert a.ran == 4 and b.ran == 0  # one task per layer
    assert r1.rows == r2.rows
    c = Counting()  # without 1000 the previous of 1500 is 500: 1500's step comparison is missing, the rest kept
    r3 = run_track([(None, run)], TrackOptions(**{**opts.__dict__, "steps": (500, 1500, 2000)}), executor=c)
    assert c.ran == 4 and r3.summary.computed == 4  # the four v_proj of step 1500 only
    row = next(x for x in r3.rows if x["step"] == 1500 and x["depth"] == 1)
    w5, w15 = weights(500)[V1].astype(np.float64), weights(1500)[V1].astype(np.float64)
    assert row["step_relative_delta"] == pytest.approx(np.linalg.norm(w15 - w5) / np.linalg.norm(w5), rel=1e-4)


def test_watch_adds_a_checkpoint_written_during_the_run(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", steps=(500,), layers=1, base=False)
    stop = threading.Event()
    rounds: list[list[int | None]] = []

    def on_update(result: Any) -> None:
        rounds.append([c.step for c in result.checkpoints])
        if len(rounds) == 1:
            threading.Thread(target=write_checkpoint, args=(run, 1000, "hf", 1)).start()
        else:
            stop.set()

    timer = threading.Timer(30, stop.set)  # never hang the suite
    timer.start()
    try:
        last = watch_track(run, TrackOptions(device="cpu", kinds=("v_proj",)), on_update, poll_seconds=0.05,
                           stop=stop)  # fmt: skip
    finally:
        timer.cancel()
    assert rounds == [[500], [500, 1000]]
    assert last is not None and [x["step"] for x in last.rows] == [500, 1000]


# ---- hostile inputs ------------------------------------------------------------------------------------


def test_empty_run_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SelectionError, match="no checkpoints found"):
        run_track([(None, tmp_path / "empty")], TrackOptions(device="cpu"))


def test_a_truncated_checkpoint_is_skipped_with_its_reason(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    f = copy / "checkpoint-1000" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = run_track([(None, copy)], TrackOptions(device="cpu", kinds=("v_proj",)))
    assert [c.step for c in r.checkpoints] == [500, 1500, 2000]
    (skipped,) = r.summary.skipped_checkpoints
    assert skipped["name"] == "checkpoint-1000" and "truncated" in skipped["reason"]
    only = tmp_path / "bad"
    only.mkdir()
    shutil.copytree(copy / "checkpoint-1000", only / "checkpoint-1000")
    with pytest.raises(SelectionError, match=r"no readable checkpoint.*truncated"):
        run_track([(None, only)], TrackOptions(device="cpu"))


def test_a_matrix_over_the_memory_budget_is_refused_before_any_work(run: Path) -> None:
    from spectra_cli.errors import BudgetError

    ex = Counting()
    with pytest.raises(BudgetError, match=r"up_proj.weight \(48×32\) needs about .* raise --max-memory"):
        run_track([(None, run)], TrackOptions(device="cpu", against="previous", max_memory=80_000), executor=ex)
    assert ex.ran == 0


def test_options_are_checked() -> None:
    with pytest.raises(SpectraError, match="--against next"):
        TrackOptions(against="next")
    with pytest.raises(SpectraError, match="--epsilon 2"):
        TrackOptions(epsilons=(2.0,))
    with pytest.raises(CheckpointError, match="no such file"):
        run_track([(None, Path("/nonexistent/ckpt.safetensors"))])


# ---- the command line ----------------------------------------------------------------------------------


def test_cli_json_csv_and_html(run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["track", str(run), "--base", str(run.parent / "base"), "--kinds", "v_proj",
                              "--device", "cpu", "--format", "json", "--html", str(tmp_path / "t.html")])  # fmt: skip
    assert res.exit_code == 0, res.output
    env = json.loads(res.stdout)
    assert env["command"] == "track" and len(env["rows"]) == 16
    assert env["summary"]["findings"][0].startswith("intruders at ε=0.5 first appear at step 1500")
    page = (tmp_path / "t.html").read_text()
    assert "depth × step" in page and "first appear at step 1500" in page
    res = runner.invoke(app, ["track", str(run), "--kinds", "v_proj", "--device", "cpu", "--format", "csv"])
    assert res.exit_code == 0 and res.stdout.splitlines()[0].startswith("checkpoint,step,name,")


def test_cli_errors(run: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["track", str(run), "--ray", "nowhere", "--device", "cpu"])
    assert res.exit_code == 1 and "--ray" in res.output
    res = runner.invoke(app, ["track", str(run / "checkpoint-500"), str(run / "checkpoint-1000"), "--watch"])
    assert res.exit_code == 2 and "--watch needs one run folder" in res.output
    res = runner.invoke(app, ["track", str(run), "--against", "next"])
    assert res.exit_code == 2 and "--against next" in res.output


def test_cli_watch_stops_cleanly_on_ctrl_c_with_the_rows_so_far(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    run = write_run(tmp_path / "run", steps=(500,), layers=1, base=False)
    out = tmp_path / "w.json"
    p = subprocess.Popen([sys.executable, "-m", "spectra_cli", "track", str(run), "--watch", "--poll", "0.1",
                          "--device", "cpu", "--format", "json", "-o", str(out)],
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        write_checkpoint(run, 1000, layers=1)
        while time.monotonic() < deadline and len(json.loads(out.read_text())["rows"]) < 14:
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err
    env = json.loads(out.read_text())
    assert [r["step"] for r in env["rows"]] == [500] * 7 + [1000] * 7
    assert "2 checkpoints tracked (last: checkpoint-1000)" in err


def test_findings_state_alpha_crossing_two_and_nonfinite_matrices() -> None:
    from spectra_cli.flows.track_findings import findings, spans

    assert spans([7, 3, 4, 5]) == "3–5, 7" and spans([2]) == "2"
    runs = [{"name": f"c{s}", "step": s} for s in (1000, 2000, 3000, 4000)]
    # six mlp matrices: α 4.1 → 2.3 on average; four cross 2 at step 3000, two at 4000; attention flat at 3
    alphas = {0: (4.1, 3.0, 1.9, 1.5), 1: (4.1, 3.0, 1.9, 1.5), 2: (4.1, 3.0, 1.9, 1.5), 3: (4.1, 3.0, 1.9, 1.5),
              4: (4.1, 3.5, 2.5, 1.9), 5: (4.1, 3.5, 2.5, 1.9)}  # fmt: skip
    rows = []
    for i, run in enumerate(runs):
        for d, series in alphas.items():
            rows.append({"checkpoint": run["name"], "step": run["step"], "name": f"l{d}.mlp", "depth": d,
                         "kind": "up_proj", "role": "mlp", "status": "ok", "alpha": series[i],
                         "effective_rank_ratio": 0.5})  # fmt: skip
            rows.append({"checkpoint": run["name"], "step": run["step"], "name": f"l{d}.attn", "depth": d,
                         "kind": "q_proj", "role": "attention", "status": "ok", "alpha": 3.0,
                         "effective_rank_ratio": 0.5})  # fmt: skip
    rows.append({"checkpoint": "c4000", "step": 4000, "name": "l9.attn", "depth": 9, "kind": "q_proj",
                 "role": "attention", "status": "nonfinite"})  # fmt: skip
    text = findings(rows, runs, TrackOptions())
    mean_last = sum(s[3] for s in alphas.values()) / 6
    assert text == [
        "mean α of attention stayed near 3",
        f"mean α of mlp fell from 4.1 to {mean_last:.2g}; 6 matrices crossed 2 between step 2000 and step 4000",
        "1 matrix holds NaN/Inf (first at step 4000); not decomposed",
    ]
