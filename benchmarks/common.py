"""Shared parts of the benchmarks: real data, readouts through a real Opacus step, denoisers.

Readouts come from the auditor's own scoring stage (:func:`opacus_dmaudit.score.scoring.read_step`
with the auditor's default configuration, :func:`~opacus_dmaudit.score.scoring.match_readouts`), so a
benchmark measures what an audit computes: the same readout, the same occupancy test, the same
predicted noise std, the same matching of readouts to real images, the same lone bins
(:func:`opacus_dmaudit.reconstruct.bins.lone_bins`). The classifier behind the imprint block is the
package's :func:`~opacus_dmaudit.assets.models.small_cnn` at width :data:`CNN_WIDTH`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from opacus_dmaudit.assets.data import (
    load_cifar10_test,
    load_mnist_idx,
    mnist_5k_split,
    natural_patches,
)
from opacus_dmaudit.assets.models import small_cnn
from opacus_dmaudit.capture.hooks import GradientCapture
from opacus_dmaudit.capture.imprint import ImprintBlock
from opacus_dmaudit.config import AuditConfig
from opacus_dmaudit.privacy.bounds import gdp_epsilon
from opacus_dmaudit.reconstruct.bins import lone_bins
from opacus_dmaudit.reconstruct.classical import classical_denoise, tune_classical
from opacus_dmaudit.score.scoring import match_readouts, read_step

DELTA = 1e-5
#: Noise multipliers from "near-perfect" to "nothing visible" (readout std ≈ σ·‖(x, 1)‖).
GRIDS = {
    "mnist": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3),
    "cifar10": (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1),
}
PRIORS = {"mnist": "embedded:mnist", "cifar10": "embedded:natural"}
#: Width of the package's small GroupNorm CNN (``assets.models.small_cnn``) behind the imprint
#: block in the readout benchmarks (the demo's is 16).
CNN_WIDTH = 8


def shared_data_dir() -> Path | None:
    """The project's evaluation data, ``../shared/data`` beside the checkout (or
    ``$DMAUDIT_SHARED_DATA``), if present. Development only: never part of the package."""
    env = os.environ.get("DMAUDIT_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    candidates.append(Path.cwd().parent / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), None)


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


def capture_every_step(
    model: nn.Module, opt, loader, *, shadow_model: nn.Module | None = None
) -> list:
    """One pass over ``loader`` with DP-SGD, every step captured (the auditor's capture stage).

    ``shadow_model``: the model to hand to the capture when it has no imprint layer (a step
    captured for the shadow adversary, as ``attach(optimizer, model=...)`` does).
    """
    steps: list = []
    capture = GradientCapture(
        opt, model=shadow_model, should_capture=lambda s: True, on_capture=steps.append
    )
    capture.attach()
    for xb, yb in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    capture.detach()
    return steps


def opacus_readouts(
    images: torch.Tensor,
    public: torch.Tensor,
    *,
    sigma: float,
    num_bins: int = 512,
    batch_size: int = 64,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    config: AuditConfig | None = None,
) -> dict:
    """Every image goes through one real DP-SGD step of an imprint model (fixed batches).

    Each step is captured as the auditor captures it and read by the auditor's scoring stage
    (``read_step`` with ``config``, default: the auditor's defaults). Returns the images that
    fell alone in their bin: ``truth``, the raw readout ``raw`` (not clipped), its predicted
    per-pixel noise std ``std`` (in [0, 1] units), ``found`` (the auditor's occupancy decision),
    ``batch`` (which step) and ``own`` (the image's index in that step's batch); ``batches``,
    each step's real images in [0, 1] (the identification criterion's candidates); ``total``
    images, the per-step privacy of σ and the occupancy test's name.
    """
    from opacus import PrivacyEngine

    config = config or AuditConfig()
    torch.manual_seed(seed)
    shape = tuple(images.shape[1:])
    block = ImprintBlock(image_shape=shape, num_bins=num_bins).calibrate(public)
    model = nn.Sequential(block, small_cnn(shape[0], shape[-1], width=CNN_WIDTH))
    data = torch.utils.data.TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
    model, opt, loader = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(data, batch_size=batch_size),
        noise_multiplier=sigma,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,
    )
    steps = capture_every_step(model, opt, loader)
    lo, hi = block.value_range
    truth, raw, std, found, batch, own, batches = [], [], [], [], [], [], []
    for k, c in enumerate(steps):
        noised, _ = read_step(c, config)
        members = c.imprint.membership
        rows = noised.select(lone_bins(members).nonzero().flatten())
        index = match_readouts(rows, c.inputs, members)
        batches.append((c.inputs.float() - lo) / (hi - lo))
        for r, i in enumerate(index):
            truth.append(batches[-1][i])
            raw.append((rows.images[r].float() - lo) / (hi - lo))
            std.append(float(rows.noise_std[r]) / (hi - lo))
            found.append(bool(rows.occupied[r]))
            batch.append(k)
            own.append(i)
    mu = 1.0 / sigma if sigma > 0 else float("inf")
    return {
        "truth": torch.stack(truth).float(),
        "raw": torch.stack(raw).float(),
        "std": torch.tensor(std, dtype=torch.float64),
        "found": torch.tensor(found),
        "batch": torch.tensor(batch),
        "own": torch.tensor(own),
        "batches": batches,
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
    is then denoised at its own predicted noise std. The denoisers get the readouts as the prior
    gets them: not clipped. Returns ``(label, denoised)``.
    """
    methods = methods or ("tv", "wavelet", "nlm")
    level = min(float(finite_std(tune_std).median()), 1.0)
    knobs = tune_classical(tune_truth, tune_raw, noise_std=level, score=score, methods=methods)
    scored = []
    for method, knob in knobs.items():
        den = classical_denoise(tune_raw, method=method, noise_std=level, knob=knob)
        scored.append((float(score(den, tune_truth).mean()), method, knob))
    _, method, knob = min(scored, key=lambda r: r[0])
    out = [
        classical_denoise(r[None], method=method, noise_std=min(s, 1.0), knob=knob)
        for r, s in zip(raw, finite_std(std).tolist())
    ]
    return method, torch.cat(out)
