"""The diffusion prior: loading, Algorithm 1 against diffusers' own schedulers, and real quality."""

import json
import shutil
import time

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from opacus_dmaudit import DiffusionPrior
from opacus_dmaudit.assets.training import build_unet, train_prior
from opacus_dmaudit.cli import main as cli_main
from opacus_dmaudit.reconstruct.prior import match_timesteps, sigma_schedule
from opacus_dmaudit.score.metrics import LPIPS, mse, ssim


def linear_schedule():
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"
    )


@pytest.fixture(scope="module")
def tiny_prior_dir(tmp_path_factory, mnist5k):
    """A few-step prior trained by the real training code (plumbing only, not quality)."""
    out = tmp_path_factory.mktemp("prior")
    train_prior(
        mnist5k["prior"][0][:256],
        out,
        block_out_channels=(16, 32, 32),
        steps=3,
        batch_size=32,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def tiny_prior(tiny_prior_dir):
    # fp32: compared with diffusers' own (fp32) schedulers below
    return DiffusionPrior.from_pretrained(tiny_prior_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def embedded():
    return DiffusionPrior.from_pretrained("embedded:mnist")


# -- Algorithm 1: reference values of the linear schedule (β 1e-4..0.02, T = 1000), where
# σ_t = √((1 − ᾱ_t)/ᾱ_t) and a noise level s is matched at argmin_t |σ_t − s| ------------------
def test_reference_sigmas_and_timesteps():
    sigma_t = sigma_schedule(linear_schedule().alphas_cumprod)
    assert sigma_t[99].item() == pytest.approx(0.33883, abs=5e-6)
    assert sigma_t[499].item() == pytest.approx(3.42414, abs=5e-6)
    assert sigma_t[999].item() == pytest.approx(157.407, abs=5e-4)
    assert match_timesteps(sigma_t, torch.tensor([0.5, 1.0, 2.0])).tolist() == [144, 258, 396]


def test_range_factor_doubles_the_noise_level(tiny_prior):
    # a readout with std s in [0, 1] units has std 2s in the model's [-1, 1] units
    assert tiny_prior.timesteps_for([0.25, 0.5, 1.0]).tolist() == [144, 258, 396]


def _count_calls(prior):
    calls = []
    handle = prior.unet.register_forward_hook(lambda m, a, o: calls.append(a[1].clone()))
    return calls, handle


def test_samplers_evaluate_the_model_at_the_right_timesteps(tiny_prior, mnist5k):
    x = mnist5k["private"][0][:3]
    calls, handle = _count_calls(tiny_prior)
    try:
        tiny_prior.denoise(x, noise_std=[0.25, 0.5, 1.0], sampler="posterior-mean")
        assert len(calls) == 1 and calls[0].tolist() == [144, 258, 396]
        calls.clear()
        tiny_prior.denoise(x, noise_std=[0.25, 0.5, 1.0], sampler="ddim", steps=4)
        assert len(calls) == 4
        assert calls[0].tolist() == [144, 258, 396]
        assert calls[-1].tolist() == [36, 64, 99]  # round(t*/4): the last grid point before 0
        calls.clear()
        # little noise, few steps: t* = 144 takes ceil(145 / 10) = 15 steps, not 20
        tiny_prior.denoise(x[:1], noise_std=0.25, sampler="ddim", steps=20, min_stride=10)
        assert len(calls) == 15
        calls.clear()
        tiny_prior.denoise(x[:1], noise_std=0.25, sampler="ddim", steps=20, min_stride=1)
        assert len(calls) == 20
        calls.clear()
        tiny_prior.denoise(x[:2], noise_std=[0.0, 0.25], sampler="ancestral")
        # every step from t* = 144 down to 0; the σ = 0 image joins at t = 0
        assert len(calls) == 145
        assert [c.numel() for c in calls[:-1]] == [1] * 144 and calls[-1].tolist() == [0, 0]
    finally:
        handle.remove()


@pytest.mark.slow
def test_ddim_every_step_is_algorithm_1(tiny_prior, mnist5k):
    """The paper's loop: deterministic DDIM (η = 0) at every timestep t*, t*−1, …, 1."""
    x = mnist5k["private"][0][:2]
    t_star = int(tiny_prior.timesteps_for(0.1)[0])
    calls, handle = _count_calls(tiny_prior)
    try:
        out = tiny_prior.denoise(x[:1], noise_std=0.1, sampler="ddim-every-step")
        assert [int(c) for c in calls] == list(range(t_star, 0, -1))  # t* = 57 down to 1
        calls.clear()
        tiny_prior.denoise(x, noise_std=[0.0, 0.05], sampler="ddim-every-step", steps=3)
        # steps/min_stride do not apply; t* = 0 takes its one model call at t = 0
        t_small = int(tiny_prior.timesteps_for(0.05)[0])
        assert calls[0].tolist() == [0, t_small]
        assert [c.tolist() for c in calls[1:]] == [[t] for t in range(t_small - 1, 0, -1)]
    finally:
        handle.remove()
    again = tiny_prior.denoise(
        x[:1], noise_std=0.1, sampler="ddim-every-step", generator=torch.Generator().manual_seed(9)
    )
    assert torch.equal(out, again)  # η = 0: no randomness
    # the same as DDIM on a grid of t* steps of one timestep each
    grid = tiny_prior.denoise(x[:1], noise_std=0.1, sampler="ddim", steps=t_star, min_stride=1)
    assert torch.allclose(out, grid, atol=1e-6)
    with pytest.warns(DeprecationWarning, match="ancestral"):
        old = tiny_prior.denoise(x[:1], noise_std=0.02, sampler="ddpm")
    assert torch.equal(old, tiny_prior.denoise(x[:1], noise_std=0.02, sampler="ancestral"))


def test_ddim_matches_diffusers_ddim_scheduler(tiny_prior, mnist5k):
    # t* = 380 with 20 steps is the uniform grid 380, 361, ..., 19 that DDIMScheduler walks
    sigma_t = tiny_prior.sigma_t
    s = float(sigma_t[380]) / 2
    assert int(tiny_prior.timesteps_for(s)[0]) == 380
    y = mnist5k["private"][0][:2] + s * torch.randn(
        2, 1, 28, 28, generator=torch.Generator().manual_seed(0)
    )
    ours = tiny_prior.denoise(y, noise_std=s, sampler="ddim", steps=20, min_stride=1)

    sched = DDIMScheduler.from_config(linear_schedule().config, clip_sample=True)
    sched.set_timesteps(1000 // 19)
    assert sched.config.num_train_timesteps // sched.num_inference_steps == 19
    a = tiny_prior.alphas_cumprod[380].float()
    x = a.sqrt() * (torch.nn.functional.pad(y, (2, 2, 2, 2)) * 2 - 1)
    for t in range(380, 18, -19):
        eps = tiny_prior.unet(x, torch.full((2,), t)).sample
        step = sched.step(eps, t, x, eta=0.0, use_clipped_model_output=True)
        x = step.prev_sample
    ref = ((step.pred_original_sample + 1) / 2).clamp(0, 1)[:, :, 2:30, 2:30]
    assert torch.allclose(ours, ref, atol=2e-5)


def test_ancestral_matches_diffusers_ddpm_scheduler(tiny_prior, mnist5k):
    s = 0.1
    t_star = int(tiny_prior.timesteps_for(s)[0])
    y = mnist5k["private"][0][:2] + s * torch.randn(
        2, 1, 28, 28, generator=torch.Generator().manual_seed(1)
    )
    ours = tiny_prior.denoise(
        y, noise_std=s, sampler="ancestral", generator=torch.Generator().manual_seed(5)
    )
    sched = linear_schedule()
    sched.set_timesteps(1000)
    gen = torch.Generator().manual_seed(5)
    x = tiny_prior.alphas_cumprod[t_star].float().sqrt() * (
        torch.nn.functional.pad(y, (2, 2, 2, 2)) * 2 - 1
    )
    for t in range(t_star, -1, -1):
        eps = tiny_prior.unet(x, torch.full((2,), t)).sample
        x = sched.step(eps, t, x, generator=gen).prev_sample
    ref = ((x + 1) / 2).clamp(0, 1)[:, :, 2:30, 2:30]
    assert torch.allclose(ours, ref, atol=5e-5)


def test_per_image_noise_levels_in_one_batch(tiny_prior, mnist5k):
    x = mnist5k["private"][0][:3]
    stds = [0.05, 0.3, 0.9]
    y = x + torch.tensor(stds).view(-1, 1, 1, 1) * torch.randn(
        x.shape, generator=torch.Generator().manual_seed(2)
    )
    for sampler in ("ddim", "posterior-mean"):
        batch = tiny_prior.denoise(y, noise_std=stds, sampler=sampler, steps=5)
        alone = torch.cat(
            [
                tiny_prior.denoise(y[i : i + 1], noise_std=stds[i], sampler=sampler, steps=5)
                for i in range(3)
            ]
        )
        assert torch.allclose(batch, alone, atol=1e-5)


def test_deterministic_and_never_touches_the_global_rng(tiny_prior, mnist5k):
    y = mnist5k["private"][0][:2] + 0.05
    state = torch.random.get_rng_state()
    a = tiny_prior.denoise(
        y, noise_std=0.05, sampler="ancestral", generator=torch.Generator().manual_seed(3)
    )
    b = tiny_prior.denoise(
        y, noise_std=0.05, sampler="ancestral", generator=torch.Generator().manual_seed(3)
    )
    c = tiny_prior.denoise(
        y, noise_std=0.05, sampler="ancestral", generator=torch.Generator().manual_seed(4)
    )
    tiny_prior.denoise(y, noise_std=0.05, sampler="ancestral")  # no generator: a fresh seeded one
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_noise_level_is_estimated(embedded, mnist5k):
    x = mnist5k["private"][0][:16]
    g = torch.Generator().manual_seed(0)
    for s in (0.1, 0.3):
        est = DiffusionPrior.estimate_noise_std(x + s * torch.randn(x.shape, generator=g))
        assert est.mean().item() == pytest.approx(s, rel=0.15)
    y = x + 0.2 * torch.randn(x.shape, generator=g)
    auto = embedded.denoise(y, sampler="posterior-mean")
    assert mse(auto, x).mean() < mse(y, x).mean() / 3


def test_bad_arguments(tiny_prior):
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match="sampler"):
        tiny_prior.denoise(x, noise_std=0.1, sampler="euler")
    with pytest.raises(ValueError, match="noise_std has 3 values"):
        tiny_prior.denoise(x, noise_std=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="non-negative"):
        tiny_prior.denoise(x, noise_std=-1.0)
    with pytest.raises(ValueError, match="steps"):
        tiny_prior.denoise(x, noise_std=0.1, steps=0)


def test_nan_images_are_refused_not_denoised_into_nan(tiny_prior):
    x = torch.rand(3, 1, 28, 28)
    x[1, 0, 4, 4] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"images \[1, 2\] have NaN or infinite pixels"):
        tiny_prior.denoise(x, noise_std=0.1)


# -- loading --------------------------------------------------------------------------------------
def test_shape_mismatch_is_an_error_unless_resizing_is_asked_for(tiny_prior_dir):
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir)
    assert prior.model_shape == (1, 32, 32) and prior.content_shape == (1, 28, 28)
    prior.check_fits((1, 28, 28))  # the padded content it was trained on
    prior.check_fits((1, 32, 32))
    for shape in [(3, 32, 32), (1, 64, 64)]:
        with pytest.raises(ValueError, match="resize=True"):
            prior.denoise(torch.rand(1, *shape), noise_std=0.1)
    resizing = DiffusionPrior.from_pretrained(tiny_prior_dir, resize=True)
    out = resizing.denoise(torch.rand(2, 3, 40, 40), noise_std=0.1)
    assert out.shape == (2, 3, 40, 40) and 0 <= out.min() and out.max() <= 1


def test_hub_id_resolves_through_the_hugging_face_cache(tmp_path, tiny_prior_dir):
    """The real ``from_pretrained(hub id)`` path, served from a local hub cache (no network here).

    Two repo layouts: google/ddpm-* keeps config.json and scheduler_config.json (with the old
    ``timesteps`` key) at the top; DDPMPipeline.save_pretrained uses unet/ and scheduler/.
    """
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    flat = cache / "models--google--ddpm-cifar10-32"
    snap = flat / "snapshots" / commit
    snap.mkdir(parents=True)
    (flat / "refs").mkdir()
    (flat / "refs" / "main").write_text(commit)
    torch.manual_seed(0)
    build_unet(channels=3, sample_size=32, block_out_channels=(16, 32, 32)).save_pretrained(snap)
    (snap / "scheduler_config.json").write_text(
        json.dumps(
            {
                "_class_name": "GaussianDDPMScheduler",
                "beta_end": 0.02,
                "beta_schedule": "linear",
                "beta_start": 0.0001,
                "timesteps": 1000,
                "variance_type": "fixed_large",
            }
        )
    )
    prior = DiffusionPrior.from_pretrained(
        "google/ddpm-cifar10-32", cache_dir=cache, local_files_only=True
    )
    assert prior.model_shape == (3, 32, 32)
    assert prior.timesteps_for(0.5).item() == 258
    assert prior.denoise(torch.rand(1, 3, 32, 32), noise_std=0.2).shape == (1, 3, 32, 32)

    nested = cache / "models--someone--mnist-prior"
    snap = nested / "snapshots" / commit
    shutil.copytree(tiny_prior_dir, snap)
    (nested / "refs").mkdir()
    (nested / "refs" / "main").write_text(commit)
    prior = DiffusionPrior.from_pretrained(
        "someone/mnist-prior", cache_dir=cache, local_files_only=True
    )
    assert prior.model_shape == (1, 32, 32)


def test_auto_precision_follows_the_hardware(tiny_prior_dir):
    from opacus_dmaudit.reconstruct.prior import native_bf16

    auto = DiffusionPrior.from_pretrained(tiny_prior_dir)
    assert auto.dtype == (torch.bfloat16 if native_bf16("cpu") else torch.float32)
    fp32 = DiffusionPrior.from_pretrained(tiny_prior_dir, dtype=torch.float32)
    x = torch.rand(2, 1, 28, 28)
    a = auto.denoise(x, noise_std=0.2, sampler="posterior-mean")
    b = fp32.denoise(x, noise_std=0.2, sampler="posterior-mean")
    assert (a - b).abs().max() < 0.05  # bf16 autocast stays close to fp32


def test_missing_and_unknown_priors(tmp_path):
    with pytest.raises(ValueError, match="embedded:mnist"):
        DiffusionPrior.from_pretrained("embedded:cifar")
    with pytest.raises(FileNotFoundError):
        DiffusionPrior.from_pretrained(tmp_path)  # an empty directory
    with pytest.raises(FileNotFoundError):
        DiffusionPrior.from_pretrained(tmp_path / "nope")


def test_a_hub_shaped_typo_of_a_local_folder_fails_fast_with_its_cause(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/my-prior is not here: the name looks like a hub id
    start = time.monotonic()
    with pytest.raises(OSError, match=r"no folder .*runs/my-prior and the Hugging Face Hub"):
        DiffusionPrior.from_pretrained("runs/my-prior", cache_dir=tmp_path / "hub")
    assert time.monotonic() - start < 30  # no minute of download retries


def test_train_prior_cli_on_an_npz(tmp_path, mnist5k, capsys):
    imgs = (mnist5k["prior"][0][:64, 0] * 255).round().to(torch.uint8).numpy()
    np.savez(tmp_path / "digits.npz", images=imgs)
    out = tmp_path / "p"
    code = cli_main(
        [
            "train-prior",
            "--data",
            str(tmp_path / "digits.npz"),
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "16",
            "--channels",
            "16",
            "32",
            "--quiet",
        ]
    )
    assert code == 0 and "saved" in capsys.readouterr().out
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 2 and record["image_shape"] == [1, 28, 28]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    # diffusers itself can load what we saved
    UNet2DModel.from_pretrained(out, subfolder="unet")
    with pytest.raises(SystemExit):
        cli_main(["train-prior", "--data", str(tmp_path / "none.npz"), "--out", str(out)])


# -- the embedded prior ---------------------------------------------------------------------------
def test_embedded_prior_is_small_and_documented(embedded):
    from opacus_dmaudit.reconstruct.prior import _embedded_path

    path = _embedded_path("mnist")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 10 * 2**20
    record = json.loads((path / "training.json").read_text())
    assert "'prior' split" in record["data"]
    assert embedded.content_shape == (1, 28, 28)


def test_embedded_prior_never_saw_the_demo_digits(mnist5k):
    """Its recorded training-data hash is the 'prior' split's, which excludes the private digits."""
    import hashlib

    from opacus_dmaudit.reconstruct.prior import _embedded_path

    record = json.loads((_embedded_path("mnist") / "training.json").read_text())
    prior_imgs, private_imgs = mnist5k["prior"][0], mnist5k["private"][0]
    assert record["data_sha256"] == hashlib.sha256(prior_imgs.numpy().tobytes()).hexdigest()
    flat_prior = {bytes(x) for x in (prior_imgs.flatten(1) * 255).round().to(torch.uint8).numpy()}
    assert not any(
        bytes(x) in flat_prior
        for x in (private_imgs.flatten(1) * 255).round().to(torch.uint8).numpy()
    )


def test_embedded_prior_beats_raw_on_real_held_out_digits(embedded, mnist5k):
    x = mnist5k["private"][0][::100][:10]  # one digit per class, never seen by the prior
    lp = LPIPS()
    for s in (0.2, 0.4):
        y = x + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        out = embedded.denoise(y, noise_std=s, sampler="ddim", steps=20)
        raw = y.clamp(0, 1)
        assert mse(out, x).mean() < mse(raw, x).mean()
        assert ssim(out, x).mean() > ssim(raw, x).mean()
        assert lp(out, x).mean() < lp(raw, x).mean()


def test_embedded_natural_prior_learned_photo_patches_never_cifar(shared_data):
    """``embedded:natural``: trained on the bundled photos' patches (hash), none of them CIFAR-10."""
    import hashlib

    from opacus_dmaudit.assets.data import load_cifar10_test, natural_patches
    from opacus_dmaudit.assets.training import load_training_images
    from opacus_dmaudit.reconstruct.prior import _embedded_path

    path = _embedded_path("natural")
    record = json.loads((path / "training.json").read_text())
    images, _ = load_training_images("natural-patches")
    assert record["data_sha256"] == hashlib.sha256(images.numpy().tobytes()).hexdigest()
    assert record["image_shape"] == [3, 32, 32]
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) <= 10 * 2**20
    cifar, _ = load_cifar10_test(shared_data / "cifar10" / "cifar10_test_first1017.npz")
    patches = torch.from_numpy(natural_patches()).permute(0, 3, 1, 2).float() / 255
    nearest = torch.cdist(cifar.flatten(1), patches[::4].flatten(1)).min(dim=1).values
    assert float(nearest.min()) > 1.0  # not one CIFAR-10 image among them, nor close to one
    prior = DiffusionPrior.from_pretrained("embedded:natural")
    assert prior.model_shape == (3, 32, 32)
    # and it denoises real CIFAR-10 images it never saw better than leaving the noise in
    x = cifar[:16]
    y = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    out = prior.denoise(y, noise_std=0.1, sampler="ddim", steps=20)
    assert mse(out, x).mean() < mse(y.clamp(0, 1), x).mean()
    assert LPIPS()(out, x).mean() < LPIPS()(y.clamp(0, 1), x).mean()


# -- grey images, other sizes -------------------------------------------------------------------
@pytest.fixture(scope="module")
def colour_prior():
    """A random-weight 3-channel prior (plumbing only, not quality)."""
    torch.manual_seed(0)
    unet = build_unet(channels=3, sample_size=32, block_out_channels=(16, 32, 32))
    return DiffusionPrior(unet, linear_schedule().alphas_cumprod, dtype=torch.float32)


def test_grey_images_through_a_colour_prior_stay_grey(colour_prior, mnist5k):
    """Replicated in (three equal channels), averaged out, at the luminance noise level s·√3."""
    grey = torch.nn.functional.pad(mnist5k["private"][0][:2], (2, 2, 2, 2))  # 1x32x32
    assert colour_prior.fit_plan((1, 32, 32)) == ("grey->rgb", None)  # no resize=True needed
    seen = []
    handle = colour_prior.unet.register_forward_hook(lambda m, a, o: seen.append(a))
    try:
        out = colour_prior.denoise(grey, noise_std=0.1, sampler="posterior-mean")
    finally:
        handle.remove()
    assert out.shape == (2, 1, 32, 32)
    x_in, t_in = seen[0]
    assert x_in.shape[1] == 3 and torch.equal(x_in[:, 0], x_in[:, 1])
    assert torch.equal(x_in[:, 0], x_in[:, 2])
    assert t_in.tolist() == colour_prior.timesteps_for([0.1 * 3**0.5] * 2).tolist()
    # the output is the channel average of the model's reconstruction
    direct = colour_prior.denoise(
        grey.expand(-1, 3, -1, -1), noise_std=0.1 * 3**0.5, sampler="posterior-mean"
    )
    assert torch.allclose(out, direct.mean(dim=1, keepdim=True), atol=1e-6)


def test_grey_photos_through_the_natural_prior_are_denoised_at_the_luminance_level(shared_data):
    """Real grey CIFAR-10 images through ``embedded:natural``: s·√3 beats the naive s."""
    from opacus_dmaudit.assets.data import load_cifar10_test

    cifar, _ = load_cifar10_test(shared_data / "cifar10" / "cifar10_test_first1017.npz")
    x = cifar[100:116]
    grey = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
    prior = DiffusionPrior.from_pretrained("embedded:natural")
    y = grey + 0.2 * torch.randn(grey.shape, generator=torch.Generator().manual_seed(0))
    ours = prior.denoise(y, noise_std=0.2)
    naive = prior.denoise(y.expand(-1, 3, -1, -1), noise_std=0.2).mean(dim=1, keepdim=True)
    assert ours.shape == grey.shape
    assert mse(ours, grey).mean() < mse(naive, grey).mean() < mse(y.clamp(0, 1), grey).mean()


def test_other_sizes_only_through_resize_with_the_noise_level_rescaled(tiny_prior_dir, mnist5k):
    strict = DiffusionPrior.from_pretrained(tiny_prior_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="resize=True"):
        strict.check_fits((1, 64, 64))
    with pytest.raises(ValueError, match="colour is lost"):
        strict.check_fits((3, 32, 32))
    prior = DiffusionPrior.from_pretrained(tiny_prior_dir, dtype=torch.float32, resize=True)
    assert prior.fit_plan((1, 64, 64)) == (None, "resize")
    assert prior.fit_plan((1, 28, 28)) == (None, "pad")  # its content size: exact, no resizing
    # the noise std the model is told is the std of the resized noise (measured here)
    from opacus_dmaudit.reconstruct.prior import _resize, _resize_gain

    noise = torch.randn(256, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    measured = float(_resize(noise, (32, 32)).std())
    assert _resize_gain(64, 32) ** 2 == pytest.approx(measured, rel=0.02)
    big = torch.nn.functional.interpolate(mnist5k["private"][0][:2], size=(64, 64))
    seen = []
    handle = prior.unet.register_forward_hook(lambda m, a, o: seen.append(a[1]))
    try:
        out = prior.denoise(big, noise_std=0.4, sampler="posterior-mean")
    finally:
        handle.remove()
    assert out.shape == (2, 1, 64, 64)
    expected = prior.timesteps_for(0.4 * _resize_gain(64, 32) ** 2)
    assert seen[0].tolist() == expected.expand(2).tolist()
    assert seen[0][0] < prior.timesteps_for(0.4)[0]  # shrinking averages the noise down
    colour = prior.denoise(torch.rand(1, 3, 64, 64), noise_std=0.1, sampler="posterior-mean")
    assert colour.shape == (1, 3, 64, 64) and torch.equal(colour[:, 0], colour[:, 2])
