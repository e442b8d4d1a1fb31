"""score_step on steps captured from real Opacus training: exact at σ = 0, limited, matched."""

import pytest
import torch

from opacus_dmaudit.capture.hooks import GradientCapture
from opacus_dmaudit.config import AuditConfig
from opacus_dmaudit.score.scoring import match_readouts, read_step, score_step
from tests.helpers import imprint_model, make_private, train_steps

CONFIG = AuditConfig(metrics=("mse",))


def _captured(mnist5k, *, sigma, batch_size=64, n=1000, poisson=True):
    """The first DP-SGD step on the private digits (128 sparse bins, C = 1), as captured."""
    x, y = mnist5k["private"]
    model = imprint_model(mnist5k["prior"][0][:1000], num_bins=128)
    model, opt, loader, _ = make_private(
        model, x[:n], y[:n], sigma=sigma, batch_size=batch_size, poisson_sampling=poisson
    )
    steps = []
    GradientCapture(opt, should_capture=lambda s: True, on_capture=steps.append).attach()
    train_steps(model, opt, loader, 1)
    (captured,) = steps
    return captured


@pytest.fixture(scope="module")
def batch_at_sigma_0(mnist5k):
    return _captured(mnist5k, sigma=0.0)


def test_a_lone_image_at_sigma_0_is_read_back_exactly(mnist5k):
    captured = _captured(mnist5k, sigma=0.0, batch_size=1, n=4, poisson=False)
    assert captured.batch_size == 1
    scored = score_step(captured, CONFIG)
    (image,) = scored.images
    assert image["true_count"] == 1 and not image["collision"] and image["noise_std"] == 0
    assert scored.truth_index == [0]
    assert torch.equal(scored.truth, captured.inputs)
    assert (scored.raw - captured.inputs).abs().max() < 1e-6
    assert image["mse_raw"] < 1e-12 and image["residual_std_raw"] < 1e-6
    assert scored.success == {"raw": 1, "clean": 1}
    assert scored.counts == {
        "num_bins": 128,
        "occupied_bins": 1,
        "true_singletons": 1,
        "found_singletons": 1,
        "collisions_flagged": 0,
    }
    assert scored.detection["power"] == 1.0 and scored.missed == []


def test_every_lone_digit_of_a_real_batch_is_exact_at_sigma_0(batch_at_sigma_0):
    captured = batch_at_sigma_0
    scored = score_step(captured, CONFIG)
    counts = scored.counts
    assert counts["true_singletons"] == counts["found_singletons"] >= 30
    lone = [row for row, im in enumerate(scored.images) if im["true_count"] == 1]
    assert len(lone) == counts["true_singletons"]
    for row in lone:
        im = scored.images[row]
        assert im["mse_raw"] < 1e-12 and not im["collision"], im
        j = scored.truth_index[row]
        assert torch.equal(scored.truth[row], captured.inputs[j])  # every found row has a truth
        assert (scored.raw[row] - captured.inputs[j]).abs().max() < 1e-5
    blends = [im for im in scored.images if im["true_count"] > 1]
    assert all(im["collision"] for im in blends)  # noise-free blends are all flagged
    assert counts["collisions_flagged"] == len(blends)
    assert scored.success["raw"] >= len(lone)  # the lone ones, at least, meet MSE <= 0.01
    assert scored.dm is None  # no prior, no DM stage


def test_max_images_limits_the_scored_images_not_the_counts(batch_at_sigma_0):
    every = score_step(batch_at_sigma_0, CONFIG)
    assert len(every.images) > 3
    limited = score_step(batch_at_sigma_0, CONFIG.replace(max_images=3))
    assert len(limited.images) == len(limited.found) == 3
    assert limited.images == every.images[:3]
    assert limited.truth.shape[0] == 3 and torch.equal(limited.truth, every.truth[:3])
    assert limited.counts == every.counts  # the step's bins are counted in full


def test_match_readouts_names_the_member_or_the_nearest_of_a_blend(batch_at_sigma_0):
    captured = batch_at_sigma_0
    readout, _ = read_step(captured, CONFIG)
    members = captured.imprint.membership
    count = (members != 0).sum(dim=1)
    lone = int((count == 1).nonzero()[0, 0])
    blend = int((count >= 2).nonzero()[0, 0])
    empty = int((count == 0).nonzero()[0, 0])
    rows = readout.select(torch.tensor([lone, blend, empty]))
    matched = match_readouts(rows, captured.inputs, members)
    assert matched[0] == int(members[lone].nonzero()[0, 0])
    assert matched[2] is None  # nothing real behind an empty bin
    candidates = members[blend].nonzero().flatten().tolist()
    errors = {
        i: float(((captured.inputs[i] - rows.images[1]) ** 2).mean().double()) for i in candidates
    }
    assert matched[1] in candidates and errors[matched[1]] == min(errors.values())
