"""``analyze --mp-fit / --randomize / --detx``: the opt-in columns, notes and figure of the random-matrix
diagnostics (shown only when a run computed them; the default table is unchanged)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spectra_cli.report.render import Column, plural
from spectra_cli.report.views.common import Env, dash, number

if TYPE_CHECKING:
    import numpy as np

#: (row key, header, formatter) of each opt-in column, in table order
RMT_COLUMNS = (
    ("num_pl_spikes", "PL tail n", dash),
    ("sigma_mp", "σ_MP", number()),
    ("bulk_max", "λ+ (MP)", number()),
    ("num_spikes", "spikes", dash),
    ("mp_softrank", "MP softrank", number()),
    ("max_rand_eval", "rand λmax", number()),
    ("rand_distance", "rand dist.", number()),
    ("ww_softrank", "ww softrank", number()),
    ("num_traps", "traps", dash),
    ("detX_num", "detX n", dash),
    ("alpha_reliability", "α fit", dash),
    ("fit_alpha", "fit α", number()),
    ("fit_Lambda", "fit Λ", number()),
    ("fit_tail", "fit tail", dash),
    ("fit_num_fingers", "fingers", dash),
    ("fit_reliability", "fit reading", dash),
)


def rmt_columns(env: Env) -> list[Column]:
    """The opt-in columns that the rows hold."""
    keys = set().union(*(r.keys() for r in env["rows"])) if env["rows"] else set()
    return [Column(k, h, f) for k, h, f in RMT_COLUMNS if k in keys]


def rmt_notes(env: Env) -> list[str]:
    s = env["summary"]
    lines = []
    if s.get("spiked") is not None:
        lines.append(f"Marchenko–Pastur fit: {s['spiked']:,} of {plural(s['analysed'], 'matrix', 'matrices')} "
                     f"{'has' if s['spiked'] == 1 else 'have'} spikes above the bulk edge")  # fmt: skip
    if s.get("trapped") is not None:
        lines.append(f"randomised ESD: {plural(s['correlation_traps'], 'correlation trap', 'correlation traps')} "
                     f"in {plural(s['trapped'], 'matrix', 'matrices')} "
                     f"(seed {env.get('options', {}).get('rmt', {}).get('seed', 0)})")  # fmt: skip
    if s.get("unreliable_fits") is not None:
        fit = env.get("options", {}).get("fit") or {}
        what = f"the {fit.get('fit', 'pl')} fit" if fit else "the power-law fit"
        lines.append(f"{what}: {s['unreliable_fits']} of {s['analysed']} matrices not read as ok (small-tail: "
                     "< 50 tail eigenvalues; poor-fit: KS D > 1.36/√n_tail; at-bound: TPL α within 0.01 of 1; "
                     "unstable: no fit inside the parameter ranges)")  # fmt: skip
    return lines


def draw_other_fit(row: dict[str, Any], lam: np.ndarray, ax: Any, tail_ax: Any, dln: float) -> None:
    """With ``--fit``/``--fix-fingers``/``--xmax``: the chosen fit's line on the ESD figure — its expected count
    per logarithmic bin on the histogram, its complementary CDF on the tail panel (a truncated power law
    x^-α·e^-Λx bends down where the power law goes straight)."""
    import numpy as np

    from spectra_cli.spectral.fits import upper_gamma

    a, x, lam_t = row.get("fit_alpha"), row.get("fit_xmin"), row.get("fit_Lambda")
    if not (isinstance(a, float) and isinstance(x, float) and math.isfinite(a) and math.isfinite(x) and x > 0):
        return
    tail = lam[lam >= x]
    if tail.size < 2:
        return
    xs = np.logspace(np.log10(x), np.log10(tail[-1]), 80)
    name = str(row.get("fit", "pl"))
    if isinstance(lam_t, float) and math.isfinite(lam_t) and lam_t > 0:
        s = 1.0 - a
        g0 = float(upper_gamma(s, lam_t * x))
        pdf = xs ** (-a) * np.exp(-lam_t * xs) * lam_t**s / g0
        ccdf = upper_gamma(s, lam_t * xs) / g0
        label = f"{name} fit α = {a:.2f}, Λ = {lam_t:.3g}"
    else:
        pdf = (a - 1) / x * (xs / x) ** (-a)
        ccdf = (xs / x) ** (1.0 - a)
        label = f"{name} fit ({row.get('fit_num_fingers', 0)} fingers) α = {a:.2f}" if "fit_num_fingers" in row \
            else f"{name} fit α = {a:.2f}"
    ax.plot(xs, tail.size * pdf * xs * dln, color="#55A868", lw=2.2, ls="--", label=label)
    # the tail panel's y is the share of the power-law tail (λ ≥ alpha_xmin) at or above λ
    n_pl = max(1, int(np.count_nonzero(lam >= float(row.get("alpha_xmin", x)))))
    tail_ax.loglog(xs, ccdf * tail.size / n_pl, color="#55A868", lw=2.2, ls="--", label=label)
    tail_ax.set_ylim(bottom=0.3 / max(n_pl, tail.size))  # where the eigenvalues are, not the fit's far tail
    tail_ax.set_xlim(min(tail_ax.get_xlim()[0], x / 1.1), tail_ax.get_xlim()[1])


def plot_rmt(row: dict[str, Any], values: np.ndarray, rand: np.ndarray | None, path: Path) -> bool:
    """The ESD rescaled to mean 1 (WeightWatcher's mp_fit scale) with the fitted MP density and its edge, and the
    randomised ESD (same rescaling of its own) overlaid."""
    import numpy as np

    from spectra_cli.report.plots import pyplot
    from spectra_cli.spectral.rmt import mp_density, rescale

    sigma = row.get("sigma_mp")
    lam = np.sort(np.asarray(values, dtype=np.float64) ** 2)
    if lam.size < 2 or float(lam.sum()) <= 0:
        return False
    r, _ = rescale(lam)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    top = float(np.quantile(r, 0.99)) * 1.5 if r.size > 20 else float(r.max())
    bins = np.linspace(0, max(top, 1e-12), 80)
    ax.hist(np.clip(r, 0, top), bins=bins, density=True, color="#4C72B0", alpha=0.6, label="ESD (λ·M/Σλ)")
    if rand is not None:
        rr, _ = rescale(np.sort(np.asarray(rand, dtype=np.float64) ** 2))
        ax.hist(np.clip(rr, 0, top), bins=bins, density=True, color="#8172B3", alpha=0.45, label="randomised ESD")
    m, n = (int(x) for x in str(row["shape"]).split("x"))
    q = max(m, n) / min(m, n)
    if isinstance(sigma, float) and math.isfinite(sigma):  # for Q = 1 σ_MP comes from the quarter-circle fit
        xs = np.linspace(top / 2000, top, 600)
        y, _, b = mp_density(xs, q, sigma)
        ax.plot(xs, y, color="#C44E52", lw=1.8, label=f"MP fit σ_MP = {sigma:.3g}, Q = {q:.3g}")
        ax.axvline(b, color="#C44E52", ls="--", lw=1, label=f"bulk edge λ+ = {b:.3g}")
        ax.set_ylim(0, ax.get_ylim()[1] if q != 1 else min(ax.get_ylim()[1], 3.0))
    ax.set_xlabel("eigenvalue λ, rescaled to mean 1 (largest values clipped into the last bin)")
    ax.set_ylabel("density")
    extra = f", {row['num_spikes']} spikes" if "num_spikes" in row else ""
    extra += f", {row['num_traps']} traps" if "num_traps" in row else ""
    ax.set_title(f"{row['name']}\n{row['shape']}{extra}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
