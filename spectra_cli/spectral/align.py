"""Weight matching (Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin: Merging Models modulo Permutation
Symmetries", ICLR, algorithm "weight matching"): the permutation of B's hidden units that brings B's weights
closest to A's, ‖A − P(B)‖_F, without changing the function B computes.

What is permuted, per transformer layer, for a given residual stream:

- **MLP hidden units**: one permutation p of the I hidden units; the rows (and biases) of every input
  projection (``up``/``gate``, BERT's ``intermediate.dense``, GPT-2's ``c_fc``) and the columns of the output
  projection (``down``, ``output.dense``, ``c_proj``). With the residual fixed, maximising
  Σ⟨W_A, P(W_B)⟩ over p is one linear assignment on C = Σ W_in,A W_in,Bᵀ + b_A b_Bᵀ + W_out,Aᵀ W_out,B,
  solved exactly by :func:`scipy.optimize.linear_sum_assignment`.
- **Attention heads**, at the level the architecture allows: key/value groups (for multi-head attention each
  group is one head), the query heads within a group (GQA: the query heads sharing a key/value head may be
  reordered among themselves, and whole groups moved together — never a query head to another group), the
  dimensions within a head jointly for q and k (the score qᵀk is a sum over them) — not with rotary position
  embeddings (RoPE rotates fixed pairs of dimensions at fixed frequencies, so a permutation would change the
  scores) — and jointly for v and o's columns.

Finding the head permutation: for each pair (group i of A, group j of B) the best within-group permutations
are found by alternating linear assignments (query heads given the dimension permutations, then the q/k and
v/o dimension permutations given the query heads; exact for multi-head attention, where a group is one
head), giving a score S[i, j]; one more assignment on S matches the groups.

The coordinate descent over layers (the paper's outer loop) and the optional permutation of the residual
stream are in :mod:`spectra_cli.spectral.align_descent`.

All arrays are out×in (``nn.Linear``'s layout); the caller transposes GPT-2's ``Conv1D`` weights and splits
its fused ``c_attn``. A layer's weights are a dict: ``mlp_in`` (list of I×H), ``mlp_in_bias`` (list of I or
None), ``mlp_out`` (list of H×I); ``q`` (nh·dh×H), ``k``, ``v`` (nkv·dh×H), ``o`` (H×nh·dh), ``q_bias``,
``k_bias``, ``v_bias`` (or None); ``o_bias`` and ``mlp_out_bias`` (lists) live in the residual stream and
are moved only by its permutation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

LayerWeights = dict[str, Any]

#: alternations of the within-group assignments per (A group, B group) pair
INNER_ROUNDS = 4


def assign(cost: np.ndarray) -> np.ndarray:
    """The permutation p maximising Σ_i cost[i, p[i]] (row i of A takes B's unit p[i])."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost, maximize=True)
    out = np.empty(cost.shape[0], dtype=np.int64)
    out[rows] = cols
    return out


# ---- MLP ------------------------------------------------------------------------------------------------


def mlp_similarity(a: LayerWeights, b: LayerWeights) -> np.ndarray:
    """C[i, j] = ⟨unit i of A, unit j of B⟩ summed over every matrix (and bias) the hidden units index."""
    c = sum(wa @ wb.T for wa, wb in zip(a["mlp_in"], b["mlp_in"], strict=True))
    for ba, bb in zip(a.get("mlp_in_bias") or [], b.get("mlp_in_bias") or [], strict=False):
        if ba is not None and bb is not None:
            c = c + np.outer(ba, bb)
    c = c + sum(wa.T @ wb for wa, wb in zip(a["mlp_out"], b["mlp_out"], strict=True))
    return np.asarray(c)


def match_mlp(a: LayerWeights, b: LayerWeights) -> np.ndarray:
    """The exact best permutation of B's MLP hidden units (given a fixed residual stream)."""
    return assign(mlp_similarity(a, b))


def apply_mlp(w: LayerWeights, perm: np.ndarray) -> LayerWeights:
    """``w`` with its hidden units taken in the order ``perm`` (new unit i = old unit perm[i])."""
    out = dict(w)
    out["mlp_in"] = [x[perm] for x in w["mlp_in"]]
    out["mlp_in_bias"] = [None if x is None else x[perm] for x in (w.get("mlp_in_bias") or [])]
    out["mlp_out"] = [x[:, perm] for x in w["mlp_out"]]
    return out


# ---- attention ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heads:
    """The attention geometry: ``heads`` query heads, ``kv_heads`` key/value heads of ``head_dim`` each;
    ``qk_dims`` False where q/k dimensions may not be permuted (rotary embeddings), ``vo_dims`` False to keep
    the v/o dimensions in place too."""

    heads: int
    kv_heads: int
    head_dim: int
    qk_dims: bool = True
    vo_dims: bool = True

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass
class HeadPerm:
    """A permutation of the attention: new key/value group i is old group ``groups[i]``; its query head a is
    old query head ``queries[i][a]`` of that group; its q/k dimension d is old dimension ``qk[i][d]``, its v/o
    dimension d old ``vo[i][d]``."""

    groups: np.ndarray
    queries: np.ndarray  # kv_heads × group
    qk: np.ndarray  # kv_heads × head_dim
    vo: np.ndarray  # kv_heads × head_dim

    @staticmethod
    def identity(h: Heads) -> HeadPerm:
        return HeadPerm(np.arange(h.kv_heads), np.tile(np.arange(h.group), (h.kv_heads, 1)),
                        np.tile(np.arange(h.head_dim), (h.kv_heads, 1)),
                        np.tile(np.arange(h.head_dim), (h.kv_heads, 1)))  # fmt: skip

    def indices(self, h: Heads) -> dict[str, np.ndarray]:
        """Row indices into q, k, v (and column indices into o): ``q``/``o`` of length heads·head_dim,
        ``k``/``v`` of length kv_heads·head_dim."""
        dh, g = h.head_dim, h.group
        k = (self.groups[:, None] * dh + self.qk).reshape(-1)
        v = (self.groups[:, None] * dh + self.vo).reshape(-1)
        old_q = self.groups[:, None] * g + self.queries  # kv × group: old query head of new (i, a)
        q = (old_q[:, :, None] * dh + self.qk[:, None, :]).reshape(-1)
        o = (old_q[:, :, None] * dh + self.vo[:, None, :]).reshape(-1)
        return {"q": q, "k": k, "v": v, "o": o}

    def changed(self, h: Heads) -> int:
        """How many query heads moved to another position (dimension permutations not counted)."""
        old_q = (self.groups[:, None] * h.group + self.queries).reshape(-1)
        return int(np.sum(old_q != np.arange(h.heads)))


def _blocks(w: LayerWeights, h: Heads) -> dict[str, np.ndarray]:
    """Per group views: q (kv, g, dh, H+1), k and v (kv, dh, H+1) — biases as the last column — and o
    (kv, g, dh, H): o's columns of each head, transposed."""
    dh, g, kv = h.head_dim, h.group, h.kv_heads

    def with_bias(x: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        col = np.zeros((x.shape[0], 1)) if bias is None else np.asarray(bias, dtype=x.dtype)[:, None]
        return np.concatenate([x, col], axis=1)

    q = with_bias(w["q"], w.get("q_bias")).reshape(kv, g, dh, -1)
    k = with_bias(w["k"], w.get("k_bias")).reshape(kv, dh, -1)
    v = with_bias(w["v"], w.get("v_bias")).reshape(kv, dh, -1)
    o = w["o"].T.reshape(kv, g, dh, -1)
    return {"q": q, "k": k, "v": v, "o": o}


def _inner(a: dict[str, np.ndarray], b: dict[str, np.ndarray], i: int, j: int, h: Heads
           ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Best (query heads, qk dims, vo dims) permutation of B's group j against A's group i, by alternating
    assignments; returns (score, queries, qk, vo)."""
    aq, bq, ao, bo = a["q"][i], b["q"][j], a["o"][i], b["o"][j]
    kk = a["k"][i] @ b["k"][j].T  # dh × dh
    vv = a["v"][i] @ b["v"][j].T
    # per (A query head a, B query head b): dh × dh similarity of their dimensions
    qq = np.einsum("adh,beh->abde", aq, bq)
    oo = np.einsum("adh,beh->abde", ao, bo)
    g, dh = h.group, h.head_dim
    t = np.arange(g)
    ident = np.arange(dh)
    qk, vo = ident.copy(), ident.copy()
    best = -np.inf
    for _ in range(INNER_ROUNDS):
        cq = kk + qq[np.arange(g), t].sum(axis=0)
        cv = vv + oo[np.arange(g), t].sum(axis=0)
        qk = assign(cq) if h.qk_dims else ident
        vo = assign(cv) if h.vo_dims else ident
        ct = qq[:, :, ident, qk].sum(axis=2) + oo[:, :, ident, vo].sum(axis=2)  # g × g
        t = assign(ct) if g > 1 else t
        score = float(kk[ident, qk].sum() + vv[ident, vo].sum() + ct[np.arange(g), t].sum())
        if score <= best + 1e-12 * abs(best):
            break
        best = score
    return best, t, qk, vo


def match_heads(a: LayerWeights, b: LayerWeights, h: Heads) -> HeadPerm:
    """The head permutation of B (groups, query heads within groups, within-head dimensions) best matching A."""
    ba, bb = _blocks(a, h), _blocks(b, h)
    kv, g, dh = h.kv_heads, h.group, h.head_dim
    scores = np.zeros((kv, kv))
    queries = np.zeros((kv, kv, g), dtype=np.int64)
    qks = np.zeros((kv, kv, dh), dtype=np.int64)
    vos = np.zeros((kv, kv, dh), dtype=np.int64)
    for i in range(kv):
        for j in range(kv):
            scores[i, j], queries[i, j], qks[i, j], vos[i, j] = _inner(ba, bb, i, j, h)
    groups = assign(scores)
    rows = np.arange(kv)
    return HeadPerm(groups, queries[rows, groups], qks[rows, groups], vos[rows, groups])


def apply_heads(w: LayerWeights, perm: HeadPerm, h: Heads) -> LayerWeights:
    """``w`` with its attention permuted by ``perm`` (the function is unchanged)."""
    idx = perm.indices(h)
    out = dict(w)
    for name in ("q", "k", "v"):
        out[name] = w[name][idx[name]]
        bias = w.get(f"{name}_bias")
        out[f"{name}_bias"] = None if bias is None else bias[idx[name]]
    out["o"] = w["o"][:, idx["o"]]
    return out


# ---- the whole model ------------------------------------------------------------------------------------


def inner_product(a: LayerWeights, b: LayerWeights) -> float:
    """Σ ⟨A_X, B_X⟩ over every array of the layer: maximising it minimises ‖A − B‖ (‖B‖ is unchanged by a
    permutation)."""
    total = 0.0
    for key, x in a.items():
        y = b.get(key)
        if isinstance(x, list):
            total += sum(float(np.vdot(p, q)) for p, q in zip(x, y or [], strict=False)
                         if p is not None and q is not None)  # fmt: skip
        elif x is not None and y is not None:
            total += float(np.vdot(x, y))
    return total


@dataclass
class LayerPerm:
    """One layer's permutations: of the MLP hidden units and of the attention."""

    mlp: np.ndarray
    heads: HeadPerm


def apply_layer(w: LayerWeights, perm: LayerPerm, h: Heads) -> LayerWeights:
    """``w`` with both of its permutations applied."""
    return apply_heads(apply_mlp(w, perm.mlp), perm.heads, h)
