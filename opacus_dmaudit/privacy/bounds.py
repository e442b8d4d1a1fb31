"""Reconstruction-robustness (ReRo) bounds: how likely *any* reconstruction attack can succeed.

A reconstruction "succeeds" when it meets a stated criterion (e.g. LPIPS ≤ η). ``κ`` is the
baseline: the success probability of the best attack that sees no gradient at all, *at the same
criterion* (see :mod:`.baseline`; ``1/N`` exactly for "name the right one of N candidates"). DP
bounds the success probability ``γ`` of an attack on a sample that was trained on:

* one Gaussian step with per-step µ = 1/σ (exact trade-off curve): ``γ ≤ Φ(Φ⁻¹(κ) + µ)``;
* any (ε, δ) pair of the run's privacy profile: ``γ ≤ e^ε κ + δ``, minimised over ε (PLD/PRV);
* RDP of order α: ``γ ≤ (κ e^{ε_α})^{(α−1)/α}``, minimised over α;
* µ-GDP by the central limit theorem for subsampled, composed runs:
  ``µ = sqrt(Σ_i T_i q_i² (e^{1/σ_i²} − 1))`` over the accountant's history, then the Gaussian
  formula; an *approximation*, loose or even optimistic at small σ and few steps.

Two events, two functions: :func:`step_bounds` bounds the success of an attack on the step an
audit reads (what the per-audit success rate measures, given that the image was in that batch);
:func:`run_bounds` bounds an attack that may use any step of the whole run so far (subsampled and
composed over the accountant's real history of ``(σ, q, steps)`` entries).

The GDP privacy profile ``δ(ε) = Φ(−ε/µ + µ/2) − e^ε Φ(−ε/µ − µ/2)`` gives the ε of a µ-GDP run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize
from scipy.stats import norm

from .._opacus import prv_loss_distribution
from .accountant import PRV_MIN_SIGMA, step_rdp

__all__ = [
    "gdp_delta",
    "gdp_epsilon",
    "rero_gaussian",
    "rero_rdp",
    "rero_profile",
    "clt_mu",
    "clt_mu_history",
    "step_bounds",
    "run_bounds",
    "History",
    "DEFAULT_ORDERS",
]

DEFAULT_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256)) + [512, 1024]

#: An accountant's history: ``(noise_multiplier, sample_rate, steps)`` entries, oldest first.
History = Sequence[tuple[float, float, int]]


def gdp_delta(mu: float, eps: float) -> float:
    """δ(ε) of µ-GDP."""
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    # e^ε·Φ(-ε/µ - µ/2) in log space: large µ (tiny σ) needs large ε, where e^ε overflows
    tail = math.exp(eps + float(norm.logcdf(-eps / mu - mu / 2)))
    return float(norm.cdf(-eps / mu + mu / 2) - tail)


def gdp_epsilon(mu: float, delta: float) -> float:
    """The ε at which µ-GDP has ``δ(ε) = delta`` (``inf`` for µ = ∞, 0 if δ(0) ≤ delta)."""
    if math.isinf(mu):
        return math.inf
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(mu, hi) > delta:
        hi *= 2
    return float(optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, hi, xtol=1e-12))


def rero_gaussian(mu: float, kappa: float) -> float:
    """``Φ(Φ⁻¹(κ) + µ)``: the exact ReRo bound of one Gaussian mechanism with SNR µ."""
    _check_kappa(kappa)
    if math.isinf(mu) or kappa >= 1:
        return 1.0
    return float(norm.cdf(norm.ppf(kappa) + mu))


def rero_rdp(kappa: float, orders: Sequence[float], rdp: Sequence[float]) -> float:
    """``min_α (κ e^{ε_α})^{(α−1)/α}`` over the given RDP curve (capped at 1)."""
    _check_kappa(kappa)
    best = 1.0
    for alpha, eps in zip(orders, rdp):
        if alpha <= 1 or not math.isfinite(eps):
            continue
        log_bound = (alpha - 1) / alpha * (math.log(kappa) + eps)
        best = min(best, math.exp(min(log_bound, 0.0)))
    return best


def rero_profile(kappa: float, eps: np.ndarray, delta: np.ndarray) -> float:
    """``min_ε (e^ε κ + δ(ε))`` over a privacy profile sampled at ``eps`` (ε ≥ 0 only)."""
    _check_kappa(kappa)
    eps, delta = np.asarray(eps, dtype=float), np.asarray(delta, dtype=float)
    keep = eps >= 0
    if not keep.any():
        return 1.0
    return float(min(1.0, np.min(np.exp(eps[keep]) * kappa + np.clip(delta[keep], 0, 1))))


def clt_mu(noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """µ of the CLT µ-GDP approximation of ``steps`` Poisson-subsampled Gaussian steps."""
    return clt_mu_history([(noise_multiplier, sample_rate, steps)])


def clt_mu_history(history: History) -> float:
    """µ of the CLT µ-GDP approximation of a whole history: ``sqrt(Σ T_i q_i² (e^{1/σ_i²} − 1))``.

    µ² adds up over composed steps, so entries with different σ or q each contribute their own
    share. An approximation (Bu et al. 2020), not a bound.
    """
    total = 0.0
    for sigma, q, steps in history:
        if steps <= 0:
            continue
        if sigma <= 0:
            return math.inf
        try:
            total += steps * q**2 * math.expm1(1.0 / sigma**2)
        except OverflowError:  # σ below ~0.038: e^{1/σ²} is beyond float range
            return math.inf
    return math.sqrt(total) if math.isfinite(total) else math.inf


def _check_kappa(kappa: float) -> None:
    if not 0 < kappa <= 1:
        raise ValueError(
            f"the baseline success rate kappa must be in (0, 1], got {kappa}: pass the success "
            "rate of a guess made without the gradient"
        )


def _prv_profile(history: tuple[tuple[float, float, int], ...]):
    """The run's privacy profile from Opacus's PRV machinery: ``(eps grid, delta grid)``."""
    t, p = prv_loss_distribution(history, eps_error=0.01, delta_error=1e-9)
    d1 = np.flip(np.flip(p).cumsum())
    d2 = np.flip(np.flip(p * np.exp(-t)).cumsum())
    with np.errstate(over="ignore", invalid="ignore"):
        delta = d1 - np.exp(t) * d2
    ok = np.isfinite(delta)
    # eps_error of the discretisation: shift ε up by it, so the bound stays an upper bound
    return t[ok] + 0.01, np.clip(delta[ok], 0, 1) + 1e-9


def _history(
    history: History | None, noise_multiplier: float | None, sample_rate: float | None, steps
) -> list[tuple[float, float, int]]:
    if history is not None:
        if noise_multiplier is not None or sample_rate is not None or steps is not None:
            raise ValueError("give either history or (noise_multiplier, sample_rate, steps)")
        return [(float(s), float(q), int(t)) for s, q, t in history if int(t) > 0]
    if noise_multiplier is None or sample_rate is None or steps is None:
        raise ValueError("give history, or noise_multiplier, sample_rate and steps")
    return [(float(noise_multiplier), float(sample_rate), int(steps))] if steps > 0 else []


def step_bounds(
    *,
    noise_multiplier: float,
    kappa: float | None,
    mu_measured: float | None = None,
    candidates: int | None = None,
) -> dict[str, float]:
    """Bounds on the success of an attack on *one* step, the one an audit reads.

    Args:
        noise_multiplier: σ of that step (per-step µ = 1/σ; ``0``: no noise, every bound is 1).
        kappa: baseline success rate at the audit's success criterion (``None``: no
            ``single_step`` bound).
        mu_measured: the imprint's measured effective per-step µ, if known.
        candidates: N, the number of real images a reconstruction must single out its own image
            from (the identification criterion, where κ = 1/N exactly).

    Returns:
        ``{"single_step": Φ(Φ⁻¹(κ) + 1/σ)}``, plus ``"estimate_at_measured_mu"`` and
        ``"single_step_identification"`` (``Φ(Φ⁻¹(1/N) + 1/σ)``) when their inputs are given.

        ``estimate_at_measured_mu`` is ``Φ(Φ⁻¹(κ) + µ̂)`` at the imprint's measured per-step µ̂:
        a plug-in *estimate* of what an attack through this imprint reaches, **not a bound**.
        µ̂ is the mean separation of the member scores, and members differ: a sample whose
        clipped contribution is larger than average has a larger SNR, so the best attack on
        such samples beats it (measured: 0.169 against 0.164). A bound would need each member's
        own SNR, which one score per member cannot estimate; ``single_step`` (µ = 1/σ, the
        largest SNR clipping allows) is the bound.
    """
    mu = 1.0 / noise_multiplier if noise_multiplier > 0 else math.inf
    out: dict[str, float] = {}
    if kappa is not None:
        out["single_step"] = rero_gaussian(mu, kappa)
        if mu_measured is not None and math.isfinite(mu_measured) and mu_measured >= 0:
            out["estimate_at_measured_mu"] = rero_gaussian(float(mu_measured), kappa)
    if candidates is not None and candidates >= 1:
        out["single_step_identification"] = rero_gaussian(mu, 1.0 / candidates)
    return out


def run_bounds(
    *,
    kappa: float,
    history: History | None = None,
    noise_multiplier: float | None = None,
    sample_rate: float | None = None,
    steps: int | None = None,
    profile: bool = True,
) -> dict[str, float | None]:
    """ReRo bounds for an attack that may use any step of a DP-SGD run so far.

    Args:
        kappa: baseline success rate at the success criterion.
        history: the accountant's ``(σ, q, steps)`` entries (``accountant.history``); or give one
            constant ``noise_multiplier``, ``sample_rate`` and ``steps`` instead.
        profile: also compute the PRV privacy-profile bound (skipped below
            :data:`~opacus_dmaudit.privacy.accountant.PRV_MIN_SIGMA`).

    Returns:
        ``{"rdp", "profile", "clt_gdp_approx"}``: the RDP bound, the privacy-profile bound
        (``None`` when skipped or when the PRV accountant cannot handle the parameters), and the
        CLT µ-GDP value (an approximation, not a bound).
    """
    _check_kappa(kappa)
    entries = _history(history, noise_multiplier, sample_rate, steps)
    if any(sigma <= 0 for sigma, _, _ in entries):
        return {"rdp": 1.0, "profile": 1.0, "clt_gdp_approx": 1.0}
    if not entries:
        return {"rdp": kappa, "profile": kappa, "clt_gdp_approx": kappa}
    rdp = sum(step_rdp(q, sigma, tuple(DEFAULT_ORDERS)) * t for sigma, q, t in entries)
    out: dict[str, float | None] = {
        "rdp": rero_rdp(kappa, DEFAULT_ORDERS, rdp),
        "profile": None,
        "clt_gdp_approx": rero_gaussian(clt_mu_history(entries), kappa),
    }
    if profile and min(sigma for sigma, _, _ in entries) >= PRV_MIN_SIGMA:
        try:
            eps, delta = _prv_profile(tuple(entries))
            out["profile"] = rero_profile(kappa, eps, delta)
        except (RuntimeError, ValueError, MemoryError, OverflowError):
            out["profile"] = None
    return out
