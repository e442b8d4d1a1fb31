"""ε of the accountant's history with σ and q rescaled: the measured ε's accounting, cheaply.

The measured ε (:mod:`.measured`) re-runs the user's accountant on the run's history with σ and
q replaced by measured values, three times per audit (the value and two corners of its
interval), at values that change at every audit. Exact RDP of a Poisson-subsampled Gaussian at
all of Opacus's orders (99 of them fractional) costs about 0.15 s per new (q, σ) on a 2-core
machine, PRV more and more with the steps; so:

* **RDP**: exact, at the orders next to the one where the accountant's own history attains its
  ε (:data:`WINDOW` on each side): a small change of σ and q moves the optimal order little,
  and when the optimum lands on the window's edge the whole curve is computed. The same value as
  the full computation, ten times faster.
* **PRV**: Opacus's PRV on the rescaled history (up to :data:`PRV_EXACT_STEPS` steps; beyond,
  the accountant's own ε scaled by the RDP ratio of rescaled to claimed), the interval's corners
  scaled from the value by the RDP ratio of corner to value; RDP below σ = 0.3 as
  :func:`~.accountant.read_epsilon` does. ``how`` says which.
* **GDP**: exact (cheap).
"""

from __future__ import annotations

import math

import numpy as np

from .accountant import PRV_MIN_SIGMA, epsilon_of_history, step_rdp

__all__ = ["rescaled_epsilons", "rescaled_rdp_epsilon", "PRV_EXACT_STEPS", "WINDOW"]

#: PRV is re-run on the rescaled history up to this many steps (about a second on 2 cores).
PRV_EXACT_STEPS = 20_000

#: RDP orders on each side of the claimed optimum computed first.
WINDOW = 6


def _curve(history, sigma_factor: float, q_factor: float, orders) -> np.ndarray:
    total = np.zeros(len(orders))
    for sigma, q, count in history:
        step = step_rdp(min(q * q_factor, 1.0), sigma * sigma_factor, tuple(orders))
        total = total + np.asarray(step, dtype=float) * count
    return total


def _optimum(history, orders, delta: float) -> int:
    """Index of the order where the unscaled history attains its ε."""
    eps = _conversion(_curve(history, 1.0, 1.0, orders), orders, delta)
    return int(np.nanargmin(eps)) if not np.isnan(eps).all() else len(orders) // 2


def rescaled_rdp_epsilon(
    history, sigma_factor: float, q_factor: float, steps: int, orders, delta: float
) -> float:
    """RDP ε of ``history`` with every σ times ``sigma_factor``, every q times ``q_factor``
    (capped at 1) and ``steps`` steps in all (exact; see the module doc)."""
    orders = tuple(float(a) for a in orders)
    full = _with_steps(history, steps)
    if not full:
        return 0.0
    centre = _optimum(full, orders, delta)
    lo, hi = max(centre - WINDOW, 0), min(centre + WINDOW + 1, len(orders))
    window = orders[lo:hi]
    eps = _conversion(_curve(full, sigma_factor, q_factor, window), window, delta)
    if not np.isnan(eps).all():
        best = int(np.nanargmin(eps))
        inner = (best > 0 or lo == 0) and (best < len(window) - 1 or hi == len(orders))
        if inner:
            return float(eps[best])
    eps = _conversion(_curve(full, sigma_factor, q_factor, orders), orders, delta)
    return math.inf if np.isnan(eps).all() else float(np.nanmin(eps))


def _with_steps(history, steps: int) -> list[tuple[float, float, int]]:
    """The history with ``steps`` steps in all: extra steps join the last entry, missing ones
    come off the end."""
    out = [[float(s), float(q), int(t)] for s, q, t in history if int(t) > 0]
    extra = int(steps) - sum(t for _, _, t in out)
    while out and extra < 0:
        cut = min(out[-1][2], -extra)
        out[-1][2] -= cut
        extra += cut
        if out[-1][2] == 0:
            out.pop()
    if out and extra > 0:
        out[-1][2] += extra
    return [(s, q, t) for s, q, t in out]


def _conversion(rdp: np.ndarray, orders, delta: float) -> np.ndarray:
    """Opacus's RDP-to-(ε, δ) conversion at each order (as :func:`~.accountant.read_epsilon`)."""
    alphas = np.asarray(orders, dtype=float)
    return rdp - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)


def rescaled_epsilons(
    kind: str,
    history,
    factors: list[tuple[float, float]],
    *,
    steps: int,
    delta: float,
    orders,
    claimed: float | None = None,
) -> tuple[list[float], str]:
    """``([ε per (σ factor, q factor)], how)``: the rescaled history's ε under ``kind``.

    Args:
        kind: ``"rdp"``, ``"prv"``, ``"gdp"`` (others: RDP, said in ``how``).
        history: the accountant's ``(σ, q, steps)`` entries.
        factors: ``(σ factor, q factor)`` pairs; the first is the value, the others corners.
        steps: the steps in all.
        delta: δ.
        orders: RDP orders.
        claimed: the accountant's own ε of ``history`` (a PRV run beyond
            :data:`PRV_EXACT_STEPS` scales it by the RDP ratio instead of re-running PRV).
    """
    history = [(float(s), float(q), int(t)) for s, q, t in history if int(t) > 0]
    if not history:
        return [0.0] * len(factors), kind
    smallest = min(s for s, _, _ in history)

    def scaled(fs: float, fq: float):
        return [(s * fs, min(q * fq, 1.0), t) for s, q, t in _with_steps(history, steps)]

    if kind == "gdp":
        return [epsilon_of_history("gdp", scaled(*f), delta=delta)[0] for f in factors], "gdp"
    rdp = [rescaled_rdp_epsilon(history, fs, fq, steps, orders, delta) for fs, fq in factors]
    if kind != "prv":
        return rdp, "rdp" if kind == "rdp" else f"rdp ({kind} not known here)"
    if smallest * min(f[0] for f in factors) < PRV_MIN_SIGMA:
        return rdp, f"rdp (prv too slow below sigma {PRV_MIN_SIGMA})"
    if steps <= PRV_EXACT_STEPS:
        value, how = epsilon_of_history("prv", scaled(*factors[0]), delta=delta)[0], "prv"
    elif claimed is not None and math.isfinite(claimed):
        base = rescaled_rdp_epsilon(history, 1.0, 1.0, sum(t for _, _, t in history), orders, delta)
        value, how = claimed * rdp[0] / base, "prv (the accountant's, scaled by the RDP ratio)"
    else:
        return rdp, "rdp (prv too slow for this many steps)"
    # the interval's corners: the PRV value scaled by the RDP ratio of corner to value
    corners = [value * r / rdp[0] if rdp[0] > 0 else r for r in rdp[1:]]
    if len(factors) > 1 and how == "prv":
        how = "prv (interval corners scaled by the RDP ratio)"
    return [value, *corners], how
