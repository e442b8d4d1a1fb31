"""AuditPipeline.run on steps captured from real Opacus training: checks gate a scored record."""

import json
import math

import pytest
import torch

from opacus_dmaudit.capture.hooks import GradientCapture
from opacus_dmaudit.config import AuditConfig
from opacus_dmaudit.pipeline import AuditPipeline
from opacus_dmaudit.record import AuditRecord
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


# -- partial records, never silence --------------------------------------------------------------
def _audited(mnist5k, tmp_path, model_kind="imprint", *, steps=2, batches=None, **kwargs):
    """A short audited run; ``batches`` replaces the loader's batches (dicts, tuples...)."""
    from opacus_dmaudit import DMAuditor
    from tests.helpers import private_training

    x, y = mnist5k["private"]
    torch.manual_seed(0)
    if model_kind == "imprint":
        model = imprint_model(mnist5k["prior"][0][:1000], num_bins=128)
    else:
        model = small_cnn()
    p = private_training(model, x, y, sigma=kwargs.pop("sigma", 0.01))
    kwargs.setdefault("metrics", ("mse",))
    auditor = DMAuditor(privacy_engine=p.engine, log_dir=tmp_path, every_n_steps=steps,
                        tensorboard=False, report=False, save_images=False, **kwargs)  # fmt: skip
    return auditor, p


def test_a_failing_prior_leaves_the_raw_readout_and_every_check(mnist5k, tmp_path, caplog):
    """A prior that raises (out of memory) costs the DM stage of that audit, nothing else."""
    auditor, p = _audited(mnist5k, tmp_path, prior="embedded:mnist", prior_fit_public=0)
    auditor.attach(p.optimizer)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    auditor.prior.unet.forward = out_of_memory
    train_steps(p.model, p.optimizer, p.loader, 4, criterion=p.criterion)
    auditor.close()
    assert [r.step for r in auditor.history] == [2, 4]  # never "no audit was recorded"
    for record in auditor.history:
        assert record.failed_stages == ["prior"], record.stage_errors
        assert "out of memory" in record.stage_errors[0]["error"]
        assert record.mean("mse", "raw") is not None and "dm" not in record.success
        assert MECHANISM <= set(_statuses(record)) and record.valid is True
        assert record.epsilon_measured is not None and record.privacy_measured is not None
    warned = [r for r in caplog.records if "audit stage 'prior' failed" in r.getMessage()]
    assert len(warned) == 1  # once per stage, not per audit
    on_disk = AuditRecord.from_json(
        json.loads((tmp_path / "audit.jsonl").read_text().split("\n")[0])
    )
    assert on_disk.failed_stages == ["prior"]


def test_a_failing_metric_leaves_the_mechanism_checks_and_measured_epsilon(
    mnist5k, tmp_path, monkeypatch
):
    from opacus_dmaudit.score import metrics

    auditor, p = _audited(mnist5k, tmp_path)
    auditor.attach(p.optimizer)

    def broken(pred, target):
        raise ValueError("metric exploded")

    monkeypatch.setattr(metrics, "mse", broken)
    train_steps(p.model, p.optimizer, p.loader, 2, criterion=p.criterion)
    auditor.close()
    (record,) = auditor.history
    assert record.failed_stages == ["metrics"], record.stage_errors
    assert MECHANISM <= set(_statuses(record)) and record.epsilon_measured is not None


@pytest.mark.parametrize("public", ["NaN pixels", "too few images"])
def test_shadow_public_images_that_cannot_work_are_refused_at_attach(mnist5k, tmp_path, public):
    images = mnist5k["prior"][0][:500].clone()
    if public == "NaN pixels":
        images[3, 0, 5, 5] = float("nan")
    else:
        images = images[:20]  # fewer than the 128 bins they must calibrate
    auditor, p = _audited(mnist5k, tmp_path, "cnn", shadow=True, public=images)
    with pytest.raises(ValueError, match="public= images cannot calibrate the shadow"):
        auditor.attach(p.optimizer, model=p.model)
    assert not (tmp_path / "audit.jsonl").exists()


class _MLP(torch.nn.Module):
    """A model of flat (B, 784) inputs, or of a dict/tuple batch."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.net = torch.nn.Sequential(torch.nn.Linear(784, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 10))  # fmt: skip

    def forward(self, batch):
        if self.kind == "dict":
            batch = batch["features"]
        elif self.kind == "tuple":
            batch = batch[1]
        return self.net(batch.reshape(len(batch), -1))


@pytest.mark.parametrize("kind", ["flat (B, 784)", "dict", "tuple"])
def test_a_batch_shadow_cannot_simulate_gives_mechanism_only_audits(
    mnist5k, tmp_path, caplog, kind
):
    from opacus_dmaudit import DMAuditor
    from tests.helpers import private_training

    x, y = mnist5k["private"]
    torch.manual_seed(0)
    flat = x.reshape(len(x), -1)
    p = private_training(_MLP(kind.split()[0]), flat, y, sigma=1.0)
    auditor = DMAuditor(privacy_engine=p.engine, log_dir=tmp_path, every_n_steps=2, shadow=True,
                        public=mnist5k["prior"][0][:500], metrics=("mse",), tensorboard=False,
                        report=False, save_images=False)  # fmt: skip
    auditor.attach(p.optimizer, model=p.model)
    batches = iter(p.loader)
    for _ in range(4):
        xb, yb = next(batches)
        batch = {"features": xb} if kind == "dict" else (yb, xb) if kind == "tuple" else xb
        p.optimizer.zero_grad()
        torch.nn.functional.cross_entropy(p.model(batch), yb).backward()
        p.optimizer.step()
    auditor.close()
    assert len(auditor.history) == 2
    for record in auditor.history:
        assert record.mode == "mechanism" and record.failed_stages == ["shadow"]
        assert MECHANISM <= set(_statuses(record)) and record.valid is True
        assert "(0,)" not in record.stage_errors[0]["error"]
    (warning,) = [r for r in caplog.records if "audit stage 'shadow' failed" in r.getMessage()]
    assert "checks the mechanism only" in warning.getMessage()


def test_attach_without_block_or_model_runs_the_mechanism_checks(mnist5k, tmp_path):
    auditor, p = _audited(mnist5k, tmp_path, "cnn", sigma=1.0)
    auditor.attach(p.optimizer)  # no ImprintBlock, no model=
    train_steps(p.model, p.optimizer, p.loader, 2, criterion=p.criterion)
    auditor.close()
    (record,) = auditor.history
    assert auditor.mode == "mechanism" and record.mode == "mechanism"
    assert MECHANISM <= set(_statuses(record)) and record.valid is True
    assert record.batch_size is not None and record.epsilon_measured is not None
