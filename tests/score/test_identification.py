"""identify() against the brute force: every row of every stage scored against the whole batch."""

import pytest

from opacus_dmaudit.capture.hooks import GradientCapture
from opacus_dmaudit.config import AuditConfig
from opacus_dmaudit.schema import HIGHER_IS_BETTER
from opacus_dmaudit.score.identification import identify, target_rows
from opacus_dmaudit.score.metrics import LPIPS, identified, pairwise
from opacus_dmaudit.score.scoring import score_step
from tests.helpers import imprint_model, make_private, train_steps

METRICS = ("mse", "ssim", "lpips")


def _brute_force(scored, captured, lpips):
    """Shares (LPIPS, every stage) and per-target counts, each row scored on its own."""
    stages = {"raw": scored.raw, "clean": scored.clean}
    own = [t for t in scored.truth_index if t is not None]
    lone = target_rows(scored)
    lo, hi = captured.imprint.geometry.value_range
    candidates = ((captured.inputs.float() - lo) / (hi - lo)).clamp(0, 1)
    shares, counts = {}, {m: {} for m in METRICS}
    for metric in METRICS:
        for stage, recon in stages.items():
            hits = [
                bool(
                    identified(
                        pairwise(metric, recon[j : j + 1], candidates, lpips=lpips),
                        [own[j]],
                        higher_is_better=HIGHER_IS_BETTER[metric],
                    )[0]
                )
                for j in range(len(own))
            ]
            if metric == "lpips":
                shares[stage] = len({own[j] for j in range(len(own)) if hits[j]}) / len(candidates)
            if stage == "raw":
                counts[metric][stage] = sum(hits[j] for j in lone)
    return shares, counts


@pytest.mark.slow
def test_identification_equals_scoring_every_row_alone(mnist5k):
    """A real DP-SGD step at σ = 0.08 (some readouts identified, some not): the shares of every
    stage and the per-target counts of every distance equal those of each row scored alone."""
    x, y = mnist5k["private"]
    model = imprint_model(mnist5k["prior"][0][:1000], num_bins=128)
    model, opt, loader, _ = make_private(model, x[:600], y[:600], sigma=0.08, batch_size=64)
    steps = []
    GradientCapture(opt, should_capture=lambda s: True, on_capture=steps.append).attach()
    train_steps(model, opt, loader, 1)
    (captured,) = steps
    lpips = LPIPS()
    scored = score_step(captured, AuditConfig(metrics=("mse",)))
    got = identify(scored, captured, metrics=METRICS, success_metric="lpips", lpips=lpips)
    shares, counts = _brute_force(scored, captured, lpips)
    assert got.targets == len(target_rows(scored)) >= 5
    assert got.shares == shares
    assert {m: {"raw": c["raw"]} for m, c in got.identified.items()} == counts
    hits = sum(counts[m]["raw"] for m in METRICS)
    assert 0 < hits < len(METRICS) * got.targets  # neither all nor none: the test can tell
