"""Occupancy tests: exact level on pure noise, predicted power against measured detection on real
digits through real Opacus steps, the lower-noise normaliser, and the calibrated collision flag."""

import math

import pytest
import torch
from scipy import stats

from opacus_dmaudit import DMAuditor
from opacus_dmaudit.capture.hooks import GradientCapture
from opacus_dmaudit.config import AuditConfig
from opacus_dmaudit.reconstruct.bins import bin_rows
from opacus_dmaudit.reconstruct.detection import occupancy_test
from opacus_dmaudit.reconstruct.readout import read_imprint
from opacus_dmaudit.score.scoring import score_step
from tests.helpers import imprint_model, make_private, train_steps

SHAPE = (1, 16, 16)
D = 256


def _pinned(k: int) -> dict:
    """A brightness direction and bin edges spread over [0.05, 0.95]."""
    edges = torch.linspace(0.05, 0.95, k + 1, dtype=torch.float64)
    return {
        "measurement": torch.full((D,), 1.0 / D, dtype=torch.float64),
        "bin_edges": tuple(edges.tolist()),
    }


def _noise(k: int, sigma_c: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = sigma_c * torch.randn(k, D, generator=gen, dtype=torch.float64)
    b = sigma_c * torch.randn(k, generator=gen, dtype=torch.float64)
    return w, b


@pytest.mark.parametrize("structure", ["sparse", "cumulative"])
@pytest.mark.parametrize("test", ["row-fisher", "row-chi2", "bias-z"])
def test_false_positive_rate_on_pure_noise_matches_the_level(structure, test):
    """Empty bins: the share declared occupied is the level (binomial bound), p-values uniform."""
    k, level = 4000, 0.02
    w, b = _noise(k, 0.3, seed=1)
    kwargs = {"occupancy_z": float(stats.norm.isf(level / 2))} if test == "bias-z" else {}
    if test != "bias-z":
        kwargs["false_bins_per_audit"] = level * k
    out = read_imprint(
        w, b, structure=structure, image_shape=SHAPE, noise_std=0.3, test=test,
        **kwargs, **_pinned(k),
    )  # fmt: skip
    false = int(out.occupied.sum())
    sd = math.sqrt(k * level * (1 - level))
    assert abs(false - k * level) < 4.5 * sd, (false, k * level)
    # the whole distribution, not only the tail: p = 2Φ(−z) is uniform on empty bins
    p = 2 * stats.norm.sf(out.zscore.double().numpy())
    assert stats.kstest(p, "uniform").pvalue > 1e-3
    if test == "bias-z":
        _, db, f = bin_rows(w, b, structure=structure)
        expected = (db.abs() / (0.3 * f)).float()
        assert torch.allclose(out.zscore, expected, rtol=1e-5)


@pytest.mark.parametrize("structure", ["sparse", "cumulative"])
def test_default_budget_of_false_bins_per_audit(structure):
    """200 pure-noise audits of 128 bins at 0.01 expected false bins each: about 2 in all."""
    false = 0
    for seed in range(200):
        w, b = _noise(128, 0.05, seed=seed)
        out = read_imprint(
            w, b, structure=structure, image_shape=SHAPE, noise_std=0.05, **_pinned(128)
        )
        false += int(out.occupied.sum())
    assert false <= 8  # Poisson(2): P(>= 9) < 1e-3


def test_occupancy_test_thresholds_and_arguments():
    t = occupancy_test("row-chi2", num_bins=128, dim=784)
    assert t.level == pytest.approx(0.01 / 128)
    assert stats.chi2.sf(t.threshold, 785) == pytest.approx(t.level, rel=1e-6)
    assert t.false_bins_per_audit == pytest.approx(0.01)
    f = occupancy_test("row-fisher", num_bins=64, dim=784, false_bins_per_audit=0.1)
    assert stats.chi2.sf(f.threshold, 4) == pytest.approx(0.1 / 64, rel=1e-6)
    z = occupancy_test("bias-z", num_bins=128, dim=784, occupancy_z=4.0)
    assert z.threshold == 4.0 and z.level == pytest.approx(2 * stats.norm.sf(4.0))
    with pytest.raises(ValueError, match="occupancy test must be one of"):
        occupancy_test("chi", num_bins=8, dim=4)
    with pytest.raises(ValueError, match="bias-z"):
        occupancy_test("row-chi2", num_bins=8, dim=4, occupancy_z=3.0)
    w, b = _noise(8, 0.1, seed=0)
    with pytest.raises(ValueError, match="needs measurement and bin_edges"):
        read_imprint(w, b, structure="sparse", image_shape=SHAPE, noise_std=0.1, test="row-fisher")
    with pytest.raises(ValueError, match="both measurement and bin_edges"):
        read_imprint(
            w, b, structure="sparse", image_shape=SHAPE, noise_std=0.1,
            measurement=torch.ones(D),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# real digits through real Opacus steps


def _captured(mnist5k, *, sigma: float, structure: str = "sparse", steps: int = 12, seed=0):
    """Captured steps of DP-SGD on the private MNIST-5k digits (128 bins, batch 64, C = 1)."""
    x, y = mnist5k["private"]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    model = imprint_model(mnist5k["prior"][0][:2000], num_bins=128, structure=structure, seed=seed)
    model, opt, loader, _ = make_private(model, x[perm], y[perm], sigma=sigma)
    caps: list = []
    GradientCapture(opt, should_capture=lambda s: True, on_capture=caps.append).attach()
    train_steps(model, opt, loader, steps)
    return caps


def _bins(captured):
    members = captured.imprint.membership
    count = (members != 0).sum(dim=1)
    lone = (count == 1) & (members.max(dim=1).values == 1)
    return lone, count >= 2


_CONFIG = AuditConfig(metrics=("mse",), report=False, tensorboard=False, save_images=False)


@pytest.fixture(scope="module")
def sparse_runs(mnist5k):
    """Scored steps at four noise levels (the auditor's own ``score_step``)."""
    out = {}
    for sigma in (0.01, 0.03, 0.05, 0.1):
        caps = _captured(mnist5k, sigma=sigma)
        out[sigma] = [(c, score_step(c, _CONFIG)) for c in caps]
    return out


@pytest.mark.slow
def test_power_matches_measured_detection_on_real_digits(sparse_runs):
    """Where the test finds about half of the lone digits, prediction and measurement agree."""
    lone_n = found = 0
    predicted = 0.0
    for captured, scored in sparse_runs[0.1]:
        lone, _ = _bins(captured)
        n = int(lone.sum())
        lone_n += n
        found += int((lone & scored.readout.occupied).sum())
        predicted += scored.detection["power"] * n
        assert scored.detection["test"] == "row-fisher"
        assert scored.detection["lone_bins"] == n
    measured, predicted = found / lone_n, predicted / lone_n
    assert lone_n >= 400
    assert 0.3 < predicted < 0.8  # an informative regime, not 0 or 1
    assert abs(measured - predicted) < 0.07, (measured, predicted)


@pytest.mark.slow
def test_power_through_the_auditor_cumulative_and_noise_free(mnist5k, tmp_path):
    """The record's ``detection``: test, level, budget and power, for the cumulative structure."""
    x, y = mnist5k["private"]
    public = mnist5k["prior"][0][:2000]
    results = {}
    for sigma in (0.0, 0.01):
        model = imprint_model(public, num_bins=128, structure="cumulative")
        model, opt, loader, engine = make_private(model, x, y, sigma=sigma)
        auditor = DMAuditor(
            privacy_engine=engine, log_dir=tmp_path / str(sigma), every_n_steps=1,
            metrics=("mse",), report=False, tensorboard=False, save_images=False,
        ).attach(opt)  # fmt: skip
        train_steps(model, opt, loader, 1 if sigma == 0 else 12)
        auditor.close()
        results[sigma] = auditor.history
    for record in results[0.0]:
        assert record.detection["power"] == 1.0
        assert record.counts.lone_found == record.counts.lone_in_batch > 0
    lone = sum(r.counts.lone_in_batch for r in results[0.01])
    found = sum(r.counts.lone_found for r in results[0.01])
    predicted = sum(r.detection["power"] * r.counts.lone_in_batch for r in results[0.01]) / lone
    det = results[0.01][0].detection
    assert det["test"] == "row-fisher" and det["false_bins_per_audit"] == pytest.approx(0.01)
    assert det["level"] == pytest.approx(0.01 / 128)
    assert stats.chi2.sf(det["threshold"], 4) == pytest.approx(det["level"], rel=1e-6)
    assert lone >= 400 and 0.3 < predicted < 0.8
    assert abs(found / lone - predicted) < 0.07, (found / lone, predicted)


@pytest.mark.slow
def test_collision_flag_is_calibrated_on_real_digits(sparse_runs):
    """At three σ: <= 1 % of found single-sample bins flagged, >= 50 % of found blends caught."""
    for sigma in (0.01, 0.03, 0.05):
        single_found = single_flagged = multi_found = multi_flagged = 0
        for captured, scored in sparse_runs[sigma]:
            lone, multi = _bins(captured)
            occupied, flagged = scored.readout.occupied, scored.readout.collision
            single_found += int((lone & occupied).sum())
            single_flagged += int((lone & occupied & flagged).sum())
            multi_found += int((multi & occupied).sum())
            multi_flagged += int((multi & occupied & flagged).sum())
        assert single_found >= 400 and multi_found >= 100, sigma
        assert single_flagged <= 0.01 * single_found, (sigma, single_flagged, single_found)
        assert multi_flagged >= 0.5 * multi_found, (sigma, multi_flagged, multi_found)


@pytest.mark.slow
def test_pinned_normaliser_estimates_the_weight_better(sparse_runs):
    """``h·ΔW/c`` pins the brightness: the clipped weight, and so the contrast, is far closer to
    the truth than with ``Δb`` alone, and the predicted pixel noise stays right."""
    for sigma in (0.03, 0.1):
        err = {"pinned": [], "bias": []}
        ratios = []
        for captured, scored in sparse_runs[sigma]:
            sums, geo = captured.imprint, captured.imprint.geometry
            lone, _ = _bins(captured)
            rows = (lone & scored.readout.occupied).nonzero().flatten()
            by_bias = read_imprint(
                sums.weight_noised, sums.bias_noised, structure=geo.structure,
                image_shape=geo.image_shape, noise_std=captured.noise_std, normaliser="bias",
            )  # fmt: skip
            _, true_w, _ = bin_rows(sums.weight_clean, sums.bias_clean, structure=geo.structure)
            for b in rows.tolist():
                err["pinned"].append(float(scored.readout.weight[b] / true_w[b] - 1) ** 2)
                err["bias"].append(float(by_bias.weight[b] / true_w[b] - 1) ** 2)
                n = int(captured.imprint.membership[b].nonzero()[0, 0])
                residual = scored.readout.images[b] - captured.inputs[n]
                ratios.append(float(residual.std() / scored.readout.noise_std[b]))
        rmse = {k: math.sqrt(sum(v) / len(v)) for k, v in err.items()}
        assert rmse["pinned"] < 0.5 * rmse["bias"], (sigma, rmse)
        assert 0.9 < sum(ratios) / len(ratios) < 1.1, sigma
