import math

import numpy as np
import pytest
import torch

from opacus_dmaudit import ImprintBlock
from opacus_dmaudit.reconstruct.bins import expected_singletons


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (2, 5, 7)])
@pytest.mark.parametrize("structure", ["sparse", "cumulative"])
def test_residual_output_is_the_input_bit_for_bit(shape, structure):
    block = ImprintBlock(image_shape=shape, num_bins=16, structure=structure)
    x = torch.rand(9, *shape)
    out = block(x)
    assert out.shape == x.shape
    assert torch.equal(out, x)


def test_connection_none_outputs_imprint_signal_only():
    block = ImprintBlock(image_shape=(1, 8, 8), num_bins=8, connection="none")
    x = torch.rand(4, 1, 8, 8)
    out = block(x)
    assert out.shape == x.shape
    assert not torch.allclose(out, x)
    # rank one: every output is a multiple of the fixed output direction
    flat = out.flatten(1)
    assert torch.linalg.matrix_rank(flat) == 1


@pytest.mark.parametrize("direction", ["brightness", "random", "dct"])
def test_sparse_each_sample_activates_exactly_one_bin(direction, mnist5k):
    public = mnist5k["prior"][0][:1000]
    private = mnist5k["private"][0][:300]
    block = ImprintBlock(image_shape=(1, 28, 28), num_bins=32, direction=direction)
    block.calibrate(public)
    members = block.membership(private)
    assert members.shape == (32, 300)
    assert torch.equal(members.sum(dim=0), torch.ones(300, dtype=torch.int64))
    # and only that row carries gradient
    x = private[:5].clone()
    a = block.activations(x)
    grads = torch.autograd.functional.jacobian(lambda z: block.activations(z).sum(1), x)
    assert grads.shape[0] == 5
    slopes = torch.stack(
        [
            torch.autograd.grad(a[i].sum(), block.imprint.bias, retain_graph=True)[0]
            for i in range(5)
        ]
    )
    assert torch.equal(slopes, members[:, :5].T.float())


def test_calibrated_bins_have_equal_mass_on_unseen_digits(mnist5k):
    public = mnist5k["prior"][0]
    private = mnist5k["private"][0]
    block = ImprintBlock(image_shape=(1, 28, 28), num_bins=10).calibrate(public)
    counts = block.membership(private).sum(dim=1).float()
    # 1000 unseen digits in 10 equal-mass bins: about 100 each
    assert counts.min() > 60 and counts.max() < 140


def test_cumulative_membership_is_row_difference(mnist5k):
    block = ImprintBlock(image_shape=(1, 28, 28), num_bins=16, structure="cumulative")
    block.calibrate(mnist5k["prior"][0][:500])
    members = block.membership(mnist5k["private"][0][::5])  # 200 digits of every class
    assert set(members.unique().tolist()) <= {0, 1}
    # each sample lies in at most one bin; those below the first edge in none
    assert members.sum(dim=0).max() == 1
    assert members.sum() >= 170  # 16/17 of them in expectation (188)


def test_construction_and_calibration_leave_global_rng_alone():
    public = torch.rand(200, 1, 28, 28)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ImprintBlock(image_shape=(1, 28, 28), direction="random").calibrate(public)
    assert torch.equal(torch.rand(3), expected)


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="image_shape"):
        ImprintBlock(image_shape=(28, 28))
    with pytest.raises(ValueError, match="num_bins"):
        ImprintBlock(image_shape=(1, 4, 4), num_bins=1)
    with pytest.raises(ValueError, match="structure"):
        ImprintBlock(image_shape=(1, 4, 4), structure="dense")
    with pytest.raises(ValueError, match="dct_mode"):
        ImprintBlock(image_shape=(1, 4, 4), direction="dct", dct_mode=(9, 0))
    block = ImprintBlock(image_shape=(1, 28, 28), num_bins=8)
    with pytest.raises(ValueError, match=r"image_shape matching your data"):
        block(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="at least num_bins"):
        block.calibrate(torch.rand(4, 1, 28, 28))
    with pytest.raises(ValueError, match="strictly increasing"):
        block.calibrate(torch.zeros(20, 1, 28, 28))


def test_expected_singletons_reference_value():
    assert expected_singletons(64, 128) == pytest.approx(39.05, abs=5e-3)
    assert expected_singletons(1, 10) == 1.0
    assert math.isclose(expected_singletons(0, 10), 0.0)


@pytest.mark.parametrize(
    "num_bins,message",
    [
        (2.7, r"num_bins must be an integer of at least 2, got 2.7"),
        (10**9, r"num_bins=1000000000 with 784 pixels .* GiB.*use fewer bins"),
        (True, r"num_bins must be an integer of at least 2, got True"),
    ],
)
def test_num_bins_that_cannot_work_fail_with_a_clear_error(num_bins, message):
    with pytest.raises(ValueError, match=message):
        ImprintBlock(image_shape=(1, 28, 28), num_bins=num_bins)
    assert ImprintBlock(image_shape=(1, 8, 8), num_bins=np.int64(4)).num_bins == 4


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_images_are_refused_with_how_to_convert(dtype):
    block = ImprintBlock(image_shape=(1, 8, 8), num_bins=4)
    images = torch.zeros(2, 1, 8, 8, dtype=dtype)
    for call in (block, block.calibrate, block.membership):
        with pytest.raises(
            TypeError, match=r"floating-point images .*value_range.*x.float\(\) / 255"
        ):
            call(images)


def test_a_block_saved_by_the_previous_release_loads_with_its_bins(mnist5k):
    public = mnist5k["prior"][0][:256]
    model = torch.nn.Sequential(
        ImprintBlock(image_shape=(1, 28, 28), num_bins=16).calibrate(public), torch.nn.Flatten()
    )
    old = model.state_dict()  # the previous release had no fixed copies of the bins
    del old["0.fixed_weight"], old["0.fixed_bias"]
    old["0.imprint.weight"] += 0.01  # and its weights moved with training
    fresh = torch.nn.Sequential(
        ImprintBlock(image_shape=(1, 28, 28), num_bins=16), torch.nn.Flatten()
    )
    with pytest.warns(UserWarning, match="saved by an earlier release"):
        fresh.load_state_dict(old)  # strict: every key matched
    block = fresh[0]
    assert torch.equal(block.fixed_weight, old["0.imprint.weight"])
    assert torch.equal(block.fixed_bias, old["0.imprint.bias"])
    x = mnist5k["private"][0][:64]
    # the bins are those the saved block evaluated: its own weights, as that release did
    z = torch.nn.functional.linear(x.flatten(1), old["0.imprint.weight"], old["0.imprint.bias"])
    expected = torch.clamp(z, min=block.lower, max=block.upper)
    assert torch.allclose(block.activations(x), expected)


def test_duplicate_public_images_still_give_every_bin():
    """Natural-image patches repeat (here 20 images three times each): plain quantiles of the
    projections tie, so the edges come from the distinct values, strictly increasing, each bin
    about equally full; without duplicates the edges are the plain quantiles, unchanged."""
    gen = torch.Generator().manual_seed(0)
    unique = torch.rand(960, 1, 8, 8, generator=gen)
    public = torch.cat([unique, unique[:20], unique[:20]])
    block = ImprintBlock(image_shape=(1, 8, 8), num_bins=950).calibrate(public)
    edges = torch.tensor(block.geometry().bin_edges, dtype=torch.float64)
    assert bool((edges[1:] > edges[:-1]).all())
    proj = unique.flatten(1).double() @ block.measurement.double()
    counts = torch.bucketize(proj, edges[1:-1]).bincount(minlength=950)
    assert int(counts.max()) <= 2  # 960 distinct images over 950 bins
    plain = ImprintBlock(image_shape=(1, 8, 8), num_bins=500).calibrate(unique)
    proj = unique.flatten(1).double() @ plain.measurement.double()
    probs = torch.arange(1, 500, dtype=torch.float64) / 500
    edges = torch.tensor(plain.geometry().bin_edges[1:-1], dtype=torch.float64)
    assert torch.equal(edges, torch.quantile(proj, probs))
    with pytest.raises(ValueError, match="strictly increasing"):  # fewer distinct than bins
        ImprintBlock(image_shape=(1, 8, 8), num_bins=950).calibrate(
            unique[:10].repeat(100, 1, 1, 1)
        )


def test_public_images_nearly_all_the_same_are_refused_with_what_would_do():
    """990 copies of one image and 10 others project to 11 distinct values: 128 bins cannot be
    placed, and the error says how many distinct values there are and what would do; 11 bins
    calibrate on them. Blank images give one value; distinct images of equal brightness (a square
    at different places) tie along the brightness direction but not along a random one."""
    base = torch.rand(11, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    public = torch.cat([base[:1].repeat(990, 1, 1, 1), base[1:]])
    with pytest.raises(ValueError, match="only 11 distinct values") as err:
        ImprintBlock(image_shape=(1, 8, 8), num_bins=128).calibrate(public)
    assert "989 repeat" in str(err.value) and "num_bins <= 11" in str(err.value)
    assert "direction='random'" in str(err.value)
    block = ImprintBlock(image_shape=(1, 8, 8), num_bins=11).calibrate(public)
    edges = torch.tensor(block.geometry().bin_edges, dtype=torch.float64)
    assert bool((edges[1:] > edges[:-1]).all())
    with pytest.raises(ValueError, match="only 1 distinct value along") as err:
        ImprintBlock(image_shape=(1, 8, 8), num_bins=8).calibrate(torch.zeros(200, 1, 8, 8))
    assert "num_bins <=" not in str(err.value)  # no number of bins places one value
    squares = torch.zeros(200, 1, 8, 8)
    for i in range(200):
        squares[i, 0, i % 6 : i % 6 + 3, i // 6 % 6 : i // 6 % 6 + 3] = 1.0
    with pytest.raises(ValueError, match="only 1 distinct value along the block's brightness"):
        ImprintBlock(image_shape=(1, 8, 8), num_bins=16).calibrate(squares)
    ImprintBlock(image_shape=(1, 8, 8), num_bins=16, direction="random").calibrate(squares)
