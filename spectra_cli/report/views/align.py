"""``align``: per layer and matrix, the distance between A and B before and after weight matching and the
agreement of their singular vectors on the permuted side; the page's cards; the agreement against the
singular-value index, before and after (the figure of the HTML page and of ``--plots``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from spectra_cli.report.render import Column, fmt_num
from spectra_cli.report.views import generic
from spectra_cli.report.views.common import Card, Env, num

if TYPE_CHECKING:
    from spectra_cli.report.plots import Figure


def title(env: Env) -> str:
    s = env["summary"]
    return f"spectra align {env['inputs']['a']['checkpoint']} {env['inputs']['b']['checkpoint']} ({s['architecture']})"


def columns(env: Env) -> list[Column]:
    return [
        Column("layer", "layer"),
        Column("role", "role", str, "left"),
        Column("module", "module", str, "left", shorten=True, default=False),
        Column("shape", "shape"),
        Column("permuted_side", "side", str, "left", default=False),
        Column("rel_distance_before", "dist. before", fmt_num),
        Column("rel_distance_after", "dist. after", fmt_num),
        Column("agreement_before", "|cos| before", fmt_num),
        Column("agreement_after", "|cos| after", fmt_num),
        Column("overlap_before", "overlap before", fmt_num, default=False),
        Column("overlap_after", "overlap after", fmt_num),
        Column("residual_agreement_after", "residual |cos| after", fmt_num, default=False),
        Column("residual_overlap_after", "residual overlap after", fmt_num, default=False),
    ]


def notes(env: Env) -> list[str]:
    s = env["summary"]
    if s["qk_dims_permuted"]:
        dims = "q/k and v/o dimensions"
    elif s.get("vo_dims_permuted", True):
        dims = "v/o dimensions (q/k fixed: rotary or relative positions)"
    else:
        dims = "no dimensions inside a head (--no-within-head)"
    return [
        f"{s['architecture']}, {s['layers']} layers, {s['heads']} heads ({s['kv_heads']} key/value) of {s['head_dim']}; "
        f"permuted: MLP units, heads, {dims}; " + (f"residual stream permuted ({s['residual_moved']:.0%} of its "
        "coordinates moved)" if s.get("residual_permuted") else "residual stream not permuted"),
        f"weight matching: {s['sweeps']} sweeps ({'converged' if s['converged'] else 'stopped at --max-iter'}), "
        f"Σ⟨A, P(B)⟩ {s['objective_before']:.4g} → {s['objective_after']:.4g}; moved {s['mlp_units_moved']:.0%} of "
        f"the MLP units and {s['heads_moved']:.0%} of the heads",
        f"‖A − B‖/‖A‖ {s['rel_distance_before']:.4g} → ‖A − P(B)‖/‖A‖ {s['rel_distance_after']:.4g} (all matched "
        "matrices)",
        f"top-{s['top_k']} singular vectors on the permuted side: mean |cos| {s['agreement_before']:.3g} → "
        f"{s['agreement_after']:.3g}, subspace overlap {s['overlap_before']:.3g} → {s['overlap_after']:.3g}",
        s["finding"],
        f"wrote the permuted B to {s['output']} in {s['seconds']:.2f} s",
    ]


def cards(env: Env) -> list[Card]:
    s = env["summary"]
    return [
        ("architecture", str(s.get("architecture") or "-"),
         f"{s.get('layers')} layers, {s.get('heads')} heads ({s.get('kv_heads')} key/value)"),
        ("‖A−B‖/‖A‖", num(s.get("rel_distance_before")), f"after alignment {num(s.get('rel_distance_after'))}"),
        ("|cos| of top-k vectors", num(s.get("agreement_before")), f"after {num(s.get('agreement_after'))}"),
        ("top-k subspace overlap", num(s.get("overlap_before")), f"after {num(s.get('overlap_after'))}"),
        ("sweeps", num(s.get("sweeps")), "converged" if s.get("converged") else "stopped at --max-iter"),
        ("finding", _finding_label(str(s.get("finding") or "")), str(s.get("finding") or "")),
        ("written to", str(s.get("output") or "-"), "the permuted B: same function, same layout"),
    ]  # fmt: skip


def _finding_label(text: str) -> str:
    """A short card value for the summary's finding sentence."""
    if "large-σ directions most" in text:
        return "large σ aligned first"
    if "about evenly" in text:
        return "raised evenly"
    if "did not raise" in text:
        return "no rise"
    return "-"


def figures(env: Env) -> list[Figure]:
    """Agreement against the singular-value index, before and after (from the summary and the rows)."""
    from spectra_cli.report import plots

    s = env["summary"]
    before, after = s.get("agreement_by_index_before"), s.get("agreement_by_index_after")
    out = generic.figures(env)
    if before and after and len(before) == len(after):
        rows = env["rows"]
        out += plots.draw_figures([("Singular-vector agreement |⟨x_i^A, x_i^B⟩| against the index i, before and "
                                    "after weight matching", lambda p: plot_agreement(before, after, rows, p))])  # fmt: skip
    return out


def plot_agreement(before: list[float], after: list[float], rows: list[dict[str, Any]], path: Path) -> None:
    """Left: mean |cos| of the i-th singular vectors (permuted side) over all matrices, before and after.
    Right: the same per role (q, k, v, o, mlp_in, mlp_out), after (solid) and before (dotted)."""
    import numpy as np

    from spectra_cli.report.plots import DPI, pyplot

    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=DPI)
    idx = np.arange(1, len(after) + 1)
    a1.plot(idx, before, marker="o", color="#8C8C8C", label="before (A vs B)")
    a1.plot(idx, after, marker="o", color="#C44E52", label="after (A vs P(B))")
    a1.set_ylim(0, 1.02)
    a1.set_xlabel("singular-value index i (1 = largest σ)")
    a1.set_ylabel(r"mean $|\langle x_i^A, x_i^B \rangle|$ (permuted side)")
    a1.set_title("all matched matrices", fontsize=10)
    a1.legend(fontsize=8)
    roles: dict[str, tuple[list[list[float]], list[list[float]]]] = {}
    for r in rows:
        curve, was = r.get("agreement_by_index_after") or [], r.get("agreement_by_index_before") or []
        if len(curve) == len(was) == len(after):
            pair = roles.setdefault(str(r.get("role")), ([], []))
            pair[0].append(curve)
            pair[1].append(was)
    for role, (curves, olds) in roles.items():
        (line,) = a2.plot(idx, np.mean(curves, axis=0), marker=".", label=role)
        a2.plot(idx, np.mean(olds, axis=0), ls=":", lw=1, color=line.get_color(), alpha=0.7)
    a2.set_ylim(0, 1.02)
    a2.set_xlabel("singular-value index i")
    a2.set_ylabel("mean |cos|")
    a2.set_title("per role: after (solid), before (dotted)", fontsize=10)
    if roles:
        a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def align_plots(env: Env, out: Path) -> list[Path]:
    """Write ``agreement.png`` (:func:`plot_agreement`) into ``out``; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = env["summary"]
    before, after = s.get("agreement_by_index_before"), s.get("agreement_by_index_after")
    if not before or not after:
        return []
    p = out / "agreement.png"
    plot_agreement(before, after, env["rows"], p)
    return [p]
