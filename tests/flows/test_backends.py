"""``backend="torch"`` on the CPU gives the same rows as ``backend="numpy"``, for every command and method.

Each command runs twice on the same tiny generated inputs, once per backend, and the rows (and the summary,
timings and the echo of the engine aside) are compared number by number. The two LAPACKs (OpenBLAS through
NumPy, MKL through PyTorch) round differently, so the tolerances follow the route:

- ``F64`` (1e-9 relative, 1e-12 absolute): exact float64 decompositions (QR/SVD of factors).
- ``GRAM`` (1e-6 relative, 1e-7 absolute): the float64 Gram routes. They resolve σ only to ~1e-8·σ₁, and
  that rounding floor differs between the LAPACKs: a figure that sums over every σ of a low-rank matrix (the
  effective rank of ΔW) moves by ~1e-7 relative, and a relative error that is exactly 0 in theory (an rmm
  basis that spans every task) comes out anywhere in 0…1e-8.
- ``F32`` (1e-5 relative, 1e-6 absolute): float32 results (adapters, written in float32).
- ``F32_SVD`` (1e-3 relative): an exact float32 SVD of the weights is accurate to ε₃₂·σ₁ absolutely, so a
  figure of the smallest σ (the condition number κ ≈ 900 of a tiny BERT matrix) agrees to ~ε₃₂·κ ≈ 1e-4.

This is what makes the CUDA path of every command real: on a GPU the same code runs with the tensors there.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures.capture_data import text_file, tiny_bert
from fixtures.embeddings import known_spectrum
from fixtures.gate import gate_models
from fixtures.merge_cases import full_case, lora_case

pytest.importorskip("torch")

BACKENDS = ("numpy", "torch")
F64 = (1e-9, 1e-12)
GRAM = (1e-6, 1e-7)
F32 = (1e-5, 1e-6)
F32_SVD = (1e-3, 1e-6)
# keys that are timings, machine facts or the echo of the backend itself, not results
VOLATILE = ("seconds", "time", "engine", "backend", "device", "resolved", "peak_", "rss", "max_memory", "out",
            "path", "created")  # fmt: skip


def _volatile(key: str) -> bool:
    return any(v in key for v in VOLATILE)


def diff(a: Any, b: Any, tol: tuple[float, float], where: str = "") -> list[str]:
    """Differences between two results (dicts, lists, numbers, strings), numbers to ``tol`` = (rtol, atol)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in a if not _volatile(str(k))]
        out = [f"{where}.{k}: only with numpy" for k in keys if k not in b]
        out += [f"{where}.{k}: only with torch" for k in b if not _volatile(str(k)) and k not in a]
        return out + [d for k in keys if k in b for d in diff(a[k], b[k], tol, f"{where}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items with numpy, {len(b)} with torch"]
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff(x, y, tol, f"{where}[{i}]")
        ]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return diff(np.asarray(a).tolist(), np.asarray(b).tolist(), tol, where)
    num = (int, float, np.integer, np.floating)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        fa, fb = float(a), float(b)
        if (math.isnan(fa) and math.isnan(fb)) or fa == fb:
            return []
        rtol, atol = tol
        if abs(fa - fb) <= atol + rtol * max(abs(fa), abs(fb)):
            return []
        return [f"{where}: {fa!r} with numpy, {fb!r} with torch"]
    return [] if a == b else [f"{where}: {a!r} with numpy, {b!r} with torch"]


def assert_same(results: dict[str, Any], tol: tuple[float, float]) -> None:
    """The rows and summaries of the two runs agree (and there are rows to compare)."""
    a, b = results["numpy"], results["torch"]
    assert a.rows, "nothing to compare: the run gave no rows"
    problems = diff(a.rows, b.rows, tol, "rows") + diff(a.summary_dict(), b.summary_dict(), tol, "summary")
    assert not problems, "\n".join(problems[:20])


def test_the_comparison_can_fail() -> None:
    """The comparator itself: a difference beyond the tolerance, a missing key and a changed string show."""
    assert diff({"x": 1.0}, {"x": 1.0 + 1e-6}, F64)
    assert not diff({"x": 1.0, "seconds": 1}, {"x": 1.0 + 1e-12, "seconds": 2}, F64)
    assert diff({"x": 1.0}, {"y": 1.0}, F64)
    assert diff([{"s": "ok"}], [{"s": "nonfinite"}], F64)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every input, generated once: a tiny BERT (a checkpoint and a model to capture from) with text, full
    fine-tunes and LoRA adapters of a tiny LLaMA, the gate's models, and embedding files."""
    root = tmp_path_factory.mktemp("backends")
    emb = root / "emb"
    emb.mkdir()
    tall = emb / "tall.npy"
    np.save(tall, known_spectrum(np.geomspace(5.0, 0.01, 12), 200, 16, seed=7, offset=0.5).astype(np.float32))
    wide = emb / "wide.npy"
    np.save(wide, known_spectrum(np.geomspace(3.0, 0.1, 6), 10, 24, seed=8))
    return {
        "bert": tiny_bert(root / "bert"),
        "data": text_file(root / "data.txt"),
        "full": full_case(root / "full"),
        "lora": lora_case(root / "lora"),
        "gate": gate_models(root / "gate"),
        "emb": {"tall": tall, "wide": wide},
        "root": root,
    }


@contextlib.contextmanager
def torch_linalg_calls() -> Iterator[list[str]]:
    """Records every decomposition PyTorch is asked for (``torch.linalg`` eigh/eigvalsh/svd/svdvals/qr and
    ``torch.svd_lowrank``) while the block runs."""
    import torch

    calls: list[str] = []
    saved = {}
    for owner, name in [(torch.linalg, n) for n in ("eigh", "eigvalsh", "svd", "svdvals", "qr")] + [
        (torch, "svd_lowrank")
    ]:
        original = getattr(owner, name)
        saved[(owner, name)] = original

        def spy(*args: Any, _f: Any = original, _n: str = name, **kwargs: Any) -> Any:
            calls.append(_n)
            return _f(*args, **kwargs)

        setattr(owner, name, spy)
    try:
        yield calls
    finally:
        for (owner, name), original in saved.items():
            setattr(owner, name, original)


def _both(run: Any, numpy_uses_torch: bool = False, torch_used: bool = True) -> dict[str, Any]:
    """Run with each backend. With ``torch`` PyTorch must do the decompositions (``torch_used``), and with
    ``numpy`` none of them (unless ``numpy_uses_torch``: init-adapter's exact SVD/QR run where its weights are,
    which are torch tensors, whatever the backend)."""
    out = {}
    for b in BACKENDS:
        with torch_linalg_calls() as calls:
            out[b] = run(b)
        if b == "torch" and torch_used:
            assert calls, "backend torch ran no decomposition in PyTorch"
        if b == "numpy" and not numpy_uses_torch:
            assert not calls, f"backend numpy asked PyTorch for {sorted(set(calls))}"
    return out


@pytest.mark.parametrize(("method", "precision", "tol"), [("gram", "float32", GRAM), ("svd", "float64", F64),
                                                          ("svd", "float32", F32_SVD)])  # fmt: skip
def test_analyze(world: dict[str, Any], method: str, precision: str, tol: tuple[float, float]) -> None:
    from spectra_cli.flows.analyze import AnalyzeOptions, run_analyze

    assert_same(_both(lambda b: run_analyze(world["bert"], AnalyzeOptions(
        device="cpu", backend=b, method=method, precision=precision))), tol)  # fmt: skip


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("case", ["full", "lora"])
def test_compare(world: dict[str, Any], case: str, precision: str) -> None:
    from spectra_cli.flows.compare import CompareOptions, run_compare

    c = world[case]
    tuned = [(n, p) for n, p in list(c.paths.items())[:2]]
    assert_same(_both(lambda b: run_compare(c.base_path, tuned, CompareOptions(
        device="cpu", backend=b, precision=precision, allow_missing=True))), GRAM)  # fmt: skip


@pytest.mark.parametrize("embedding", ["tall", "wide"])
def test_rankme(world: dict[str, Any], embedding: str) -> None:
    from spectra_cli.flows.rankme import RankmeOptions, run_rankme

    path = world["emb"][embedding]
    # small chunks, so the Gram accumulation runs over several of them
    assert_same(_both(lambda b: run_rankme([("z", path)], RankmeOptions(device="cpu", backend=b, chunk_rows=64))),
                GRAM)  # fmt: skip


def _strategies() -> list[str]:
    from spectra_cli.spectral.allocation import STRATEGIES

    return [s for s in STRATEGIES if s != "eva"]


@pytest.mark.parametrize("strategy", _strategies())
def test_allocate(world: dict[str, Any], strategy: str) -> None:
    from spectra_cli.flows.allocate import AllocateOptions, run_allocate

    assert_same(_both(lambda b: run_allocate(world["bert"], AllocateOptions(
        device="cpu", backend=b, strategy=strategy, budget_rank=4, kinds=("query", "value", "dense")))), GRAM)  # fmt: skip


@pytest.fixture(scope="module")
def activations(world: dict[str, Any]) -> dict[str, Path]:
    """``capture`` once per backend (its statistics and PCA, both stats), for the comparison below and for
    the data-driven inits."""
    from spectra_cli.flows.capture import CaptureOptions, run_capture

    def run(b: str) -> Any:
        return run_capture(world["bert"], world["data"], world["root"] / f"acts-{b}.safetensors", CaptureOptions(
            device="cpu", backend=b, stats="both", components=8, chunk=16))  # fmt: skip

    for b, res in _both(run).items():
        world[f"capture-{b}"] = res
    return {b: world["root"] / f"acts-{b}.safetensors" for b in BACKENDS}


def test_capture(world: dict[str, Any], activations: dict[str, Path]) -> None:
    from spectra_cli.checkpoint.activations import read_activations

    assert_same({b: world[f"capture-{b}"] for b in BACKENDS}, GRAM)
    acts = {b: read_activations(p).modules for b, p in activations.items()}
    assert acts["numpy"].keys() == acts["torch"].keys()
    for name, m in acts["numpy"].items():
        t = acts["torch"][name]
        np.testing.assert_allclose(t.pca_explained_variance_ratio, m.pca_explained_variance_ratio, rtol=1e-9,
                                   atol=1e-12)  # fmt: skip
        # the components are written in float32, their signs fixed as PEFT fixes them
        np.testing.assert_allclose(t.pca_components, m.pca_components, atol=1e-5)


INIT_CASES = {
    "pissa": {"rank": 4},
    "pissa-fast": {"rank": 4, "fast": 2},
    "milora": {"rank": 4},
    "olora": {"rank": 4},
    "extract": {"rank": 3},  # ΔW has rank 3: the Gram route (rank 4 would fall back to the exact SVD)
    "extract-energy": {"energy": 0.9},
    "corda": {"rank": 4},
    "corda-kpm": {"rank": 4, "method_options": {"mode": "kpm"}},
    "eva": {"rank": 4},
}


@pytest.mark.parametrize("case", list(INIT_CASES))
def test_init_adapter(world: dict[str, Any], activations: dict[str, Path], case: str) -> None:
    from spectra_cli.flows.init_adapter import InitOptions, run_init

    method = case.split("-")[0]
    extra: dict[str, Any] = dict(INIT_CASES[case])
    if method == "extract":
        extra["tuned"] = _finetuned(world)
    if method in ("corda", "eva"):
        extra["activations"] = activations["numpy"]

    def run(b: str) -> Any:
        if case == "pissa-fast":  # the randomized SVD is seeded by torch's generator, as in PEFT
            import torch

            torch.manual_seed(0)
        out = world["root"] / f"init-{case}-{b}"
        return run_init(world["bert"], out, InitOptions(device="cpu", backend=b, method=method,
                                                        kinds=("query", "value"), **extra))  # fmt: skip

    # exact SVDs and QRs run where the weights are (torch tensors); EVA decomposes nothing (capture did)
    assert_same(_both(run, numpy_uses_torch=method not in ("pissa", "extract") or "-" in case,
                      torch_used=method != "eva"), F32)  # fmt: skip


def _finetuned(world: dict[str, Any]) -> Path:
    """The tiny BERT with every query/value weight changed by a rank-3 update (for extract)."""
    path = world["root"] / "bert-tuned"
    if not path.exists():
        from safetensors.numpy import load_file, save_file

        path.mkdir()
        for f in world["bert"].iterdir():
            if f.name != "model.safetensors":
                (path / f.name).write_bytes(f.read_bytes())
        tensors = load_file(world["bert"] / "model.safetensors")
        rng = np.random.default_rng(5)
        for name, w in tensors.items():
            if w.ndim == 2 and ("query" in name or "value" in name):
                tensors[name] = (w + rng.standard_normal((w.shape[0], 3)) @ rng.standard_normal((3, w.shape[1]))
                                 * 0.05).astype(w.dtype)  # fmt: skip
        save_file(tensors, str(path / "model.safetensors"))
    return path


def _merge_methods() -> list[str]:
    from spectra_cli.flows.merge import method_names

    return method_names()


@pytest.mark.parametrize("method", _merge_methods())
@pytest.mark.parametrize("case", ["full", "lora"])
def test_merge(world: dict[str, Any], case: str, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from spectra_cli.flows.merge import MergeOptions, run_merge
    from spectra_cli.spectral.merge import MergeError
    from spectra_cli.spectral.merge.peft_types import FACTOR_TYPES, SVD_TYPES

    c = world[case]
    extra: dict[str, Any] = {"basis": 2, "sweep": True} if method == "rmm" else {}
    if method in SVD_TYPES and case == "full":
        extra["params"] = (("rank", 2),)  # full fine-tunes have no input rank to default to

    def run(b: str) -> Any:
        out = world["root"] / f"merge-{case}-{method}-{b}"
        opts = MergeOptions(device="cpu", backend=b, method=method, interference_k=4, **extra)
        return run_merge(c.base_path, list(c.paths.items()), out, opts)

    if case == "full" and (method in FACTOR_TYPES or method == "cat"):  # PEFT's factor-wise types need LoRA
        with pytest.raises(MergeError, match="LoRA adapters"):
            run("numpy")
        return
    with merge_arrays(monkeypatch) as kinds:
        results = _both(run)
    # the torch run's task updates (and what the method made of them) were tensors: its arithmetic ran in torch
    assert kinds["torch"] and all(kinds["torch"]), method
    assert kinds["numpy"] and not any(kinds["numpy"]), method
    assert_same(results, GRAM)


@contextlib.contextmanager
def merge_arrays(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[bool]]]:
    """Records, per backend, whether each array a merge method was given or gave back (or an rmm basis element)
    was a torch tensor; the norms and biases merged on the host (1×N) are left out."""
    import spectra_cli.flows.merge as flow
    from spectra_cli.spectral.merge import MergeMethod

    kinds: dict[str, list[bool]] = {"numpy": [], "torch": []}
    call, fit = MergeMethod.__call__, flow.host_fit

    def record(updates: Any) -> None:
        arrays = [x for u in updates for x in (u.dense, u.B, u.A) if x is not None]
        torch_run = any(type(x).__module__.startswith("torch") for x in arrays)
        kinds["torch" if torch_run else "numpy"].extend(type(x).__module__.startswith("torch") for x in arrays)

    def spy_call(self: Any, updates: Any, *args: Any, **kwargs: Any) -> Any:
        out = call(self, updates, *args, **kwargs)
        if updates[0].shape[0] > 1:
            record([*updates, out.update])
        return out

    def spy_fit(f: Any) -> Any:
        record([*([f.mean] if f.mean is not None else []), *f.basis])
        return fit(f)

    monkeypatch.setattr(MergeMethod, "__call__", spy_call)
    monkeypatch.setattr(flow, "host_fit", spy_fit)
    yield kinds


POLICY = """\
[rules]
no_nonfinite = true
max_intruders = 0
max_relative_delta = 0.2
max_spectral_norm = 100.0
alpha_range = [1.0, 10.0]
"""


@pytest.mark.parametrize("tuned", ["healthy", "intruders", "overtrained"])
def test_check(world: dict[str, Any], tuned: str) -> None:
    from spectra_cli.flows.check import CheckOptions, run_check
    from spectra_cli.gate.policy import load_policy

    policy = world["root"] / "policy.toml"
    policy.write_text(POLICY)
    gate = world["gate"]
    assert_same(_both(lambda b: run_check(gate[tuned].path, load_policy(policy), CheckOptions(
        device="cpu", backend=b, base=gate["base"].path))), GRAM)  # fmt: skip
