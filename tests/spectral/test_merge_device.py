"""The merge methods on torch tensors (the merge's torch route, CUDA on a GPU): every registry method, the
rmm fit and the interference statistics, given updates that are tensors, compute with tensors (their results
are tensors where they were) and agree with the NumPy route on the same numbers. TIES's trimming at a
threshold shared by several entries and its exact-zero sign elections are worked by hand and checked on
both routes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from spectra_cli.spectral.linalg import Backend  # noqa: E402
from spectra_cli.spectral.merge import METHODS, Update, interference, rmm_fit, ties_combine  # noqa: E402
from spectra_cli.spectral.merge.peft_types import FACTOR_TYPES, SVD_TYPES  # noqa: E402
from spectra_cli.spectral.merge.updates import to_host  # noqa: E402

TORCH = Backend("torch", "cpu")


def _tensors(u: Update, lora_scale: float | None = None) -> Update:
    conv = {k: torch.from_numpy(getattr(u, k).copy()) for k in ("dense", "B", "A") if getattr(u, k) is not None}
    return Update(**conv, lora_scale=lora_scale if lora_scale is not None else u.lora_scale)


def _updates(kind: str, rng: np.random.Generator) -> list[Update]:
    out, inn, r = 24, 18, 3
    if kind == "dense":
        return [Update(dense=rng.standard_normal((out, inn))) for _ in range(3)]
    # LoRA-like factors, scale 2 folded into B (lora_scale says so, as the checkpoint reader makes them)
    return [Update(B=2.0 * rng.standard_normal((out, r)), A=rng.standard_normal((r, inn)), lora_scale=2.0)
            for _ in range(3)]  # fmt: skip


def _arrays(u: Update) -> list[Any]:
    return [x for x in (u.dense, u.B, u.A) if x is not None]


def _params(name: str, kind: str) -> dict[str, Any]:
    if name in SVD_TYPES and kind == "dense":
        return {"rank": 2}
    return {}


CASES = [(name, kind) for name in METHODS for kind in ("dense", "factored")
         if not (kind == "dense" and name in (*FACTOR_TYPES, "cat"))]  # fmt: skip


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_every_method_computes_with_tensors_and_agrees_with_numpy(name: str, kind: str) -> None:
    rng = np.random.default_rng(3)
    ups = _updates(kind, rng)
    weights = [1.0, 0.5, -0.25]
    params = _params(name, kind)
    ref = METHODS[name](ups, weights, params)
    got = METHODS[name]([_tensors(u) for u in ups], weights, params, TORCH)
    # the result is made of tensors: the arithmetic ran in torch, where the updates were
    assert all(type(x).__module__.startswith("torch") for x in _arrays(got.update)), name
    a, b = ref.update.to_dense(), to_host(got.update).to_dense()
    np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-9 * float(np.abs(a).max() or 1.0))
    assert got.update.dtype == ref.update.dtype
    for key, value in ref.stats.items():
        assert got.stats[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_ties_threshold_ties_and_zero_elections_by_hand() -> None:
    # density 0.5 of 4 entries keeps 2 per task. Task 1: |3| and the first of the two |2|'s (position order);
    # task 2: |−3| and |1|... (its magnitudes 3, 1, 1, 0: the 3 and the first 1).
    x = np.array([[3.0, 2.0, -2.0, 0.0],
                  [-3.0, 1.0, 1.0, 0.0]])  # fmt: skip
    # trimmed: [3, 2, 0, 0] and [−3, 1, 0, 0]; column sums 0, 3, 0, 0: column 0's elected sign is an exact
    # zero with agreeing entries, resolved by the majority of the elected signs (+1, from column 1): mean of
    # the positive entries = 3; column 1: (2 + 1)/2
    want = np.array([3.0, 1.5, 0.0, 0.0])
    kept = (9 + 4 + 9 + 1) / (9 + 4 + 4 + 9 + 1 + 1)
    for arr in (x, torch.from_numpy(x.copy())):
        merged, k = ties_combine(arr, [1.0, 1.0], 0.5)
        np.testing.assert_array_equal(np.asarray(merged), want)
        assert k == pytest.approx(kept)


@pytest.mark.parametrize("kind", ["dense", "factored"])
@pytest.mark.parametrize("center", [False, True])
def test_rmm_and_interference_on_tensors_agree_with_numpy(kind: str, center: bool) -> None:
    rng = np.random.default_rng(4)
    ups = _updates(kind, rng)
    tens = [_tensors(u) for u in ups]
    ref, got = rmm_fit(ups, basis=2, center=center), rmm_fit(tens, basis=2, center=center, backend=TORCH)
    assert all(type(x).__module__.startswith("torch") for e in got.basis for x in _arrays(e))
    # an error that is 0 in theory (centred: two elements span three tasks) comes out anywhere in 0…1e-8 from
    # the float64 Gram route, whose rounding floor differs between the two LAPACKs (see test_backends.py)
    np.testing.assert_allclose(got.errors, ref.errors, atol=1e-7)
    np.testing.assert_allclose(got.singular_values, ref.singular_values, rtol=1e-9,
                               atol=1e-7 * ref.singular_values[0])  # (the centred stack's zero σ, the same floor)
    for e_ref, e_got in zip(ref.basis, got.basis, strict=True):
        a, b = e_ref.to_dense(), to_host(e_got).to_dense()
        # a basis element is defined up to its sign (an eigenvector's)
        assert min(np.abs(a - b).max(), np.abs(a + b).max()) < 1e-8
    i_ref, i_got = interference(ups, 2), interference(tens, 2, TORCH)
    for key in ("cosine", "overlap", "norms"):
        np.testing.assert_allclose(i_got[key], i_ref[key], rtol=1e-9, atol=1e-12)
