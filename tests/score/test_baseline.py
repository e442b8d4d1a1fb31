"""κ at the audit's own criterion, the identification criterion, and the pairwise metrics they use."""

import math

import pytest
import torch

from opacus_dmaudit import ImprintBlock
from opacus_dmaudit.privacy.bounds import rero_gaussian
from opacus_dmaudit.score.baseline import estimate_baselines, estimate_kappa
from opacus_dmaudit.score.metrics import LPIPS, identified, image_metrics, pairwise
from opacus_dmaudit.sinks.summary import summary_from_json
from tests.helpers import audited_run


def _astronaut_patches(n: int) -> torch.Tensor:
    from skimage.data import astronaut

    img = torch.from_numpy(astronaut()).permute(2, 0, 1).float() / 255
    return torch.stack([img[:, 40 * i : 40 * i + 32, 60 + 13 * i : 92 + 13 * i] for i in range(n)])


@pytest.mark.parametrize("colour", [False, True])
def test_pairwise_equals_the_loop_over_pairs(mnist5k, colour):
    """Every metric's (P, T) matrix equals scoring each pair on its own (real images)."""
    if colour:
        targets = _astronaut_patches(6)
    else:
        targets = mnist5k["prior"][0][:6].float()
    gen = torch.Generator().manual_seed(0)
    # noisy versions (values outside [0, 1] included), and two exact copies
    preds = torch.cat(
        [targets[:3] + 0.2 * torch.randn(targets[:3].shape, generator=gen), targets[3:5]]
    )
    lpips = LPIPS(batch_size=4)  # several chunks of predictions and targets
    for metric in ("mse", "psnr", "ssim", "lpips"):
        got = pairwise(metric, preds, targets, lpips=lpips)
        assert got.shape == (5, 6) and got.dtype == torch.float64
        for i in range(5):
            loop = image_metrics(
                preds[i : i + 1].expand(6, -1, -1, -1), targets, names=(metric,), lpips=lpips
            )[metric]
            finite = torch.isfinite(loop)
            assert torch.equal(finite, torch.isfinite(got[i]))
            tol = 1e-6 if metric == "lpips" else 1e-10  # LPIPS's own path is float32
            assert torch.allclose(got[i][finite], loop[finite], rtol=0, atol=tol), metric
    # the exact copies: distance 0 (PSNR ∞, SSIM 1) to their own image
    assert pairwise("lpips", preds[3:5], targets[3:5], lpips=lpips).diagonal().abs().max() < 1e-6
    assert pairwise("ssim", preds[3:5], targets[3:5]).diagonal() == pytest.approx([1.0, 1.0])


def test_identified_needs_strictly_the_nearest_own_image():
    d = torch.tensor([[0.1, 0.3, 0.2], [0.4, 0.2, 0.2], [0.5, 0.6, 0.1], [float("nan"), 1.0, 1.0]])
    assert identified(d, [0, 1, 0, 0]).tolist() == [True, False, False, False]  # a tie is no win
    # SSIM-like scores: higher is nearer
    assert identified(d, [1, 0, 1, 1], higher_is_better=True).tolist() == [True, True, True, False]
    assert identified(torch.zeros((0, 3)), []).numel() == 0
    assert identified(torch.tensor([[math.inf, 20.0]]), [0], higher_is_better=True).item()  # PSNR
    with pytest.raises(ValueError, match="own columns"):
        identified(d, [0, 1])


@pytest.mark.slow
def test_a_fixed_guess_beats_one_over_n_and_kappa_hat_sees_it(mnist5k, shared_data):
    """κ̂ from public digits only, chosen on one half and scored on the other: its guess, never
    shown a test digit, meets LPIPS ≤ 0.1 for far more held-out MNIST *test* digits than 1/N,
    and no more than the upper limit the tests and bounds use."""
    from opacus_dmaudit.assets.data import load_mnist_idx

    lpips = LPIPS()
    digits = mnist5k["prior"][0]  # sorted by class: take a random sample of every class
    public = digits[torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))[:400]]
    base = estimate_kappa(public, metric="lpips", threshold=0.1, lpips=lpips)
    assert base is not None and base.candidates == 385  # 384 public images and their mean
    assert base.targets in (191, 192)  # the held-out half (less the guess, if it is there)
    fixed = base.rates["fixed"]
    assert base.kappa == pytest.approx(fixed.hits / fixed.trials)
    assert base.kappa < fixed.upper <= base.kappa_upper  # a one-sided upper limit
    test_digits = load_mnist_idx(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz")[:500]
    rate = float((pairwise("lpips", base.guess, test_digits, lpips=lpips) <= 0.1).double().mean())
    n = 60000  # MNIST's training set: κ = 1/N
    assert rate > 100 / n  # a constant output beats κ = 1/N by orders of magnitude
    assert rate <= base.kappa_upper  # the held-out limit is not beaten by its own guess
    assert rero_gaussian(0.0, base.kappa_upper) == pytest.approx(base.kappa_upper)
    # same images, same criterion: cached; too few images: no estimate
    assert estimate_kappa(public, metric="lpips", threshold=0.1, lpips=lpips) is base
    assert estimate_kappa(public[:20], metric="mse", threshold=0.01) is None
    with pytest.raises(ValueError, match="NaN"):
        estimate_kappa(public.clone().fill_(math.nan), metric="mse", threshold=0.01)


def test_a_guess_that_knows_the_bin_beats_one_over_n_and_the_baselines_see_it(mnist5k):
    """The scorer pairs each reconstruction with its own bin: a guess made from the bin alone is
    nearer its own digit than to the 63 others far more often than 1/64, and so is the informed
    adversary who knows the 63 others. Both are measured on public batches, with upper limits."""
    public = mnist5k["prior"][0][torch.randperm(4000, generator=torch.Generator().manual_seed(1))]
    block = ImprintBlock(image_shape=(1, 28, 28), num_bins=128).calibrate(public[:1000])
    b = estimate_baselines(
        public[1000:1384], metric="mse", threshold=0.01, metrics=("mse", "ssim"),
        batch_size=64, geometry=block.geometry(),
    )  # fmt: skip
    assert not b.missing and set(b.identification) == {"mse", "ssim"}
    for ident in b.identification.values():
        assert set(ident.rates) == {"bin_mean", "bin_centre", "informed"}
        assert ident.batch_used == 64
        trials = ident.rates["informed"].trials
        assert 150 < trials <= 384  # lone images of the public batches, both halves
        for rate in ident.rates.values():
            assert rate.trials == trials and rate.rate <= rate.upper <= 1
            assert rate.level == pytest.approx(1 - 0.05 / 3)  # Bonferroni over the three
        assert ident.upper == max(r.upper for r in ident.rates.values())
        assert ident.informed_upper == ident.rates["informed"].upper
    mse = b.identification["mse"]
    assert max(mse.rates["bin_mean"].rate, mse.rates["bin_centre"].rate) > 2 / 64
    assert mse.rates["informed"].rate > 1 / 64
    # the success baseline also tries the bin guesses
    assert set(b.success.rates) == {"fixed", "bin_mean", "bin_centre"}
    assert b.success.kappa_upper == max(r.upper for r in b.success.rates.values())
    # a batch of one: identification is no test; a batch larger than half the public images:
    # smaller public batches, said
    one = estimate_baselines(public[1000:1384], metric="mse", threshold=0.01, metrics=("mse",),
                             batch_size=1, geometry=block.geometry())  # fmt: skip
    assert not one.identification and "batch of one" in one.missing["identification"]
    big = estimate_baselines(public[1000:1384], metric="mse", threshold=0.01, metrics=("mse",),
                             batch_size=512, geometry=block.geometry())  # fmt: skip
    assert big.identification["mse"].batch_used == 192
    assert "lean high" in big.notes[0] and "1024 public images" in big.notes[0]


@pytest.mark.slow
def test_records_carry_kappa_at_the_criterion_and_identification(mnist5k, tmp_path):
    auditor, engine = audited_run(
        mnist5k, tmp_path, sigma=0.02, steps=1, metrics=("mse", "lpips"), calibration=600
    )
    auditor.close()
    r = auditor.history[-1]
    n = round(1 / r.kappa_uniform)  # expected batch / q: about the 1000 private digits
    assert 900 < n <= 1000
    base = auditor.pipeline.baselines
    # κ used = the success baseline's upper limit; κ̂ = the held-out rate of the fixed guess
    assert r.kappa == base.success.kappa_upper and r.kappa_baseline == base.success.kappa
    assert r.kappa_baseline > r.kappa_uniform
    # the identification bound's κ: the informed adversary's upper limit, not 1/N
    informed = base.identification["lpips"].informed_upper
    assert informed > 1 / r.batch_size
    assert r.bounds["single_step_identification"] == pytest.approx(
        rero_gaussian(1 / 0.02, informed)
    )
    assert r.targets.baselines["identification"] == {
        m: b.upper for m, b in base.identification.items()
    }
    assert r.targets.baselines["success"] == r.kappa
    ident = r.identification
    assert set(ident) == {"raw", "clean"}
    # at σ = 0.02 the clean readout of a lone digit is that digit: nearest to it in LPIPS
    batch = r.batch_size
    lone = sum("mse_raw" in im.metrics and im.true_count == 1 for im in r.images)
    matched = sum("mse_raw" in im.metrics for im in r.images)
    assert lone > 0 and lone / batch <= ident["clean"] <= matched / batch
    assert 0 < ident["raw"] <= ident["clean"] + 1e-9
    # per target: every lone digit found is a target, identified in both distances
    assert r.targets.attempted == lone
    assert set(r.targets.identified) == {"mse", "lpips"}
    assert r.targets.identified["mse"]["raw"] <= lone


def test_verdict_states_no_bound_a_fixed_guess_may_beat():
    base = {
        "audits": 1,
        "first_step": 1,
        "last_step": 1,
        "noise_multiplier": 1.0,
        "checks": {},
        "mean_success_rate": {"raw": 0.0},
        "recovered": {"raw": 0},
        "detection_power": 0.95,
        "bounds": {"single_step": 0.025, "single_step_identification": 0.12},
        "kappa_uniform": 1e-3,
    }
    uniform_only = summary_from_json({**base, "kappa": 1e-3, "kappa_baseline": None}).verdict.text
    assert "no attack can reach a success rate above 0.025" not in uniform_only
    assert "may be beaten by a fixed guess" in uniform_only
    measured = summary_from_json({**base, "kappa": 0.05, "kappa_baseline": 0.04}).verdict.text
    assert "no attack can reach a success rate above 0.025" in measured
    assert "κ̂ = 0.04" in measured and "upper limit" in measured
    assert "above 0.12 (ReRo bound of one step; κ: the informed adversary" in measured
    assert "exact" not in measured
