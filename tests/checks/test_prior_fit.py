"""Prior fit: the auditor measures whether its diffusion prior restores this data or guesses."""

import pytest
import torch
from torch import nn

from opacus_dmaudit import DiffusionPrior
from opacus_dmaudit.checks.prior_fit import (
    COLOUR_TOLERANCE,
    _decided,
    _side,
    _verdict,
    faithful,
    public_fit,
)
from opacus_dmaudit.config import AuditConfig
from opacus_dmaudit.score.metrics import LPIPS
from tests.helpers import audited_run, small_cnn


def test_the_rule_faithful_hallucinating_losing_or_mixed():
    # MSE and LPIPS (lower is better): faithful only when the prior wins at both
    assert faithful(0.01, 0.02, 0.05, 0.10, higher_is_better=False)
    assert _verdict(0.01, 0.02, 0.05, 0.10, higher_is_better=False) is None
    # worse MSE, better LPIPS: the prior painted detail that is not there
    assert _verdict(0.03, 0.02, 0.05, 0.10, higher_is_better=False) == "hallucination"
    # "loses" only where it is worse at both; better MSE but worse LPIPS: it smooths
    assert _verdict(0.03, 0.02, 0.20, 0.10, higher_is_better=False) == "loses"
    assert _verdict(0.01, 0.02, 0.20, 0.10, higher_is_better=False) == "mixed"
    # SSIM (higher is better) when LPIPS is not computed
    assert _verdict(0.03, 0.02, 0.9, 0.8, higher_is_better=True) == "hallucination"
    assert faithful(0.01, 0.02, 0.9, 0.8, higher_is_better=True)
    # at attach each metric is won or lost by the paired per-image differences, with a margin
    assert _side(torch.tensor([-0.01, -0.012, -0.009, -0.011])) == -1
    assert _side(torch.tensor([0.01, 0.012, 0.009, 0.011])) == 1
    assert _side(torch.tensor([-0.02, 0.015, -0.01, 0.012])) == 0  # within the noise
    assert _side(torch.tensor([-0.02])) == 0  # one image decides nothing
    assert _decided(-1, -1) is None and _decided(1, -1) == "hallucination"
    assert _decided(1, 1) == "loses" and _decided(-1, 1) == "mixed"
    assert _decided(0, -1) == _decided(-1, 0) == "undecided"


def _sklearn_digits(n: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images[:n]).float()[:, None] / 16
    return nn.functional.interpolate(x, size=(28, 28), mode="bilinear").clamp(0, 1)


@pytest.mark.slow
def test_public_fit_tells_a_fitting_prior_from_a_guessing_one(mnist5k):
    """embedded:mnist restores MNIST digits better than classical denoising at every level, and
    loses to it on scikit-learn's 8x8 digits (upsampled): real data, the issue's observation."""
    prior = DiffusionPrior.from_pretrained("embedded:mnist")
    config, lpips = AuditConfig(), LPIPS()
    fits = {}
    for name, images in (("mnist", mnist5k["prior"][0][:32]), ("sklearn", _sklearn_digits(32))):
        fits[name] = public_fit(
            images,
            prior,
            config=config,
            lpips=lpips,
            generator=torch.Generator().manual_seed(0),
            images=16,
        ).check
    good, bad = fits["mnist"], fits["sklearn"]
    assert good["name"] == "prior_fit" and good["status"] == "pass" and good["value"] == 1.0
    assert all(d < c for d, c in zip(good["mse_dm"], good["mse_classical"]))
    assert all(d < c for d, c in zip(good["lpips_dm"], good["lpips_classical"]))
    assert bad["status"] == "warn" and bad["value"] == 0.0
    assert bad["verdicts"] == ["loses"] * 3 and "loses to classical" in bad["detail"]
    assert all(d > c for d, c in zip(bad["lpips_dm"], bad["lpips_classical"]))
    assert len(bad["levels"]) == 3 and bad["images"] == 16


def _audit_once(train_x, public, tmp_path, **kwargs):
    """One real DP-SGD step (σ small enough that lone images are found), audited once."""
    auditor, _ = audited_run(
        None,
        tmp_path,
        sigma=0.01,
        steps=1,
        train=(train_x, torch.zeros(train_x.shape[0], dtype=torch.long)),
        calibration=public,
        metrics=AuditConfig().metrics,  # the auditor's default metrics
        prior="embedded:mnist",
        max_images=12,
        prior_fit_public=4,
        close=True,
        **kwargs,
    )
    assert len(auditor.history) == 1
    return auditor.history[0]


@pytest.mark.slow
def test_audits_measure_the_prior_on_their_own_lone_images(mnist5k, shared_data, tmp_path):
    """Digits through the digit prior: faithful. Grey photos through the digit prior: flagged,
    in the record, TensorBoard and the report."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from opacus_dmaudit.assets.data import load_cifar10_test
    from opacus_dmaudit.sinks.report.images import caption

    digits = _audit_once(mnist5k["private"][0][:256], mnist5k["prior"][0][:512], tmp_path / "d")
    cifar, _ = load_cifar10_test(shared_data / "cifar10" / "cifar10_test_first1017.npz")
    grey = 0.299 * cifar[:, :1] + 0.587 * cifar[:, 1:2] + 0.114 * cifar[:, 2:]
    photos = _audit_once(grey[:256], grey[256:768], tmp_path / "p")
    for record in (digits, photos):
        names = [c.name for c in record.checks]
        assert "prior_fit" in names and "prior_fit_audit" in names
        fit = record.prior_fit
        assert 1 <= fit["images"] <= 4 and 0 <= fit["faithful_share"] <= 1
        scored = [im for im in record.images if "mse_dm" in im.metrics]
        assert scored and all(isinstance(im.dm_faithful, bool) for im in scored)
        measured = [im for im in scored if "fit_mse_dm" in im.extra]
        assert len(measured) == fit["images"]
        assert fit["mse_dm"] == pytest.approx(
            sum(im.extra["fit_mse_dm"] for im in measured) / len(measured)
        )
    assert digits.check("prior_fit").status == "pass"
    assert digits.check("prior_fit_audit").status == "pass"
    assert digits.prior_fit["faithful_share"] >= 0.75
    assert photos.check("prior_fit").status == "warn"
    assert photos.check("prior_fit_audit").status == "warn"
    assert photos.prior_fit["mse_dm"] > photos.prior_fit["mse_classical"]
    unfaithful = [im for im in photos.images if im.dm_faithful is False]
    assert len(unfaithful) >= len(photos.images) // 2
    assert "DM: prior unfaithful" in caption(photos.step, unfaithful[0], "lpips")
    assert "unfaithful" not in caption(digits.step, digits.images[0], "lpips")
    # TensorBoard: beside the DM metrics; the report: a column beside the DM success rate
    acc = EventAccumulator(str(tmp_path / "p"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "quality/dm/fit_faithful_share" in tags and "quality/dm/lpips" in tags
    assert acc.Scalars("quality/dm/fit_faithful_share")[0].value == pytest.approx(
        photos.prior_fit["faithful_share"]
    )
    assert acc.Scalars("checks/prior_fit_audit/status")[0].value == 1.0  # warn
    html = (tmp_path / "p" / "report.html").read_text()
    assert "prior faithful" in html and "prior_fit_audit" in html


@pytest.mark.slow
def test_the_attach_time_decision_holds_over_two_runs_and_catches_colour(mnist5k, shared_data):
    """Two runs on the same public images (other noise, other images drawn) decide alike; grey
    photos through the colour prior are flagged for the colour it paints onto them."""
    from opacus_dmaudit.assets.data import load_cifar10_test

    config, lpips = AuditConfig(), LPIPS()
    digits = mnist5k["prior"][0][torch.randperm(4000, generator=torch.Generator().manual_seed(0))]
    prior = DiffusionPrior.from_pretrained("embedded:mnist")
    fits = [
        public_fit(digits[:200], prior, config=config, lpips=lpips,
                   generator=torch.Generator().manual_seed(seed)).check
        for seed in (1, 2)
    ]  # fmt: skip
    assert fits[0]["images"] == 16  # the default: enough images for the margin
    assert [f["status"] for f in fits] == ["pass", "pass"]
    assert fits[0]["verdicts"] == fits[1]["verdicts"] == ["faithful"] * 3
    cifar, _ = load_cifar10_test(shared_data / "cifar10" / "cifar10_test_first1017.npz")
    grey = 0.299 * cifar[:, :1] + 0.587 * cifar[:, 1:2] + 0.114 * cifar[:, 2:]
    colour = public_fit(
        grey[:200], DiffusionPrior.from_pretrained("embedded:natural"), config=config,
        lpips=lpips, generator=torch.Generator().manual_seed(1), images=8,
    ).check  # fmt: skip
    assert colour["status"] == "warn" and "colour" in colour["verdicts"]
    assert max(colour["chroma_dm"]) > COLOUR_TOLERANCE
    assert "paints colour onto these grey images" in colour["detail"]


@pytest.mark.slow
def test_without_public_images_the_fit_is_unknown_never_passed(mnist5k, tmp_path):
    """A shadow audit with the digit prior on digits but no public images: the prior may well
    fit, but nothing measured it, so neither check passes."""
    auditor, _ = audited_run(
        mnist5k, tmp_path, sigma=0.01, steps=1, model=small_cnn(), shadow=True,
        prior="embedded:mnist", metrics=("mse", "ssim"), max_images=8, close=True,
    )  # fmt: skip
    (r,) = auditor.history
    fit = r.check("prior_fit")
    assert fit.status == "warn" and fit.values["fit"] == "unknown"
    assert fit.detail.startswith("unknown: no public images")
    per_audit = r.check("prior_fit_audit")
    assert per_audit.status == "warn" and per_audit.values["fit"] == "unknown"
