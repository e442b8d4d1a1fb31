"""Is the noise drawn afresh at every step? The ``noise_freshness`` check.

The accountant composes T steps whose noise is independent. Noise drawn again from a generator
re-seeded at every step (``torch.Generator().manual_seed(0)`` inside the loop, a "reproducible"
``noise_generator`` reset per batch) has the right scale and shape, so the ``noise_scale`` and
``noise_shape`` checks pass, yet every step adds the *same* noise: it cancels out of the
difference of two updates, and the run is far less private than its ε.

The capture keeps the signs of the noise at :data:`~opacus_dmaudit.capture.mechanism.FINGERPRINT`
fixed coordinates of every audited step and of the step just before it. Fresh Gaussian noise
agrees in sign with any other step's at each coordinate with probability exactly 1/2 (whatever
the scale), so the number of agreements is Binomial(m, 1/2); reused noise agrees everywhere,
noise mixed with a share ρ of another step's agrees on about ``1/2 + arcsin(ρ)/π``. The audit
compares its signs with the step before it and with the audits kept by the run (``run.signs``:
resumed audits included), and fails when an agreement is impossible for independent noise
(two-sided exact binomial test, Bonferroni over the comparisons, :data:`FALSE_ALARM` in all).

Signs reveal little of the noise (one bit per coordinate, a thousand coordinates), so keeping
them in the audit log does not let its reader denoise the model's updates.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .entries import FALSE_ALARM, check

if TYPE_CHECKING:
    from ..capture.step import CapturedStep

__all__ = ["check_noise_freshness", "sign_agreement"]

#: Earlier audits compared with each audit (the most recent ones).
MAX_COMPARISONS = 64


def sign_agreement(a, b) -> tuple[int, int]:
    """``(agreements, positions)`` of two sign vectors over the positions known in both."""
    a, b = np.asarray(a, dtype=np.int8), np.asarray(b, dtype=np.int8)
    if a.shape != b.shape:
        return 0, 0
    known = (a != 0) & (b != 0)
    return int((a[known] == b[known]).sum()), int(known.sum())


def _p_value(agree: int, m: int) -> float:
    """Two-sided exact binomial p-value of ``agree`` agreements in ``m`` fair coin flips."""
    from scipy import stats

    low = float(stats.binom.cdf(agree, m, 0.5))
    high = float(stats.binom.sf(agree - 1, m, 0.5))
    return min(1.0, 2 * min(low, high))


def check_noise_freshness(captured: CapturedStep, run: Any = None) -> dict[str, Any] | None:
    """``fail`` when this step's noise agrees in sign with another step's more (or less) than
    independent noise can; ``None`` without signs to compare."""

    stats = (captured.mechanism or {}).get("noise")
    if not stats or stats.get("signs") is None or not stats["expected_std"] > 0:
        return None
    if stats["rounding_sq"] > 1e-4 * stats["sum_sq"]:
        return None  # the "noise" is float round-off of the sums, not noise
    mine = np.asarray(stats["signs"], dtype=np.int8)
    others: list[tuple[str, Any]] = []
    if stats.get("previous_signs") is not None:
        others.append((f"step {captured.step - 1}", stats["previous_signs"]))
    earlier = [(step, s) for step, s in (getattr(run, "signs", None) or []) if step < captured.step]
    for step, signs in earlier[-MAX_COMPARISONS:]:
        others.append((f"the audit of step {step}", signs))
    results = []
    for label, signs in others:
        agree, m = sign_agreement(mine, signs)
        if m >= 32:
            results.append((label, agree, m, _p_value(agree, m)))
    if not results:
        return None
    label, agree, m, p = min(results, key=lambda r: r[3])
    level = FALSE_ALARM / len(results)
    z = float(_z(level))
    detect = math.sin(math.pi * z * 0.5 / math.sqrt(m))  # sign correlation it detects
    share = agree / m
    detail = (
        f"the noise at {m} fixed coordinates agrees in sign with {label} on {share:.1%} of them "
        f"(fresh noise: 50% ± {100 * 0.5 / math.sqrt(m):.1f}%; {len(results)} comparison(s); "
        f"detects noise correlated at {detect:.2f})"
    )
    values = {"value": 2 * share - 1, "comparisons": len(results), "detectable": detect}
    if p < level:
        return check(
            "noise_freshness",
            "fail",
            detail + ": the noise is not drawn afresh at every step (a noise generator "
            "re-seeded at every step or reused?). Reused noise cancels between steps, so the run "
            "is far less private than its ε, which assumes independent noise at every step",
            p_value=p,
            **values,
        )
    return check("noise_freshness", "pass", detail, p_value=p, **values)


def _z(level: float) -> float:
    from scipy import stats

    return float(stats.norm.isf(level / 2))
