"""The pure readout function on gradient sums computed by autograd, one sample at a time."""

import pytest
import torch

from opacus_dmaudit import ImprintBlock
from opacus_dmaudit.reconstruct.readout import read_imprint


def per_sample_sums(block, x, upstream):
    """Exact clipped-free sums Σ_n ∇W(x_n), Σ_n ∇b(x_n) with per-sample upstream weights."""
    w_sum = torch.zeros_like(block.imprint.weight, dtype=torch.float64)
    b_sum = torch.zeros_like(block.imprint.bias, dtype=torch.float64)
    for xn, gn in zip(x, upstream):
        block.zero_grad()
        (block.activations(xn[None]).sum() * gn).backward()
        w_sum += block.imprint.weight.grad.double()
        b_sum += block.imprint.bias.grad.double()
    return w_sum, b_sum


@pytest.mark.parametrize("structure", ["sparse", "cumulative"])
def test_noise_free_readout_is_exact_for_every_singleton(mnist5k, structure):
    x = mnist5k["private"][0][::10][:64]
    block = ImprintBlock(image_shape=(1, 28, 28), num_bins=128, structure=structure)
    block.calibrate(mnist5k["prior"][0][:2000])
    upstream = torch.linspace(0.2, 3.0, 64)  # positive but unequal clipped upstream gradients
    w, b = per_sample_sums(block, x, upstream)
    out = read_imprint(
        w, b, structure=structure, image_shape=(1, 28, 28), noise_std=0.0, clip_norm=None
    )
    members = block.membership(x)
    singles = ((members != 0).sum(1) == 1).nonzero().flatten()
    assert len(singles) >= 25
    for k in singles:
        n = members[k].nonzero().item()
        assert out.occupied[k]
        assert (out.images[k] - x[n]).abs().max() < 1e-4
        assert not out.collision[k]
    empty = (members != 0).sum(1) == 0
    assert not out.occupied[empty].any()


def test_opposite_sign_blend_is_flagged_as_collision():
    block = ImprintBlock(image_shape=(1, 8, 8), num_bins=4)
    x = torch.rand(2, 1, 8, 8) * 0.5 + 0.25
    x[1] = x[0].flip(-1)  # same brightness: same bin
    w, b = per_sample_sums(block, x, torch.tensor([1.0, -0.6]))
    out = read_imprint(w, b, structure="sparse", image_shape=(1, 8, 8), noise_std=0.0)
    k = int(block.membership(x)[:, 0].nonzero())
    assert out.occupied[k] and out.collision[k]


def test_norm_bound_flags_same_sign_blend():
    """Two clipped samples of full norm C in one bin exceed what one sample can give."""
    x = torch.rand(2, 1, 8, 8) * 0.5 + 0.25
    x[1] = x[0].flip(-1)
    c = 1.0
    w = torch.zeros(4, 64, dtype=torch.float64)
    b = torch.zeros(4, dtype=torch.float64)
    for xn in x:
        weight = c / (xn.double().pow(2).sum() + 1).sqrt()  # imprint takes all of the clip norm
        w[2] += weight * xn.flatten().double()
        b[2] += weight
    out = read_imprint(w, b, structure="sparse", image_shape=(1, 8, 8), noise_std=0.0, clip_norm=c)
    assert out.occupied[2] and out.collision[2]
    single = read_imprint(
        w / 2, b / 2 * 1.0, structure="sparse", image_shape=(1, 8, 8), noise_std=0.0, clip_norm=c
    )
    assert not single.collision[2]


def test_noise_prediction_and_occupancy_under_gaussian_noise(mnist5k):
    gen = torch.Generator().manual_seed(0)
    x = mnist5k["private"][0][::20][:50]
    block = ImprintBlock(image_shape=(1, 28, 28), num_bins=128).calibrate(mnist5k["prior"][0])
    weight = 1.0 / (x.flatten(1).pow(2).sum(1) + 1).sqrt()
    w, b = per_sample_sums(block, x, weight)
    sigma_c = 0.01
    w = w + sigma_c * torch.randn(w.shape, generator=gen, dtype=torch.float64)
    b = b + sigma_c * torch.randn(b.shape, generator=gen, dtype=torch.float64)
    out = read_imprint(w, b, structure="sparse", image_shape=(1, 28, 28), noise_std=sigma_c)
    members = block.membership(x)
    singles = ((members != 0).sum(1) == 1).nonzero().flatten()
    ratios = []
    for k in singles:
        n = members[k].nonzero().item()
        assert out.occupied[k]
        ratios.append(float((out.images[k] - x[n]).std() / out.noise_std[k]))
    assert 0.85 < sum(ratios) / len(ratios) < 1.15
    # no false positives among empty bins (0.01 expected false bins per readout)
    assert not out.occupied[(members != 0).sum(1) == 0].any()
    # the older bias-only test is still there for comparison: exactly |Δb|/σC > z
    old = read_imprint(
        w, b, structure="sparse", image_shape=(1, 28, 28), noise_std=sigma_c, occupancy_z=4.0
    )
    assert torch.equal(old.occupied, b.abs() / sigma_c > 4.0)
    assert torch.equal(old.images, out.images)  # same normaliser (Δb) without the bins' geometry


def test_cancelling_blend_is_flagged_under_noise():
    """Two samples with opposite weights that nearly cancel: ``ŵ`` is near zero, so the
    readout's pixels exceed anything one sample of the value range can give."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 64, generator=gen, dtype=torch.float64) * 0.5 + 0.25
    w = torch.zeros(4, 64, dtype=torch.float64)
    b = torch.zeros(4, dtype=torch.float64)
    for xn, g in zip(x, (0.5, -0.45)):
        w[1] += g * xn
        b[1] += g
    sigma_c = 0.01
    w += sigma_c * torch.randn(w.shape, generator=gen, dtype=torch.float64)
    b += sigma_c * torch.randn(b.shape, generator=gen, dtype=torch.float64)
    out = read_imprint(w, b, structure="sparse", image_shape=(1, 8, 8), noise_std=sigma_c)
    assert out.occupied[1] and out.collision[1]
    assert not out.occupied[[0, 2, 3]].any()


def test_bad_inputs():
    with pytest.raises(ValueError, match="structure"):
        read_imprint(
            torch.zeros(2, 4), torch.zeros(2), structure="x", image_shape=(1, 2, 2), noise_std=0.0
        )
    with pytest.raises(ValueError, match="pixels"):
        read_imprint(
            torch.zeros(2, 4),
            torch.zeros(2),
            structure="sparse",
            image_shape=(1, 3, 3),
            noise_std=0.0,
        )
    with pytest.raises(ValueError, match="expected weight_sum"):
        read_imprint(
            torch.zeros(2, 4),
            torch.zeros(3),
            structure="sparse",
            image_shape=(1, 2, 2),
            noise_std=0.0,
        )
