"""Privacy numbers read from the user's Opacus accountant, safely and cheaply."""

from __future__ import annotations

import logging
import math

__all__ = [
    "epsilon_from_accountant",
    "epsilon_at_audit",
    "steps_from_accountant",
    "sample_rate_from_accountant",
    "PRV_MIN_SIGMA",
]

#: Below this noise multiplier Opacus's PRV accountant takes seconds to minutes per query (8 s at
#: σ = 0.1, 45 s at σ = 0.01 for 60 steps on 2 cores); the auditor then asks RDP about the same
#: history instead (about 12 ms, a valid upper bound, looser than PRV).
PRV_MIN_SIGMA = 0.3

logger = logging.getLogger(__name__)


def _history(accountant) -> list:
    return list(getattr(accountant, "history", None) or [])


def steps_from_accountant(accountant) -> int:
    """Optimizer steps the accountant has recorded (its history holds ``(σ, q, steps)`` entries)."""
    return int(sum(entry[2] for entry in _history(accountant)))


def sample_rate_from_accountant(accountant) -> float | None:
    """Sampling rate of the most recent step, or ``None`` before any step."""
    history = _history(accountant)
    return float(history[-1][1]) if history else None


def epsilon_from_accountant(accountant, *, delta: float, noise_multiplier: float) -> float:
    """ε spent so far at ``delta``; ``inf`` without noise, ``nan`` (with a warning) if it fails.

    Args:
        accountant: an Opacus accountant (``privacy_engine.accountant``) or ``None``.
        delta: target δ.
        noise_multiplier: the optimizer's σ; ``0`` means no privacy, so ε is ``inf``.
    """
    if noise_multiplier <= 0:
        return math.inf
    if accountant is None or not _history(accountant):
        return 0.0 if accountant is not None else math.nan
    try:
        return float(accountant.get_epsilon(delta=delta))
    except Exception as err:  # an accountant failing must never stop training
        logger.warning("could not compute epsilon from %s: %s", type(accountant).__name__, err)
        return math.nan


def epsilon_at_audit(accountant, *, delta: float, noise_multiplier: float) -> tuple[float, str]:
    """ε for an audit record, cheaply, and how it was computed.

    The user's accountant answers, except a PRV accountant at σ below :data:`PRV_MIN_SIGMA`, where
    an RDP accountant with the same history answers in milliseconds instead of seconds.

    Returns:
        ``(epsilon, method)`` with ``method`` like ``"prv"``, ``"rdp"`` or
        ``"rdp (prv too slow below sigma 0.3)"``.
    """
    name = type(accountant).__name__.replace("Accountant", "").lower() if accountant else "none"
    if noise_multiplier <= 0 or accountant is None:
        return epsilon_from_accountant(
            accountant, delta=delta, noise_multiplier=noise_multiplier
        ), name
    if name == "prv" and noise_multiplier < PRV_MIN_SIGMA:
        from opacus.accountants import RDPAccountant

        rdp = RDPAccountant()
        rdp.history = _history(accountant)
        eps = epsilon_from_accountant(rdp, delta=delta, noise_multiplier=noise_multiplier)
        return eps, f"rdp (prv too slow below sigma {PRV_MIN_SIGMA})"
    return epsilon_from_accountant(accountant, delta=delta, noise_multiplier=noise_multiplier), name
