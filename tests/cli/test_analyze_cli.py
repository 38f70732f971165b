"""CLI contract of `spectra analyze`: exit codes, messages, formats, files written, options."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures import checkpoints as fx
from spectra_cli.cli.app import app

runner = CliRunner()


def run(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> fx.Generated:
    return fx.single_safetensors(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> fx.Generated:
    return fx.sharded_safetensors(tmp_path_factory.mktemp("sharded"))


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, fx.Bad]:
    return fx.bad_inputs(tmp_path_factory.mktemp("bad"))


def test_table_lists_every_matrix_and_a_summary(tiny: fx.Generated) -> None:
    r = run("analyze", tiny.path, "--columns", "name,alpha,status")  # room for whole names at any width
    assert r.exit_code == 0, r.stderr
    for name in tiny.matrices:
        assert name in r.stdout
    assert f"{len(tiny.matrices)} of {len(tiny.matrices)} matrices analysed" in r.stdout
    assert "no NaN/Inf weights" in r.stdout
    assert "position_ids" not in r.stdout  # int buffer skipped


def test_json_envelope_is_pure_stdout(tiny: fx.Generated) -> None:
    r = run("analyze", tiny.path, "--format", "json")
    assert r.exit_code == 0
    env = json.loads(r.stdout)
    assert env["schema_version"] == 1 and env["command"] == "analyze"
    assert set(env) >= {"spectra_version", "inputs", "rows", "summary"}
    assert {row["name"] for row in env["rows"]} == set(tiny.matrices)
    q = next(row for row in env["rows"] if row["name"] == "layers.0.attn.q_proj.weight")
    s = fx.KNOWN_SPECTRA["layers.0.attn.q_proj.weight"]
    assert q["spectral_norm"] == pytest.approx(s.max(), rel=1e-5)
    assert q["nuclear_norm"] == pytest.approx(s.sum(), rel=1e-5)
    assert q["rows"] == 8 and q["cols"] == 8 and q["params"] == 64


def test_json_has_no_nan_tokens(tmp_path: Path) -> None:
    g = fx.nonfinite(tmp_path)
    r = run("analyze", g.path, "-f", "json", "-q")
    assert r.exit_code == 0
    assert "NaN" not in r.stdout and "Infinity" not in r.stdout
    env = json.loads(r.stdout)
    bad = {row["name"]: row for row in env["rows"] if row["status"] != "ok"}
    assert bad["layers.0.nan.weight"]["nan_count"] == 2
    assert bad["layers.0.inf.weight"]["inf_count"] == 3
    assert sum(1 for row in env["rows"] if row["status"] == "ok") == 3
    assert len(env["summary"]["nonfinite"]) == 2


def test_nonfinite_is_reported_not_fatal(tmp_path: Path) -> None:
    g = fx.nonfinite(tmp_path)
    r = run("analyze", g.path)
    assert r.exit_code == 0
    assert "NaN/Inf found in 2 matrices" in r.stdout
    assert "contain NaN/Inf" in r.stderr


def test_csv_and_markdown(tiny: fx.Generated) -> None:
    r = run("analyze", tiny.path, "-f", "csv")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == len(tiny.matrices)
    assert {"name", "effective_rank", "alpha", "stable_rank"} <= set(rows[0])
    r = run("analyze", tiny.path, "-f", "markdown")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("## spectra analyze")
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 2 + len(tiny.matrices)


def test_output_file_is_written_and_stdout_is_empty(tiny: fx.Generated, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    r = run("analyze", tiny.path, "-f", "json", "-o", out)
    assert r.exit_code == 0 and r.stdout == ""
    assert len(json.loads(out.read_text())["rows"]) == len(tiny.matrices)
    assert not list(tmp_path.glob(".*tmp*"))


def test_refuses_to_write_over_the_input(tiny: fx.Generated) -> None:
    before = tiny.path.read_bytes()
    r = run("analyze", tiny.path, "-o", tiny.path)
    assert r.exit_code == 1 and "refusing to write over an input (--output)" in r.stderr
    assert tiny.path.read_bytes() == before


@pytest.mark.parametrize(
    ("command", "flag"),
    [("analyze", "--output"), ("analyze", "--html"), ("analyze", "--save-spectra"), ("compare", "--output"),
     ("compare", "--html")],
)  # fmt: skip
def test_an_output_in_a_missing_folder_is_refused_before_the_run(
    tiny: fx.Generated, tmp_path: Path, command: str, flag: str
) -> None:
    args = [command, tiny.path] + ([tiny.path] if command == "compare" else [])
    r = runner.invoke(app, [str(a) for a in [*args, flag, tmp_path / "nope" / "out.x"]])
    assert r.exit_code == 1, r.output
    assert r.stderr.strip() == f"Error: {tmp_path / 'nope'}: no such folder; create it first (for {flag})"
    assert not (tmp_path / "nope").exists()


def test_selection_options(sharded: fx.Generated) -> None:
    def names(*extra: str) -> set[str]:
        r = run("analyze", sharded.path, "-f", "json", *extra)
        assert r.exit_code == 0, r.stderr
        return {row["name"] for row in json.loads(r.stdout)["rows"]}

    assert names("--kinds", "q_proj,v_proj") == {
        f"model.layers.{i}.self_attn.{k}.weight" for i in (0, 1) for k in ("q_proj", "v_proj")
    }
    assert names("--kinds", "q_proj", "--kinds", "o_proj", "--include", "*layers.1.*") == {
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
    }
    assert "lm_head.weight" not in names("--exclude", "lm_head*")
    assert all("k_proj" not in n and "v_proj" not in n for n in names("--min-dim", "5"))


def test_empty_selection_is_an_error(sharded: fx.Generated) -> None:
    r = run("analyze", sharded.path, "--kinds", "nope_proj")
    assert r.exit_code == 1
    assert r.stderr.startswith("Error: ") and "no weight matrices selected" in r.stderr
    assert "--kinds nope_proj" in r.stderr


@pytest.mark.parametrize(
    "case",
    ["truncated", "corrupt_header", "missing_shard", "pickle_list", "pickle_garbage", "no_weights",
     "unknown_format", "missing_path"],
)  # fmt: skip
def test_bad_input_is_one_clear_line(bad: dict[str, fx.Bad], case: str) -> None:
    b = bad[case]
    r = run("analyze", b.path)
    assert r.exit_code == 1
    assert r.stderr.startswith("Error: ")
    assert r.stderr.count("\n") == 1, r.stderr
    for frag in b.message:
        assert frag in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--format", "xml"], "xml"),
        (["--max-memory", "lots"], "not a size"),
        (["--precision", "float16"], "float16"),
        (["--min-dim", "0"], "min-dim"),
        (["--method", "qr"], "qr"),
    ],
)
def test_bad_flags_exit_2(tiny: fx.Generated, args: list[str], fragment: str) -> None:
    r = runner.invoke(app, ["analyze", str(tiny.path), *args])
    assert r.exit_code == 2
    assert fragment in r.stderr


def test_missing_checkpoint_argument_exits_2() -> None:
    r = runner.invoke(app, ["analyze"])
    assert r.exit_code == 2 and "--demo" in r.stderr


def test_cuda_requested_without_gpu(tiny: fx.Generated) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():  # the CI machine has no GPU; a developer's may
        pytest.skip("a GPU is present")
    r = run("analyze", tiny.path, "--device", "cuda")
    assert r.exit_code == 1 and "CUDA is not available" in r.stderr and "--device cpu" in r.stderr


def test_tiny_memory_budget_gives_the_same_values(sharded: fx.Generated) -> None:
    full = json.loads(run("analyze", sharded.path, "-f", "json").stdout)["rows"]
    small = run("analyze", sharded.path, "-f", "json", "--max-memory", "6KB")
    assert small.exit_code == 0, small.stderr
    rows = json.loads(small.stdout)["rows"]
    assert [r["name"] for r in rows] == [r["name"] for r in full]
    for a, b in zip(full, rows, strict=True):
        for key in ("spectral_norm", "nuclear_norm", "effective_rank", "stable_rank"):
            assert b[key] == pytest.approx(a[key], rel=1e-9)
    assert json.loads(small.stdout)["summary"]["engine"]["max_memory"] == 6144


def test_svd_over_budget_is_refused(sharded: fx.Generated) -> None:
    r = run("analyze", sharded.path, "--method", "svd", "--max-memory", "1KB")
    assert r.exit_code == 1 and "--method gram" in r.stderr and "raise --max-memory" in r.stderr


def test_torch_backend_matches_numpy(sharded: fx.Generated) -> None:
    a = json.loads(run("analyze", sharded.path, "-f", "json").stdout)["rows"]
    b = json.loads(run("analyze", sharded.path, "-f", "json", "--backend", "torch", "--device", "cpu").stdout)
    assert b["summary"]["engine"]["backend"] == "torch"
    for x, y in zip(a, b["rows"], strict=True):
        assert y["spectral_norm"] == pytest.approx(x["spectral_norm"], rel=1e-6)
        assert y["effective_rank"] == pytest.approx(x["effective_rank"], rel=1e-6)


def test_precision_and_numerical_rank(tiny: fx.Generated) -> None:
    name = "layers.0.mlp.up_proj.weight"  # rank 5, stored in float32
    env32 = json.loads(run("analyze", tiny.path, "-f", "json").stdout)
    env64 = json.loads(run("analyze", tiny.path, "-f", "json", "--precision", "float64").stdout)
    assert env32["summary"]["engine"]["method"] == "gram"
    assert env64["summary"]["engine"]["method"] == "svd"
    up32 = next(r for r in env32["rows"] if r["name"] == name)
    up64 = next(r for r in env64["rows"] if r["name"] == name)
    # the NumPy convention, with ε of the compute precision
    assert up32["numerical_rank"] == 5 == np.linalg.matrix_rank(tiny.matrices[name].astype(np.float32))
    assert up64["numerical_rank"] == np.linalg.matrix_rank(tiny.matrices[name])


def test_save_spectra_round_trip(tiny: fx.Generated, tmp_path: Path) -> None:
    saved = tmp_path / "spectra.safetensors"
    first = run("analyze", tiny.path, "-f", "json", "--save-spectra", saved)
    assert first.exit_code == 0 and saved.is_file()
    again = run("analyze", saved, "-f", "json")
    assert again.exit_code == 0, again.stderr
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert b["summary"]["engine"]["source"] == "saved spectra"
    assert [r["name"] for r in a["rows"]] == [r["name"] for r in b["rows"]]
    for x, y in zip(a["rows"], b["rows"], strict=True):
        for k, v in x.items():
            if isinstance(v, float) and math.isfinite(v):
                assert y[k] == pytest.approx(v, rel=1e-12), k
    only_q = json.loads(run("analyze", saved, "-f", "json", "--kinds", "q_proj").stdout)["rows"]
    assert {r["name"] for r in only_q} == {"layers.0.attn.q_proj.weight", "layers.1.attn.q_proj.weight"}


def test_plots_are_written_with_provenance(sharded: fx.Generated, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    r = run("analyze", sharded.path, "--plots", out, "-o", tmp_path / "t.txt")
    assert r.exit_code == 0, r.stderr
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"metrics_by_depth.png", "heatmap_alpha.png", "heatmap_effective_rank_ratio.png"} <= set(pngs)
    assert any(n.startswith("esd_") for n in pngs)
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    record = json.loads((out / "spectra_run.json").read_text())
    assert record["command"] == "analyze" and set(record["artifacts"]) == set(pngs)
    assert record["inputs"]["format"] == "safetensors-sharded"


def test_plot_layers_pattern(sharded: fx.Generated, tmp_path: Path) -> None:
    out = tmp_path / "p"
    r = run("analyze", sharded.path, "--plots", out, "--plot-layers", "*q_proj*", "-q", "-o", tmp_path / "t")
    assert r.exit_code == 0
    assert sorted(p.name for p in out.glob("esd_*")) == [
        "esd_model.layers.0.self_attn.q_proj.weight.png",
        "esd_model.layers.1.self_attn.q_proj.weight.png",
    ]


def test_version_and_help_examples() -> None:
    assert run("--version").stdout.startswith("spectra ")
    h = run("analyze", "--help")
    assert h.exit_code == 0 and "Examples" in h.stdout and "--max-memory" in h.stdout


COMMANDS = ("analyze", "compare", "rankme", "allocate", "init-adapter", "capture", "merge", "reconstruct",
            "check", "report")  # fmt: skip


def test_every_command_is_registered_and_its_help_has_examples() -> None:
    """Concurrent edits of app.py once dropped registrations: every command must be listed and answer --help
    with an epilog of examples that call it."""
    root = run("--help").stdout
    for command in COMMANDS:
        assert command in root, command
        h = run(command, "--help")
        assert h.exit_code == 0, (command, h.output)
        assert "Examples" in h.stdout and f"spectra {command}" in h.stdout, command


def _spectra(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "spectra_cli", *args], capture_output=True, text=True, env=env)


def test_console_entry_point_error_and_debug(bad: dict[str, fx.Bad]) -> None:
    p = _spectra("analyze", str(bad["truncated"].path))
    assert p.returncode == 1 and p.stderr.startswith("Error: ") and "Traceback" not in p.stderr
    env = {**os.environ, "SPECTRA_DEBUG": "1"}
    d = subprocess.run([sys.executable, "-m", "spectra_cli", "analyze", str(bad["truncated"].path)],
                       capture_output=True, text=True, env=env)  # fmt: skip
    assert d.returncode != 0 and "Traceback" in d.stderr and "CheckpointError" in d.stderr


def test_cpu_run_imports_no_torch_pandas_or_matplotlib(tiny: fx.Generated) -> None:
    code = (
        "import sys; from spectra_cli.cli.app import main; sys.argv=['spectra','analyze',sys.argv[1],'-f','json','-q'];"
        "\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy=[m for m in ('torch','pandas','matplotlib','scipy') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)"
    )
    p = subprocess.run([sys.executable, "-c", code, str(tiny.path)], capture_output=True, text=True)
    assert "HEAVY []" in p.stderr, p.stderr
    assert json.loads(p.stdout)["rows"]


def test_library_api_to_pandas(tiny: fx.Generated) -> None:
    import spectra_cli

    res = spectra_cli.analyze(str(tiny.path), kinds=("q_proj",))
    df = res.to_pandas()
    assert list(df["name"]) == ["layers.1.attn.q_proj.weight", "layers.0.attn.q_proj.weight"]
    assert np.allclose(
        np.sort(res.spectra["layers.0.attn.q_proj.weight"]), np.sort(fx.KNOWN_SPECTRA["layers.0.attn.q_proj.weight"]),
        rtol=1e-5,
    )  # fmt: skip


def test_an_unwritable_output_is_one_error_line_naming_the_users_file(
    tiny: fx.Generated, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails (permission denied, disk full) is an input problem, not a bug: one line that names
    the file asked for (not its staging name), exit 1, nothing left behind."""
    import spectra_cli.checkpoint.output as output_mod

    def refuse(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(output_mod.os, "replace", refuse)
    out = tmp_path / "rows.json"
    r = runner.invoke(app, ["analyze", str(tiny.path), "-f", "json", "-o", str(out)])
    assert r.exit_code == 1, r.output
    assert r.stderr.strip() == f"Error: {out}: cannot write (Permission denied); choose a path you may write to"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, words", [
    (["--xmax", "abc"], "--xmax abc"), (["--fit", "e_tpl", "--fix-fingers", "clip_xmax"], "--fix-fingers clip_xmax"),
    (["--fit", "pl", "--xmax", "force"], "--xmax force"), (["--fit", "lognormal"], "--fit lognormal"),
])  # fmt: skip
def test_fit_flags_refuse_bad_values_with_exit_2(tiny: fx.Generated, args: list[str], words: str) -> None:
    r = run("analyze", tiny.path, *args)
    assert r.exit_code == 2 and words in r.stderr


def test_fit_columns_in_json_and_table(tiny: fx.Generated) -> None:
    r = run("analyze", tiny.path, "--fit", "pl", "--fix-fingers", "clip_xmax", "-f", "json", "-q")
    env = json.loads(r.stdout)
    row = next(x for x in env["rows"] if x["status"] == "ok")
    assert {"fit", "fit_alpha", "fit_tail", "fit_reliability", "fit_num_fingers", "alpha_reliability"} <= set(row)
    assert env["options"]["fit"] == {"fit": "pl", "fix_fingers": "clip_xmax", "xmax": None}
    assert env["summary"]["unreliable_fits"] == sum(x.get("fit_reliability") != "ok" for x in env["rows"]
                                                    if x["status"] == "ok")  # fmt: skip
    r = run("analyze", tiny.path, "--fit", "pl", "--xmax", "2", "--columns", "name,fit_alpha,fit_reliability")
    assert r.exit_code == 0 and "fit reading" in r.stdout
