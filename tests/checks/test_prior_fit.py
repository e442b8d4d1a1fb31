"""Prior fit: the auditor measures whether its diffusion prior restores this data or guesses."""

import pytest
import torch
from torch import nn

from opacus_dmaudit import DiffusionPrior
from opacus_dmaudit.checks.prior_fit import _verdict, faithful, public_fit
from opacus_dmaudit.config import AuditConfig
from opacus_dmaudit.score.metrics import LPIPS
from tests.helpers import audited_run


def test_the_rule_faithful_hallucinating_or_losing():
    # MSE and LPIPS (lower is better): faithful only when the prior wins at both
    assert faithful(0.01, 0.02, 0.05, 0.10, higher_is_better=False)
    assert _verdict(0.01, 0.02, 0.05, 0.10, higher_is_better=False) is None
    # worse MSE, better LPIPS: the prior painted detail that is not there
    assert _verdict(0.03, 0.02, 0.05, 0.10, higher_is_better=False) == "hallucination"
    assert _verdict(0.03, 0.02, 0.20, 0.10, higher_is_better=False) == "loses"
    assert _verdict(0.01, 0.02, 0.20, 0.10, higher_is_better=False) == "loses"  # blurrier
    # SSIM (higher is better) when LPIPS is not computed
    assert _verdict(0.03, 0.02, 0.9, 0.8, higher_is_better=True) == "hallucination"
    assert faithful(0.01, 0.02, 0.9, 0.8, higher_is_better=True)


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
            images=6,
        ).check
    good, bad = fits["mnist"], fits["sklearn"]
    assert good["name"] == "prior_fit" and good["status"] == "pass" and good["value"] == 1.0
    assert all(d < c for d, c in zip(good["mse_dm"], good["mse_classical"]))
    assert all(d < c for d, c in zip(good["lpips_dm"], good["lpips_classical"]))
    assert bad["status"] == "warn" and bad["value"] == 0.0
    assert bad["verdicts"] == ["loses"] * 3 and "loses to classical" in bad["detail"]
    assert all(d > c for d, c in zip(bad["lpips_dm"], bad["lpips_classical"]))
    assert len(bad["levels"]) == 3 and bad["images"] == 6


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
