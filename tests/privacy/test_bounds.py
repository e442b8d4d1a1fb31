"""ReRo bounds and GDP conversions against reference values computed outside the package.

µ-GDP: δ(ε) = Φ(−ε/µ + µ/2) − e^ε·Φ(−ε/µ − µ/2), so ε(δ = 1e-5) is 1.993, 4.377, 9.997 at
µ = 0.5, 1, 2. ReRo of one Gaussian step with baseline success κ: γ ≤ Φ(Φ⁻¹(κ) + µ), so
0.005541, 0.06177, 0.2946 at κ = 1/5000 and µ = 1, 2, 3.
"""

import math

import pytest

from opacus_dmaudit.privacy.bounds import (
    DEFAULT_ORDERS,
    clt_mu,
    clt_mu_history,
    gdp_delta,
    gdp_epsilon,
    rero_gaussian,
    rero_profile,
    rero_rdp,
    run_bounds,
    step_bounds,
)


@pytest.mark.parametrize("mu,eps", [(0.5, 1.993), (1.0, 4.377), (2.0, 9.997)])
def test_gdp_epsilon_reference(mu, eps):
    assert gdp_epsilon(mu, 1e-5) == pytest.approx(eps, abs=5e-4)
    assert gdp_delta(mu, gdp_epsilon(mu, 1e-5)) == pytest.approx(1e-5, rel=1e-6)


@pytest.mark.parametrize("mu,gamma", [(1.0, 0.005541), (2.0, 0.06177), (3.0, 0.2946)])
def test_rero_single_gaussian_reference(mu, gamma):
    assert rero_gaussian(mu, 1 / 5000) == pytest.approx(gamma, rel=5e-4)


def test_edge_cases():
    assert rero_gaussian(0.0, 0.01) == pytest.approx(0.01)  # no signal: the baseline
    assert rero_gaussian(math.inf, 0.01) == 1.0
    assert gdp_epsilon(math.inf, 1e-5) == math.inf
    assert clt_mu(0.0, 0.1, 10) == math.inf
    assert rero_gaussian(1.0, 1.0) == 1.0  # a guess that always succeeds: nothing to bound
    with pytest.raises(ValueError, match="kappa"):
        rero_gaussian(1.0, 0.0)
    no_noise = run_bounds(noise_multiplier=0.0, sample_rate=0.1, steps=10, kappa=0.001)
    assert set(no_noise.values()) == {1.0}


def test_rdp_and_profile_bounds_are_valid_and_ordered():
    kappa = 1 / 1000
    b = run_bounds(noise_multiplier=1.0, sample_rate=0.064, steps=60, kappa=kappa)
    for name in ("rdp", "profile"):
        assert kappa < b[name] < 1
    # the privacy profile is the tight (ε, δ) description: never looser than the RDP conversion
    assert b["profile"] <= b["rdp"] * 1.01
    # more steps can only raise a run-level bound
    later = run_bounds(noise_multiplier=1.0, sample_rate=0.064, steps=600, kappa=kappa)
    assert later["rdp"] >= b["rdp"] and later["profile"] >= b["profile"]


def test_run_bounds_rdp_equals_opacus_rdp_of_the_whole_run():
    """The cached per-step curve times T is exactly Opacus's RDP of T steps (audits reuse it)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    for q, sigma, steps in (
        (0.256, 0.02, 150),
        (0.064, 1.0, 60),
        (0.004, 0.7, 37),
        (0.064, 1.0, 7),
    ):
        rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=DEFAULT_ORDERS)
        b = run_bounds(
            noise_multiplier=sigma, sample_rate=q, steps=steps, kappa=1e-3, profile=False
        )
        assert b["rdp"] == rero_rdp(1e-3, DEFAULT_ORDERS, rdp)


def test_profile_bound_of_a_gaussian_profile_equals_the_tradeoff_bound():
    """For an exactly µ-GDP profile, min_ε e^ε κ + δ(ε) is Φ(Φ⁻¹(κ) + µ) (the trade-off curve)."""
    import numpy as np

    for mu in (1.0, 2.0):
        eps = np.linspace(0, 30, 30001)
        delta = np.array([gdp_delta(mu, e) for e in eps])
        assert rero_profile(1 / 5000, eps, delta) == pytest.approx(
            rero_gaussian(mu, 1 / 5000), rel=1e-3
        )


def test_rdp_bound_of_a_gaussian_mechanism():
    """One Gaussian step has ε_α = α µ²/2; the RDP bound is valid but above the exact one."""
    mu, kappa = 2.0, 1 / 5000
    orders = [1 + i / 100 for i in range(1, 5000)]
    bound = rero_rdp(kappa, orders, [a * mu**2 / 2 for a in orders])
    assert rero_gaussian(mu, kappa) < bound < 1


def test_run_bounds_compose_the_accountants_real_history():
    """σ and q changed mid-run: each entry composes at its own (σ, q), not at the latest ones."""
    from opacus.accountants.analysis.rdp import compute_rdp

    history = [(1.0, 0.064, 40), (0.5, 0.128, 10), (2.0, 0.032, 50)]
    b = run_bounds(kappa=1e-3, history=history)
    rdp = sum(
        compute_rdp(q=q, noise_multiplier=s, steps=t, orders=DEFAULT_ORDERS) for s, q, t in history
    )
    assert b["rdp"] == pytest.approx(rero_rdp(1e-3, DEFAULT_ORDERS, rdp), rel=1e-12)
    latest = run_bounds(kappa=1e-3, noise_multiplier=2.0, sample_rate=0.032, steps=100)
    assert b["rdp"] > latest["rdp"] and b["profile"] > latest["profile"]  # the σ = 0.5 steps count
    # µ² adds up over entries; one entry is the classic formula
    assert clt_mu_history(history) == pytest.approx(
        math.sqrt(sum(clt_mu(s, q, t) ** 2 for s, q, t in history)), rel=1e-12
    )
    assert b["clt_gdp_approx"] == pytest.approx(rero_gaussian(clt_mu_history(history), 1e-3))
    # a history entry below the profile's σ range skips the profile, never the other bounds
    small = run_bounds(kappa=1e-3, history=[(1.0, 0.064, 10), (0.1, 0.064, 1)])
    assert small["profile"] is None and 0 < small["rdp"] <= 1
    with pytest.raises(ValueError, match="either history"):
        run_bounds(kappa=1e-3, history=history, noise_multiplier=1.0)


def test_the_clt_value_is_an_approximation_below_a_valid_bound():
    """The CLT µ-GDP value can sit below the (valid) privacy-profile bound: not a bound itself."""
    b = run_bounds(noise_multiplier=0.5, sample_rate=0.01, steps=10, kappa=1e-3)
    assert b["clt_gdp_approx"] < b["profile"] <= b["rdp"]


def test_step_bounds_are_the_audited_steps_own_event():
    b = step_bounds(noise_multiplier=0.5, kappa=0.05, mu_measured=0.7, candidates=64)
    assert b["single_step"] == pytest.approx(rero_gaussian(2.0, 0.05))
    assert b["estimate_at_measured_mu"] == pytest.approx(rero_gaussian(0.7, 0.05))
    assert b["single_step_identification"] == pytest.approx(rero_gaussian(2.0, 1 / 64))
    assert step_bounds(noise_multiplier=0.5, kappa=None) == {}
    assert set(step_bounds(noise_multiplier=0.0, kappa=0.1, candidates=8).values()) == {1.0}
