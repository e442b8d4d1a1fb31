"""LPIPS features shared within an audit: the same values, each distinct image computed once."""

import torch

from opacus_dmaudit import timing
from opacus_dmaudit.score.metrics import LPIPS, pairwise, stage_metrics


def test_shared_features_give_the_same_values_and_compute_each_image_once(mnist5k):
    truth = mnist5k["private"][0][:40].float()
    gen = torch.Generator().manual_seed(0)
    stages = {
        "raw": truth + 0.2 * torch.randn(truth.shape, generator=gen),
        "clean": truth.clone(),  # the same pixels as the truth: computed once
        "dm": (truth + 0.05 * torch.randn(truth.shape, generator=gen)).clamp(0, 1),
    }
    candidates = torch.cat([mnist5k["prior"][0][:30].float(), truth])  # the truth among them
    recon = torch.cat(list(stages.values()))
    lpips = LPIPS(batch_size=16)  # several chunks
    plain = stage_metrics(stages, truth, names=("lpips",), lpips=lpips)
    plain_pairs = pairwise("lpips", recon, candidates, lpips=lpips)
    with timing.measure() as times, lpips.shared_features():
        shared = stage_metrics(stages, truth, names=("lpips",), lpips=lpips)
        shared_pairs = pairwise("lpips", recon, candidates, lpips=lpips)
    for stage in stages:
        assert torch.equal(shared[stage]["lpips"], plain[stage]["lpips"])
    assert torch.equal(shared_pairs, plain_pairs)
    # distinct images: the truth (= clean), raw, dm and 30 other candidates
    assert times.counts["lpips images"] == 3 * 40 + 30
    with timing.measure() as alone:
        stage_metrics(stages, truth, names=("lpips",), lpips=lpips)
        pairwise("lpips", recon, candidates, lpips=lpips)
    assert alone.counts["lpips images"] == 4 * 40 + 3 * 40 + 70  # without sharing


def test_features_beyond_the_budget_are_computed_again_with_the_same_values(mnist5k):
    images = mnist5k["private"][0][:8].float()
    lpips = LPIPS()
    ref = lpips(images, images.flip(0))
    with timing.measure() as times, lpips.shared_features(budget=1):  # nothing fits
        assert torch.equal(lpips(images, images.flip(0)), ref)
        assert torch.equal(lpips(images, images.flip(0)), ref)
    assert times.counts["lpips images"] == 2 * 8 * 2
