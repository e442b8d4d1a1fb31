"""Privacy numbers read from the user's Opacus accountant, safely and cheaply."""

from __future__ import annotations

import logging
import math

__all__ = ["epsilon_from_accountant", "steps_from_accountant", "sample_rate_from_accountant"]

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
