"""Selecting matrices by role (``--roles``), and the count of what the selection flags left out, as analyze's
summary sentence says it ("4 of 8 matrices analysed (4 excluded by --roles mlp)")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fixtures import checkpoints as fx
from spectra_cli.checkpoint.matrices import Selection, count_excluded, select_matrices
from spectra_cli.checkpoint.source import open_checkpoint
from spectra_cli.cli.app import app
from spectra_cli.errors import SelectionError, SpectraError
from spectra_cli.flows.analyze import AnalyzeOptions
from spectra_cli.report.views.analyze import count_line

runner = CliRunner()

#: the tiny fixture's matrices by the role their names give them (written out, not computed)
MLP = {f"layers.{i}.mlp.{k}.weight" for i in (0, 1) for k in ("up_proj", "down_proj")}
ATTENTION = {"layers.0.attn.q_proj.weight", "layers.1.attn.q_proj.weight"}
EMBEDDING = {"embed.weight"}
HEAD = {"head.weight"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> fx.Generated:
    return fx.single_safetensors(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize(("roles", "expected"), [
    (("mlp",), MLP), (("attention",), ATTENTION), (("embedding", "lm_head"), EMBEDDING | HEAD),
    (("attention", "mlp"), ATTENTION | MLP),
])  # fmt: skip
def test_roles_select_the_matrices_of_those_roles(tiny: fx.Generated, roles: tuple[str, ...], expected: set[str]
                                                  ) -> None:  # fmt: skip
    ckpt = open_checkpoint(tiny.path)
    specs, _ = select_matrices(ckpt, Selection(roles=roles))
    assert {s.name for s in specs} == expected
    assert count_excluded(ckpt, Selection(roles=roles), len(specs)) == 8 - len(expected)


def test_roles_combine_with_kinds(tiny: fx.Generated) -> None:
    specs, _ = select_matrices(open_checkpoint(tiny.path), Selection(kinds=("up_proj", "q_proj"), roles=("mlp",)))
    assert {s.name for s in specs} == {"layers.0.mlp.up_proj.weight", "layers.1.mlp.up_proj.weight"}


def test_a_role_with_no_matrix_is_an_error_naming_the_flag(tiny: fx.Generated) -> None:
    with pytest.raises(SelectionError, match=r"no weight matrices selected after filters \(--roles conv\)"):
        select_matrices(open_checkpoint(tiny.path), Selection(roles=("conv",)))


def test_an_unknown_role_lists_the_valid_ones() -> None:
    for make in (lambda: Selection(roles=("ffn",)), lambda: AnalyzeOptions(roles=("ffn",))):
        with pytest.raises(SpectraError, match=r"^--roles ffn: not a role; choose from embedding, lm_head, "
                                               r"attention, mlp, conv, other$"):  # fmt: skip
            make()


def _json(*args: Any) -> dict[str, Any]:
    r = runner.invoke(app, [str(a) for a in args] + ["--format", "json", "-q"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_analyze_counts_the_matrices_the_flags_excluded(tiny: fx.Generated) -> None:
    env = _json("analyze", tiny.path, "--roles", "mlp")
    assert {r["name"] for r in env["rows"]} == MLP and {r["role"] for r in env["rows"]} == {"mlp"}
    s = env["summary"]
    assert (s["matrices"], s["analysed"], s["excluded"], s["excluded_by"]) == (4, 4, 4, ["--roles mlp"])
    r = runner.invoke(app, ["analyze", str(tiny.path), "--roles", "mlp", "-q"], env={"COLUMNS": "100"})
    assert "4 of 8 matrices analysed (4 excluded by --roles mlp)," in r.stdout
    everything = _json("analyze", tiny.path)["summary"]
    assert (everything["matrices"], everything["excluded"], everything["excluded_by"]) == (8, 0, [])


def test_min_dim_and_several_flags_are_named(tiny: fx.Generated) -> None:
    s = _json("analyze", tiny.path, "--kinds", "up_proj,q_proj", "--exclude", "layers.1.*")["summary"]
    assert (s["matrices"], s["excluded"]) == (2, 6)
    assert s["excluded_by"] == ["--exclude layers.1.*", "--kinds up_proj,q_proj"]
    s = _json("analyze", tiny.path, "--min-dim", "8")["summary"]  # head.weight is 5×8
    assert (s["matrices"], s["excluded"], s["excluded_by"]) == (7, 1, ["--min-dim 8"])


def test_saved_spectra_are_selected_by_role_too(tiny: fx.Generated, tmp_path: Path) -> None:
    saved = tmp_path / "s.safetensors"
    r = runner.invoke(app, ["analyze", str(tiny.path), "--save-spectra", str(saved), "-q"])
    assert r.exit_code == 0, r.output
    env = _json("analyze", saved, "--roles", "attention")
    assert {r["name"] for r in env["rows"]} == ATTENTION
    assert (env["summary"]["excluded"], env["summary"]["excluded_by"]) == (6, ["--roles attention"])


def _summary(**kw: Any) -> dict[str, Any]:
    return {"matrices": 1, "analysed": 1, "params": 64, "skipped_tensors": 0, **kw}


@pytest.mark.parametrize(("summary", "line"), [
    (_summary(), "1 of 1 matrix analysed, 64 parameters"),
    (_summary(excluded=1, excluded_by=["--roles mlp"]), "1 of 2 matrices analysed (1 excluded by --roles mlp), "
                                                        "64 parameters"),
    (_summary(skipped_tensors=1), "1 of 1 matrix analysed, 64 parameters; 1 non-matrix tensor skipped"),
    (_summary(matrices=2, excluded=1234, excluded_by=["--kinds q"], skipped_tensors=2),
     "1 of 1,236 matrices analysed (1,234 excluded by --kinds q), 64 parameters; 2 non-matrix tensors skipped"),
])  # fmt: skip
def test_the_count_sentence_says_one_matrix_and_many_matrices(summary: dict[str, Any], line: str) -> None:
    assert count_line(summary) == line
