"""The DP mechanism checked at every audit, on real Opacus: bugs are caught, correct runs pass."""

import contextlib
import json
import math

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine

from opacus_dmaudit import DMAuditor
from opacus_dmaudit.capture.hooks import GradientCapture
from opacus_dmaudit.capture.step import CapturedStep
from opacus_dmaudit.checks.mechanism import (
    CHECK_NAMES,
    FALSE_ALARM,
    check_sampling,
    mechanism_checks,
)
from opacus_dmaudit.checks.validity import validity_checks
from opacus_dmaudit.errors import AuditCheckFailed
from opacus_dmaudit.privacy.canaries import Canaries, one_run_epsilon_lower, one_run_p_value
from opacus_dmaudit.privacy.empirical import epsilon_lower_bound, gaussian_mu
from opacus_dmaudit.privacy.measured import RunEvidence
from tests.helpers import imprint_model, private_training, small_cnn, train_steps

MECHANISM = set(CHECK_NAMES)


#: Opacus's adaptive clipping, starting at C = 1.
ADAPTIVE = dict(
    target_unclipped_quantile=0.5,
    clipbound_learning_rate=0.2,
    max_clipbound=10.0,
    min_clipbound=0.1,
)


def _private(mnist5k, *, imprint=False, sigma=1.0, n=1000, poisson=True, seed=0, **private):
    """A small model made private on the real digits; returns model, optimizer, loader, engine,
    criterion. ``private``: ``private_training`` keywords (batch size, modes, clipping...)."""
    x, y = mnist5k["private"]
    torch.manual_seed(seed)
    model = imprint_model(mnist5k["prior"][0][:1000], num_bins=128) if imprint else small_cnn()
    if private.get("clipping") == "adaptive":
        private.update(ADAPTIVE, unclipped_num_std=max(sigma, 1.0))
    p = private_training(model, x[:n], y[:n], sigma=sigma, poisson_sampling=poisson, **private)
    return p.model, p.optimizer, p.loader, p.engine, p.criterion


def _auditor(tmp_path, engine, opt, model, *, every, imprint=False, **kwargs):
    auditor = DMAuditor(
        privacy_engine=engine,
        log_dir=tmp_path,
        every_n_steps=every,
        metrics=("mse",),
        tensorboard=False,
        report=False,
        save_images=False,
        **kwargs,
    )
    return auditor.attach(opt, model=None if imprint else model)


def _statuses(record):
    return {c.name: c.status for c in record.checks}


# -- bugs are caught on the first audit after they start -----------------------------------------
def _halve_noise(monkeypatch, factor=0.5):
    import opacus.optimizers.optimizer as opacus_optimizer

    original = opacus_optimizer._generate_noise

    def scaled(std, reference, generator=None, secure_mode=False):
        return original(std * factor, reference, generator, secure_mode)

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", scaled)


def _clipping_off(opt):
    """Per-sample gradients summed unclipped, while the noise stays σC (what the accountant
    believes)."""
    original = opt.clip_and_accumulate

    def unclipped():
        bound = opt.max_grad_norm
        opt.max_grad_norm = math.inf
        try:
            original()
        finally:
            opt.max_grad_norm = bound

    opt.clip_and_accumulate = unclipped


def _sigma_behind_accountant(opt, engine, sigma):
    """σ lowered on the optimizer while the accountant keeps recording the old σ."""
    record = engine.accountant.step
    opt.noise_multiplier = sigma / 2
    engine.accountant.step = lambda *, noise_multiplier, sample_rate: record(
        noise_multiplier=sigma, sample_rate=sample_rate
    )


@pytest.mark.parametrize(
    "bug,check",
    [
        ("noise halved", "noise_scale"),
        ("noise absent", "noise_scale"),
        ("clipping off", "clipping"),
        ("sigma lowered behind the accountant", "accountant"),
        ("noise halved mid-run", "noise_scale"),
    ],
)
def test_a_broken_mechanism_fails_at_the_first_audit_after_it_starts(
    mnist5k, tmp_path, monkeypatch, bug, check
):
    model, opt, loader, engine, criterion = _private(mnist5k)
    auditor = _auditor(tmp_path, engine, opt, model, every=5)
    start = 7  # after the first audit (step 5), before the second (step 10)

    def after_step(step):
        if step != start:
            return
        if bug.startswith("noise halved"):
            _halve_noise(monkeypatch)
        elif bug == "noise absent":
            _halve_noise(monkeypatch, 0.0)
        elif bug == "clipping off":
            _clipping_off(opt)
        else:
            _sigma_behind_accountant(opt, engine, 1.0)

    train_steps(model, opt, loader, 10, after_step, criterion=criterion)
    auditor.close()
    before, after = auditor.history
    assert set(_statuses(before)) == MECHANISM
    assert set(_statuses(before).values()) == {"pass"}, before.checks
    assert _statuses(after)[check] == "fail", after.checks
    assert after.valid is False
    failed = after.check(check)
    if check == "noise_scale":
        expected = 0.0 if bug == "noise absent" else 0.5
        assert failed.value == pytest.approx(expected, abs=0.03)  # measured / predicted σC
    if check == "clipping":
        assert failed.value > 1.2  # contributions well above C, as the per-sample norms say


def test_fixed_shuffled_batches_under_poisson_accounting_warn(mnist5k, tmp_path):
    model, opt, loader, engine, criterion = _private(mnist5k, poisson=False, shuffle=True)
    auditor = _auditor(tmp_path, engine, opt, model, every=8)
    train_steps(model, opt, loader, 8, criterion=criterion)
    auditor.close()
    (record,) = auditor.history
    statuses = _statuses(record)
    assert statuses["sampling"] == "warn", record.checks
    assert record.valid and set(statuses.values()) == {"pass", "warn"}


def test_clipping_off_in_ghost_mode_is_caught_by_the_lone_imprint_bins(mnist5k, tmp_path):
    """Ghost clipping keeps no per-sample gradients; a bin with one sample is one sample's
    clipped gradient, so its clean row cannot exceed C."""
    model, opt, loader, engine, criterion = _private(
        mnist5k, imprint=True, grad_sample_mode="ghost"
    )
    auditor = _auditor(tmp_path, engine, opt, model, every=2, imprint=True)
    model.max_grad_norm = 1e6  # the module stops clipping; the optimizer's noise stays σC

    train_steps(model, opt, loader, 2, criterion=criterion)
    auditor.close()
    (record,) = auditor.history
    clipping = record.check("clipping")
    assert clipping.status == "fail" and clipping.value > 2, clipping


def test_strict_raises_after_logging_the_failed_audit(mnist5k, tmp_path, monkeypatch):
    model, opt, loader, engine, criterion = _private(mnist5k)
    auditor = _auditor(tmp_path, engine, opt, model, every=2, strict=True)
    _halve_noise(monkeypatch)
    with pytest.raises(AuditCheckFailed, match="noise_scale"):
        train_steps(model, opt, loader, 2, criterion=criterion)
    auditor.close()
    assert auditor.history and _statuses(auditor.history[-1])["noise_scale"] == "fail"


# -- no false alarms ----------------------------------------------------------------------------
CORRECT_RUNS = [
    dict(name="hooks, mean"),
    dict(name="hooks, sum", loss_reduction="sum"),
    dict(name="functorch", grad_sample_mode="functorch"),
    dict(name="ghost", grad_sample_mode="ghost"),
    dict(name="ghost with imprint", grad_sample_mode="ghost", imprint=True),
    dict(name="BatchMemoryManager with imprint", imprint=True, bmm=16),
    dict(name="Poisson empty batches", batch_size=1, n=200, sigma=0.5),
    dict(name="per-layer clipping", clipping="per_layer"),
    dict(name="adaptive clipping", clipping="adaptive"),
]


@pytest.mark.slow
def test_correct_runs_pass_every_mechanism_check_over_200_audits(mnist5k):
    """The capture and the mechanism checks on every step of nine kinds of correct runs (the
    rest of an audit, readout and bounds, is left out: it does not feed these checks)."""
    audits, seen = 0, set()
    for i, spec in enumerate(CORRECT_RUNS):
        spec = dict(spec)
        name, bmm = spec.pop("name"), spec.pop("bmm", None)
        imprint = spec.get("imprint", False)
        model, opt, loader, engine, criterion = _private(mnist5k, seed=i, **spec)
        captured = []
        capture = GradientCapture(
            opt,
            model=None if imprint else model,
            should_capture=lambda step: True,
            on_capture=captured.append,
            mechanism=True,
            accountant=engine.accountant,
        )
        capture.attach()
        train_steps(model, opt, loader, 24, criterion=criterion, bmm=bmm)
        capture.detach()
        assert len(captured) == 24, name
        run = RunEvidence()  # pooled as the pipeline pools: noise scale, sizes, noise signs
        for step in captured:
            run.add(step)
            checks = validity_checks(step) + mechanism_checks(step, run)
            failed = [c for c in checks if c["status"] == "fail"]
            assert not failed, (name, step.step, failed)
            names = {c["name"] for c in checks}
            expected = {"noise_scale", "noise_shape", "sampling", "accountant"}
            if step is not captured[0]:
                expected.add("noise_freshness")
            if step.mechanism["noise"]["clean_sq"] > 0:  # an empty batch has nothing to scale
                expected.add("normalisation")
            assert expected <= names, (name, names)
            seen |= names
        audits += len(captured)
    assert audits >= 200
    assert "clipping" in seen and "blind" in seen


def test_sampling_check_has_no_false_alarms_and_sees_fixed_batches():
    rng = np.random.default_rng(0)

    def captured(sizes, lam, q):
        counts = {}
        for s in sizes:
            counts[int(s)] = counts.get(int(s), 0) + 1
        sampling = {"counts": counts, "sample_rate": q, "expected_batch_size": lam, "slack": 1.0}
        return CapturedStep(
            step=1,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            denominator=1.0,
            clipping="flat",
            inputs=torch.zeros(0),
            mechanism={"sampling": sampling},
        )

    for n_data, q in ((1000, 1 / 16), (200, 1 / 200)):
        lam = int(n_data * q)
        for _ in range(300):  # Poisson sampling: never a warning or failure
            sizes = rng.binomial(n_data, q, size=int(rng.integers(1, 150)))
            assert check_sampling(captured(sizes, lam, q))["status"] == "pass"
    # fixed batches of 64 accounted as Poisson at q = 1/16: flagged after a few steps
    assert check_sampling(captured([64] * 10, 62, 1 / 16))["status"] == "warn"
    # batches twice as large as the accountant's q says: a failure
    sizes = rng.binomial(1000, 2 / 16, size=20)
    assert check_sampling(captured(sizes, 62, 1 / 16))["status"] == "fail"
    assert FALSE_ALARM <= 1e-6


# -- empirical privacy --------------------------------------------------------------------------
def test_empirical_estimates_on_known_gaussian_scores():
    rng = np.random.default_rng(1)
    member, nonmember = rng.normal(2.0, 1.0, 400), rng.normal(0.0, 1.0, 800)
    mu, lo, hi = gaussian_mu(member, nonmember)
    assert lo < 2.0 < hi and hi - lo < 0.5
    from opacus_dmaudit.privacy.bounds import gdp_epsilon

    thresholds = tuple(2.0 * k / 4 for k in range(1, 9))
    eps = epsilon_lower_bound(member, nonmember, delta=1e-5, thresholds=thresholds)
    assert 0 < eps < gdp_epsilon(2.0, 1e-5)  # a valid lower bound of the true ε
    # without noise members and non-members separate completely: ε is limited by the trials
    eps_free = epsilon_lower_bound(
        rng.normal(100.0, 1.0, 400), nonmember, delta=1e-5, thresholds=(50.0,)
    )
    assert math.log(800 / 10) < eps_free < math.log(800)


def test_measured_mu_sees_halved_noise_that_the_claimed_mu_hides(mnist5k, tmp_path, monkeypatch):
    """Live imprint: the oracle projection of lone bins measures µ per step; halving the noise
    doubles it, beyond the claimed 1/σ."""
    results = {}
    for label in ("correct", "halved"):
        if label == "halved":
            _halve_noise(monkeypatch)
        model, opt, loader, engine, criterion = _private(mnist5k, imprint=True, sigma=1.0)
        auditor = _auditor(tmp_path / label, engine, opt, model, every=1, imprint=True)
        train_steps(model, opt, loader, 6, criterion=criterion)
        auditor.close()
        results[label] = auditor.history[-1].privacy_measured
    ok, bad = results["correct"], results["halved"]
    assert ok["mu_step_claimed"] == 1.0 and ok["trials_member"] > 100
    assert ok["mu_step_ci"][0] < 1.0 and ok["mu_step_measured"] > 0.7  # imprint: most of C
    assert bad["mu_step_ci"][0] > 1.2  # noise halved: twice the separation
    assert 0 <= ok["epsilon_lower"] < ok["epsilon_step_claimed"]


# -- one-run auditing with canaries ---------------------------------------------------------------
def test_one_run_p_value_and_bound():
    from scipy import stats

    # δ = 0: the binomial tail of randomized response at e^ε/(1+e^ε)
    p = one_run_p_value(canaries=100, guesses=40, correct=35, epsilon=1.0, delta=0.0)
    assert p == pytest.approx(stats.binom.sf(34, 40, 1 / (1 + math.exp(-1.0))))
    assert one_run_p_value(canaries=100, guesses=40, correct=35, epsilon=1.0, delta=1e-5) >= p
    eps = one_run_epsilon_lower(canaries=1000, guesses=200, correct=190, delta=1e-5)
    assert 1.0 < eps < math.log(190 / 10)
    assert one_run_p_value(canaries=1000, guesses=200, correct=190, epsilon=eps, delta=1e-5) == (
        pytest.approx(0.05, abs=1e-3)
    )
    assert one_run_epsilon_lower(canaries=1000, guesses=200, correct=100, delta=1e-5) == 0.0


@pytest.mark.slow
def test_canaries_one_run_audit_separates_memorising_from_private_training(mnist5k):
    """Random-noise images with random labels as canaries: non-private training memorises them
    (a clearly positive ε lower bound); under DP-SGD the bound is smaller and never above the
    accountant's ε (a lower bound that exceeded it would be a false alarm)."""
    x, y = mnist5k["private"]
    gen = torch.Generator().manual_seed(1)
    cx, cy = torch.rand(200, 1, 28, 28, generator=gen), torch.randint(10, (200,), generator=gen)
    canaries = Canaries(cx, cy, seed=3)
    assert 60 < int(canaries.included.sum()) < 140
    data = torch.utils.data.ConcatDataset(
        [torch.utils.data.TensorDataset(x[:150], y[:150]), canaries.dataset()]
    )
    bounds, accounted = {}, {}
    for sigma in (0.0, 2.0):
        torch.manual_seed(0)
        model = small_cnn()
        engine = PrivacyEngine(accountant="rdp")
        model, opt, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
            data_loader=torch.utils.data.DataLoader(data, batch_size=50),
            noise_multiplier=sigma,
            max_grad_norm=1e3 if sigma == 0 else 1.0,
        )
        for _ in range(20):  # epochs
            train_steps(model, opt, loader, len(loader))
        scores = canaries.scores(model)
        assert model.training  # restored after scoring
        result = canaries.audit(scores, delta=1e-5)
        bounds[sigma] = result["epsilon_lower"]
        accounted[sigma] = engine.get_epsilon(1e-5) if sigma > 0 else math.inf
        assert result["guesses"] > 0 and result["included"] == int(canaries.included.sum())
    assert bounds[0.0] > 1.0
    assert bounds[2.0] < bounds[0.0] and bounds[2.0] <= accounted[2.0]


@pytest.mark.slow
def test_demo_broken_noise_run_turns_its_report_red(tmp_path, capsys):
    from opacus_dmaudit.cli import main

    args = ["demo", "--out", str(tmp_path), "--steps", "4", "--every", "2", "--quiet"]
    args += ["--noise-multipliers", "1", "--prior", "none", "--broken-noise"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sigma 1: noise_scale pass, noise_shape pass, clipping pass" in out
    assert "sigma 1 (broken noise): noise_scale fail" in out
    good = (tmp_path / "sigma_1" / "report.html").read_text()
    broken = (tmp_path / "sigma_1_broken" / "report.html").read_text()
    assert "id='failed-checks'" not in good
    assert "id='failed-checks'" in broken and "This audit is invalid" in broken
    report = json.loads((tmp_path / "sigma_1_broken" / "report.json").read_text())
    assert report["verdict"]["status"] == "invalid"


# -- precision: tolerances from the dtypes actually used -------------------------------------------
def _reduced_precision_steps(p, steps, *, autocast):
    """DP-SGD steps with the forward under bf16 autocast (step and backward outside it, as
    torch's AMP recipe has them) or in the model's own dtype."""
    batches = iter(p.loader)
    for _ in range(steps):
        xb, yb = next(batches)
        p.optimizer.zero_grad()
        with torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext():
            out = p.model(xb)
        torch.nn.functional.cross_entropy(out.float(), yb).backward()
        p.optimizer.step()


@pytest.mark.parametrize("precision", ["bf16 autocast", "bf16 model", "fp16 model", "float64"])
def test_reduced_and_double_precision_give_no_false_failure(mnist5k, tmp_path, precision):
    """A correct mechanism in bf16/fp16/float64: no check fails and strict training goes on;
    clipping at 1.1 C is still caught under bf16 autocast (the tolerance is not blind)."""
    x, y = mnist5k["private"]
    dtype = {"bf16 model": torch.bfloat16, "fp16 model": torch.float16}.get(precision)
    dtype = torch.float64 if precision == "float64" else dtype
    torch.manual_seed(0)
    model = small_cnn().to(dtype or torch.float32)
    p = private_training(model, x.to(dtype or torch.float32), y, sigma=1.0)
    auditor = _auditor(tmp_path, p.engine, p.optimizer, p.model, every=2, strict=True)
    _reduced_precision_steps(p, 6, autocast=precision == "bf16 autocast")
    auditor.close()
    assert len(auditor.history) == 3
    for record in auditor.history:
        assert not record.failed_checks, record.failed_checks
    clipping = auditor.history[-1].check("clipping")
    assert clipping.status == "pass" and "tolerance" in clipping.detail
    if precision == "bf16 autocast":
        _clipping_at(p.optimizer, 1.1)
        bad = _auditor(tmp_path / "bug", p.engine, p.optimizer, p.model, every=2)
        _reduced_precision_steps(p, 2, autocast=True)
        bad.close()
        assert bad.history[-1].check("clipping").status == "fail"


def _clipping_at(opt, factor):
    original = opt.clip_and_accumulate

    def clip():
        bound = opt.max_grad_norm
        opt.max_grad_norm = bound * factor
        try:
            original()
        finally:
            opt.max_grad_norm = bound

    opt.clip_and_accumulate = clip


# -- pooled noise_scale -----------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["6k-parameter CNN", "demo CNN"])
def test_noise_at_097_is_caught_within_8_audits(mnist5k, tmp_path, monkeypatch, model):
    """Each audit alone detects a deficit of about 4.6 % on 6k coordinates; pooled over the run's
    audits the limit shrinks as 1/sqrt(audits), and 3 % less noise fails."""
    from opacus_dmaudit.demo import digit_cnn

    x, y = mnist5k["private"]
    torch.manual_seed(0)
    net = small_cnn() if model.startswith("6k") else digit_cnn()
    p = private_training(net, x, y, sigma=1.0)
    auditor = _auditor(tmp_path, p.engine, p.optimizer, p.model, every=1)
    _halve_noise(monkeypatch, 0.97)
    train_steps(p.model, p.optimizer, p.loader, 8, criterion=p.criterion)
    auditor.close()
    statuses = [r.check("noise_scale").status for r in auditor.history]
    assert "fail" in statuses, statuses
    last = auditor.history[-1].check("noise_scale")
    assert last.values["pooled_audits"] == 8
    assert last.values["detectable_pooled"] < 0.02 < last.values["detectable"]
    assert last.values["pooled_value"] == pytest.approx(0.97, abs=0.01)
    for record in auditor.history:  # every check says what it can detect at this size
        for entry in record.checks:
            if entry.name in ("noise_scale", "clipping", "sampling", "normalisation"):
                assert entry.values.get("detectable") is not None, entry


# -- bugs users hit ---------------------------------------------------------------------------------
def test_noise_from_a_generator_reseeded_every_step_fails_freshness(mnist5k, tmp_path):
    """Noise drawn again from a re-seeded generator has the right scale and shape; only its
    repetition across steps shows (fixed-position noise signs, the step before each audit)."""
    x, y = mnist5k["private"]
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    p = private_training(small_cnn(), x, y, sigma=1.0, noise_generator=generator)
    auditor = _auditor(tmp_path, p.engine, p.optimizer, p.model, every=5)

    def reseed(step):
        if step >= 7:  # "reproducible" noise, reset after every step
            generator.manual_seed(1)

    train_steps(p.model, p.optimizer, p.loader, 10, reseed, criterion=p.criterion)
    auditor.close()
    before, after = auditor.history
    assert before.check("noise_freshness").status == "pass"
    fresh = after.check("noise_freshness")
    assert fresh.status == "fail" and fresh.value == pytest.approx(1.0), fresh
    assert {"noise_scale", "noise_shape"} <= {c.name for c in after.checks if c.status == "pass"}


def _divide_by_actual_batch(opt):
    """The noised sum divided by the batch's actual size instead of the expected one."""

    def scale_grad():
        size = next(len(p.grad_sample) for p in opt.params if p.grad_sample is not None)
        for p in opt.params:
            p.grad /= size * opt.accumulated_iterations

    opt.scale_grad = scale_grad


def test_normalising_by_the_actual_batch_size_fails(mnist5k, tmp_path):
    """opacus#571/#819's mechanism at its extreme: a divisor that depends on the data. The noise
    scale then follows D/B; the check names the batch size it was divided by."""
    x, y = mnist5k["private"]
    model = imprint_model(mnist5k["prior"][0][:1000], num_bins=128)
    p = private_training(model, x, y, sigma=1.0)
    auditor = _auditor(tmp_path, p.engine, p.optimizer, p.model, every=3, imprint=True)

    def start(step):
        if step == 4:
            _divide_by_actual_batch(p.optimizer)

    train_steps(p.model, p.optimizer, p.loader, 6, start, criterion=p.criterion)
    auditor.close()
    before, after = auditor.history
    assert before.check("normalisation").status == "pass"
    entry = after.check("normalisation")
    assert entry.status == "fail", entry
    assert f"actual size {after.batch_size}" in entry.detail


def test_a_divisor_that_changes_with_one_record_warns():
    """⌊N·q⌋ at N = 5000, q = 1/20 is 250, at N − 1 it is 249: the released gradient's scale
    tells the two apart (opacus#571, #819)."""
    from opacus_dmaudit.checks.normalisation import normaliser_changes

    assert normaliser_changes(5000, 1 / 20)
    assert not normaliser_changes(1000, 1 / 16)  # N·q = 62.5
    assert not normaliser_changes(None, 1 / 16)


def _weighted_loader(x, y, *, num_samples, batch_size):
    """A class-balancing WeightedRandomSampler, as in opacus#813."""
    counts = torch.bincount(y, minlength=10).float()
    weights = (1.0 / counts)[y]
    sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples, replacement=True)
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler)


@pytest.mark.parametrize(
    "case,status",
    [
        ("WeightedRandomSampler (opacus#813)", "fail"),
        ("WeightedRandomSampler at the mean rate", "warn"),
        ("data loader replaced after make_private", "fail"),
    ],
)
def test_a_sampler_that_is_not_poisson_at_the_accountants_rate(mnist5k, tmp_path, case, status):
    from opacus import PrivacyEngine

    x, y = mnist5k["private"]
    torch.manual_seed(0)
    model = small_cnn()
    engine = PrivacyEngine(accountant="rdp")
    if case.startswith("WeightedRandomSampler"):
        # num_samples=128 in batches of 16: Opacus takes q = 1/8 from len(loader) (#813)
        size = (128, 16) if "813" in case else (1000, 64)
        loader = _weighted_loader(x, y, num_samples=size[0], batch_size=size[1])
        poisson = False  # the user's sampler is kept
    else:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
        poisson = True
    model, opt, private_loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=poisson,
    )  # fmt: skip
    if case.startswith("data loader"):  # the user keeps training on a loader of their own
        private_loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=128, shuffle=True
        )
    auditor = _auditor(tmp_path, engine, opt, model, every=8 if "mean" in case else 2)
    train_steps(model, opt, private_loader, 8 if "mean" in case else 2)
    auditor.close()
    first = auditor.history[0].check("sampling")
    assert first.status == status, first
    assert (
        auditor.history[0].epsilon_measured_basis["sample_rate"]
        != pytest.approx(auditor.history[0].sample_rate, rel=0.05)
        or status == "warn"
    )


def test_an_accountant_restored_from_its_length_fails(mnist5k, tmp_path):
    """opacus#834: len(accountant) counts history entries, not steps. An accountant restored
    from it after a checkpoint leaves steps out of ε; the auditor, resumed from its own state,
    knows how many steps were taken."""
    x, y = mnist5k["private"]
    torch.manual_seed(0)
    p = private_training(small_cnn(), x, y, sigma=1.0)
    first = _auditor(tmp_path, p.engine, p.optimizer, p.model, every=5)
    train_steps(p.model, p.optimizer, p.loader, 10, criterion=p.criterion)
    state = first.state_dict()
    first.close()
    sigma, q, _ = p.engine.accountant.history[-1]
    p.engine.accountant.history = [(sigma, q, len(p.engine.accountant))]  # 1 "step"
    resumed = DMAuditor(privacy_engine=p.engine, log_dir=tmp_path, every_n_steps=5,
                        metrics=("mse",), tensorboard=False, report=False, save_images=False)  # fmt: skip
    resumed.load_state_dict(state)
    resumed.attach(p.optimizer, model=p.model)
    train_steps(p.model, p.optimizer, p.loader, 5, criterion=p.criterion)
    resumed.close()
    entry = resumed.history[-1].check("accountant")
    assert entry.status == "fail" and "opacus#834" in entry.detail, entry
    assert "6 steps in all" in entry.detail and "taken 15" in entry.detail


@pytest.mark.parametrize("secure", [False, True])
def test_secure_mode_is_stated_in_the_run_file(mnist5k, tmp_path, secure):
    from opacus import PrivacyEngine

    x, y = mnist5k["private"]
    engine = PrivacyEngine(accountant="rdp")
    engine.secure_mode = secure  # PrivacyEngine(secure_mode=True) needs torchcsprng to seed
    model = small_cnn()
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), 64),
        noise_multiplier=1.0, max_grad_norm=1.0,
    )  # fmt: skip
    auditor = _auditor(tmp_path, engine, opt, model, every=2)
    train_steps(model, opt, loader, 2)
    auditor.close()
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["secure_mode"] is secure
    assert auditor.history[-1].epsilon_measured_basis["secure_mode"] is secure
