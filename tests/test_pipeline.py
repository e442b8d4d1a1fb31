"""AuditPipeline.run on steps captured from real Opacus training: checks gate a scored record."""

import math

import pytest
import torch

from opacus_dmaudit.capture.hooks import GradientCapture
from opacus_dmaudit.config import AuditConfig
from opacus_dmaudit.pipeline import AuditPipeline
from tests.helpers import imprint_model, make_private, small_cnn, train_steps

MECHANISM = {"noise_scale", "noise_shape", "clipping", "sampling", "accountant"}


def _capture_one_step(model, x, y, *, sigma, shadow=False):
    """One DP-SGD step captured as the auditor captures it (with the mechanism statistics)."""
    model, opt, loader, engine = make_private(model, x, y, sigma=sigma)
    steps = []
    GradientCapture(
        opt,
        model=model if shadow else None,
        should_capture=lambda s: True,
        on_capture=steps.append,
        mechanism=True,
        accountant=engine.accountant,
    ).attach()
    train_steps(model, opt, loader, 1)
    (captured,) = steps
    return captured, opt, engine


def _pipeline(config, generator=None):
    generator = generator or torch.Generator().manual_seed(0)
    return AuditPipeline(config=config, prior=None, lpips=None, generator=generator)


def _statuses(record):
    return {c.name: c.status for c in record.checks}


def _imprint_audit(mnist5k, *, scale=1.0, sigma=0.01):
    x, y = mnist5k["private"]
    model = imprint_model(mnist5k["prior"][0][:1000], num_bins=128)
    block = model[0]
    captured, opt, engine = _capture_one_step(model, x * scale, y, sigma=sigma)
    pipeline = _pipeline(AuditConfig(metrics=("mse",)))
    pipeline.prepare(block, mode="imprint")
    result = pipeline.run(
        captured,
        accountant=engine.accountant,
        mode="imprint",
        expected_batch_size=opt.expected_batch_size,
    )
    return result, engine


def test_a_captured_step_becomes_a_valid_checked_and_scored_record(mnist5k):
    result, engine = _imprint_audit(mnist5k)
    record = result.record
    assert record.step == 1 and record.mode == "imprint"
    statuses = _statuses(record)
    assert {"value_range", "blind"} | MECHANISM <= set(statuses)
    assert set(statuses.values()) == {"pass"}, record.checks
    assert record.valid is True
    assert record.epsilon == pytest.approx(engine.get_epsilon(record.delta))
    assert record.noise_multiplier == 0.01 and record.mu_step == pytest.approx(100)
    assert record.counts.lone_found == record.counts.lone_in_batch >= 30
    lone = [im for im in record.images if im.true_count == 1]
    assert len(lone) == record.counts.lone_found
    for im in lone:  # σ·‖x‖ ≈ 0.1 per pixel: predicted and measured noise agree
        assert 0.5 < im.residual_std_raw / im.noise_std < 2, im
    assert result.truth.shape == result.raw.shape
    assert result.truth.shape[0] == len(record.images)
    assert result.dm is None


def test_a_failed_check_makes_the_record_invalid(mnist5k):
    result, _ = _imprint_audit(mnist5k, scale=255.0)  # 0..255 pixels into a [0, 1] block
    record = result.record
    assert _statuses(record)["value_range"] == "fail"
    assert record.valid is False


def test_shadow_mode_simulates_the_imprint_adversary_on_the_real_batch(mnist5k):
    x, y = mnist5k["private"]
    torch.manual_seed(0)
    captured, opt, engine = _capture_one_step(small_cnn(), x, y, sigma=0.0, shadow=True)
    assert captured.imprint is None  # the model has no imprint layer
    generator = torch.Generator().manual_seed(0)
    config = AuditConfig(metrics=("mse",), shadow=True, public=mnist5k["prior"][0][:500])
    pipeline = _pipeline(config, generator)
    pipeline.prepare(None, mode="shadow")
    before = generator.get_state()
    result = pipeline.run(
        captured,
        accountant=engine.accountant,
        mode="shadow",
        expected_batch_size=opt.expected_batch_size,
    )
    record = result.record
    assert record.mode == "shadow" and record.valid is True
    assert set(_statuses(record).values()) == {"pass"}, record.checks
    assert record.epsilon == math.inf  # σ = 0
    assert record.counts.lone_found == record.counts.lone_in_batch >= 30
    lone = [im for im in record.images if im.true_count == 1]
    assert (
        lone and max(im.metric("mse", "raw") for im in lone) < 1e-12
    )  # the real batch, read exactly
    assert not torch.equal(before, generator.get_state())  # the simulation drew from it
    assert captured.imprint is None  # the captured step itself is left as it was


def test_without_imprint_or_shadow_only_the_mechanism_is_checked(mnist5k):
    x, y = mnist5k["private"]
    torch.manual_seed(0)
    captured, opt, engine = _capture_one_step(small_cnn(), x, y, sigma=1.0, shadow=True)
    pipeline = _pipeline(AuditConfig(metrics=("mse",)))
    pipeline.prepare(None, mode="mechanism")
    record = pipeline.run(
        captured,
        accountant=engine.accountant,
        mode="mechanism",
        expected_batch_size=opt.expected_batch_size,
    ).record
    assert MECHANISM <= set(_statuses(record)) and record.valid is True
    assert record.images == [] and record.success == {} and record.counts is None
    assert "found_singletons" not in record.to_json()  # on disk: no readout counts
