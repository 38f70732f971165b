"""The device routes of ``compare`` and ``merge`` (``--backend torch``; CUDA on a GPU), run with PyTorch on the
CPU: the work is done on tensors (the tuned matrices, the cosines, the task updates and the merge methods),
and ``--max-memory`` refuses a module whose working set is over it, before anything is read or written, with
the working set written out here from the documented memory model. (test_backends.py checks that the rows
equal the NumPy route's.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from fixtures.merge_cases import full_case, lora_case  # noqa: E402
from spectra_cli.errors import BudgetError  # noqa: E402


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("device")
    return {"full": full_case(root / "full"), "lora": lora_case(root / "lora"), "root": root}


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


@pytest.mark.parametrize("case", ["full", "lora"])
def test_compare_builds_tuned_matrices_and_cosines_on_the_device(cases, case, monkeypatch):
    import spectra_cli.flows.compare_sides as sides
    from spectra_cli.flows.compare import CompareOptions, run_compare

    seen: list[tuple[bool, bool]] = []
    real = sides.max_abs_cosines

    def spy(u0: Any, ut: Any) -> Any:
        seen.append((_is_tensor(u0), _is_tensor(ut)))
        return real(u0, ut)

    monkeypatch.setattr(sides, "max_abs_cosines", spy)
    c = cases[case]
    res = run_compare(c.base_path, list(c.paths.items())[:1], CompareOptions(device="cpu", backend="torch",
                                                                            allow_missing=True))  # fmt: skip
    assert len(seen) == len(res.rows) > 0
    assert all(a and b for a, b in seen)  # |U₀ᵀU_t| formed from the device's vectors, not copies on the host
    assert all(r["status"] == "ok" for r in res.rows)


def test_compare_refuses_a_module_over_the_device_budget(cases):
    from spectra_cli.flows.compare import CompareOptions, run_compare

    c = cases["lora"]
    # the largest module is up_proj, 48×16 float32 (k = 16): 2·(stored 3072 + upcast 3072) + 16·768 + 24·16²
    # + 16·(48·16 + 16·16) bytes
    need = 2 * (3072 + 3072) + 16 * 768 + 24 * 16**2 + 16 * (48 * 16 + 16 * 16)
    opts = {"device": "cpu", "backend": "torch", "allow_missing": True}
    with pytest.raises(BudgetError, match=r"up_proj.weight \(48×16\).*--max-memory"):
        run_compare(c.base_path, list(c.paths.items()), CompareOptions(max_memory=need - 1, **opts))
    assert run_compare(c.base_path, list(c.paths.items()), CompareOptions(max_memory=need, **opts)).rows


@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "tsv", "rmm"])
@pytest.mark.parametrize("case", ["full", "lora"])
def test_merge_builds_the_updates_on_the_device_and_merges_there(cases, case, method, monkeypatch):
    import spectra_cli.flows.merge as merge_flow
    from spectra_cli.flows.merge import MergeOptions, run_merge
    from spectra_cli.spectral.merge import MergeMethod

    kinds: list[bool] = []
    if method == "rmm":
        real_fit = merge_flow.host_fit

        def spy_fit(fit: Any) -> Any:
            kinds.extend(_is_tensor(x) for b in fit.basis for x in (b.dense, b.B, b.A) if x is not None)
            return real_fit(fit)

        monkeypatch.setattr(merge_flow, "host_fit", spy_fit)
    else:
        real_call = MergeMethod.__call__

        def spy(self: Any, updates: Any, *args: Any, **kwargs: Any) -> Any:
            if updates[0].shape[0] == 1:  # a norm or bias (1×N), merged on the host by merge_rest: small
                return real_call(self, updates, *args, **kwargs)
            kinds.extend(_is_tensor(x) for u in updates for x in (u.dense, u.B, u.A) if x is not None)
            out = real_call(self, updates, *args, **kwargs)
            kinds.extend(_is_tensor(x) for x in (out.update.dense, out.update.B, out.update.A) if x is not None)
            return out

        monkeypatch.setattr(MergeMethod, "__call__", spy)
    c = cases[case]
    out = cases["root"] / f"merge-{case}-{method}"
    extra = {"basis": 2} if method == "rmm" else {}
    run_merge(c.base_path, list(c.paths.items()), out, MergeOptions(device="cpu", backend="torch", method=method,
                                                                    **extra))  # fmt: skip
    assert kinds and all(kinds)


def test_merge_refuses_a_module_over_the_budget_before_writing(cases, tmp_path):
    from spectra_cli.flows.merge import MergeOptions, run_merge

    c = cases["full"]
    # the largest modules are 24×16 (gate/up/down, k = 16): W₀, the merged update and the patched matrix in
    # float64, three full tasks' float32 updates, and a 16×16 Gram matrix with eigenvectors and workspace
    need = 3 * 8 * 24 * 16 + 3 * 4 * 24 * 16 + 3 * 8 * 16**2
    for backend in ("numpy", "torch"):
        out = tmp_path / f"out-{backend}"
        with pytest.raises(BudgetError, match=r"(gate|up|down)_proj.weight \((24×16|16×24)\).*--max-memory"):
            run_merge(c.base_path, list(c.paths.items()), out, MergeOptions(device="cpu", backend=backend,
                                                                            max_memory=need - 1))  # fmt: skip
        assert not out.exists()
        run_merge(c.base_path, list(c.paths.items()), out, MergeOptions(device="cpu", backend=backend,
                                                                        max_memory=need))  # fmt: skip
        assert (Path(out) / "spectra_run.json").is_file()
