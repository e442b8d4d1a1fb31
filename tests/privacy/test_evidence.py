"""Evidence on real digits: exact images without noise; measured noise matches the prediction."""

import statistics

import pytest
import torch

from opacus_dmaudit import DMAuditor
from opacus_dmaudit.assets.data import load_mnist_idx
from tests.helpers import audited_run, make_private


def _audit_run(x, y, public, tmp_path, *, sigma, steps=3, structure="sparse", metrics=("mse",)):
    """Every step of a run on ``(x, y)`` audited, the bins calibrated on ``public``; closed."""
    auditor, _ = audited_run(
        None,
        tmp_path,
        sigma=sigma,
        steps=steps,
        train=(x, y),
        calibration=public,
        block={"structure": structure},
        metrics=metrics,
        close=True,
    )
    return auditor


def _noise_ratios(auditor):
    return [
        im.residual_std_raw / im.noise_std
        for r in auditor.history
        for im in r.images
        if im.true_count == 1 and im.residual_std_raw is not None
    ]


@pytest.mark.parametrize(
    "structure,sigma", [("sparse", 0.005), ("sparse", 0.02), ("cumulative", 0.001)]
)
def test_measured_noise_matches_prediction_on_mnist5k(mnist5k, tmp_path, structure, sigma):
    x, y = mnist5k["private"]
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    auditor = _audit_run(
        x[perm], y[perm], mnist5k["prior"][0][:2000], tmp_path, sigma=sigma, structure=structure
    )
    ratios = _noise_ratios(auditor)
    assert len(ratios) >= 30
    mean = statistics.mean(ratios)
    assert 0.85 < mean < 1.15, mean
    if structure == "sparse":
        # an imprint that dominates the per-sample norm, clipped: per-pixel noise std ≈ σ·‖x‖,
        # and ‖x‖ ≈ 9.5 for MNIST digits
        # (cumulative readouts are noisier by √2 and by √rows of the sample's bin)
        stds = [im.noise_std for r in auditor.history for im in r.images if im.true_count == 1]
        assert statistics.median(stds) == pytest.approx(sigma * 9.5, rel=0.5)


def test_real_mnist_test_set(shared_data, mnist5k, tmp_path):
    """The official MNIST test digits: exact at σ = 0, predicted noise at σ > 0."""
    x, y = load_mnist_idx(
        shared_data / "mnist" / "t10k-images-idx3-ubyte.gz",
        shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz",
    )
    assert x.shape == (10000, 1, 28, 28)
    x, y = x[:1000], y[:1000]
    public = mnist5k["prior"][0][:2000]
    exact = _audit_run(x, y, public, tmp_path / "exact", sigma=0.0, metrics=("mse", "ssim"))
    singles = [im for r in exact.history for im in r.images if im.true_count == 1]
    assert len(singles) >= 60
    assert max(im.residual_std_raw for im in singles) < 1e-5
    assert min(im.metric("ssim", "raw") for im in singles) > 0.9999
    noisy = _audit_run(x, y, public, tmp_path / "noisy", sigma=0.01)
    ratios = _noise_ratios(noisy)
    assert len(ratios) >= 30
    assert 0.85 < statistics.mean(ratios) < 1.15


def test_auditor_denoises_every_recovered_image_with_the_embedded_prior(mnist5k, tmp_path):
    """``_dm`` metrics per recovered image, at the readout's predicted noise, better than raw."""
    auditor, _ = audited_run(
        mnist5k, tmp_path, sigma=0.03, steps=3, calibration=2000, prior="embedded:mnist"
    )
    auditor.close()
    scored = [im for r in auditor.history for im in r.images if "mse_raw" in im.metrics]
    assert len(scored) >= 40
    for im in scored:
        assert {"mse_dm", "ssim_dm", "lpips_dm"} <= im.metrics.keys()
    for record in auditor.history:
        assert record.denoiser == {
            "prior": "embedded:mnist",
            "sampler": "ddim",
            "steps": 20,
            "min_stride": 20,
        }
    result = auditor.last_result
    assert result.dm.shape == result.raw.shape and result.dm.shape[0] > 0
    singles = [im for im in scored if im.true_count == 1]
    for metric, better in (("mse", min), ("ssim", max), ("lpips", min)):
        dm = statistics.mean(im.metric(metric, "dm") for im in singles)
        raw = statistics.mean(im.metric(metric, "raw") for im in singles)
        assert better(dm, raw) == dm and dm != raw, (metric, dm, raw)


def test_prior_that_does_not_fit_the_block_is_refused_at_attach(mnist5k, tmp_path):
    from opacus_dmaudit import ImprintBlock

    x = torch.rand(64, 3, 16, 16)
    y = torch.zeros(64, dtype=torch.long)
    torch.manual_seed(0)
    block = ImprintBlock(image_shape=(3, 16, 16), num_bins=8).calibrate(x)
    model = torch.nn.Sequential(block, torch.nn.Flatten(), torch.nn.Linear(768, 10))
    model, opt, loader, engine = make_private(model, x, y, sigma=0.1)
    auditor = DMAuditor(log_dir=tmp_path, metrics=("mse",), prior="embedded:mnist")
    with pytest.raises(ValueError, match="resize=True"):
        auditor.attach(opt)
    assert auditor.block is None  # nothing was hooked
