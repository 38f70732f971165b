"""CLI contract of `spectra compare`: naming, several tuned inputs, formats, mismatches, exit codes, plots, and
`--remove-intruders` (full checkpoints, adapters loaded back by PEFT, --force, interrupted runs).

Expected weights and intruder sets are computed here with NumPy from the files on disk, never by spectra.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import spectra_cli.flows.compare_sides as sides
from fixtures import checkpoints as fx
from spectra_cli.cli.app import app

runner = CliRunner()
L0, L1, L2 = (f"layers.{i}.mlp.up_proj.weight" for i in range(3))
DOWN = "layers.0.mlp.down_proj.weight"
LAM = 0.75
PNG = b"\x89PNG\r\n\x1a\n"


def run(*args: str | Path, catch: bool = False):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=catch)


def ok_json(*args: str | Path) -> dict[str, Any]:
    r = run("compare", *args, "-f", "json", "-q")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.linalg.svd(np.asarray(x, dtype=np.float64), full_matrices=False)


def intruder_set(w0: np.ndarray, wt: np.ndarray, eps: float = 0.5, k: int = 10) -> list[int]:
    """1-based ranks j ≤ k whose tuned left singular vector has max |cos| < eps against all base vectors."""
    u0 = svd(w0)[0]
    ut = svd(wt)[0][:, : min(k, u0.shape[1])]
    return [int(j) + 1 for j in np.flatnonzero(np.abs(u0.T @ ut).max(axis=0) < eps)]


def mitigated(wt: np.ndarray, ranks: list[int], lam: float = LAM) -> np.ndarray:
    """W′ = W_t + (λ−1)·Σ_{j∈I} σⱼuⱼvⱼᵀ, from a float64 SVD of W_t."""
    u, s, vt = svd(wt)
    idx = [j - 1 for j in ranks]
    return wt + (lam - 1.0) * (u[:, idx] * s[idx]) @ vt[idx]


def digests(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, fx.Generated]:
    return fx.intruder_cases(tmp_path_factory.mktemp("intruder_cases"))


# ---- naming, several tuned inputs, formats ---------------------------------------------------------------


def test_name_equals_path_and_default_names(cases):
    env = ok_json(cases["base"].path, f"first={cases['intruders'].path}", cases["noise"].path)
    names = [t["name"] for t in env["inputs"]["tuned"]]
    assert names == ["first", "noise"]  # NAME=PATH, and the file's stem by default
    assert env["inputs"]["tuned"][0]["path"] == str(cases["intruders"].path)
    assert env["inputs"]["base"] == str(cases["base"].path)
    assert {r["tuned"] for r in env["rows"]} == {"first", "noise"}
    assert set(env["summary"]["tuned"]) == {"first", "noise"}


def test_duplicate_names_are_an_error(cases):
    r = run("compare", cases["base"].path, f"x={cases['noise'].path}", f"x={cases['rescaled'].path}")
    assert r.exit_code == 1
    assert r.stderr.startswith("Error: ") and "distinct names" in r.stderr and "NAME=PATH" in r.stderr


def test_several_tuned_one_row_each_and_the_base_decomposed_once(cases, tmp_path, monkeypatch):
    base = cases["base"]
    noise = {k: cases["noise"].matrices[k] - v for k, v in base.matrices.items()}
    extra = {
        f"n{i}": fx.patched_copy(
            base.path, tmp_path / f"n{i}", {k: v + i * noise[k] for k, v in base.matrices.items()}
        )
        for i in (2, 3)
    }
    seen: list[np.ndarray] = []
    original = sides.svd_function

    def counting(*args: Any, **kwargs: Any):
        inner = original(*args, **kwargs)

        def svd_counted(w: np.ndarray):
            seen.append(np.array(w, dtype=np.float64))
            return inner(w)

        return svd_counted

    monkeypatch.setattr(sides, "svd_function", counting)
    env = ok_json(base.path, f"n1={cases['noise'].path}", *(f"{k}={v.path}" for k, v in extra.items()))
    n = len(base.matrices)
    assert len(env["rows"]) == 3 * n
    assert sorted((r["tuned"], r["name"]) for r in env["rows"]) == sorted(
        (t, name) for t in ("n1", "n2", "n3") for name in base.matrices
    )
    assert len(seen) == n + 3 * n  # every tuned matrix once, and the base ...
    for name, w in base.matrices.items():  # ... each base matrix exactly once
        assert sum(1 for x in seen if x.shape == w.shape and np.array_equal(x, w)) == 1, name
    for t in ("n1", "n2", "n3"):
        s = env["summary"]["tuned"][t]
        assert s["matrices"] == n and s["total_intruders"] == {"0.5": 0} and s["source"] == "checkpoint"
    deltas = [env["summary"]["tuned"][t]["mean_relative_delta"] for t in ("n1", "n2", "n3")]
    assert deltas == pytest.approx([deltas[0], 2 * deltas[0], 3 * deltas[0]], rel=1e-3)


def test_several_epsilons(cases):
    env = ok_json(cases["base"].path, cases["intruders"].path, "--epsilon", "0.3,0.5")
    rows = {r["name"]: r for r in env["rows"]}
    assert env["summary"]["epsilons"] == [0.3, 0.5]
    assert env["options"]["epsilons"] == [0.3, 0.5]
    assert (rows[L2]["intruders@0.3"], rows[L2]["intruders@0.5"]) == (1, 2)  # designed max |cos| 0.2, 0.4, …
    assert rows[L2]["intruders"] == 1 and rows[L2]["intruder_ranks"] == [1]  # the first ε is primary
    assert env["summary"]["tuned"]["intruders"]["total_intruders"] == {"0.3": 6, "0.5": 7}
    repeated = ok_json(cases["base"].path, cases["intruders"].path, "-e", "0.3", "-e", "0.5")
    assert repeated["rows"] == env["rows"]
    r = run("compare", cases["base"].path, cases["intruders"].path, "--epsilon", "0.3,0.5")
    assert r.exit_code == 0
    assert "intr@0.3" in r.stdout and "intr@0.5" in r.stdout
    assert "intruder dimensions 6 at ε=0.3, 7 at ε=0.5" in r.stdout


def test_json_envelope_and_other_formats(cases, tmp_path):
    r = run("compare", cases["base"].path, cases["intruders"].path, "--format", "json")
    assert r.exit_code == 0
    env = json.loads(r.stdout)  # stdout holds only the JSON document
    assert env["schema_version"] == 1 and env["command"] == "compare"
    assert set(env) >= {"spectra_version", "inputs", "options", "rows", "summary"}
    assert len(env["rows"]) == 4 and "NaN" not in r.stdout
    row = next(x for x in env["rows"] if x["name"] == L1)
    assert row["intruders"] == 3 and row["intruder_ranks"] == [1, 2, 3] and row["status"] == "ok"
    assert row["shape"] == "48x24" and row["kind"] == "up_proj" and row["depth"] == 1
    assert row["source"] == "checkpoint" and row["tuned"] == "intruders"
    r = run("compare", cases["base"].path, cases["intruders"].path, "-f", "csv")
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 + 4 and "intruders" in lines[0] and "relative_delta" in lines[0]
    r = run("compare", cases["base"].path, cases["intruders"].path, "-f", "markdown")
    assert r.stdout.startswith("## spectra compare")
    assert sum(1 for ln in r.stdout.splitlines() if ln.startswith("|")) == 2 + 4
    out = tmp_path / "rows.json"
    r = run("compare", cases["base"].path, cases["intruders"].path, "-f", "json", "-o", out)
    assert r.exit_code == 0 and r.stdout == ""
    assert json.loads(out.read_text())["rows"] == env["rows"]


def test_table_names_the_worst_modules(cases):
    r = run("compare", cases["base"].path, cases["intruders"].path)
    assert r.exit_code == 0
    assert "intruders (checkpoint): intruder dimensions 7 at ε=0.5; 3 of 4 matrices have any" in r.stdout
    assert f"most intruders: {L1} (3)" in r.stdout


def test_refuses_to_write_output_over_an_input(cases):
    before = cases["noise"].path.read_bytes()
    r = run("compare", cases["base"].path, cases["noise"].path, "-o", cases["noise"].path)
    assert (
        r.exit_code == 1 and r.stderr.startswith("Error: ") and "refusing to write over an input" in r.stderr
    )
    assert cases["noise"].path.read_bytes() == before


# ---- mismatches and bad flags ----------------------------------------------------------------------------


def test_tensor_shape_mismatch_names_the_tensor(cases, tmp_path):
    tensors = {k: v.astype(np.float32) for k, v in cases["base"].matrices.items()}
    tensors[L1] = np.zeros((48, 23), dtype=np.float32)
    fx.write_safetensors(tmp_path / "other.safetensors", tensors)
    r = run("compare", cases["base"].path, tmp_path / "other.safetensors")
    assert r.exit_code == 1 and r.stdout == ""
    assert (
        r.stderr.startswith("Error: ")
        and L1 in r.stderr
        and "[48, 23]" in r.stderr
        and "[48, 24]" in r.stderr
    )
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_tensor_needs_allow_missing(cases, tmp_path):
    tensors = {k: v.astype(np.float32) for k, v in cases["base"].matrices.items() if k != L2}
    fx.write_safetensors(tmp_path / "partial.safetensors", tensors)
    r = run("compare", cases["base"].path, tmp_path / "partial.safetensors")
    assert r.exit_code == 1 and r.stderr.startswith("Error: ")
    assert L2 in r.stderr and "--allow-missing" in r.stderr
    r = run("compare", cases["base"].path, tmp_path / "partial.safetensors", "--allow-missing", "-f", "json")
    assert r.exit_code == 0
    env = json.loads(r.stdout)
    assert {x["name"] for x in env["rows"]} == set(cases["base"].matrices) - {L2}
    assert env["summary"]["tuned"]["partial"]["missing"] == [L2]
    assert env["inputs"]["tuned"][0]["missing"] == [L2]
    assert "missing" in r.stderr and "--allow-missing" in r.stderr


def test_adapter_for_another_model_is_an_error(cases, tmp_path):
    ones = (np.ones((2, 16)), np.ones((40, 2)))
    other = fx.lora_adapter(tmp_path / "other", {"model.layers.0.mlp.zzz_proj": ones}, r=2, alpha=2)
    r = run("compare", cases["base"].path, other)
    assert r.exit_code == 1 and r.stderr.startswith("Error: ")
    assert "zzz_proj" in r.stderr and "does not fit the base" in r.stderr
    both = fx.lora_adapter(
        tmp_path / "both", {"layers.0.mlp.up_proj": ones, "model.x.zzz_proj": ones}, r=2, alpha=2
    )
    env = ok_json(cases["base"].path, both, "--allow-missing")
    assert [x["name"] for x in env["rows"]] == [L0]
    assert env["summary"]["tuned"]["both"]["missing"] == ["model.x.zzz_proj"]


def test_adapter_module_shape_mismatch_is_an_error(cases, tmp_path):
    bad = fx.lora_adapter(
        tmp_path / "bad", {"layers.0.mlp.up_proj": (np.ones((2, 15)), np.ones((40, 2)))}, r=2, alpha=2
    )
    r = run("compare", cases["base"].path, bad)
    assert r.exit_code == 1 and r.stderr.startswith("Error: ")
    assert "layers.0.mlp.up_proj" in r.stderr and "40×15" in r.stderr and "40×16" in r.stderr


def test_adapter_rank_disagreeing_with_its_config_is_an_error(cases, tmp_path):
    bad = fx.lora_adapter(
        tmp_path / "bad", {"layers.0.mlp.up_proj": (np.ones((3, 16)), np.ones((40, 3)))}, r=2, alpha=2
    )
    r = run("compare", cases["base"].path, bad)
    assert r.exit_code == 1 and "rank 2" in r.stderr and "(3, 16)" in r.stderr


def test_selection_that_leaves_nothing_changed_is_an_error(cases, tmp_path):
    adapter = fx.lora_adapter(
        tmp_path / "a", {"layers.0.mlp.up_proj": (np.ones((2, 16)), np.ones((40, 2)))}, r=2, alpha=2
    )
    r = run("compare", cases["base"].path, adapter, "--kinds", "down_proj")
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and "--kinds" in r.stderr


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--remove-intruders", "0.75"], "--remove-intruders needs --out"),
        (["--out", "somewhere"], "--out is only used with --remove-intruders"),
        (["--epsilon", "1.5"], "(0, 1]"),
        (["--epsilon", "0"], "(0, 1]"),
        (["--epsilon", "abc"], "expected numbers"),
        (["--epsilon", "0.3,abc"], "expected numbers"),
        (["--top-k", "0"], "--top-k"),
        (["--format", "xml"], "--format"),
    ],
)
def test_bad_flags_exit_2(cases, tmp_path, flags, fragment):
    r = run("compare", cases["base"].path, cases["noise"].path, *flags)
    assert r.exit_code == 2, r.stdout
    assert fragment in re.sub(r"[│╭╮╰╯─\s]+", " ", r.stderr)
    assert not (Path.cwd() / "somewhere").exists()


def test_remove_intruders_rejects_a_non_finite_lambda(cases, tmp_path):
    r = run(
        "compare",
        cases["base"].path,
        cases["intruders"].path,
        "--remove-intruders",
        "nan",
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 2
    assert not (tmp_path / "o").exists()


def _nan_inputs(cases: dict[str, fx.Generated], tmp: Path, where: str) -> tuple[Path, Path]:
    w = cases["base"].matrices[L2].copy()
    w[3, 4] = np.nan
    nan_copy = fx.patched_copy(cases["base"].path, tmp / "nan", {L2: w}).path
    if where == "tuned":
        return cases["base"].path, nan_copy
    if where == "base":
        return nan_copy, cases["noise"].path
    a = np.ones((2, 24))
    a[0, 0] = np.nan
    return cases["base"].path, fx.lora_adapter(
        tmp / "nan_adapter", {"layers.2.mlp.up_proj": (a, np.ones((64, 2)))}, r=2, alpha=2
    )


@pytest.mark.parametrize("where", ["tuned", "base", "adapter"])
def test_nan_is_a_nonfinite_row_not_a_crash(cases, tmp_path, where):
    base, tuned = _nan_inputs(cases, tmp_path, where)
    r = run("compare", base, tuned, "-f", "json")
    assert r.exit_code == 0, r.stderr
    assert "NaN" not in r.stdout
    env = json.loads(r.stdout)
    rows = {x["name"]: x for x in env["rows"]}
    assert rows[L2]["status"] == "nonfinite"
    assert all(x["status"] == "ok" for name, x in rows.items() if name != L2)
    s = next(iter(env["summary"]["tuned"].values()))
    assert s["nonfinite"] == 1


# ---- plots ---------------------------------------------------------------------------------------------


def test_plots_and_run_record(cases, tmp_path):
    plots = tmp_path / "plots"
    tuned = (f"lora-r8={cases['intruders'].path}", f"full={cases['noise'].path}")
    # two matrices only: the figures have fewer panels and draw faster
    r = run("compare", cases["base"].path, *tuned, "--include", "layers.1.*,layers.2.*", "--plots", plots)
    assert r.exit_code == 0, r.stderr
    expected = {f"{kind}_{name}.png" for kind in ("intruders_heatmap", "cosine_profile", "spectra", "drift_by_depth")
                for name in ("lora-r8", "full")} | {"intruders_by_model.png"}  # fmt: skip
    assert {p.name for p in plots.glob("*.png")} == expected
    for p in plots.glob("*.png"):
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 1000, p.name
    record = json.loads((plots / "spectra_run.json").read_text())
    assert record["command"] == "compare" and sorted(record["artifacts"]) == sorted(expected)
    assert [t["name"] for t in record["inputs"]["tuned"]] == ["lora-r8", "full"]
    assert "wrote 9 figures" in r.stderr


# ---- --remove-intruders: a sharded full checkpoint -----------------------------------------------------

UP0, GATE1, Q1 = (
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.mlp.gate_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
)


@pytest.fixture(scope="module")
def sharded_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[fx.Generated, fx.Generated]:
    """The 2-shard LLaMA-style base, and a tuned copy (same layout) with intruders in two 16×8 matrices and
    small noise in a third."""
    root = tmp_path_factory.mktemp("sharded_pair")
    base = fx.sharded_safetensors(root / "base")
    w = base.matrices

    def s1(x: np.ndarray) -> float:
        return float(np.linalg.norm(x, 2))

    new = {
        UP0: fx.retarget_tail(w[UP0], np.array([5.0, 4.0]) * s1(w[UP0]), np.array([0.0, 0.1]), seed=1),
        GATE1: w[GATE1] + fx.orthogonal_update(w[GATE1], np.array([4.0, 3.0, 2.0]) * s1(w[GATE1]), seed=2),
        Q1: w[Q1] + 1e-4 * s1(w[Q1]) * np.random.default_rng(3).standard_normal(w[Q1].shape) / 6,
    }
    return base, fx.patched_copy(base.path, root / "tuned", new)


def test_remove_intruders_from_a_sharded_checkpoint(sharded_pair, tmp_path):
    base, tuned = sharded_pair
    before = digests(tuned.path)
    out = tmp_path / "mitigated"
    r = run("compare", base.path, tuned.path, "--remove-intruders", LAM, "--out", out, "-f", "json", "-q")
    assert r.exit_code == 0, r.stderr
    assert digests(tuned.path) == before  # the input is untouched
    # same layout: the shards, the index and the config, plus the run record
    assert {p.name for p in out.iterdir()} == {p.name for p in tuned.path.iterdir()} | {"spectra_run.json"}
    for name in ("config.json", "model.safetensors.index.json"):
        assert (out / name).read_bytes() == (tuned.path / name).read_bytes()
    for shard in fx.safetensors_files(tuned.path):
        assert fx.read_header(out / shard.name) == fx.read_header(shard)
        assert (out / shard.name).stat().st_size == shard.stat().st_size
    # which matrices have intruders, independently: exactly the two constructed ones
    expected: dict[str, list[int]] = {}
    for name, w0 in base.matrices.items():
        wt = fx.read_tensor(tuned.path, name)
        ranks = intruder_set(w0, wt)
        if ranks:
            expected[name] = ranks
    assert expected == {UP0: [1, 2], GATE1: [1, 2, 3]}
    rows = {x["name"]: x for x in json.loads(r.stdout)["rows"]}
    assert {n: x["intruder_ranks"] for n, x in rows.items() if x["intruders"]} == expected
    for shard in fx.safetensors_files(tuned.path):
        for name in fx.read_header(shard)[0]:
            if name in expected:
                wt = fx.read_tensor(tuned.path, name)
                got = fx.read_tensor(out, name)
                want = mitigated(wt, expected[name])
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.linalg.norm(wt, 2))
                s_new = svd(got)[1]
                s_t = svd(wt)[1]
                for j in expected[name]:  # the intruders' singular values are scaled by λ
                    assert np.min(np.abs(s_new - LAM * s_t[j - 1])) < 1e-5 * s_t[0]
            else:  # everything else, the noisy q_proj, the norms and the embeddings: bit for bit
                assert fx.tensor_bytes(out, name) == fx.tensor_bytes(tuned.path, name), name
    record = json.loads((out / "spectra_run.json").read_text())
    assert record["command"] == "compare --remove-intruders"
    assert record["options"]["remove_intruders"] == LAM and record["options"]["epsilon"] == 0.5
    assert {c["name"]: c["intruders"] for c in record["changed_modules"]} == expected
    assert leftovers(tmp_path, "mitigated") == []


def test_remove_intruders_with_several_tuned_writes_one_folder_each(cases, tmp_path):
    out = tmp_path / "out"
    r = run("compare", cases["base"].path, f"i={cases['intruders'].path}", f"n={cases['noise'].path}",
            "--remove-intruders", LAM, "--out", out, "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["i", "n"]
    assert sorted(p.name for p in (out / "n").iterdir()) == ["noise.safetensors", "spectra_run.json"]
    assert (out / "n" / "noise.safetensors").read_bytes() == cases["noise"].path.read_bytes()  # no intruders
    got = out / "i" / "intruders.safetensors"
    for name, w0 in cases["base"].matrices.items():
        wt = cases["intruders"].matrices[name]
        ranks = intruder_set(w0, wt)
        assert bool(ranks) == (name != DOWN)
        want = mitigated(wt, ranks) if ranks else wt
        np.testing.assert_allclose(fx.read_tensor(got, name), want, rtol=0, atol=1e-5 * np.linalg.norm(wt, 2))
    assert fx.tensor_bytes(got, "layers.0.mlp.up_proj.bias") == fx.tensor_bytes(
        cases["intruders"].path, "layers.0.mlp.up_proj.bias"
    )


def test_existing_out_needs_force(cases, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    r = run("compare", cases["base"].path, cases["intruders"].path, "--remove-intruders", LAM, "--out", out)
    assert r.exit_code == 1 and r.stderr.startswith("Error: ")
    assert "already exists" in r.stderr and "--force" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    r = run(
        "compare",
        cases["base"].path,
        cases["intruders"].path,
        "--remove-intruders",
        LAM,
        "--out",
        out,
        "--force",
    )
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["intruders.safetensors", "spectra_run.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old folder left beside it


def test_out_inside_an_input_is_refused(cases, sharded_pair):
    base, tuned = sharded_pair
    before = digests(tuned.path)
    r = run("compare", base.path, tuned.path, "--remove-intruders", LAM, "--out", tuned.path / "sub")
    assert r.exit_code == 1 and "must not be inside" in r.stderr
    assert digests(tuned.path) == before


def _raising_svd(after: int, exc: BaseException):
    original = sides.svd_function

    def factory(*args: Any, **kwargs: Any):
        inner = original(*args, **kwargs)
        calls = [0]

        def svd_or_fail(w: np.ndarray):
            calls[0] += 1
            if calls[0] > after:
                raise exc
            return inner(w)

        return svd_or_fail

    return factory


@pytest.mark.parametrize(
    "failure", ["error during the run", "interrupt during the run", "error while committing"]
)
def test_an_interrupted_run_leaves_nothing_behind(sharded_pair, tmp_path, monkeypatch, failure):
    base, tuned = sharded_pair
    before = digests(tuned.path)
    if failure == "error during the run":
        monkeypatch.setattr(sides, "svd_function", _raising_svd(5, RuntimeError("disk on fire")))
    elif failure == "interrupt during the run":
        monkeypatch.setattr(sides, "svd_function", _raising_svd(5, KeyboardInterrupt()))
    else:
        import spectra_cli.checkpoint.provenance

        def broken(*args: Any, **kwargs: Any) -> None:
            raise OSError("no space left on device")

        monkeypatch.setattr(spectra_cli.checkpoint.provenance, "write_run_record", broken)
    out = tmp_path / "out"
    r = run("compare", base.path, tuned.path, "--remove-intruders", LAM, "--out", out, catch=True)
    assert r.exit_code != 0
    if failure == "interrupt during the run":
        assert r.exit_code == 130
    elif failure == "error while committing":  # an OSError without a file name: one line, not a traceback
        assert (r.exit_code, r.stderr) == (1, "Error: no space left on device\n")
    else:
        assert isinstance(r.exception, RuntimeError)
    assert not out.exists()
    assert leftovers(tmp_path, "out") == []
    assert digests(tuned.path) == before


def test_an_interrupted_run_with_several_tuned_leaves_nothing_behind(cases, tmp_path, monkeypatch):
    monkeypatch.setattr(sides, "svd_function", _raising_svd(5, RuntimeError("disk on fire")))
    out = tmp_path / "out"
    r = run("compare", cases["base"].path, f"a={cases['intruders'].path}", f"b={cases['noise'].path}",
            "--remove-intruders", LAM, "--out", out, catch=True)  # fmt: skip
    assert isinstance(r.exception, RuntimeError)
    assert leftovers(tmp_path, "out") == [] and not (
        out.exists() and leftovers(out, "a") + leftovers(out, "b")
    )
    assert not out.exists()


# ---- --remove-intruders: adapters ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, fx.PeftCase]:
    root = tmp_path_factory.mktemp("peft")
    return {arch: fx.peft_case(root / arch, arch, intruders=arch == "llama") for arch in ("llama", "gpt2")}


def _adapter_factors(folder: Path, module: str) -> tuple[np.ndarray, np.ndarray]:
    f = folder / "adapter_model.safetensors"
    return (
        fx.read_tensor(f, f"base_model.model.{module}.lora_A.weight"),
        fx.read_tensor(f, f"base_model.model.{module}.lora_B.weight"),
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_remove_intruders_from_a_peft_adapter_loads_back_in_peft(peft_cases, tmp_path, arch):
    import warnings

    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import GPT2Model, LlamaForCausalLM

    case = peft_cases[arch]
    conv1d = arch == "gpt2"  # Conv1D weights stored in×out; the adapter has fan_in_fan_out
    out = tmp_path / "adapter-mitigated"
    before = digests(case.adapter)
    r = run("compare", case.base, case.adapter, "--remove-intruders", LAM, "--out", out, "-f", "json", "-q")
    assert r.exit_code == 0, r.stderr
    assert digests(case.adapter) == before
    assert {p.name for p in out.iterdir()} == {p.name for p in case.adapter.iterdir()} | {"spectra_run.json"}
    cfg_in = json.loads((case.adapter / "adapter_config.json").read_text())
    cfg = json.loads((out / "adapter_config.json").read_text())
    expected: dict[str, np.ndarray] = {}  # module → W′ in the logical out×in orientation
    ranks: dict[str, int] = {}
    for module in case.modules:
        w0 = fx.read_tensor(case.base, module + ".weight")
        w0 = w0.T if conv1d else w0
        a, b = _adapter_factors(case.adapter, module)
        r0, _, s0 = fx.lora_scale(cfg_in, module)
        wt = w0 + s0 * (b @ a)
        found = intruder_set(w0, wt)
        expected[module] = mitigated(wt, found) if found else wt
        ranks[module] = r0 + len(found)
        r_out, _, s_out = fx.lora_scale(cfg, module)
        assert r_out == ranks[module], module
        if found:
            assert cfg["rank_pattern"][re.escape(module)] == r0 + len(found)
            assert s_out == pytest.approx(1.0)
        else:
            assert (r_out, s_out) == (r0, s0)
            assert _adapter_factors(out, module)[0].tobytes() == a.tobytes()
    assert sum(ranks.values()) > 4 * len(ranks)  # some module had intruders
    if arch == "llama":  # lora_B along the complement of up_proj's column space: 4 + 4
        assert ranks["model.layers.0.mlp.up_proj"] == 8 and ranks["model.layers.1.mlp.up_proj"] == 8
    # the real consumer: PEFT loads it onto the base, without missing or unexpected keys
    model = (GPT2Model if conv1d else LlamaForCausalLM).from_pretrained(case.base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, out)
    messages = [str(w.message).lower() for w in caught]
    assert not [m for m in messages if "missing" in m or "unexpected" in m], messages
    weights_file = out / "adapter_model.safetensors"
    file_keys = set(fx.read_header(weights_file)[0])
    state = get_peft_model_state_dict(peft_model)
    assert set(state) == file_keys
    for key in file_keys:
        np.testing.assert_array_equal(state[key].float().numpy(), fx.read_tensor(weights_file, key))
    inner = peft_model.base_model.model
    for module, r_expected in ranks.items():
        shape = inner.get_submodule(module).lora_A["default"].weight.shape
        assert tuple(shape) == (r_expected, expected[module].shape[1]), module
    merged = peft_model.merge_and_unload()
    params = dict(merged.named_parameters())
    for module, want in expected.items():
        got = params[module + ".weight"].detach().to(torch.float64).numpy()
        np.testing.assert_allclose(got.T if conv1d else got, want, rtol=0, atol=1e-5)
    for name, p in params.items():
        if name.removesuffix(".weight") not in expected:
            base_value = fx.read_tensor(case.base, name).astype(np.float32)
            np.testing.assert_array_equal(p.detach().numpy(), base_value)


def test_remove_intruders_from_a_conv1d_checkpoint_keeps_the_stored_layout(peft_cases, tmp_path):
    case = peft_cases["gpt2"]  # the PEFT-merged GPT-2 as a full tuned checkpoint: Conv1D stored in×out
    out = tmp_path / "out"
    r = run("compare", case.base, case.merged, "--remove-intruders", LAM, "--out", out, "-q")
    assert r.exit_code == 0, r.stderr
    changed = 0
    for name in fx.read_header(case.merged / "model.safetensors")[0]:
        stored = fx.read_tensor(case.merged, name)
        if name.removesuffix(".weight") in case.modules:
            w0, wt = fx.read_tensor(case.base, name).T, stored.T
            found = intruder_set(w0, wt)
            if found:
                changed += 1
                got = fx.read_tensor(out, name)
                assert got.shape == stored.shape
                tol = 1e-5 * np.linalg.norm(wt, 2)
                np.testing.assert_allclose(got.T, mitigated(wt, found), rtol=0, atol=tol)
                continue
        assert fx.tensor_bytes(out, name) == fx.tensor_bytes(case.merged, name), name
    assert changed == len(case.modules)


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> fx.Generated:
    return fx.lora_base(tmp_path_factory.mktemp("lora_base"))


UP = "model.layers.0.mlp.up_proj"
Q = "model.layers.0.self_attn.q_proj"


def _intruder_adapter(lora: fx.Generated, folder: Path, **config: Any) -> Path:
    """up_proj (48×16, rank 6): B in the complement of W's column space → intruders; q_proj (rank 4) small."""
    rng = np.random.default_rng(5)
    w = lora.matrices[UP + ".weight"]
    factors = {
        UP: (
            fx.f32(np.linalg.qr(rng.standard_normal((16, 6)))[0].T),
            fx.f32(fx.complement_directions(w, 6, 9) * 3.0),
        ),
        Q: (fx.f32(rng.standard_normal((4, 16)) * 0.01), fx.f32(rng.standard_normal((16, 4)) * 0.01)),
    }
    return fx.lora_adapter(folder, factors, r=4, alpha=8, **config)


def _check_exact_adapter(lora: fx.Generated, adapter: Path, out: Path) -> None:
    """The written adapter, read with PEFT's rules, gives W′ for every module whose intruders were removed."""
    cfg_in = json.loads((adapter / "adapter_config.json").read_text())
    cfg = json.loads((out / "adapter_config.json").read_text())
    changed = 0
    for module in (UP, Q):
        w0 = lora.matrices[module + ".weight"]
        a, b = _adapter_factors(adapter, module)
        wt = w0 + fx.lora_scale(cfg_in, module)[2] * (b @ a)
        found = intruder_set(w0, wt)
        changed += bool(found)
        a2, b2 = _adapter_factors(out, module)
        r2, _, s2 = fx.lora_scale(cfg, module)
        assert a2.shape[0] == b2.shape[1] == r2, (module, a2.shape, r2)
        want = mitigated(wt, found) if found else wt
        np.testing.assert_allclose(w0 + s2 * (b2 @ a2), want, rtol=0, atol=1e-5)
    assert changed == 1  # up_proj has intruders, the tiny q_proj update none


def _remove(base: Path, adapter: Path, out: Path) -> None:
    r = run("compare", base, adapter, "--remove-intruders", LAM, "--out", out, "-q")
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("rslora", [False, True])
def test_remove_intruders_from_an_adapter_is_exact(lora, tmp_path, rslora):
    adapter = _intruder_adapter(
        lora, tmp_path / "adapter", use_rslora=rslora, rank_pattern={re.escape(UP): 6}
    )
    _remove(lora.path, adapter, tmp_path / "out")
    _check_exact_adapter(lora, adapter, tmp_path / "out")


def test_remove_intruders_when_rank_pattern_has_a_generic_key(lora, tmp_path):
    adapter = _intruder_adapter(lora, tmp_path / "adapter", rank_pattern={"up_proj": 6})
    _remove(lora.path, adapter, tmp_path / "out")
    _check_exact_adapter(lora, adapter, tmp_path / "out")


def test_remove_intruders_when_alpha_pattern_has_a_generic_key(lora, tmp_path):
    adapter = _intruder_adapter(
        lora, tmp_path / "adapter", rank_pattern={re.escape(UP): 6}, alpha_pattern={"up_proj": 3}
    )
    _remove(lora.path, adapter, tmp_path / "out")
    _check_exact_adapter(lora, adapter, tmp_path / "out")
