"""ε at audit time: from the user's accountant, never a slow PRV query at tiny σ."""

import logging
import math
import warnings

import pytest
from opacus.accountants import RDPAccountant

from opacus_dmaudit.privacy.accountant import (
    NO_GUARANTEE,
    PRV_MIN_SIGMA,
    epsilon_at_audit,
    epsilon_note,
    read_epsilon,
)
from tests.helpers import audited_run


def _prv_run(mnist5k, tmp_path, sigma):
    auditor, engine = audited_run(
        mnist5k,
        tmp_path,
        sigma=sigma,
        steps=2,
        every=2,
        block={"num_bins": 64},
        private={"accountant": "prv"},  # Opacus's default accountant
        metrics=("mse",),
        close=True,
    )
    return engine, auditor.history[-1]


def test_prv_answers_at_ordinary_noise(mnist5k, tmp_path):
    engine, record = _prv_run(mnist5k, tmp_path, sigma=1.0)
    assert record.epsilon_accountant == "prv"
    assert record.epsilon == pytest.approx(engine.get_epsilon(1e-5))


def test_tiny_sigma_asks_rdp_about_the_same_history(mnist5k, tmp_path):
    engine, record = _prv_run(mnist5k, tmp_path, sigma=0.02)
    assert 0.02 < PRV_MIN_SIGMA
    assert record.epsilon_accountant.startswith("rdp (prv too slow")
    rdp = RDPAccountant()
    rdp.history = list(engine.accountant.history)
    assert record.epsilon == pytest.approx(rdp.get_epsilon(1e-5))
    assert math.isfinite(record.epsilon) and record.epsilon > 1000
    # ε in context: flagged in the record and, as text, in TensorBoard
    assert NO_GUARANTEE in record.epsilon_note
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    texts = acc.Tensors("privacy/epsilon_note/text_summary")
    assert len(texts) == 1  # written once, when it first appeared
    assert NO_GUARANTEE in texts[0].tensor_proto.string_val[0].decode()


def test_rdp_epsilon_equals_opacus_and_its_warning_is_explained_once(caplog):
    """The user's RDP accountant: the same ε as Opacus, no Opacus warning, one explanation."""
    acc = RDPAccountant()
    acc.history = [(0.02, 0.064, 30)]
    with warnings.catch_warnings(record=True) as opacus_warned:
        warnings.simplefilter("always")
        expected = acc.get_epsilon(1e-5)
    assert any("smallest alpha" in str(w.message) for w in opacus_warned)
    explained: set[str] = set()
    with warnings.catch_warnings(record=True) as ours, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        readings = [
            read_epsilon(acc, delta=1e-5, noise_multiplier=0.02, explained=explained)
            for _ in range(3)
        ]
    assert not [w for w in ours if "alpha" in str(w.message)]  # never repeated per audit
    assert [r.epsilon for r in readings] == [expected] * 3
    assert readings[0].at_smallest_order and readings[0].rdp_order == min(acc.DEFAULT_ALPHAS)
    assert all(NO_GUARANTEE in r.note for r in readings)
    told = [r for r in caplog.records if "smallest RDP order" in r.getMessage()]
    assert len(told) == 1


def test_epsilon_note_flags_only_meaningless_epsilons():
    acc = RDPAccountant()
    acc.history = [(1.0, 0.064, 60)]
    ordinary = read_epsilon(acc, delta=1e-5, noise_multiplier=1.0)
    assert ordinary.note is None and not ordinary.at_smallest_order
    assert ordinary.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert epsilon_note(99.0) is None
    assert NO_GUARANTEE in epsilon_note(1.3e6) and "1.3e+06" in epsilon_note(1.3e6)
    assert NO_GUARANTEE in epsilon_note(math.inf)
    assert NO_GUARANTEE in epsilon_note(50.0, at_smallest_order=True)
    assert epsilon_note(math.nan) is None


def test_no_noise_and_no_accountant():
    assert epsilon_at_audit(None, delta=1e-5, noise_multiplier=0.0)[0] == math.inf
    eps, method = epsilon_at_audit(None, delta=1e-5, noise_multiplier=1.0)
    assert math.isnan(eps) and method == "none"
