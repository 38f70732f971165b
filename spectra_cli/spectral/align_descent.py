"""The outer loop of weight matching (Ainsworth et al. 2023, Git Re-Basin, algorithm "weight matching"):
coordinate descent over the permutations, and the permutation of the residual stream.

Coordinates: each layer's MLP permutation and attention permutation (:mod:`spectra_cli.spectral.align`),
and, with ``residual``, one permutation r of the residual stream shared by every layer. They are visited in a
seeded random order, each solved exactly (a linear assignment) given the others, sweeping until a sweep brings
no improvement or ``max_iter`` sweeps. A new permutation is kept only when it raises the objective
Σ⟨A, P(B)⟩, so the objective never falls.

Without the residual the coordinates do not interact and the second sweep confirms the first. With it the
layers are coupled through r: every matrix that reads the hidden states (q, k, v, the MLP input: columns),
writes them (o, the MLP output: rows, and their biases), and the *global* tensors (embeddings, every
LayerNorm/RMSNorm weight and bias, the LM head, a pooler's input), each viewed as H×m with the residual axis
first. Norms commute with a permutation of their input when their weight and bias are permuted with it (the
mean and variance over the coordinates do not change), so the model computes the same function; only the
hidden states it returns come out permuted by r (logits and a pooler's output do not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from spectra_cli.spectral.align import (
    HeadPerm,
    Heads,
    LayerPerm,
    LayerWeights,
    apply_heads,
    apply_layer,
    apply_mlp,
    assign,
    inner_product,
    match_heads,
    match_mlp,
)

Globals = dict[str, np.ndarray]  # tensor name → H×m, the residual axis first
Loader = Callable[[int], tuple[LayerWeights, LayerWeights]]

#: layer-dict keys whose columns (``IN``) or rows (``OUT``, and biases ``OUT_BIAS``) index the residual stream
IN, OUT, OUT_BIAS = ("q", "k", "v", "mlp_in"), ("o", "mlp_out"), ("o_bias", "mlp_out_bias")


def _each(w: LayerWeights, key: str) -> list[np.ndarray | None]:
    x = w.get(key)
    return list(x) if isinstance(x, list) else [x]


def apply_residual(w: LayerWeights, r: np.ndarray) -> LayerWeights:
    """A layer dict with its residual stream taken in the order ``r`` (new coordinate i = old r[i])."""
    out = dict(w)
    for keys, take in ((IN, lambda x: x[:, r]), (OUT, lambda x: x[r]), (OUT_BIAS, lambda x: x[r])):
        for key in keys:
            if key not in w:
                continue
            done = [None if x is None else take(x) for x in _each(w, key)]
            out[key] = done if isinstance(w[key], list) else done[0]
    return out


def residual_similarity(a: LayerWeights, b: LayerWeights) -> np.ndarray:
    """C[i, j] = ⟨coordinate i of A's residual, coordinate j of B's⟩ over one layer's matrices and biases."""
    c: np.ndarray | None = None
    for keys, term in ((IN, lambda x, y: x.T @ y), (OUT, lambda x, y: x @ y.T), (OUT_BIAS, np.outer)):
        for key in keys:
            for x, y in zip(_each(a, key), _each(b, key), strict=False):
                if x is not None and y is not None:
                    t = term(x, y)
                    c = t if c is None else c + t
    assert c is not None
    return c


@dataclass
class Matching:
    """The result of :func:`weight_matching`: per layer its permutations, the residual permutation (None when
    not permuted), the sweeps run, the objective Σ⟨A, P(B)⟩ after each sweep (starting with the identity's),
    and the coordinates' visiting order per sweep (layer −1: the residual)."""

    perms: list[LayerPerm]
    residual: np.ndarray | None
    sweeps: int
    objective: list[float]
    order: list[list[tuple[int, str]]] = field(default_factory=list)
    converged: bool = True


def _better(new: float, old: float) -> bool:
    return new > old + 1e-12 * max(abs(old), 1.0)


def weight_matching(load: Loader, layers: int, heads: Heads, max_iter: int = 10, seed: int = 0,
                    progress: Callable[[int, int, str], None] | None = None,
                    globals_: tuple[Globals, Globals] | None = None) -> Matching:  # fmt: skip
    """Coordinate descent over the permutations (see the module docstring). ``load(i)`` gives layer i's
    weights of A and B (read again on each visit, so only one layer is in memory); ``globals_`` (A's and B's
    global tensors as H×m) turns on the residual permutation."""
    rng = np.random.default_rng(seed)
    ga, gb = globals_ if globals_ is not None else ({}, {})
    perms: list[LayerPerm] = []
    start = 0.0
    hidden = 0
    for i in range(layers):
        wa, wb = load(i)
        perms.append(LayerPerm(np.arange(wb["mlp_in"][0].shape[0]), HeadPerm.identity(heads)))
        start += inner_product(wa, wb)
        hidden = wb["q"].shape[1]
    start += sum(float(np.vdot(ga[n], gb[n])) for n in ga)
    r = np.arange(hidden)
    coords = [(i, part) for i in range(layers) for part in ("mlp", "attn")]
    if globals_ is not None:
        coords.append((-1, "residual"))
    objective, orders, converged, step = [start], [], False, 0
    for _sweep in range(max_iter):
        order = [coords[k] for k in rng.permutation(len(coords))]
        orders.append(order)
        improved = False
        for i, part in order:
            if part == "residual":
                c = sum((residual_similarity(wa, apply_layer(wb, perms[j], heads))
                         for j in range(layers) for wa, wb in [load(j)]), np.zeros((hidden, hidden)))  # fmt: skip
                for n in ga:
                    c = c + ga[n] @ gb[n].T
                cand_r = assign(c)
                rows = np.arange(hidden)
                if _better(float(c[rows, cand_r].sum()), float(c[rows, r].sum())):
                    r, improved = cand_r, True
            else:
                wa, wb = load(i)
                base = apply_residual(wb, r) if globals_ is not None else wb
                perm = perms[i]
                if part == "mlp":
                    cand = LayerPerm(match_mlp(wa, apply_heads(base, perm.heads, heads)), perm.heads)
                else:
                    cand = LayerPerm(perm.mlp, match_heads(wa, apply_mlp(base, perm.mlp), heads))
                before = inner_product(wa, apply_layer(base, perm, heads))
                if _better(inner_product(wa, apply_layer(base, cand, heads)), before):
                    perms[i], improved = cand, True
            step += 1
            if progress:
                progress(step, len(coords) * max(len(orders) + 1, 2), f"layer {i} {part}" if i >= 0 else part)
        objective.append(_objective(load, layers, perms, heads, r if globals_ is not None else None, ga, gb))
        if not improved:
            converged = True
            break
    return Matching(perms, r if globals_ is not None else None, len(orders), objective, orders, converged)


def _objective(load: Loader, layers: int, perms: list[LayerPerm], h: Heads, r: np.ndarray | None, ga: Globals,
               gb: Globals) -> float:  # fmt: skip
    total = 0.0
    for i in range(layers):
        wa, wb = load(i)
        total += inner_product(wa, apply_b(wb, perms[i], h, r))
    if r is not None:
        total += sum(float(np.vdot(ga[n], gb[n][r])) for n in ga)
    return total


def apply_b(w: LayerWeights, perm: LayerPerm, h: Heads, r: np.ndarray | None) -> LayerWeights:
    """A layer of B with everything found applied: the residual permutation (when any), then the layer's."""
    return apply_layer(w if r is None else apply_residual(w, r), perm, h)
