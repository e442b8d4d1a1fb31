"""Privacy numbers read from the user's Opacus accountant, safely, cheaply and in context.

ε is asked at audits only, never per step. An RDP ε is computed here from the accountant's own
history and orders with Opacus's RDP analysis (the same value ``RDPAccountant.get_epsilon``
returns), so that the order at which it is attained is known and Opacus's "Optimal order is the
smallest/largest alpha" warnings are never triggered: their meaning is told once, in this tool's
words, instead (see :class:`EpsilonReading` and :func:`epsilon_note`).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np

from .._opacus import accountant_history, rdp_orders, set_accountant_history

__all__ = [
    "EpsilonReading",
    "read_epsilon",
    "epsilon_note",
    "epsilon_from_accountant",
    "epsilon_at_audit",
    "history_from_accountant",
    "steps_from_accountant",
    "sample_rate_from_accountant",
    "step_rdp",
    "accountant_kind",
    "epsilon_of_history",
    "PRV_MIN_SIGMA",
    "MEANINGLESS_EPSILON",
    "NO_GUARANTEE",
]

#: Below this noise multiplier Opacus's PRV machinery takes seconds to minutes per query (8 s at
#: σ = 0.1, 45 s at σ = 0.01 for 60 steps on 2 cores) and its discretisation breaks down: ε is
#: then read from RDP of the same history (about 12 ms, a valid upper bound, looser than PRV),
#: and :func:`~opacus_dmaudit.privacy.bounds.run_bounds` skips its PRV privacy-profile bound.
PRV_MIN_SIGMA = 0.3

#: Above this ε a DP guarantee says nothing a reader can use (e^100 bounds any likelihood ratio).
MEANINGLESS_EPSILON = 100.0

#: What an ε without meaning is flagged with, in the record, the report, TensorBoard and the CLI.
NO_GUARANTEE = "no meaningful formal guarantee: read the per-step µ and the images"

logger = logging.getLogger(__name__)


def history_from_accountant(accountant) -> list[tuple[float, float, int]]:
    """The accountant's ``(noise_multiplier, sample_rate, steps)`` entries, oldest first."""
    return [(float(s), float(q), int(t)) for s, q, t in accountant_history(accountant)]


def steps_from_accountant(accountant) -> int:
    """Optimizer steps the accountant has recorded (its history holds ``(σ, q, steps)`` entries)."""
    return int(sum(entry[2] for entry in accountant_history(accountant)))


def sample_rate_from_accountant(accountant) -> float | None:
    """Sampling rate of the most recent step, or ``None`` before any step."""
    history = accountant_history(accountant)
    return float(history[-1][1]) if history else None


@dataclass(frozen=True)
class EpsilonReading:
    """ε at an audit, how it was computed, and whether it means anything.

    Attributes:
        epsilon: ε at the audit's δ (``inf`` without noise, ``nan`` if it could not be computed).
        accountant: how: ``"prv"``, ``"rdp"``, ``"gdp"``, ``"rdp (prv too slow below sigma
            0.3)"``, ``"none"``.
        note: :func:`epsilon_note`'s flag (``None`` when ε is meaningful).
        rdp_order: the RDP order α at which an RDP ε is attained (``None`` otherwise).
        at_smallest_order: ``True`` when that is the smallest order tried: RDP's conversion is
            loose there, and ε is larger than the mechanism's true ε (Opacus warns "Optimal
            order is the smallest alpha").
    """

    epsilon: float
    accountant: str
    note: str | None = None
    rdp_order: float | None = None
    at_smallest_order: bool = False


@functools.lru_cache(maxsize=96)
def step_rdp(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at ``orders`` (Opacus's analysis), cached.

    A run is audited at one ``(q, σ)`` many times, and T identical steps compose to T times this
    curve (what Opacus's ``compute_rdp`` returns for ``steps=T``). The array is read-only.
    """
    from opacus.accountants.analysis.rdp import compute_rdp

    if not (math.isfinite(sample_rate) and math.isfinite(noise_multiplier)):
        # Opacus's fractional-order series never ends on a NaN σ or q: refuse instead of hanging
        raise ValueError(
            f"RDP needs a finite sample rate and noise multiplier, got q = {sample_rate!r}, "
            f"σ = {noise_multiplier!r} (a NaN in the batch or the gradients makes the measured "
            "noise NaN)"
        )
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders)
    rdp.flags.writeable = False
    return rdp


def _rdp_epsilon(history: list, orders: tuple[float, ...], delta: float) -> tuple[float, float]:
    """``(ε, α)`` of the RDP curve of ``history`` at ``delta``, as Opacus computes it.

    The conversion ``ε = min_α ε_α − (log δ + log α)/(α − 1) + log((α − 1)/α)`` (Balle et al.
    2020) is the one Opacus's ``get_privacy_spent`` uses; written out here so that the optimal
    order is known without Opacus warning about it. A curve of T identical steps is T times the
    cached one-step curve (what Opacus's ``compute_rdp`` returns for ``steps=T``).
    """
    rdp = sum(step_rdp(float(q), float(s), orders) * int(t) for s, q, t in history)
    alphas = np.atleast_1d(np.asarray(orders, dtype=float))
    rdp = np.atleast_1d(rdp)
    eps = rdp - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    if np.isnan(eps).all():
        return math.inf, math.nan
    best = int(np.nanargmin(eps))
    return float(eps[best]), float(alphas[best])


def epsilon_note(epsilon: float, *, at_smallest_order: bool = False) -> str | None:
    """Why an ε carries no meaningful guarantee, or ``None`` when it does.

    Flags ε above :data:`MEANINGLESS_EPSILON` (∞ included) and an RDP ε attained at the smallest
    RDP order (loose by construction: the true ε of the mechanism is smaller, but not small).
    """
    if epsilon is None or (isinstance(epsilon, float) and math.isnan(epsilon)):
        return None
    if math.isinf(epsilon):
        return f"ε = ∞ (no noise): {NO_GUARANTEE}"
    if epsilon > MEANINGLESS_EPSILON:
        return f"ε = {epsilon:.3g} > {MEANINGLESS_EPSILON:g}: {NO_GUARANTEE}"
    if at_smallest_order:
        return f"ε = {epsilon:.3g} is attained at the smallest RDP order (loose): {NO_GUARANTEE}"
    return None


def read_epsilon(
    accountant,
    *,
    delta: float,
    noise_multiplier: float,
    explained: set[str] | None = None,
) -> EpsilonReading:
    """ε for an audit record, cheaply, with how it was computed and whether it means anything.

    The user's accountant answers, except a PRV accountant at σ below :data:`PRV_MIN_SIGMA`, where
    the RDP analysis of the same history answers in milliseconds instead of seconds. An RDP ε
    (the user's RDP accountant or that fallback) is computed from the history here, never
    through Opacus's ``get_epsilon``, whose optimal-order warnings would repeat at every audit.

    Args:
        accountant: an Opacus accountant (``privacy_engine.accountant``) or ``None``.
        delta: target δ.
        noise_multiplier: the optimizer's σ; ``0`` means no privacy, so ε is ``inf``.
        explained: the explanations already logged (a set owned by the caller, e.g. one per
            auditor): each kind of note is logged once as a warning, then only recorded.
    """
    name = type(accountant).__name__.replace("Accountant", "").lower() if accountant else "none"
    history = accountant_history(accountant)
    epsilon, order, smallest = math.nan, None, False
    if noise_multiplier <= 0:
        epsilon = math.inf
    elif accountant is None:
        epsilon = math.nan
    elif not history:
        epsilon = 0.0
    elif name == "rdp" or (name == "prv" and noise_multiplier < PRV_MIN_SIGMA):
        if name == "prv":
            name = f"rdp (prv too slow below sigma {PRV_MIN_SIGMA})"
            orders = rdp_orders()
        else:
            orders = rdp_orders(accountant)
        try:
            epsilon, order = _rdp_epsilon(history, orders, delta)
            smallest = order == min(orders)
        except Exception as err:  # an accountant failing must never stop training
            logger.warning("could not compute the RDP epsilon: %s", err)
            epsilon, order = math.nan, None
    else:
        epsilon = epsilon_from_accountant(
            accountant, delta=delta, noise_multiplier=noise_multiplier
        )
    note = epsilon_note(epsilon, at_smallest_order=smallest)
    reading = EpsilonReading(
        epsilon=epsilon,
        accountant=name,
        note=note,
        rdp_order=None if order is None or math.isnan(order) else order,
        at_smallest_order=smallest,
    )
    if note is not None:
        _explain_once(reading, explained)
    return reading


def _explain_once(reading: EpsilonReading, explained: set[str] | None) -> None:
    kind = "smallest_order" if reading.at_smallest_order else "large_epsilon"
    if explained is not None:
        if kind in explained:
            return
        explained.add(kind)
    if reading.at_smallest_order:
        logger.warning(
            "ε = %.3g is attained at the smallest RDP order (α = %g): Opacus would warn 'Optimal "
            "order is the smallest alpha'. The RDP-to-(ε, δ) conversion is loose there, and at "
            "this noise level no conversion gives a useful ε: %s. Every record carries this note "
            "in 'epsilon_note'; it is not repeated in the log.",
            reading.epsilon,
            reading.rdp_order,
            NO_GUARANTEE,
        )
    else:
        logger.warning(
            "ε = %.3g: %s. A per-step µ = 1/σ above ~3 lets single images show through one "
            "step; the audit's images and success rates show how much. Every record carries "
            "this note in 'epsilon_note'; it is not repeated in the log.",
            reading.epsilon,
            NO_GUARANTEE,
        )


def accountant_kind(accountant) -> str:
    """``"rdp"``, ``"prv"``, ``"gdp"`` (Opacus's names), another lower-case name, or ``"none"``."""
    if accountant is None:
        return "none"
    return type(accountant).__name__.replace("Accountant", "").lower()


def epsilon_of_history(
    kind: str, history: list[tuple[float, float, int]], *, delta: float, orders=None
) -> tuple[float, str]:
    """``(ε, how)`` of a ``(σ, q, steps)`` history under the accountant ``kind``, as
    :func:`read_epsilon` computes it for that kind (so that the same history gives the same ε).

    PRV below :data:`PRV_MIN_SIGMA` and kinds this package does not know are answered by RDP
    (``how`` says so); ``nan`` when the accountant fails.
    """
    history = [(float(s), float(q), int(t)) for s, q, t in history if int(t) > 0]
    if not history:
        return 0.0, kind
    if min(s for s, _, _ in history) <= 0:
        return math.inf, kind
    how = kind
    if kind == "prv" and min(s for s, _, _ in history) < PRV_MIN_SIGMA:
        kind, how = "rdp", f"rdp (prv too slow below sigma {PRV_MIN_SIGMA})"
    elif kind not in ("rdp", "prv", "gdp"):
        kind, how = "rdp", f"rdp ({kind} not known here)"
    try:
        if kind == "rdp":
            return _rdp_epsilon(history, tuple(orders or rdp_orders()), delta)[0], how
        from opacus.accountants import GaussianAccountant, PRVAccountant

        acc = PRVAccountant() if kind == "prv" else GaussianAccountant()
        set_accountant_history(acc, history)
        return float(acc.get_epsilon(delta=delta)), how
    except Exception as err:  # an accountant failing must never stop training
        logger.warning("could not compute ε of the measured history: %s", err)
        return math.nan, how


def epsilon_from_accountant(accountant, *, delta: float, noise_multiplier: float) -> float:
    """ε spent so far at ``delta``; ``inf`` without noise, ``nan`` (with a warning) if it fails.

    Args:
        accountant: an Opacus accountant (``privacy_engine.accountant``) or ``None``.
        delta: target δ.
        noise_multiplier: the optimizer's σ; ``0`` means no privacy, so ε is ``inf``.
    """
    if noise_multiplier <= 0:
        return math.inf
    if accountant is None or not accountant_history(accountant):
        return 0.0 if accountant is not None else math.nan
    try:
        return float(accountant.get_epsilon(delta=delta))
    except Exception as err:  # an accountant failing must never stop training
        logger.warning("could not compute epsilon from %s: %s", type(accountant).__name__, err)
        return math.nan


def epsilon_at_audit(accountant, *, delta: float, noise_multiplier: float) -> tuple[float, str]:
    """``(epsilon, method)`` of :func:`read_epsilon` (kept for callers that need only these)."""
    reading = read_epsilon(accountant, delta=delta, noise_multiplier=noise_multiplier)
    return reading.epsilon, reading.accountant
