"""Tables fit the terminal: default columns, --columns/--wide, names shortened in the middle, numbers whole."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from spectra_cli.report.render import Column, render, select_columns, shorten_name, table_width
from spectra_cli.report.views import VIEWS

GOLDEN = Path(__file__).parents[1] / "golden"


@pytest.mark.parametrize(
    ("name", "width", "expected"),
    [
        ("encoder.layer.3.attention.self.value.weight", 27, "encoder.layer.3.…self.value"),
        ("encoder.layer.3.attention.self.value.weight", 22, "…layer.3.…self.value"),
        ("encoder.layer.0.output.dense.weight", 30, "encoder.layer.0.output.dense"),
        ("short.name", 20, "short.name"),
        ("model.language_model.layers.17.mlp.down_proj", 24, "…layers.17.mlp.down_proj"),
        # dropping the head's first part keeps the whole kind: intermediate.dense is not output.dense
        ("encoder.layer.0.intermediate.dense.weight", 33, "…layer.0.intermediate.dense"),
        ("encoder.layer.0.attention.self.value.weight", 20, "…layer.0.…self.value"),
        ("abcdefghijklmnopqrstuvwxyz", 9, "abcd…wxyz"),
    ],
)
def test_shorten_name_keeps_the_layer_and_the_kind(name: str, width: int, expected: str) -> None:
    out = shorten_name(name, width)
    assert out == expected
    assert len(out) <= width


def test_select_columns_default_wide_and_chosen() -> None:
    cols = [Column("a", "A"), Column("b", "B", default=False), Column("c", "C")]
    rows = [{"a": 1, "b": 2, "c": 3, "d": 4.5}]
    assert [c.key for c in select_columns(cols, rows, None)] == ["a", "c"]
    assert [c.key for c in select_columns(cols, rows, None, wide=True)] == ["a", "b", "c"]
    chosen = select_columns(cols, rows, ["d", "b"])
    assert [(c.key, c.header, c.justify) for c in chosen] == [("d", "d", "right"), ("b", "B", "right")]
    with pytest.raises(ValueError, match=r"unknown column nope; choose from a, b, c, d"):
        select_columns(cols, rows, ["nope"])


def test_piped_width_is_columns_else_100(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert table_width(io.StringIO()) == 100
    monkeypatch.setenv("COLUMNS", "132")
    assert table_width(io.StringIO()) == 132


def _table(case: str, width: int, capsys: pytest.CaptureFixture[str], **kw: object) -> list[str]:
    env = json.loads((GOLDEN / f"{case}.json").read_text())
    view = VIEWS[env["command"]]
    rows = view.rows(env) if view.rows else env["rows"]
    render({**env, "rows": rows}, "table", view.columns(env), view.title(env), [], width=width, **kw)  # type: ignore[arg-type]
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("case", sorted(p.stem for p in GOLDEN.glob("*.json")))
def test_every_default_table_fits_100_columns_with_one_line_per_row(case: str, capsys) -> None:
    env = json.loads((GOLDEN / f"{case}.json").read_text())
    lines = _table(case, 100, capsys)
    body = lines[3:]  # title, header, rule
    assert all(len(ln.rstrip()) <= 100 for ln in lines[1:])
    if env["command"] != "check":  # check's "why" is prose and may wrap
        assert len(body) == len(VIEWS[env["command"]].rows(env) if VIEWS[env["command"]].rows else env["rows"])


def test_numbers_never_split_at_80_columns(capsys) -> None:
    env = json.loads((GOLDEN / "rankme-layers.json").read_text())
    lines = _table("rankme-layers", 80, capsys, wide=True)
    assert len(lines) == 3 + len(env["rows"])  # one line per row even with every column


def test_wide_shows_every_column_and_columns_chooses(capsys) -> None:
    head = _table("analyze", 400, capsys, wide=True)[1]
    assert "entropy" in head and "σ₁" in head
    head = _table("analyze", 100, capsys, chosen=["name", "alpha_ks"])[1]
    assert head.split() == ["name", "┃", "alpha_ks"]
