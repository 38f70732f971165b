"""The singular-value engine: numpy and torch (CPU) backends, svd and gram methods, chunking, budgets, NaN/Inf."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures.checkpoints import ENGINE_CASES, known_spectra
from fixtures.matrices import (
    assert_singular_values_close,
    expected_singular_values,
    reference_singular_values,
)
from spectra_cli import errors
from spectra_cli.checkpoint.loader import MatrixLoader
from spectra_cli.checkpoint.matrices import MatrixSpec, Selection, select_matrices
from spectra_cli.checkpoint.source import open_checkpoint
from spectra_cli.spectral.engine import (
    EngineOptions,
    MatrixValues,
    ResolvedEngine,
    chunk_rows,
    plan_batches,
    resolve,
    singular_values,
    working_bytes,
)

CONFIGS = [
    ("numpy", "svd", "float64"),
    ("numpy", "svd", "float32"),
    ("numpy", "gram", "float32"),
    ("numpy", "gram", "float64"),
    ("torch", "svd", "float64"),
    ("torch", "svd", "float32"),
    ("torch", "gram", "float32"),
]


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _specs(gen, **sel) -> tuple[object, list[MatrixSpec]]:
    ckpt = open_checkpoint(gen.path)
    specs, _ = select_matrices(ckpt, Selection(**sel))
    return ckpt, specs


def _run(
    gen, backend="numpy", method="gram", precision="float32", max_memory=None, only=None, **sel
) -> dict[str, MatrixValues]:
    """Run the engine on the selected matrices of ``gen`` (only those named in ``only``, when given)."""
    ckpt, specs = _specs(gen, **sel)
    if only is not None:
        specs = [s for s in specs if s.name in only]
    eng = resolve(EngineOptions(device="cpu", precision=precision, method=method, backend=backend, max_memory=max_memory))
    assert (eng.backend, eng.method, eng.device) == (backend, method, "cpu")
    loader = MatrixLoader(ckpt)
    out = {mv.spec.name: mv for mv in singular_values(specs, eng, loader.load, loader.chunks)}
    assert list(out) == [s.name for b in plan_batches(specs, eng) for s in b]
    return out


def _budget_forcing_chunks(spec: MatrixSpec, lines: int = 3) -> int:
    """The smallest --max-memory with which the engine's own memory model (``chunk_rows``) lets a Gram
    accumulation step take ``lines`` lines of ``spec``: far below what the whole matrix needs."""

    def rows(budget: int) -> int:
        try:
            return chunk_rows(spec, budget)
        except errors.BudgetError:
            return 0

    lo, hi = 1, 1 << 40
    while lo < hi:
        mid = (lo + hi) // 2
        if rows(mid) >= lines:
            hi = mid
        else:
            lo = mid + 1
    return lo


# ---- agreement with float64 LAPACK ------------------------------------------------------------------------


def test_known_spectra_fixture_has_the_designed_singular_values(ckpts):
    gen = ckpts.known
    for name, (m, n, s) in ENGINE_CASES.items():
        ref = reference_singular_values(gen.matrices[name])  # of the float32 data actually stored
        np.testing.assert_allclose(ref, expected_singular_values(s, m, n), rtol=0, atol=1e-5 * s.max())


@pytest.mark.parametrize(("backend", "method", "precision"), CONFIGS)
def test_engine_agrees_with_float64_svd(ckpts, backend, method, precision):
    gen = ckpts.known
    got = _run(gen, backend, method, precision)
    assert set(got) == set(ENGINE_CASES)
    for name, mv in got.items():
        assert mv.values is not None and mv.values.dtype == np.float64
        assert (mv.nan_count, mv.inf_count, mv.chunks) == (0, 0, 1)
        assert_singular_values_close(mv.values, gen.matrices[name], rtol=1e-4)


@pytest.mark.parametrize(("backend", "method"), [("numpy", "svd"), ("numpy", "gram"), ("torch", "svd")])
def test_float64_storage_gives_the_designed_values_to_high_accuracy(tmp_path, backend, method):
    gen = known_spectra(tmp_path, ENGINE_CASES, dtype="F64")
    got = _run(gen, backend, method, "float64")
    for name, (m, n, s) in ENGINE_CASES.items():
        want = expected_singular_values(s, m, n)
        vals = got[name].values
        big = want >= 1e-3 * want[0]
        np.testing.assert_allclose(vals[big], want[big], rtol=1e-9)
        assert np.all(np.abs(vals[~big]) <= 1e-7 * want[0])


@pytest.mark.parametrize(
    ("backend", "method"), [("numpy", "gram"), ("numpy", "svd"), ("torch", "gram"), ("torch", "svd")]
)
def test_bf16_and_fp16_are_upcast_exactly(ckpts, backend, method):
    gen = ckpts.half
    got = _run(gen, backend, method)
    assert set(got) == set(gen.matrices)
    for name, mv in got.items():
        assert_singular_values_close(mv.values, gen.matrices[name], rtol=1e-4)


# ---- chunked Gram route -----------------------------------------------------------------------------------


CHUNK_CASES = [
    ("known", "cases.0.tall.weight", "rows"),
    ("known", "cases.0.wide.weight", "cols"),
    ("known", "cases.0.tall_low_rank.weight", "rows"),
    ("phi3", "model.layers.0.self_attn.qkv_proj.weight[k]", "cols"),  # a row range of a fused tensor, wide
    ("gpt2", "transformer.h.0.attn.c_attn.weight[v]", "rows"),  # a column range of a transposed Conv1D
    ("neox", "gpt_neox.layers.0.attention.query_key_value.weight[k]", "rows"),  # interleaved rows (index)
]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize(("key", "name", "axis"), CHUNK_CASES)
def test_chunked_gram_gives_the_same_values(ckpts, backend, key, name, axis):
    gen = getattr(ckpts, key)
    split = "[" in name
    include = (name.split("[")[0],)
    _, specs = _specs(gen, include=include, split_fused=split)
    spec = next(s for s in specs if s.name == name)
    budget = _budget_forcing_chunks(spec)
    assert working_bytes(spec, "gram", "float32") > budget // 2  # precondition: the whole matrix does not fit
    # the loader cuts along the expected axis
    ckpt = open_checkpoint(gen.path)
    assert {a for _, a in MatrixLoader(ckpt).chunks(spec, 3)} == {axis}
    got = _run(gen, backend, "gram", max_memory=budget, only={name}, include=include, split_fused=split)
    assert list(got) == [name]
    mv = got[name]
    assert mv.chunks >= 2
    expected = (gen.parts if split else gen.matrices)[name]
    assert_singular_values_close(mv.values, expected, rtol=1e-4)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("key", ["gpt2", "phi3", "neox"])
def test_fused_parts_in_batches(ckpts, backend, key):
    gen = getattr(ckpts, key)
    got = _run(gen, backend, "gram", split_fused=True)
    assert gen.parts and set(gen.parts) <= set(got)
    for name, x in gen.parts.items():
        assert_singular_values_close(got[name].values, x)


def test_column_chunks_of_a_part_read_only_the_part_rows(ckpts, monkeypatch):
    gen = ckpts.phi3
    ckpt, specs = _specs(gen, split_fused=True, include=("*qkv_proj*",))
    spec = next(s for s in specs if s.name.endswith("[k]"))  # rows 16..24 of a 32×16 tensor
    shapes: list[tuple[int, ...]] = []
    real = ckpt.read_columns

    def spy(info, shape2d, start, stop, *rows):
        raw = real(info, shape2d, start, stop, *rows)
        shapes.append(raw.data.shape)
        return raw

    monkeypatch.setattr(ckpt, "read_columns", spy)
    pieces = list(MatrixLoader(ckpt).chunks(spec, 4))
    assert [p.data.shape for p, _ in pieces] == [(8, 4)] * 4
    assert shapes and all(s[0] == 8 for s in shapes), shapes


# ---- plans and budgets ------------------------------------------------------------------------------------


def _eng(method: str, budget: int, precision: str = "float32") -> ResolvedEngine:
    return resolve(EngineOptions(device="cpu", precision=precision, method=method, backend="numpy", max_memory=budget))


@pytest.mark.parametrize("factor", [None, 8, 4, 2])
def test_batches_respect_the_budget_and_keep_every_matrix_once(ckpts, factor):
    gen = ckpts.llama
    _, specs = _specs(gen)
    biggest = max(working_bytes(s, "gram", "float32") for s in specs)
    budget = 1 << 30 if factor is None else factor * biggest
    batches = plan_batches(specs, _eng("gram", budget))
    flat = [s.name for b in batches for s in b]
    assert sorted(flat) == sorted(s.name for s in specs)
    read_order = {s.name: i for i, s in enumerate(specs)}
    for batch in batches:
        assert len({(s.tensor.file, s.shape, s.tensor.dtype, s.transposed) for s in batch}) == 1
        assert [read_order[s.name] for s in batch] == sorted(read_order[s.name] for s in batch)
        if len(batch) > 1:
            assert sum(working_bytes(s, "gram", "float32") for s in batch) <= budget // 2
            assert sum(s.shape[0] * s.shape[1] * 4 for s in batch) <= budget // 2  # the stored float32 bytes
    if factor is None:
        # one batch per distinct shape: (24,8) embed+lm_head, (8,8) q/o, (4,8) k/v, (16,8) gate/up, (8,16) down
        assert len(batches) == 5


def test_smaller_budget_means_more_batches(ckpts):
    _, specs = _specs(ckpts.llama)
    biggest = max(working_bytes(s, "gram", "float32") for s in specs)
    counts = [len(plan_batches(specs, _eng("gram", b))) for b in (1 << 30, 4 * biggest, 2 * biggest)]
    assert counts[0] <= counts[1] <= counts[2]
    assert counts[0] < counts[2]


def test_svd_over_budget_is_a_budget_error(ckpts):
    gen = ckpts.known
    _, specs = _specs(gen)
    with pytest.raises(errors.BudgetError) as exc:
        plan_batches(specs, _eng("svd", 4096))
    msg = str(exc.value)
    assert "--method svd" in msg and "--max-memory" in msg and "--method gram" in msg
    assert any(name in msg for name in ENGINE_CASES)
    with pytest.raises(errors.BudgetError, match="--max-memory"):
        _run(gen, "numpy", "svd", max_memory=4096)


def test_gram_matrix_over_budget_is_a_budget_error(ckpts):
    gen = ckpts.known
    with pytest.raises(errors.BudgetError) as exc:
        _run(gen, "numpy", "gram", max_memory=2048, include=("cases.0.tall.weight",))
    msg = str(exc.value)
    assert "cases.0.tall.weight" in msg and "20×20 Gram matrix" in msg and "raise --max-memory" in msg


# ---- NaN / Inf ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_nonfinite_matrices_are_counted_and_not_decomposed(ckpts, backend, method):
    gen = ckpts.nonfinite
    _, specs = _specs(gen)
    batches = plan_batches(specs, _eng(method, 1 << 30))
    same = next(b for b in batches if any(s.name == "layers.0.nan.weight" for s in b))
    assert {s.name for s in same} >= {"layers.0.a.weight", "layers.0.nan.weight", "layers.0.inf.weight"}
    got = _run(gen, backend, method)
    assert (got["layers.0.nan.weight"].values, got["layers.0.nan.weight"].nan_count) == (None, 2)
    assert got["layers.0.nan.weight"].inf_count == 0
    assert (got["layers.0.inf.weight"].values, got["layers.0.inf.weight"].inf_count) == (None, 3)
    assert got["layers.0.inf.weight"].nan_count == 0
    for name in ("layers.0.a.weight", "layers.0.b.weight", "layers.0.c.weight"):
        assert (got[name].nan_count, got[name].inf_count) == (0, 0)
        assert_singular_values_close(got[name].values, gen.matrices[name])


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_nonfinite_counts_add_up_over_chunks(ckpts, backend):
    gen = ckpts.nonfinite
    for name, (nan, inf) in {"layers.0.nan.weight": (2, 0), "layers.0.inf.weight": (0, 3)}.items():
        _, specs = _specs(gen, include=(name,))
        got = _run(gen, backend, "gram", max_memory=_budget_forcing_chunks(specs[0], 2), include=(name,))[
            name
        ]
        assert got.chunks >= 2
        assert (got.values, got.nan_count, got.inf_count) == (None, nan, inf)


# ---- devices ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(_cuda(), reason="this machine has CUDA; the test is about a CPU-only machine")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_on_a_cpu_only_machine_is_a_device_error(device):
    with pytest.raises(errors.DeviceError) as exc:
        resolve(EngineOptions(device=device))
    assert device in str(exc.value) and "use --device cpu" in str(exc.value)


def test_malformed_cuda_index_is_a_device_error(monkeypatch):
    from spectra_cli.spectral import engine

    monkeypatch.setattr(engine, "_torch_cuda_ok", lambda: True)  # as on a GPU machine
    with pytest.raises(errors.DeviceError, match="cuda:x"):
        resolve(EngineOptions(device="cuda:x"))


def test_unknown_device_and_numpy_on_cuda_are_device_errors():
    with pytest.raises(errors.DeviceError, match="expected auto, cpu, cuda or cuda:N"):
        resolve(EngineOptions(device="tpu"))
    with pytest.raises(errors.DeviceError, match="--backend numpy runs on the CPU only"):
        resolve(EngineOptions(device="cuda", backend="numpy"))


@pytest.mark.skipif(_cuda(), reason="on a CUDA machine auto picks the GPU")
def test_auto_resolves_to_cpu_numpy_here():
    eng = resolve(EngineOptions())
    assert (eng.device, eng.backend, eng.method, eng.precision) == ("cpu", "numpy", "gram", "float32")
    assert eng.budget > 0


def test_auto_method_follows_precision_and_budget_is_honoured():
    assert resolve(EngineOptions(device="cpu", precision="float32")).method == "gram"
    assert resolve(EngineOptions(device="cpu", precision="float64")).method == "svd"
    assert resolve(EngineOptions(device="cpu", max_memory=123_456)).budget == 123_456
    assert resolve(EngineOptions(device="cpu", backend="torch")).backend == "torch"


# ---- CUDA (only where there is a GPU) ----------------------------------------------------------------------


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("method", "precision"), [("gram", "float32"), ("svd", "float32"), ("svd", "float64")]
)
def test_cuda_backend_agrees_with_float64_svd(ckpts, method, precision):
    gen = ckpts.known
    ckpt, specs = _specs(gen)
    eng = resolve(EngineOptions(device="cuda", precision=precision, method=method))
    assert (eng.backend, eng.device.startswith("cuda")) == ("torch", True)
    loader = MatrixLoader(ckpt)
    got = {mv.spec.name: mv for mv in singular_values(specs, eng, loader.load, loader.chunks)}
    for name, x in gen.matrices.items():
        assert_singular_values_close(got[name].values, x, rtol=1e-4)
    half = ckpts.half
    ckpt, specs = _specs(half)
    loader = MatrixLoader(ckpt)
    for mv in singular_values(specs, eng, loader.load, loader.chunks):
        assert_singular_values_close(mv.values, half.matrices[mv.spec.name], rtol=1e-4)


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_cuda_chunked_and_nonfinite(ckpts):
    gen = ckpts.nonfinite
    ckpt, specs = _specs(gen)
    eng = resolve(EngineOptions(device="cuda", method="gram", backend="torch"))
    loader = MatrixLoader(ckpt)
    got = {mv.spec.name: mv for mv in singular_values(specs, eng, loader.load, loader.chunks)}
    assert (got["layers.0.nan.weight"].values, got["layers.0.nan.weight"].nan_count) == (None, 2)
    assert (got["layers.0.inf.weight"].values, got["layers.0.inf.weight"].inf_count) == (None, 3)
    assert_singular_values_close(got["layers.0.a.weight"].values, gen.matrices["layers.0.a.weight"])
    ckpt, specs = _specs(ckpts.known, include=("cases.0.tall.weight",))
    eng = resolve(EngineOptions(device="cuda", method="gram", backend="torch", max_memory=_budget_forcing_chunks(specs[0])))
    loader = MatrixLoader(ckpt)
    (mv,) = singular_values(specs, eng, loader.load, loader.chunks)
    assert mv.chunks >= 2
    assert_singular_values_close(mv.values, ckpts.known.matrices["cases.0.tall.weight"])


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_cuda_index_beyond_the_devices_is_a_device_error():
    import torch

    n = torch.cuda.device_count()
    with pytest.raises(errors.DeviceError, match=f"only {n} CUDA device"):
        resolve(EngineOptions(device=f"cuda:{n}"))
