"""The CUDA-specific parts of spectra, exercised on the CPU: the memory budget on CUDA (``--max-memory`` is GPU
memory; default half the free memory) and the batch plan under it, weights kept in their stored dtype until
they reach the device, the prefetch thread (order, overlap, errors), and the same answers as the NumPy route."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.matrices import assert_singular_values_close
from spectra_cli.checkpoint import torch_tensors
from spectra_cli.checkpoint.loader import MatrixLoader, prefetched
from spectra_cli.checkpoint.matrices import MatrixSpec, Selection, select_matrices
from spectra_cli.checkpoint.source import open_checkpoint
from spectra_cli.checkpoint.tensors import RawTensor, TensorInfo, from_float
from spectra_cli.options import EngineOptions
from spectra_cli.spectral import engine
from spectra_cli.spectral.engine import ResolvedEngine, plan_batches, resolve, singular_values, working_bytes
from spectra_cli.spectral.rankme import GramAccumulator

GB = 1024**3


# ---- the budget on CUDA ---------------------------------------------------------------------------------------


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, free: int, devices: int = 1) -> None:
    """Pretend a CUDA device with ``free`` bytes free is present (nothing runs on it in these tests)."""
    monkeypatch.setattr(engine, "_torch_cuda_ok", lambda: True)
    monkeypatch.setattr(engine, "cuda_free_bytes", lambda idx: free)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)


def test_default_budget_on_cuda_is_half_the_free_gpu_memory(monkeypatch):
    _fake_cuda(monkeypatch, free=70 * GB)
    eng = resolve(EngineOptions(device="cuda"))
    assert (eng.device, eng.backend, eng.budget) == ("cuda:0", "torch", 35 * GB)
    # --max-memory is GPU memory there: taken as given, whatever is free
    assert resolve(EngineOptions(device="cuda:0", max_memory=3 * GB)).budget == 3 * GB
    # auto picks CUDA once the driver is there
    monkeypatch.setattr(engine, "_cuda_present", lambda: True)
    assert resolve(EngineOptions()).device == "cuda:0"


def test_default_budget_for_the_cpu_is_a_quarter_of_ram_at_most_4_gb():
    assert engine.default_budget_for("cpu", 8 * GB) == 2 * GB
    assert engine.default_budget_for("cpu", 64 * GB) == 4 * GB
    assert engine.default_budget_for("cuda:1", 64 * GB) == 32 * GB


def _llama7b_specs() -> list[MatrixSpec]:
    """The 7B's linear weights (LLaMA-2 shapes, bf16, two shards) as specs; no file is read."""
    specs = []
    for i in range(32):
        f = Path(f"model-{1 + i // 16:05d}-of-00002.safetensors")
        for kind, shape in (("q_proj", (4096, 4096)), ("k_proj", (4096, 4096)), ("v_proj", (4096, 4096)),
                            ("o_proj", (4096, 4096)), ("gate_proj", (11008, 4096)), ("up_proj", (11008, 4096)),
                            ("down_proj", (4096, 11008))):  # fmt: skip
            name = f"model.layers.{i}.{kind}.weight"
            specs.append(MatrixSpec(name, TensorInfo(name, shape, "BF16", f, 0), shape, shape, i, kind, "attn"))
    return specs


@pytest.mark.parametrize(("free_gb", "method"), [(80, "gram"), (8, "gram"), (80, "svd"), (20, "svd")])
def test_batch_plan_fits_half_the_budget_from_the_free_gpu_memory(monkeypatch, free_gb, method):
    _fake_cuda(monkeypatch, free=free_gb * GB)
    eng = resolve(EngineOptions(device="cuda", method=method))
    assert eng.budget == free_gb * GB // 2
    specs = _llama7b_specs()
    batches = plan_batches(specs, eng)
    assert sorted(s.name for b in batches for s in b) == sorted(s.name for s in specs)
    for b in batches:
        assert len({(s.tensor.file, s.shape) for s in b}) == 1  # same-shape stacks
        assert sum(working_bytes(s, method, "float32") for s in b) <= eng.budget // 2
    # the independent arithmetic of one 4096² bf16 matrix on the Gram route: 2 + 12 bytes per entry + 24·n²
    assert working_bytes(specs[0], "gram", "float32") == 2 * 4096**2 + 12 * 4096**2 + 24 * 4096**2
    # a larger budget means fewer, larger stacks
    if free_gb == 80 and method == "gram":
        # per shard (16 layers): 64 square matrices of 38·4096² B = 608 MiB → stacks of ≤ 33 in 20 GiB: 2;
        # 32 gate/up of 14·11008·4096 + 24·4096² B ≈ 0.96 GiB → ≤ 20 a stack: 2; 16 down: 1. Two shards.
        assert max(len(b) for b in batches) == 33
        assert len(batches) == 10


# ---- stored dtype until the device ---------------------------------------------------------------------------


def test_stage_keeps_the_stored_dtype_and_upload_upcasts():
    x = np.array([[1.5, -2.25], [3.0, 0.0078125]], dtype=np.float32)
    for code, dt in (("BF16", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32)):
        host = torch_tensors.stage(from_float(x, code), "cpu")
        assert host.dtype == dt and not host.is_pinned()  # pinned only for CUDA
        dev = torch_tensors.upload(host, "cpu", torch.float64)
        assert dev.dtype == torch.float64
        np.testing.assert_array_equal(dev.numpy(), x.astype(np.float64))  # exact in all three
    with pytest.raises(Exception, match="I8"):
        torch_tensors.stage(RawTensor(np.zeros((2, 2), np.int8), "I8"), "cpu")


def _record_uploads(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    real = torch_tensors.upload

    def spy(host, device, dtype=None):
        seen.append(host.dtype)
        return real(host, device, dtype)

    monkeypatch.setattr(torch_tensors, "upload", spy)
    return seen


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_engine_moves_bf16_and_fp16_in_their_stored_dtype(ckpts, monkeypatch, method):
    gen = ckpts.half
    seen = _record_uploads(monkeypatch)
    ckpt = open_checkpoint(gen.path)
    specs, _ = select_matrices(ckpt, Selection())
    loader = MatrixLoader(ckpt)
    eng = resolve(EngineOptions(device="cpu", backend="torch", method=method))
    got = {v.spec.name: v.values for v in singular_values(specs, eng, loader.load, loader.chunks)}
    # two bf16 matrices, one fp16, one fp32 (the float8 one is skipped): each crossed in its own dtype
    assert Counter(seen) == Counter({torch.bfloat16: 2, torch.float16: 1, torch.float32: 1})
    np_eng = resolve(EngineOptions(device="cpu", backend="numpy", method=method))
    ref = {v.spec.name: v.values for v in singular_values(specs, np_eng, loader.load, loader.chunks)}
    for name, vals in got.items():
        assert_singular_values_close(vals, gen.matrices[name], rtol=1e-4)
        np.testing.assert_allclose(vals, ref[name], rtol=1e-5, atol=1e-6 * ref[name][0])


def test_a_stack_is_one_device_tensor_with_the_numpy_answers(tmp_path):
    """Several same-shape bf16 matrices in one batch: torch's stacked route gives LAPACK's values."""
    from fixtures.llama_like import PRESETS, make_llama_like

    dims, _ = PRESETS["tiny"]
    ckpt = open_checkpoint(make_llama_like(tmp_path / "m", 2, 0, dims=dims))
    specs, _ = select_matrices(ckpt, Selection(kinds=("q_proj", "o_proj", "gate_proj", "up_proj")))
    eng = ResolvedEngine("cpu", "torch", "gram", "float32", 1 << 30)
    assert max(len(b) for b in plan_batches(specs, eng)) == 4  # q and o of both layers in one stack
    loader = MatrixLoader(ckpt)
    got = {v.spec.name: v.values for v in singular_values(specs, eng, loader.load, loader.chunks)}
    for s in specs:
        w = loader.dense(s, np.float64)
        ref = np.linalg.svd(w, compute_uv=False)
        np.testing.assert_allclose(got[s.name], ref, rtol=1e-10, atol=1e-12 * ref[0])


def test_rankme_accumulator_moves_half_chunks_and_agrees_with_numpy(monkeypatch):
    rng = np.random.default_rng(3)
    z = (rng.standard_normal((300, 24)) * np.linspace(2, 0.1, 24)).astype(np.float16)
    moved: list[torch.dtype] = []
    real_from_numpy = torch.from_numpy

    def spy(a):
        t = real_from_numpy(a)
        moved.append(t.dtype)
        return t

    monkeypatch.setattr(torch, "from_numpy", spy)
    dev, ref = GramAccumulator(24, "cpu"), GramAccumulator(24)
    for a in range(0, 300, 70):
        dev.update(z[a : a + 70])
        ref.update(z[a : a + 70])
    assert torch.float16 in moved and torch.float64 not in moved[1:]  # chunks cross in float16
    z64 = z.astype(np.float64)
    np.testing.assert_allclose(ref.gram(), z64.T @ z64, rtol=1e-12)
    np.testing.assert_allclose(dev.gram(), ref.gram(), rtol=1e-12)
    np.testing.assert_allclose(dev.scatter(), ref.scatter(), rtol=1e-10, atol=1e-9)


# ---- the prefetch thread ---------------------------------------------------------------------------------------


def test_prefetch_keeps_order_and_reads_ahead_while_the_caller_works():
    started: dict[int, float] = {}
    main = threading.get_ident()
    threads = set()

    def read(i: int) -> int:
        started[i] = time.perf_counter()
        threads.add(threading.get_ident())
        time.sleep(0.02)
        return i * i

    got = []
    for i, v in prefetched(range(6), read):
        got.append((i, v))
        if i + 1 < 6:
            time.sleep(0.05)  # "compute": the next read has started meanwhile
            assert i + 1 in started
    assert got == [(i, i * i) for i in range(6)]
    assert main not in threads and len(threads) == 1
    assert all(started[i] < started[i + 1] for i in range(5))


def test_prefetch_raises_at_the_failing_item_after_the_ones_before():
    def read(i: int) -> int:
        if i == 3:
            raise OSError("disk gone at 3")
        return i

    seen = []
    with pytest.raises(OSError, match="disk gone at 3"):
        for i, _ in prefetched(range(10), read):
            seen.append(i)
    assert seen == [0, 1, 2]


def test_prefetch_stops_reading_when_the_caller_stops():
    reads = []
    gen = prefetched(range(100), lambda i: reads.append(i) or i, ahead=2)
    assert next(gen) == (0, 0)
    gen.close()
    time.sleep(0.05)
    assert len(reads) <= 4  # the current item and at most `ahead` more


def test_engine_read_errors_surface_in_the_caller(ckpts):
    ckpt = open_checkpoint(ckpts.half.path)
    specs, _ = select_matrices(ckpt, Selection())
    eng = resolve(EngineOptions(device="cpu", backend="torch"))
    loader = MatrixLoader(ckpt)

    def load(spec):
        if spec is specs[-1]:
            raise OSError("read failed")
        return loader.load(spec)

    with pytest.raises(OSError, match="read failed"):
        list(singular_values(specs, eng, load, loader.chunks))


# ---- the flows on the torch route ------------------------------------------------------------------------------


def _tiny_with_adapter(tmp_path: Path) -> tuple[Path, Path]:
    from fixtures.llama_like import PRESETS, make_llama_like
    from spectra_cli.checkpoint.writers import LoraFactors, write_lora_adapter

    dims, _ = PRESETS["tiny"]
    ckpt = make_llama_like(tmp_path / "m", 1, 0, dims=dims)
    rng = np.random.default_rng(0)
    mods = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.down_proj": (64, 172)}
    factors = {m: LoraFactors(0.05 * rng.standard_normal((4, i)), 0.2 * rng.standard_normal((o, 4)), 4.0)
               for m, (o, i) in mods.items()}  # fmt: skip
    (tmp_path / "a").mkdir()
    write_lora_adapter(tmp_path / "a", factors, base=str(ckpt))
    return ckpt, tmp_path / "a"


def test_compare_moves_the_base_in_bf16_and_agrees_with_numpy(tmp_path, monkeypatch):
    from spectra_cli.flows.compare import CompareOptions, run_compare

    ckpt, adapter = _tiny_with_adapter(tmp_path)
    ref = run_compare(ckpt, [("a", adapter)], CompareOptions(device="cpu", backend="numpy")).rows
    seen = _record_uploads(monkeypatch)
    got = run_compare(ckpt, [("a", adapter)], CompareOptions(device="cpu", backend="torch")).rows
    # per module the bf16 base, then the adapter's lora_B and lora_A as stored (the fixture wrote float64)
    assert seen == [torch.bfloat16, torch.float64, torch.float64] * 2
    assert [r["name"] for r in got] == [r["name"] for r in ref]
    for a, b in zip(got, ref, strict=True):
        assert a["intruders"] == b["intruders"]
        for key in ("relative_delta", "subspace_overlap", "delta_spectral_norm", "effective_rank_change"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key


def test_init_adapter_moves_weights_in_bf16_and_agrees_with_numpy(tmp_path, monkeypatch):
    from spectra_cli.flows.init_adapter import InitOptions, run_init

    ckpt, _ = _tiny_with_adapter(tmp_path)
    kinds = ("q_proj", "down_proj")
    run_init(ckpt, tmp_path / "ref", InitOptions(method="pissa", rank=4, kinds=kinds, backend="numpy", device="cpu"))
    seen = _record_uploads(monkeypatch)
    run_init(ckpt, tmp_path / "dev", InitOptions(method="pissa", rank=4, kinds=kinds, backend="torch", device="cpu"))
    assert seen == [torch.bfloat16, torch.bfloat16]
    from safetensors.numpy import load_file

    ref = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    dev = load_file(str(tmp_path / "dev" / "adapter" / "adapter_model.safetensors"))
    for name in ref:
        if name.endswith("lora_A.weight"):
            b = name.replace("lora_A", "lora_B")
            np.testing.assert_allclose(dev[b] @ dev[name], ref[b] @ ref[name], rtol=1e-4, atol=1e-6)


def test_init_adapter_refuses_a_module_over_the_budget_before_writing(tmp_path):
    from spectra_cli.errors import BudgetError
    from spectra_cli.flows.init_adapter import InitOptions, run_init

    ckpt, _ = _tiny_with_adapter(tmp_path)
    # down_proj is 64×172: 5 float32 copies (220 160 B) + two 64² float64 matrices (65 536 B) = 285 696 B
    need = 5 * 4 * 64 * 172 + 16 * 64 * 64
    with pytest.raises(BudgetError, match=r"down_proj.*--max-memory"):
        run_init(ckpt, tmp_path / "out", InitOptions(method="pissa", rank=4, kinds=("down_proj",), max_memory=need - 1))
    assert not (tmp_path / "out").exists()
    run_init(ckpt, tmp_path / "out", InitOptions(method="pissa", rank=4, kinds=("down_proj",), max_memory=need))
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
