"""The per-target test: k successes among n attempted targets against a baseline's upper limit.

Each target (a lone sample the audit found and scored) is one trial: the reconstruction succeeds
or not, identifies its image or not. Against a baseline whose upper limit is ``p0`` (what a guess
made without the gradient achieves per target, :mod:`.baseline`), the evidence for leakage is the
exact one-sided binomial tail ``P(X ≥ k)`` with ``X ~ Binomial(n, p0)``. Several tests of one run
(success raw and DM; identification in MSE, SSIM and LPIPS, raw and DM) share the level
:data:`DECISION_LEVEL` by Bonferroni: each is run at ``DECISION_LEVEL / m``.

A negative verdict needs power: the probability that the test would have found leakage had the
per-target rate been :func:`alternative` (``p0 + 0.1``, capped at 1). :func:`power` gives it at the
run's n; :func:`targets_needed` the smallest n that reaches :data:`POWER_FOR_NEGATIVE`.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "DECISION_LEVEL",
    "POWER_FOR_NEGATIVE",
    "ALTERNATIVE_GAP",
    "alternative",
    "p_value",
    "critical_count",
    "power",
    "targets_needed",
]

#: The level of the run's per-target tests together (Bonferroni over the tests run).
DECISION_LEVEL = 1e-3

#: A negative verdict needs at least this power against :func:`alternative`.
POWER_FOR_NEGATIVE = 0.9

#: The alternative of the power: a per-target rate this much above the baseline's upper limit.
ALTERNATIVE_GAP = 0.1

#: The most targets :func:`targets_needed` looks for.
MAX_TARGETS = 10**6


def alternative(p0: float) -> float:
    """The stated alternative: the baseline's upper limit plus :data:`ALTERNATIVE_GAP`, at most 1."""
    return min(1.0, p0 + ALTERNATIVE_GAP)


def p_value(hits: int, trials: int, p0: float) -> float:
    """``P(X ≥ hits)`` for ``X ~ Binomial(trials, p0)`` (1 for no hits)."""
    from scipy import stats

    if hits <= 0:
        return 1.0
    if p0 <= 0:
        return 0.0
    return float(stats.binom.sf(hits - 1, trials, min(p0, 1.0)))


def critical_count(trials, p0: float, alpha: float):
    """The fewest hits among ``trials`` that reject ``p0`` at ``alpha`` (vectorised over trials;
    ``trials + 1`` where none does)."""
    from scipy import stats

    n = np.asarray(trials)
    k = stats.binom.ppf(1.0 - alpha, n, p0) + 1  # P(X > ppf) ≤ alpha
    k = np.where(stats.binom.sf(k - 1, n, p0) > alpha, k + 1, k)  # round-off at the edge
    return np.minimum(k, n + 1)


def power(trials: int, p0: float, alpha: float, p1: float | None = None) -> float:
    """Probability that the test rejects ``p0`` at ``alpha`` when the true rate is ``p1``
    (default :func:`alternative`); 0 without trials."""
    from scipy import stats

    if trials <= 0:
        return 0.0
    p1 = alternative(p0) if p1 is None else p1
    k = float(critical_count(trials, p0, alpha))
    if k > trials:
        return 0.0
    return float(stats.binom.sf(k - 1, trials, p1))


def targets_needed(
    p0: float, alpha: float, *, p1: float | None = None, goal: float = POWER_FOR_NEGATIVE
) -> int | None:
    """The fewest targets with which the test reaches ``goal`` power against ``p1``
    (``None`` beyond :data:`MAX_TARGETS` or when ``p1 ≤ p0``)."""
    from scipy import stats

    p1 = alternative(p0) if p1 is None else p1
    if p1 <= p0:
        return None
    # normal approximation for a start, then scan exactly around it
    z_a, z_b = stats.norm.isf(alpha), stats.norm.isf(1 - goal)
    guess = ((z_a * math.sqrt(p0 * (1 - p0)) + z_b * math.sqrt(p1 * (1 - p1))) / (p1 - p0)) ** 2
    lo = 1
    hi = int(min(MAX_TARGETS, max(16, 4 * guess + 64)))
    while hi <= MAX_TARGETS:
        n = np.arange(lo, hi + 1)
        k = critical_count(n, p0, alpha)
        ok = (k <= n) & (stats.binom.sf(k - 1, n, p1) >= goal)
        if ok.any():
            return int(n[ok.argmax()])
        lo, hi = hi + 1, hi * 4
    return None
