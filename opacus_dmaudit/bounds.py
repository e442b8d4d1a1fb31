"""Reconstruction-robustness (ReRo) bounds: how likely *any* reconstruction attack can succeed.

A reconstruction "succeeds" when it meets a stated criterion (e.g. LPIPS ≤ η). ``κ`` is the
baseline: the success probability of the best attack that sees no gradient at all (``1/N`` when the
task is to single out one of ``N`` training images). DP bounds the success probability ``γ`` of an
attack on a sample that was trained on:

* one Gaussian step with per-step µ = 1/σ (exact trade-off curve): ``γ ≤ Φ(Φ⁻¹(κ) + µ)``;
* any (ε, δ) pair of the run's privacy profile: ``γ ≤ e^ε κ + δ``, minimised over ε (PLD/PRV);
* RDP of order α: ``γ ≤ (κ e^{ε_α})^{(α−1)/α}``, minimised over α;
* µ-GDP by the CLT for subsampled, composed runs: ``µ = q·sqrt(T(e^{1/σ²} − 1))``, then the
  Gaussian formula; an approximation, loose or even optimistic at small σ and few steps.

The GDP privacy profile ``δ(ε) = Φ(−ε/µ + µ/2) − e^ε Φ(−ε/µ − µ/2)`` gives the ε of a µ-GDP run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize
from scipy.stats import norm

__all__ = [
    "gdp_delta",
    "gdp_epsilon",
    "rero_gaussian",
    "rero_rdp",
    "rero_profile",
    "clt_mu",
    "run_bounds",
    "DEFAULT_ORDERS",
]

DEFAULT_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256)) + [512, 1024]


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
    if math.isinf(mu):
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
    if noise_multiplier <= 0:
        return math.inf
    try:
        return sample_rate * math.sqrt(steps * math.expm1(1.0 / noise_multiplier**2))
    except OverflowError:  # σ below ~0.038: e^{1/σ²} is beyond float range
        return math.inf


def _check_kappa(kappa: float) -> None:
    if not 0 < kappa < 1:
        raise ValueError(f"the baseline success rate kappa must be in (0, 1), got {kappa}")


def _prv_profile(noise_multiplier: float, sample_rate: float, steps: int):
    """The run's privacy profile from Opacus's PRV machinery: ``(eps grid, delta grid)``."""
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(noise_multiplier, sample_rate, steps)]
    dprv = acc._get_dprv(eps_error=0.01, delta_error=1e-9)
    t, p = dprv.domain.ts, dprv.pmf
    d1 = np.flip(np.flip(p).cumsum())
    d2 = np.flip(np.flip(p * np.exp(-t)).cumsum())
    with np.errstate(over="ignore", invalid="ignore"):
        delta = d1 - np.exp(t) * d2
    ok = np.isfinite(delta)
    # eps_error of the discretisation: shift ε up by it, so the bound stays an upper bound
    return t[ok] + 0.01, np.clip(delta[ok], 0, 1) + 1e-9


@functools.lru_cache(maxsize=32)
def _step_rdp(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one subsampled Gaussian step at ``DEFAULT_ORDERS`` (Opacus's analysis), cached:
    a run audits at one (q, σ) many times, and T steps compose to T times this curve."""
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=DEFAULT_ORDERS
    )
    rdp.flags.writeable = False
    return rdp


def run_bounds(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    kappa: float,
    profile: bool = True,
) -> dict[str, float | None]:
    """Every ReRo bound for a DP-SGD run so far (Poisson rate ``sample_rate``, ``steps`` steps).

    Returns ``{"single_step", "rdp", "profile", "clt_gdp"}``; ``profile`` is ``None`` when skipped
    or when the PRV accountant cannot handle the parameters (tiny σ).
    """
    _check_kappa(kappa)
    if noise_multiplier <= 0 or steps <= 0:
        full = 1.0 if noise_multiplier <= 0 else kappa
        return {"single_step": full, "rdp": full, "profile": full, "clt_gdp": full}
    rdp = _step_rdp(float(sample_rate), float(noise_multiplier)) * steps
    out: dict[str, float | None] = {
        "single_step": rero_gaussian(1.0 / noise_multiplier, kappa),
        "rdp": rero_rdp(kappa, DEFAULT_ORDERS, rdp),
        "profile": None,
        "clt_gdp": rero_gaussian(clt_mu(noise_multiplier, sample_rate, steps), kappa),
    }
    if profile and noise_multiplier >= 0.3:
        try:
            eps, delta = _prv_profile(noise_multiplier, sample_rate, steps)
            out["profile"] = rero_profile(kappa, eps, delta)
        except (RuntimeError, ValueError, MemoryError, OverflowError):
            out["profile"] = None
    return out
