"""Shared parts of the benchmarks: real data, readouts through a real Opacus step, denoisers."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from opacus_dmaudit.bounds import gdp_epsilon  # noqa: E402
from opacus_dmaudit.capture import GradientCapture  # noqa: E402
from opacus_dmaudit.classical import classical_denoise, tune_classical  # noqa: E402
from opacus_dmaudit.data import (  # noqa: E402
    load_cifar10_test,
    load_mnist_idx,
    mnist_5k_split,
    natural_patches,
    shared_data_dir,
)
from opacus_dmaudit.imprint import ImprintBlock  # noqa: E402
from opacus_dmaudit.readout import read_imprint  # noqa: E402

DELTA = 1e-5
#: Noise multipliers from "near-perfect" to "nothing visible" (readout std ≈ σ·‖(x, 1)‖).
GRIDS = {
    "mnist": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3),
    "cifar10": (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1),
}
PRIORS = {"mnist": "embedded:mnist", "cifar10": "embedded:natural"}


def load_dataset(name: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(evaluation images, public images)``: MNIST test digits or the 1017 CIFAR-10 test images.

    Public images calibrate the imprint bins: MNIST-5k training digits, natural-image patches.
    """
    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("../shared/data is missing: the benchmarks need the real test sets")
    if name == "mnist":
        images = load_mnist_idx(shared / "mnist" / "t10k-images-idx3-ubyte.gz")
        public = mnist_5k_split()["prior"][0]
    elif name == "cifar10":
        images, _ = load_cifar10_test(shared / "cifar10" / "cifar10_test_first1017.npz")
        public = torch.from_numpy(natural_patches(count=4000, seed=1)).permute(0, 3, 1, 2) / 255
    else:
        raise ValueError(name)
    return (images if n is None else images[:n]), public.float()


def _cnn(channels: int, size: int) -> nn.Module:
    flat = 16 * (((size - 4) // 2 - 4) // 2) ** 2
    return nn.Sequential(
        nn.Conv2d(channels, 8, 5, 2),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 5, 2),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, 10),
    )


def opacus_readouts(
    images: torch.Tensor,
    public: torch.Tensor,
    *,
    sigma: float,
    num_bins: int = 512,
    batch_size: int = 64,
    max_grad_norm: float = 1.0,
    seed: int = 0,
) -> dict:
    """Every image goes through one real DP-SGD step of an imprint model (fixed batches).

    Returns the images that fell alone in their bin: ``truth``, the raw readout ``raw`` (not
    clipped), its predicted per-pixel noise std ``std``, and ``found`` (the auditor's occupancy
    decision, z > 4), plus ``total`` images and the per-step privacy of σ.
    """
    from opacus import PrivacyEngine

    torch.manual_seed(seed)
    shape = tuple(images.shape[1:])
    block = ImprintBlock(image_shape=shape, num_bins=num_bins).calibrate(public)
    model = nn.Sequential(block, _cnn(shape[0], shape[-1]))
    data = torch.utils.data.TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
    model, opt, loader = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(data, batch_size=batch_size),
        noise_multiplier=sigma,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,
    )
    steps: list = []
    capture = GradientCapture(
        opt, block=None, should_capture=lambda s: True, on_capture=steps.append
    )
    capture.attach()
    for xb, yb in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    capture.detach()
    truth, raw, std, found = [], [], [], []
    for c in steps:
        sums = c.imprint
        ro = read_imprint(
            sums.weight_noised,
            sums.bias_noised,
            structure=capture.block.structure,
            image_shape=shape,
            noise_std=c.noise_std,
            clip_norm=c.max_grad_norm,
            value_range=capture.block.value_range,
        )
        counts = (sums.membership != 0).sum(dim=1)
        for b in (counts == 1).nonzero().flatten().tolist():
            truth.append(c.inputs[(sums.membership[b] != 0).nonzero()[0, 0]])
            raw.append(ro.images[b])
            std.append(float(ro.noise_std[b]))
            found.append(bool(ro.occupied[b]))
    mu = 1.0 / sigma if sigma > 0 else float("inf")
    return {
        "truth": torch.stack(truth).float(),
        "raw": torch.stack(raw).float(),
        "std": torch.tensor(std, dtype=torch.float64),
        "found": torch.tensor(found),
        "total": len(images),
        "sigma": sigma,
        "mu": mu,
        "epsilon": gdp_epsilon(mu, DELTA) if sigma > 0 else float("inf"),
    }


def finite_std(std: torch.Tensor) -> torch.Tensor:
    """Predicted stds with the infinite ones (no signal in the bin) made merely huge."""
    return torch.nan_to_num(std, nan=1e6, posinf=1e6).clamp(max=1e6)


def best_classical(truth, raw, std, tune_truth, tune_raw, tune_std, *, score, methods=None):
    """Tune each classical denoiser on the tuning readouts; apply the best one to each image.

    The tuning readouts are other images through the same kind of step at the same σ. Each image
    is then denoised at its own predicted noise std. Returns ``(label, denoised)``.
    """
    methods = methods or ("tv", "wavelet", "nlm")
    level = min(float(finite_std(tune_std).median()), 1.0)
    knobs = tune_classical(
        tune_truth, tune_raw.clamp(0, 1), noise_std=level, score=score, methods=methods
    )
    scored = []
    for method, knob in knobs.items():
        den = classical_denoise(tune_raw.clamp(0, 1), method=method, noise_std=level, knob=knob)
        scored.append((float(score(den, tune_truth).mean()), method, knob))
    _, method, knob = min(scored, key=lambda r: r[0])
    out = [
        classical_denoise(r[None].clamp(0, 1), method=method, noise_std=min(s, 1.0), knob=knob)
        for r, s in zip(raw, finite_std(std).tolist())
    ]
    return method, torch.cat(out)
