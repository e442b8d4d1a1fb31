"""The run's ε measured beside the accountant's, on real Opacus runs: correct runs agree, injected
bugs are outside the interval, the pooled evidence survives a resume, the trade-off picture."""

import contextlib
import json
import logging
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from opacus_dmaudit import DMAuditor, read_audit_log
from opacus_dmaudit._opacus import scaled_noise
from opacus_dmaudit.privacy.accountant import epsilon_of_history
from opacus_dmaudit.privacy.measured import RunEvidence, measured_epsilon
from opacus_dmaudit.privacy.reaccount import rescaled_epsilons
from opacus_dmaudit.privacy.tradeoff import auroc, gaussian_tradeoff, roc_points, tpr_at_fpr
from tests.helpers import imprint_model, private_training, small_cnn, train_steps


@pytest.fixture(scope="module")
def digits(mnist5k):
    """All 5000 digits of MNIST-5k: enough samples for q̂ to within about 1 %."""
    x = torch.cat([mnist5k["private"][0], mnist5k["prior"][0]])
    y = torch.cat([mnist5k["private"][1], mnist5k["prior"][1]])
    return x, y


def _clip_at(opt, factor):
    """Clip at factor·C while the noise stays σC (what the accountant believes)."""
    original = opt.clip_and_accumulate

    def clip():
        bound = opt.max_grad_norm
        opt.max_grad_norm = bound * factor
        try:
            original()
        finally:
            opt.max_grad_norm = bound

    opt.clip_and_accumulate = clip


def _measured_run(tmp_path, digits, *, bug=None, steps, every=5, accountant="rdp", seed=0):
    x, y = digits
    torch.manual_seed(seed)
    p = private_training(small_cnn(), x, y, sigma=1.0, batch_size=250, accountant=accountant,
                         poisson_sampling=True)  # fmt: skip
    if bug == "clipping at 1.1 C":
        _clip_at(p.optimizer, 1.1)
    if bug == "sampler at twice the rate":
        p.loader.batch_sampler.sample_rate *= 2
    auditor = DMAuditor(privacy_engine=p.engine, log_dir=tmp_path, every_n_steps=every,
                        metrics=("mse",), tensorboard=False, report=False, save_images=False)  # fmt: skip
    auditor.attach(p.optimizer, model=p.model)
    factor = {"noise x0.9": 0.9, "noise x0.97": 0.97}.get(bug)
    with scaled_noise(factor) if factor else contextlib.nullcontext():
        train_steps(p.model, p.optimizer, p.loader, steps, criterion=p.criterion)
    auditor.close()
    return auditor, p


@pytest.mark.slow
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_correct_run_measures_the_accountants_epsilon(tmp_path, digits, accountant):
    auditor, p = _measured_run(tmp_path, digits, steps=100, every=10, accountant=accountant)
    last = auditor.history[-1]
    assert last.valid, last.failed_checks
    low, high = last.epsilon_measured_ci
    assert low <= last.epsilon <= high
    assert 0.95 <= last.epsilon_measured / last.epsilon <= 1.05
    assert high / low < 1.08  # a precise measurement, not a vacuous interval
    basis = last.epsilon_measured_basis
    assert basis["accountant"].startswith(accountant)
    assert basis["steps"] == 100 and basis["dataset_size"] == 5000
    assert basis["noise_multiplier"] == pytest.approx(1.0, rel=0.01)
    assert basis["sample_rate"] == pytest.approx(0.05, rel=0.03)
    assert set(basis["assumes"]) and basis["cannot_see"]
    assert basis["secure_mode"] is False
    # on disk, beside the accountant's ε
    on_disk = read_audit_log(tmp_path / "audit.jsonl")[-1]
    assert on_disk.epsilon_measured == pytest.approx(last.epsilon_measured)


@pytest.mark.parametrize(
    "bug,steps,check",
    [
        ("noise x0.9", 20, "noise_scale"),
        pytest.param("noise x0.97", 100, "noise_scale", marks=pytest.mark.slow),
        ("clipping at 1.1 C", 20, "clipping"),
        ("sampler at twice the rate", 20, "sampling"),
    ],
)
def test_each_injected_bug_puts_the_claimed_epsilon_outside_the_interval(
    tmp_path, digits, bug, steps, check
):
    auditor, _ = _measured_run(tmp_path, digits, bug=bug, steps=steps, every=10)
    last = auditor.history[-1]
    low, _ = last.epsilon_measured_ci
    assert last.epsilon < low, (bug, last.epsilon, last.epsilon_measured_ci)
    assert check in {c.name for c in last.failed_checks}
    if bug == "clipping at 1.1 C":
        assert last.epsilon_measured_basis["clip_ratio"] == pytest.approx(1.1, rel=1e-3)
        assert "clipped at 1.1000× C" in last.check("clipping").detail


def test_the_pooled_evidence_survives_a_resume(tmp_path, digits):
    """A run resumed from a checkpoint pools the audits before it again (from the log)."""
    x, y = digits
    torch.manual_seed(0)
    p = private_training(small_cnn(), x, y, sigma=1.0, batch_size=250, poisson_sampling=True)
    kwargs = dict(privacy_engine=p.engine, log_dir=tmp_path, every_n_steps=5, metrics=("mse",),
                  tensorboard=False, report=False, save_images=False)  # fmt: skip
    first = DMAuditor(**kwargs)
    first.attach(p.optimizer, model=p.model)
    train_steps(p.model, p.optimizer, p.loader, 10, criterion=p.criterion)
    state = first.state_dict()
    first.close()
    second = DMAuditor(**kwargs)
    second.load_state_dict(state)
    second.attach(p.optimizer, model=p.model)
    train_steps(p.model, p.optimizer, p.loader, 10, criterion=p.criterion)
    second.close()
    last = second.history[-1]
    assert [r.step for r in second.history] == [5, 10, 15, 20]
    assert last.check("noise_scale").values["pooled_audits"] == 4
    assert last.check("sampling").values["steps"] == 20
    assert last.epsilon_measured_basis["steps_counted"] == 20
    # recomputed from the log alone, the pooled numbers are the live ones
    records = read_audit_log(tmp_path / "audit.jsonl")
    again = RunEvidence()
    again.restore(records)
    history = [tuple(e) for e in p.engine.accountant.history]
    recomputed = measured_epsilon(again, kind="rdp", history=history, delta=1e-5)
    assert recomputed["epsilon_measured"] == pytest.approx(last.epsilon_measured, rel=1e-9)
    assert recomputed["epsilon_measured_ci"] == pytest.approx(last.epsilon_measured_ci)


def test_rescaled_accounting_is_the_accountants_own():
    """The fast re-accounting gives exactly what re-running the accountant gives."""
    from opacus_dmaudit._opacus import rdp_orders

    history = [(1.0, 0.05, 200)]
    for fs, fq in ((1.0, 1.0), (0.97, 1.0), (1.03, 0.98), (0.5, 1.0), (1.0, 2.0)):
        (fast,), how = rescaled_epsilons(
            "rdp", history, [(fs, fq)], steps=200, delta=1e-5, orders=rdp_orders()
        )
        exact = epsilon_of_history("rdp", [(fs, 0.05 * fq, 200)], delta=1e-5)[0]
        assert fast == pytest.approx(exact, rel=1e-12) and how == "rdp"
    (value,), how = rescaled_epsilons("prv", history, [(1.0, 1.0)], steps=200, delta=1e-5,
                                      orders=rdp_orders())  # fmt: skip
    assert value == pytest.approx(epsilon_of_history("prv", history, delta=1e-5)[0])
    assert how == "prv"


def test_the_tradeoff_picture_on_gaussian_scores():
    rng = np.random.default_rng(0)
    mu = 1.5
    member, nonmember = rng.normal(mu, 1, 4000), rng.normal(0, 1, 4000)
    fpr, tpr = roc_points(member, nonmember)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # the empirical ROC follows the µ-GDP curve of the scores' own µ
    inside = (fpr > 0.05) & (fpr < 0.95)
    assert np.abs(tpr[inside] - gaussian_tradeoff(mu, fpr[inside])).max() < 0.05
    assert auroc(member, nonmember) == pytest.approx(norm.cdf(mu / math.sqrt(2)), abs=0.01)
    assert tpr_at_fpr(member, nonmember, 1e-3) == pytest.approx(
        gaussian_tradeoff(mu, 1e-3), abs=0.03
    )
    assert gaussian_tradeoff(0.0, [0.1, 0.5]) == pytest.approx([0.1, 0.5])
    assert auroc([1.0], [1.0]) == 0.5  # ties count half


@pytest.mark.slow
def test_live_imprint_composes_the_attacks_mu_and_exports_its_scores(tmp_path, mnist5k):
    """Live mode: the membership test's per-step µ composed over the run (a labelled heuristic),
    AUROC and TPR at FPR 10⁻³ in the record, the scores exportable as a documented npz."""
    from opacus_dmaudit.cli import main

    x, y = mnist5k["private"]
    model = imprint_model(mnist5k["prior"][0][:1000], num_bins=128)
    p = private_training(model, x, y, sigma=1.0)
    auditor = DMAuditor(privacy_engine=p.engine, log_dir=tmp_path, every_n_steps=2,
                        metrics=("mse",), tensorboard=False, save_images=False)  # fmt: skip
    auditor.attach(p.optimizer)
    train_steps(p.model, p.optimizer, p.loader, 12, criterion=p.criterion)
    auditor.close()
    measured = auditor.history[-1].privacy_measured
    assert 0.5 < measured["auroc"] <= 1 and 0 <= measured["tpr_at_fpr_0.001"] <= 1
    claimed = auditor.history[-1].epsilon
    assert 0 < measured["epsilon_composed"] < 1.5 * claimed
    assert "heuristic" in measured["epsilon_composed_note"]
    assert "Nasr" in measured["epsilon_composed_note"]
    out = tmp_path / "scores.npz"
    assert main(["report", str(tmp_path), "--export-scores", str(out)]) == 0
    data = np.load(out)
    assert data["member"].size == measured["trials_member"]
    assert data["nonmember"].size == measured["trials_nonmember"]
    assert set(data["member_step"]) == {r.step for r in auditor.history}
    assert float(data["member_sigma"][0]) == 1.0 and float(data["delta"]) == 1e-5
    assert "oracle projection" in str(data["description"])
    assert (out.stat().st_mode & 0o777) == 0o600
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["privacy"]["epsilon_measured 95% CI"] is not None


def test_shadow_mode_says_the_attacks_mu_is_not_evidence(tmp_path, mnist5k):
    x, y = mnist5k["private"]
    p = private_training(small_cnn(), x, y, sigma=1.0)
    auditor = DMAuditor(privacy_engine=p.engine, log_dir=tmp_path, every_n_steps=2, shadow=True,
                        public=mnist5k["prior"][0][:500], metrics=("mse",), tensorboard=False,
                        report=False, save_images=False)  # fmt: skip
    auditor.attach(p.optimizer, model=p.model)
    train_steps(p.model, p.optimizer, p.loader, 2, criterion=p.criterion)
    auditor.close()
    (record,) = auditor.history
    assert "says nothing about the mechanism" in record.privacy_measured["note"]
    assert "mu_step_measured" not in record.privacy_measured
    assert record.epsilon_measured is not None  # from the noise the optimizer really added


def test_a_nan_in_a_batch_never_hangs_the_step(tmp_path, caplog):
    """A NaN input makes the measured σ NaN; Opacus's RDP series never ends on a NaN σ, so the
    re-accounting refuses it: the step returns, the audit records the failed stage and the
    checks say the statistics are not numbers."""
    from opacus_dmaudit.privacy.accountant import step_rdp

    with pytest.raises(ValueError, match="finite sample rate and noise multiplier"):
        step_rdp(0.25, math.nan, (1.5, 2.0))
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    p = private_training(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)), x, y,
                         sigma=1.0, batch_size=16, poisson_sampling=False)  # fmt: skip
    auditor = DMAuditor(privacy_engine=p.engine, log_dir=tmp_path, every_n_steps=1,
                        tensorboard=False, report=False)  # fmt: skip
    auditor.attach(p.optimizer, model=p.model)
    xb = x[:16].clone()
    xb[0, 0, 0, 0] = math.nan
    p.optimizer.zero_grad()
    torch.nn.functional.cross_entropy(p.model(xb), y[:16]).backward()
    with caplog.at_level(logging.WARNING):
        p.optimizer.step()  # returned: the test would time out otherwise
    auditor.close()
    # a property of the data, said in one line: no traceback as if it were a bug
    failed = [r for r in caplog.records if "'measured' failed" in r.getMessage()]
    assert failed and not any(r.exc_info for r in failed)
    (record,) = auditor.history
    assert "measured" in record.failed_stages and record.epsilon_measured is None
    assert "not finite" in record.stage_errors[0]["error"]
    assert record.check("noise_scale").status == "fail"
