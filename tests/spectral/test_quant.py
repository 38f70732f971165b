"""spectra's NF4 / int8 quantisers (LoftQ's base): the code table against its definition, the quantisation
against an independent NumPy implementation, and idempotence (quantising the dequantised weight again gives
back exactly the same weight)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm

from spectra_cli.spectral.quant import NF4_CODE, dequantise, fake_quantise, quantise


def nf4_table() -> np.ndarray:
    """bitsandbytes' create_normal_map(offset=0.9677083, use_extra_value=True), written out from QLoRA's
    definition: 8 positive and 7 negative normal quantiles, plus 0, normalised to [−1, 1]."""
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    return v / np.abs(v).max()


def numpy_nf4(w: np.ndarray) -> np.ndarray:
    """Blockwise (64) absmax NF4 round trip, nearest code (ties: lower), float32 like bitsandbytes."""
    code = np.asarray(NF4_CODE, np.float32)
    flat = w.astype(np.float32).reshape(-1)
    pad = (-flat.size) % 64
    blocks = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, 64)
    a = np.abs(blocks).max(axis=1)
    safe = np.where(a > 0, a, 1).astype(np.float32)
    idx = np.abs((blocks / safe[:, None])[..., None] - code).argmin(axis=-1)
    return (code[idx] * a[:, None]).reshape(-1)[: w.size].reshape(w.shape)


def test_nf4_code_table_is_the_normal_float_definition():
    np.testing.assert_allclose(np.asarray(NF4_CODE), nf4_table(), atol=2e-7)
    assert len(NF4_CODE) == 16 and NF4_CODE[7] == 0.0


def test_nf4_matches_an_independent_implementation():
    w = np.random.default_rng(0).standard_normal((37, 50)).astype(np.float32) * 0.02  # 1850: a partial block
    got = fake_quantise(torch.from_numpy(w), 4).numpy()
    np.testing.assert_array_equal(got, numpy_nf4(w))


def test_int8_is_rowwise_absmax():
    w = np.random.default_rng(1).standard_normal((20, 33)).astype(np.float32)
    a = np.abs(w).max(axis=1, keepdims=True)
    want = np.clip(np.round(w * 127 / a), -127, 127) / 127 * a
    np.testing.assert_allclose(fake_quantise(torch.from_numpy(w), 8).numpy(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [4, 8])
def test_requantising_is_idempotent(bits):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(70, 90, generator=g) * torch.logspace(-3, 1, 90)  # scales that differ by columns
    w[:3] = 0.0  # whole zero blocks / rows
    q = quantise(w, bits)
    d = dequantise(q)
    q2 = quantise(d, bits)
    assert torch.equal(q.codes, q2.codes) and torch.equal(q.scales, q2.scales)
    assert torch.equal(dequantise(q2), d)
    if bits == 4:
        np.testing.assert_array_equal(numpy_nf4(d.numpy()), d.numpy())
