"""Weight matching (spectral/align*.py) on small random layers: planted permutations are recovered exactly, a
permutation leaves an attention layer's and an MLP's outputs unchanged (checked with a forward pass written
out here), and the agreement figures equal their formulas."""

from __future__ import annotations

import numpy as np
import pytest

from spectra_cli.errors import SelectionError
from spectra_cli.spectral.align import (
    HeadPerm,
    Heads,
    apply_heads,
    apply_layer,
    apply_mlp,
    assign,
    inner_product,
    match_heads,
    match_mlp,
)
from spectra_cli.spectral.align_arch import detect
from spectra_cli.spectral.align_descent import weight_matching
from spectra_cli.spectral.align_report import agreement, finding, rel_distance

H, N_UNITS = 24, 40


def _layer(rng: np.random.Generator, h: Heads, bias: bool = True) -> dict:
    dq, dkv = h.heads * h.head_dim, h.kv_heads * h.head_dim
    w = {"mlp_in": [rng.normal(size=(N_UNITS, H)), rng.normal(size=(N_UNITS, H))],
         "mlp_in_bias": [rng.normal(size=N_UNITS) if bias else None, None],
         "mlp_out": [rng.normal(size=(H, N_UNITS))],
         "q": rng.normal(size=(dq, H)), "k": rng.normal(size=(dkv, H)), "v": rng.normal(size=(dkv, H)),
         "o": rng.normal(size=(H, dq))}  # fmt: skip
    for n, d in (("q", dq), ("k", dkv), ("v", dkv)):
        w[f"{n}_bias"] = rng.normal(size=d) if bias else None
    return w


def _mlp_forward(w: dict, x: np.ndarray) -> np.ndarray:
    gate = x @ w["mlp_in"][0].T + (w["mlp_in_bias"][0] if w["mlp_in_bias"][0] is not None else 0)
    up = x @ w["mlp_in"][1].T
    return (np.tanh(gate) * up) @ w["mlp_out"][0].T


def _attention(w: dict, x: np.ndarray, h: Heads, rope: bool = False) -> np.ndarray:
    """Grouped-query attention over a sequence x (T×H), written out: query head j uses key/value head
    j // (heads / kv_heads); with ``rope`` a rotary embedding on pairs (d, d + dh/2)."""
    t, dh = x.shape[0], h.head_dim

    def proj(name: str) -> np.ndarray:
        b = w.get(f"{name}_bias")
        return x @ w[name].T + (0 if b is None else b)

    q = proj("q").reshape(t, h.heads, dh)
    k = proj("k").reshape(t, h.kv_heads, dh)
    v = proj("v").reshape(t, h.kv_heads, dh)
    if rope:
        half = dh // 2
        ang = np.arange(t)[:, None] * (10000.0 ** (-np.arange(half) / half))[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

        def rot(z: np.ndarray) -> np.ndarray:
            a, b = z[..., :half], z[..., half:]
            return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)

        q, k = rot(q), rot(k)
    outs = []
    for j in range(h.heads):
        g = j // h.group
        s = q[:, j] @ k[:, g].T / np.sqrt(dh)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        outs.append(p @ v[:, g])
    return np.concatenate(outs, axis=1) @ w["o"].T


def test_assign_finds_the_maximum_of_a_known_matrix():
    c = np.array([[1.0, 9.0, 0.0], [0.0, 1.0, 8.0], [7.0, 0.0, 1.0]])
    assert assign(c).tolist() == [1, 2, 0]


def test_planted_mlp_permutation_is_recovered_exactly():
    rng = np.random.default_rng(0)
    h = Heads(4, 4, 6)
    a = _layer(rng, h)
    pi = rng.permutation(N_UNITS)  # B's unit j is A's unit pi[j]
    b = dict(a, mlp_in=[x[pi] for x in a["mlp_in"]], mlp_in_bias=[a["mlp_in_bias"][0][pi], None],
             mlp_out=[a["mlp_out"][0][:, pi]])  # fmt: skip
    p = match_mlp(a, b)
    assert p.tolist() == np.argsort(pi).tolist()
    back = apply_mlp(b, p)
    np.testing.assert_array_equal(back["mlp_in"][0], a["mlp_in"][0])
    np.testing.assert_array_equal(back["mlp_out"][0], a["mlp_out"][0])
    x = rng.normal(size=(5, H))
    np.testing.assert_allclose(_mlp_forward(apply_mlp(b, rng.permutation(N_UNITS)), x), _mlp_forward(b, x), rtol=1e-12)


def _plant_heads(a: dict, h: Heads, rng: np.random.Generator, qk_dims: bool) -> dict:
    """B = A with its key/value groups, query heads within groups and head dimensions permuted (indices
    built here, independently of HeadPerm.indices)."""
    dh, g = h.head_dim, h.group
    groups = rng.permutation(h.kv_heads)
    qk = [rng.permutation(dh) if qk_dims else np.arange(dh) for _ in range(h.kv_heads)]
    vo = [rng.permutation(dh) for _ in range(h.kv_heads)]
    within = [rng.permutation(g) for _ in range(h.kv_heads)]
    kq, kv_, qq, oo = [], [], [], []
    for new in range(h.kv_heads):
        old = groups[new]
        kq += [old * dh + d for d in qk[new]]
        kv_ += [old * dh + d for d in vo[new]]
        for a_ in range(g):
            head = old * g + within[new][a_]
            qq += [head * dh + d for d in qk[new]]
            oo += [head * dh + d for d in vo[new]]
    b = dict(a)
    for name, idx in (("q", qq), ("k", kq), ("v", kv_)):
        b[name] = a[name][idx]
        b[f"{name}_bias"] = None if a[f"{name}_bias"] is None else a[f"{name}_bias"][idx]
    b["o"] = a["o"][:, oo]
    return b


@pytest.mark.parametrize(
    ("h", "rope"),
    [(Heads(4, 4, 6), False), (Heads(6, 2, 4, qk_dims=False), True), (Heads(6, 3, 4), False)],
    ids=["mha", "gqa-rope", "gqa"],
)
def test_planted_head_permutation_is_recovered_and_keeps_the_function(h, rope):
    rng = np.random.default_rng(1)
    a = _layer(rng, h)
    b = _plant_heads(a, h, rng, qk_dims=h.qk_dims)
    x = rng.normal(size=(7, H)) * 0.3
    np.testing.assert_allclose(_attention(b, x, h, rope), _attention(a, x, h, rope), rtol=1e-10, atol=1e-12)
    perm = match_heads(a, b, h)
    back = apply_heads(b, perm, h)
    for name in ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias"):
        np.testing.assert_array_equal(back[name], a[name])
    # any head permutation of this kind keeps the attention's output
    other = apply_heads(b, match_heads(_layer(rng, h), b, h), h)
    np.testing.assert_allclose(_attention(other, x, h, rope), _attention(b, x, h, rope), rtol=1e-10, atol=1e-12)


def test_rotary_positions_forbid_qk_dimension_permutations():
    """With qk_dims False the q/k dimensions stay in place (a permutation would change rotary scores)."""
    rng = np.random.default_rng(2)
    h = Heads(4, 2, 4, qk_dims=False)
    perm = match_heads(_layer(rng, h), _layer(rng, h), h)
    assert (perm.qk == np.arange(4)).all()
    ident = HeadPerm.identity(h).indices(h)
    assert ident["q"].tolist() == list(range(16)) and ident["o"].tolist() == list(range(16))


def test_weight_matching_descends_and_stops_after_a_sweep_without_gain():
    rng = np.random.default_rng(3)
    h = Heads(4, 4, 6)
    layers = [(_layer(rng, h), _layer(rng, h)) for _ in range(3)]
    seen: list[str] = []
    m = weight_matching(lambda i: layers[i], 3, h, max_iter=5, seed=7, progress=lambda d, t, n: seen.append(n))
    assert m.converged and m.sweeps == 2  # the layers do not interact: the second sweep finds nothing more
    assert m.objective[0] == pytest.approx(sum(inner_product(a, b) for a, b in layers))
    assert m.objective[1] > m.objective[0] and m.objective[-1] == m.objective[1]
    after = sum(inner_product(a, apply_layer(b, m.perms[i], h)) for i, (a, b) in enumerate(layers))
    assert after == pytest.approx(m.objective[-1])
    assert len(seen) == 12 and sorted(m.order[0]) == sorted(m.order[1]) and m.order[0] != m.order[1]
    one = weight_matching(lambda i: layers[i], 3, h, max_iter=1)
    assert one.sweeps == 1 and not one.converged


def test_agreement_matches_its_formulas():
    rng = np.random.default_rng(4)
    u, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    v, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    s = np.arange(12, 0, -1.0)
    a = u[:, :12] * s @ v.T
    same = agreement(a, a, 5)
    np.testing.assert_allclose(same.u_cos, 1.0, atol=1e-10)
    assert same.u_overlap == pytest.approx(1.0) and same.v_overlap == pytest.approx(1.0)
    # swap the 1st and 2nd left vectors' σ: the top-2 subspace is the same, the per-index vectors are not
    b = u[:, :12] * np.array([11.0, 12.0, *s[2:]]) @ v.T
    ag = agreement(a, b, 2)
    np.testing.assert_allclose(ag.u_cos, [0.0, 0.0], atol=1e-10)
    assert ag.u_overlap == pytest.approx(1.0)
    # a row permutation of A: left vectors permuted (cos = |⟨u_i, P u_i⟩|), right vectors unchanged
    p = rng.permutation(20)
    ag = agreement(a, a[p], 3)
    np.testing.assert_allclose(ag.v_cos, 1.0, atol=1e-10)
    np.testing.assert_allclose(ag.u_cos, np.abs(np.sum(u[:, :3] * u[p, :3], axis=0)), atol=1e-10)
    assert rel_distance(a, a) == 0.0
    assert rel_distance(a, 0 * a) == pytest.approx(1.0)


def test_finding_states_what_the_curves_show():
    before = np.full(8, 0.1)
    top = finding(before, np.array([0.9, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15]))
    assert top.text.startswith("weight matching aligns the large-σ directions most")
    assert top.head == 2 and top.top_after == pytest.approx(0.85) and top.tail_after == pytest.approx(0.175)
    assert finding(before, np.full(8, 0.5)).text.startswith("weight matching raised the agreement about evenly")
    assert finding(before, before).text.startswith("weight matching did not raise")


def test_detect_names_the_supported_architectures():
    assert detect(["encoder.layer.0.attention.self.query.weight"]).name == "bert"
    ll = detect(["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"])
    assert (ll.name, ll.prefix, ll.layers, ll.rope) == ("llama", "model.", 2, True)
    assert detect(["transformer.h.0.attn.c_attn.weight"]).name == "gpt2"
    with pytest.raises(SelectionError, match=r"unknown architecture.*BERT.*LLaMA.*GPT-2"):
        detect(["conv.weight"])
    with pytest.raises(SelectionError, match="layer 1 is missing"):
        detect(["layers.0.self_attn.q_proj.weight", "layers.2.self_attn.q_proj.weight"])


def test_the_permuted_side_comes_from_bs_own_vectors():
    """agreement_of(A, permuted(B's triplets)) equals the agreement with the SVD of the permuted matrix."""
    from spectra_cli.spectral.align_report import agreement_of, permuted, top_vectors

    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(30, 12)), rng.normal(size=(30, 12))
    rows, cols = rng.permutation(30), rng.permutation(12)
    for side, pb, idx in (("left", b[rows], rows), ("right", b[:, cols], cols)):
        fast = agreement_of(top_vectors(a, 4), permuted(top_vectors(b, 4), idx, side))
        slow = agreement(a, pb, 4)
        np.testing.assert_allclose(fast.u_cos, slow.u_cos, atol=1e-9)
        np.testing.assert_allclose(fast.v_cos, slow.v_cos, atol=1e-9)
        assert fast.u_overlap == pytest.approx(slow.u_overlap) and fast.v_overlap == pytest.approx(slow.v_overlap)
