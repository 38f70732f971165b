"""`spectra rankme`: known-spectrum answers for every score, the chunked Gram route against a direct SVD, every
input format, bad inputs, the CLI contract, plots, and the real MiniLM checkpoint through transformers.

Expected values come from the construction (fixtures.embeddings.known_spectrum) or from np.linalg.svd of the
matrix with the published formulas written out here, never from spectra.
"""

from __future__ import annotations

import json
import math
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fixtures import embeddings as fx
from fixtures.real import minilm_dir
from spectra_cli.checkpoint.embeddings import open_embeddings
from spectra_cli.cli.app import app
from spectra_cli.errors import SpectraError
from spectra_cli.spectral import rankme as rk

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"
EPS = 1e-7


def run(*args: str | Path):
    return runner.invoke(app, ["rankme", *map(str, args)], catch_exceptions=False)


def ok_json(*args: str | Path) -> dict[str, Any]:
    r = run(*args, "-f", "json", "-q")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


# ---- reference formulas on a direct SVD ---------------------------------------------------------------------


def ref_rankme(s: np.ndarray) -> float:
    p = s / np.sum(np.abs(s)) + EPS
    return float(np.exp(-np.sum(p * np.log(p))))


def ref_erank(s: np.ndarray) -> float:
    p = s[s > 1e-300] / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def ref(z: np.ndarray) -> dict[str, float]:
    z = np.asarray(z, dtype=np.float64)
    s = np.linalg.svd(z, compute_uv=False)
    lam = np.linalg.svd(z - z.mean(axis=0), compute_uv=False) ** 2 / z.shape[0]
    return {
        "rankme": ref_rankme(s),
        "effective_rank": ref_erank(s),
        "stable_rank": float(np.sum(s**2) / s[0] ** 2),
        "participation_ratio": float(lam.sum() ** 2 / np.sum(lam**2)),
    }


def assert_scores(got: rk.RankScores | dict[str, Any], want: dict[str, float], rtol: float) -> None:
    for key, value in want.items():
        g = got[key] if isinstance(got, dict) else getattr(got, key)
        assert g == pytest.approx(value, rel=rtol), key


# ---- known spectra ------------------------------------------------------------------------------------------


def test_rankme_of_a_flat_rank_r_spectrum_matches_the_closed_form():
    n, k, r = 400, 32, 8
    z = fx.known_spectrum(np.full(r, 3.0), n, k, seed=1)
    m = min(n, k)
    # p = 1/r + ε on the r non-zero values, ε on the m − r zeros
    want = math.exp(-(r * (1 / r + EPS) * math.log(1 / r + EPS) + (m - r) * EPS * math.log(EPS)))
    got = rk.scores(z)
    assert got.rankme == pytest.approx(want, rel=1e-10)
    assert got.effective_rank == pytest.approx(r, rel=1e-10)
    assert got.stable_rank == pytest.approx(r, rel=1e-10)
    assert got.numerical_rank == r
    assert got.rankme_fraction == pytest.approx(want / m, rel=1e-10)


def test_known_spectrum_scores_are_exact():
    s = np.array([4.0, 2.0, 2.0, 1.0, 0.5])
    n, k = 300, 12
    z = fx.known_spectrum(s, n, k, seed=2, centred=True)
    got = rk.scores(z)
    p = s / s.sum()
    assert got.effective_rank == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-10)
    assert got.stable_rank == pytest.approx(np.sum(s**2) / 16.0, rel=1e-10)
    assert got.numerical_rank == 5
    # centred by construction: covariance eigenvalues are s²/N, so PR = (Σs²)²/Σs⁴
    assert got.participation_ratio == pytest.approx(np.sum(s**2) ** 2 / np.sum(s**4), rel=1e-10)
    np.testing.assert_allclose(got.covariance_eigenvalues[:5], s**2 / n, rtol=1e-10)
    np.testing.assert_allclose(got.singular_values[:5], s, rtol=1e-10)


@pytest.mark.parametrize("alpha", [0.7, 1.0, 2.3])
def test_alpha_req_recovers_a_power_law(alpha: float):
    r = 40
    s = np.arange(1, r + 1, dtype=np.float64) ** (-alpha / 2)  # λᵢ ∝ σᵢ² = i^−α
    z = fx.known_spectrum(s, 500, 64, seed=3, centred=True)
    got = rk.scores(z)
    assert got.alpha_req == pytest.approx(alpha, rel=1e-8)
    assert got.alpha_req_points == r  # the 24 exact zeros are left out of the fit


def test_centred_scores_ignore_a_large_mean_offset():
    s = np.linspace(2.0, 0.1, 10)
    base = fx.known_spectrum(s, 200, 16, seed=4, centred=True)
    shifted = base + 1e4
    a, b = rk.scores(base), rk.scores(shifted, chunk_rows=17)
    assert b.participation_ratio == pytest.approx(a.participation_ratio, rel=1e-8)
    assert b.alpha_req == pytest.approx(a.alpha_req, rel=1e-6)
    # the uncentred spectrum sees the offset: one dominant direction
    assert b.stable_rank == pytest.approx(1.0, abs=1e-6)
    assert b.numerical_rank == 11


def test_numerical_rank_threshold():
    n, k = 300, 20
    small = fx.known_spectrum([1.0, 1e-4, 1e-12], n, k, seed=5)
    assert rk.scores(small).numerical_rank == 2  # 1e-12·σ₁ is below the Gram route's resolution
    # stored in float32: values below ε₃₂·‖Z‖_F are rounding, not rank
    low_rank = fx.known_spectrum(np.linspace(1, 0.01, 6), n, k, seed=6, offset=3.0).astype(np.float32)
    assert rk.scores(low_rank).numerical_rank == 7  # 6 + the offset direction
    assert rk.dtype_eps("bfloat16") == 2.0**-7 and rk.dtype_eps("int64") == np.finfo(np.float64).eps


def test_n_smaller_than_k_uses_min_n_k_values():
    z = np.random.default_rng(7).standard_normal((10, 50))
    got = rk.scores(z)
    assert got.singular_values.size == 10 and got.max_rank == 10
    assert_scores(got, ref(z), 1e-9)
    assert got.numerical_rank == 10
    assert got.alpha_req_points == 9  # centring removes one dimension


def test_edge_cases_of_the_formulas():
    assert math.isnan(rk.rankme(np.zeros(4)))
    assert math.isnan(rk.alpha_req(np.array([1.0])))
    assert rk.numerical_rank(np.zeros(3), 3, 3) == 0
    z = np.ones((5, 3))  # rank 1, zero covariance
    got = rk.scores(z)
    assert got.numerical_rank == 1 and math.isnan(got.participation_ratio) and math.isnan(got.alpha_req)


# ---- chunked accumulation vs a direct SVD -------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 60),
    k=st.integers(1, 12),
    chunk=st.integers(1, 70),
    offset=st.floats(-50, 50),
    seed=st.integers(0, 2**16),
)
def test_chunked_gram_equals_direct_svd(n: int, k: int, chunk: int, offset: float, seed: int):
    z = np.random.default_rng(seed).standard_normal((n, k)) * np.linspace(1, 0.05, k) + offset
    whole = rk.scores(z)
    chunked = rk.scores(z, chunk_rows=chunk)
    want = ref(z)
    assert_scores(chunked, want, 1e-7)
    assert_scores(whole, want, 1e-7)
    assert chunked.numerical_rank == whole.numerical_rank == min(n, k)
    wide = rk.scores_wide(z)  # the N×N route (used for N < K), any shape
    assert_scores(wide, want, 1e-7)
    assert wide.numerical_rank == min(n, k)


# ---- readers ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, dict[str, Path]]:
    z = fx.known_spectrum(np.linspace(3, 0.2, 12), 120, 16, seed=8, offset=0.3)
    return z, fx.write_formats(z, tmp_path_factory.mktemp("emb"))


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return fx.write_bad(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize(
    ("fmt", "key"),
    [("npy", None), ("npz", "emb"), ("pt", None), ("pt_dict", "emb"), ("safetensors", None),
     ("safetensors_multi", "emb"), ("csv", None), ("csv_noheader", None), ("csv_numbered", None), ("parquet", None),
     ("parquet_vectors", "embedding")],
)  # fmt: skip
def test_every_format_reads_the_same_matrix(files, fmt: str, key: str | None):
    z, paths = files
    src = open_embeddings(paths[fmt], key)
    assert (src.n, src.k) == z.shape
    got = np.concatenate(list(src.chunks(7)))
    np.testing.assert_allclose(got, z, rtol=1e-15, atol=0)


def test_npy_is_memory_mapped_and_tiny_chunks_bound_memory(tmp_path: Path):
    z = np.random.default_rng(9).standard_normal((20000, 32))  # 5 MB
    path = tmp_path / "big.npy"
    np.save(path, z)
    src = open_embeddings(path)
    assert isinstance(src.read(0, 2), np.memmap) and src.release is not None
    from spectra_cli.flows.rankme import score_source

    tracemalloc.start()
    got = score_source(src, rows=64)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < z.nbytes / 20, f"peak {peak} bytes for a {z.nbytes}-byte matrix"
    assert_scores(got, ref(z), 1e-9)


@pytest.mark.parametrize(("fmt", "names"), [("pt_dict", "emb, labels"), ("safetensors_multi", "emb, labels"),
                                            ("npz", "emb, labels")])  # fmt: skip
def test_several_tensors_need_key_and_are_listed(files, fmt: str, names: str):
    _, paths = files
    with pytest.raises(SpectraError, match=f"holds 2 .*\\({names}\\); choose one with --key NAME"):
        open_embeddings(paths[fmt])
    with pytest.raises(SpectraError, match=r"no .* named 'nope'; it holds: emb, labels"):
        open_embeddings(paths[fmt], "nope")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("one_d", r"is 1-D \(shape \(16,\)\); rankme needs an N×K matrix"),
        ("three_d", r"has shape \(4, 5, 6\); rankme needs a 2-D N×K matrix .* reshape to \(4×5, 6\)"),
        ("no_rows", r"is empty \(shape \(0, 8\)\)"),
        ("no_cols", r"is empty \(shape \(8, 0\)\)"),
        ("text_csv", r"non-numeric columns 'label', 'note'; drop them"),
        ("empty_csv", r"is empty"),
        ("complex", r"dtype complex128 is not real numbers"),
        ("unknown", r"unknown embedding format '.txt'"),
    ],
)
def test_bad_inputs_are_refused_on_open(bad, name: str, message: str):
    with pytest.raises(SpectraError, match=message):
        open_embeddings(bad[name])


def test_nan_and_inf_are_counted_and_located(bad):
    src = open_embeddings(bad["nan"])
    with pytest.raises(SpectraError, match=r"3 NaN/Inf values \(first at row 5, column 2, 0-based\)"):
        list(src.chunks(4))


def test_parquet_vector_column_is_suggested(files):
    _, paths = files
    with pytest.raises(SpectraError, match="column 'embedding' holds vectors: use --key embedding"):
        open_embeddings(paths["parquet_vectors"])


# ---- CLI ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three checkpoints' embeddings with known RankMe order: full (flat spectrum) > decaying > collapsed."""
    d = tmp_path_factory.mktemp("ranked")
    n, k = 400, 24
    out = {
        "full": fx.known_spectrum(np.ones(k), n, k, seed=10),
        "decay": fx.known_spectrum(np.arange(1, k + 1) ** -1.0, n, k, seed=11),
        "collapsed": fx.known_spectrum(np.ones(3), n, k, seed=12),
    }
    paths = {}
    for name, z in out.items():
        paths[name] = d / f"{name}.npy"
        np.save(paths[name], z.astype(np.float32))
    return paths


def test_several_inputs_sorted_by_rankme_with_the_best_named(ranked):
    args = [ranked["collapsed"], f"dec={ranked['decay']}", ranked["full"]]
    env = ok_json(*args)
    assert env["command"] == "rankme" and env["schema_version"] == 1
    assert [r["input"] for r in env["rows"]] == [str(ranked["full"]), "dec", str(ranked["collapsed"])]
    assert env["summary"]["best"] == str(ranked["full"])
    cols = ["input", "N", "K", "rankme", "rankme_fraction", "effective_rank", "stable_rank",
            "participation_ratio", "alpha_req", "numerical_rank"]  # fmt: skip
    assert list(env["rows"][0])[: len(cols)] == cols
    for row in env["rows"]:
        z = np.load(row["source"]) if row["input"] != "dec" else np.load(ranked["decay"])
        assert_scores(row, ref(z), 1e-5)  # float32 files: ε₃₂-level agreement
        assert row["rankme_fraction"] == pytest.approx(row["rankme"] / 24)
    assert env["rows"][2]["numerical_rank"] == 3
    table = run(*args)
    assert table.exit_code == 0
    assert f"best: {ranked['full']} (RankMe 24" in table.stdout
    md = run(*args, "-f", "markdown", "-q").stdout
    assert md.startswith("## spectra rankme") and "| input |" in md
    csv = run(*args, "-f", "csv", "-q").stdout.splitlines()
    assert csv[0].startswith("input,N,K,rankme,rankme_fraction") and len(csv) == 4


def test_few_samples_warn_on_stderr(ranked, tmp_path: Path):
    small = tmp_path / "small.npy"
    np.save(small, np.random.default_rng(13).standard_normal((50, 24)))
    r = run(small)
    assert r.exit_code == 0
    assert "N = 50 samples < 10·K = 240" in r.stderr and "N = 25,600" in r.stderr
    assert "N = 50" not in r.stdout.split("\n")[0]
    assert run(small, "-q").stderr == ""
    assert run(ranked["full"]).stderr == ""  # N = 400 ≥ 10·24


def test_chunk_rows_max_memory_and_torch_backend_do_not_change_scores(ranked):
    env = ok_json(ranked["decay"])
    assert env["options"]["resolved_backend"] == "numpy"
    a = env["rows"][0]
    b = ok_json(ranked["decay"], "--chunk-rows", "3")["rows"][0]
    c = ok_json(ranked["decay"], "--max-memory", "2KB")["rows"][0]
    env_t = ok_json(ranked["decay"], "--backend", "torch", "--device", "cpu", "--chunk-rows", "50")
    assert env_t["options"]["resolved_backend"] == "torch"
    d = env_t["rows"][0]
    for key in ("rankme", "effective_rank", "participation_ratio", "alpha_req"):
        for other in (b, c, d):
            assert other[key] == pytest.approx(a[key], rel=1e-10), key


def test_torch_accumulator_matches_numpy():
    z = np.random.default_rng(14).standard_normal((300, 10)) * np.linspace(2, 0.1, 10) + 5.0
    a, b = rk.scores(z, chunk_rows=41), rk.scores(z, chunk_rows=41, device="cpu")
    np.testing.assert_allclose(b.singular_values, a.singular_values, rtol=1e-10)
    np.testing.assert_allclose(b.covariance_eigenvalues, a.covariance_eigenvalues, rtol=1e-9)


@pytest.mark.parametrize(
    ("name", "message"),
    [("one_d", "is 1-D"), ("nan", "3 NaN/Inf values (first at row 5, column 2"), ("no_rows", "is empty"),
     ("text_csv", "non-numeric columns 'label', 'note'")],
)  # fmt: skip
def test_cli_bad_input_is_one_error_line_exit_1(bad, name: str, message: str):
    r = run(bad[name])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_cli_usage_errors_exit_2(ranked, files, tmp_path: Path):
    assert run().exit_code == 2
    assert run(ranked["full"], "--texts", tmp_path / "t.txt").exit_code == 2
    assert run("--model", tmp_path).exit_code == 2
    assert run(ranked["full"], "--chunk-rows", "0").exit_code == 2
    r = run(files[1]["pt_dict"])
    assert r.exit_code == 1 and "choose one with --key NAME" in r.stderr
    r = run(ranked["full"], ranked["full"])
    assert r.exit_code == 1 and "name them apart with NAME=PATH" in r.stderr
    r = run(ranked["full"], "-o", ranked["full"])
    assert r.exit_code == 1 and "refusing to write over an input" in r.stderr
    r = run(tmp_path / "missing.npy")
    assert r.exit_code == 1 and "no such file" in r.stderr
    import torch

    if not torch.cuda.is_available():
        r = run(ranked["full"], "--device", "cuda")
        assert r.exit_code == 1 and "CUDA is not available" in r.stderr


def test_output_file_and_plots(ranked, tmp_path: Path):
    out = tmp_path / "scores.json"
    plots = tmp_path / "plots"
    r = run(ranked["full"], ranked["collapsed"], "-f", "json", "-o", out, "--plots", plots)
    assert r.exit_code == 0 and r.stdout == ""
    assert json.loads(out.read_text())["summary"]["best"] == str(ranked["full"])
    for name in ("spectra.png", "rankme.png"):
        assert (plots / name).read_bytes().startswith(PNG)
    record = json.loads((plots / "spectra_run.json").read_text())
    assert record["command"] == "rankme" and sorted(record["artifacts"]) == ["rankme.png", "spectra.png"]


def test_help_has_examples():
    r = runner.invoke(app, ["rankme", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "spectra rankme --model" in r.stdout and "--chunk-rows" in r.stdout


# ---- the real MiniLM checkpoint through transformers --------------------------------------------------------

SENTENCES = [
    "The cat sat on the mat.",
    "Stock markets fell sharply on Tuesday.",
    "Quantum computers use qubits instead of bits.",
    "She painted the old fence a bright blue.",
    "Heavy rain is expected across the north tomorrow.",
    "He scored the winning goal in the final minute.",
]


def test_minilm_end_to_end(tmp_path: Path):
    import torch
    import transformers

    folder = minilm_dir()
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES[:3]) + "\n\n" + "\n".join(SENTENCES[3:]) + "\n")
    env = ok_json("--model", f"minilm={folder}", "--texts", texts, "--batch-size", "4")
    row = env["rows"][0]
    assert (row["input"], row["N"], row["K"]) == ("minilm", 6, 384)
    # the real consumer, independently: transformers + mean pooling over the attention mask
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        enc = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        emb = ((h * m).sum(1) / m.sum(1)).numpy()
    assert_scores(row, ref(emb), 1e-4)
    assert row["numerical_rank"] == 6 and row["alpha_req_points"] == 5


def test_batches_pad_and_mean_pool_over_the_mask_only(tmp_path: Path):
    """Batched (padded) embeddings equal one-text-at-a-time (unpadded) ones only if padding is masked out."""
    import torch
    import transformers

    from spectra_cli.checkpoint.hf_model import embed_texts

    folder = fx.tiny_sentence_model(tmp_path / "tiny", minilm_dir())
    got = embed_texts(folder, SENTENCES, batch_size=4, device="cpu")
    normed = embed_texts(folder, SENTENCES, batch_size=3, device="cpu", normalize=True)
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        want = np.stack(
            [model(**tok(s, return_tensors="pt")).last_hidden_state[0].mean(0).numpy() for s in SENTENCES]
        )
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(normed, want / np.linalg.norm(want, axis=1, keepdims=True), atol=2e-5)


def test_missing_transformers_says_which_extra(monkeypatch, tmp_path: Path):
    monkeypatch.delitem(sys.modules, "transformers", raising=False)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers → ImportError
    texts = tmp_path / "t.txt"
    texts.write_text("hello\n")
    r = run("--model", tmp_path, "--texts", texts)
    assert r.exit_code == 1
    assert "install the hf extra: pip install 'spectra-cli[hf]'" in r.stderr


def test_empty_texts_file(tmp_path: Path):
    texts = tmp_path / "t.txt"
    texts.write_text("\n  \n")
    r = run("--model", minilm_dir(), "--texts", texts)
    assert r.exit_code == 1 and "holds no text" in r.stderr


def test_a_file_that_is_not_npy_says_so(tmp_path: Path):
    # NumPy's own message for a text file named .npy talks about pickled data, which misleads
    path = tmp_path / "notes.npy"
    path.write_text("garbage\n")
    with pytest.raises(SpectraError, match=r"notes.npy: not a \.npy file \(no NumPy header\)") as e:
        open_embeddings(path)
    assert "pickle" not in str(e.value)


def test_output_in_a_missing_folder_is_one_error_line(tmp_path: Path):
    path = tmp_path / "z.npy"
    np.save(path, np.random.default_rng(0).standard_normal((20, 4)))
    r = runner.invoke(app, ["rankme", str(path), "--output", str(tmp_path / "no" / "o.csv"), "-q"])
    assert r.exit_code == 1 and r.stderr.startswith("Error:") and "no such folder; create it first" in r.stderr


def test_wide_inputs_take_the_n_by_n_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """N < K (few samples, wide features): the scores come from the N×N Gram matrices, O(N²K), not from a K×K
    eigendecomposition (100 × 6,000 took minutes and 1.2 GB); same answers as a direct SVD."""
    import spectra_cli.flows.rankme as rep

    rng = np.random.default_rng(4)
    z = (rng.standard_normal((30, 500)) * np.linspace(1, 0.01, 500) + 2.0).astype(np.float32)
    path = tmp_path / "wide.npy"
    np.save(path, z)
    want = ref(z)
    k_by_k = rep.score_source(open_embeddings(path), rows=7)  # several chunks: the streamed K×K route

    class NoGram:
        def __init__(self, *a: Any, **k: Any) -> None:
            raise AssertionError("the K×K accumulator was used for a wide input that fits one chunk")

    monkeypatch.setattr(rep, "GramAccumulator", NoGram)
    got = rep.score_source(open_embeddings(path), rows=64)
    assert_scores(got, want, 1e-7)
    for key in ("rankme", "effective_rank", "stable_rank", "participation_ratio", "alpha_req"):
        assert getattr(got, key) == pytest.approx(getattr(k_by_k, key), rel=1e-7), key
    assert got.numerical_rank == k_by_k.numerical_rank == 30
    assert got.alpha_req_points == k_by_k.alpha_req_points
    assert got.covariance_eigenvalues.shape == (500,) and got.singular_values.shape == (30,)


def test_small_inputs_are_scored_on_one_blas_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 600×384 input is small work (engine.SMALL_WORK): its Gram and eigensolve run on one BLAS thread, as the
    analyze engine's, so a busy machine's spinning BLAS threads do not slow it tenfold."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import spectra_cli.flows.rankme as flow

    seen: list[int] = []
    real = flow.score_source

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.extend(p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas")
        return real(*args, **kwargs)

    monkeypatch.setattr(flow, "score_source", spy)
    np.save(tmp_path / "a.npy", np.random.default_rng(0).standard_normal((600, 384)).astype(np.float32))
    flow.run_rankme([("a", tmp_path / "a.npy")], flow.RankmeOptions())
    assert seen and set(seen) == {1}
