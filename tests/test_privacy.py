"""ε at audit time: from the user's accountant, never a slow PRV query at tiny σ."""

import math

import pytest
from opacus.accountants import RDPAccountant

from conftest import imprint_model, make_private, train_steps
from opacus_dmaudit import DMAuditor
from opacus_dmaudit.privacy import PRV_MIN_SIGMA, epsilon_at_audit


def _prv_run(mnist5k, tmp_path, sigma):
    x, y = mnist5k["private"]
    model = imprint_model(mnist5k["prior"][0][:1000], num_bins=64)
    # Opacus's default accountant: PRV
    model, opt, loader, engine = make_private(model, x, y, sigma=sigma, accountant="prv")
    auditor = DMAuditor(
        privacy_engine=engine, log_dir=tmp_path, every_n_steps=2, metrics=("mse",)
    ).attach(opt)
    train_steps(model, opt, loader, 2)
    auditor.close()
    return engine, auditor.history[-1]


def test_prv_answers_at_ordinary_noise(mnist5k, tmp_path):
    engine, record = _prv_run(mnist5k, tmp_path, sigma=1.0)
    assert record["epsilon_accountant"] == "prv"
    assert record["epsilon"] == pytest.approx(engine.get_epsilon(1e-5))


def test_tiny_sigma_asks_rdp_about_the_same_history(mnist5k, tmp_path):
    engine, record = _prv_run(mnist5k, tmp_path, sigma=0.02)
    assert 0.02 < PRV_MIN_SIGMA
    assert record["epsilon_accountant"].startswith("rdp (prv too slow")
    rdp = RDPAccountant()
    rdp.history = list(engine.accountant.history)
    assert record["epsilon"] == pytest.approx(rdp.get_epsilon(1e-5))
    assert math.isfinite(record["epsilon"]) and record["epsilon"] > 1000


def test_no_noise_and_no_accountant():
    assert epsilon_at_audit(None, delta=1e-5, noise_multiplier=0.0)[0] == math.inf
    eps, method = epsilon_at_audit(None, delta=1e-5, noise_multiplier=1.0)
    assert math.isnan(eps) and method == "none"
