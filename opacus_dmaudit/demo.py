"""``dmaudit demo``: DP-SGD on real digits at several noise levels, audited, entirely offline.

The private training set is the held-out part of MNIST-5k (:func:`.data.mnist_5k_split`); the
imprint bins are calibrated on the disjoint public part. Each noise multiplier gets its own run
directory (``sigma_<σ>``: audit log, TensorBoard events, report); every recovered image is also
denoised with the diffusion prior (the embedded ``embedded:mnist`` by default, which never saw these
digits). A rerun into the same ``out_dir`` replaces the demo's earlier runs there.

Every audit also checks the DP mechanism (noise, clipping, sampling, accountant; see
:mod:`.mechanism`). ``broken_noise=True`` (``dmaudit demo --broken-noise``) adds one run at the
last noise multiplier whose optimizer adds only half the noise it reports (``sigma_<σ>_broken``):
its checks fail and its report says the audit is invalid.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from opacus import PrivacyEngine
from torch import nn
from tqdm.auto import tqdm

from ._opacus import scaled_noise
from .assets.data import mnist_5k_split
from .assets.models import small_cnn
from .auditor import DMAuditor
from .capture.imprint import ImprintBlock
from .reconstruct.prior import DiffusionPrior
from .sinks.summary import RunSummary

__all__ = ["run_demo", "digit_cnn"]

logger = logging.getLogger(__name__)


@dataclass
class DemoRun:
    """One run of the demo: its σ, whether it is the broken-noise run, its folder and summary."""

    noise_multiplier: float
    broken: bool
    log_dir: Path
    summary: RunSummary

    @property
    def log(self) -> Path:
        return self.log_dir / "audit.jsonl"

    @property
    def report(self) -> Path:
        return self.log_dir / "report.html"

    @property
    def label(self) -> str:
        return f"{self.noise_multiplier:g}" + (" (broken noise)" if self.broken else "")


def digit_cnn() -> nn.Module:
    """The demo's CNN for 28×28 digits (:func:`~opacus_dmaudit.assets.models.small_cnn`)."""
    return small_cnn(1, 28)


def run_demo(
    *,
    out_dir: str | Path = "dmaudit-demo",
    noise_multipliers: Sequence[float] = (0.005, 0.02, 0.05, 1.0),
    steps: int = 60,
    every_n_steps: int = 20,
    batch_size: int = 64,
    seed: int = 0,
    prior: str | DiffusionPrior | None = "embedded:mnist",
    sampler: str = "ddim",
    progress: bool = True,
    broken_noise: bool = False,
) -> list[DemoRun]:
    """Train and audit one run per noise multiplier.

    Args:
        broken_noise: add a run at the last noise multiplier whose optimizer secretly adds half
            the noise (a deliberately broken mechanism the checks must catch).

    Returns:
        One :class:`DemoRun` per run.
    """
    if steps < 1 or every_n_steps < 1:
        raise ValueError("steps and every_n_steps must be positive")
    bad = [s for s in noise_multipliers if not (s >= 0 and math.isfinite(s))]
    if bad:
        raise ValueError(f"noise multipliers must be finite and non-negative, got {bad}")
    if prior is not None and not isinstance(prior, DiffusionPrior):
        prior = DiffusionPrior.from_pretrained(prior)
    split = mnist_5k_split()
    runs = [(sigma, False) for sigma in noise_multipliers]
    if broken_noise:
        runs.append((noise_multipliers[-1] if noise_multipliers else 1.0, True))
    out = []
    for sigma, broken in runs:
        run_dir = Path(out_dir) / (f"sigma_{sigma:g}" + ("_broken" if broken else ""))
        model, optimizer, loader, engine = _private_model(split, sigma, batch_size, seed)
        auditor = DMAuditor(
            privacy_engine=engine,
            log_dir=run_dir,
            every_n_steps=every_n_steps,
            prior=prior,
            sampler=sampler,
            existing="overwrite",  # the demo's own earlier run of this σ
        )
        label = f"σ={sigma:g}" + (" broken" if broken else "")
        with tqdm(total=steps, desc=label, disable=not progress, unit="step") as bar:
            with scaled_noise(0.5) if broken else contextlib.nullcontext():
                # once per run (κ̂ is cached across runs): the baseline and the prior's fit
                bar.set_postfix_str("measuring the baseline and the prior's fit on public digits")
                auditor.attach(optimizer)
                bar.set_postfix_str("")
                _train(model, optimizer, loader, steps, auditor, bar)
                summary = auditor.close()
        out.append(DemoRun(sigma, broken, run_dir, summary))
    if out:
        from .sinks.report import build_comparison

        build_comparison(out_dir, [run.log_dir for run in out])
    return out


def _private_model(split, sigma: float, batch_size: int, seed: int):
    """The demo's imprint model and Poisson DP-SGD on the private digits, seeded."""
    x, y = split["private"]
    torch.manual_seed(seed)
    block = ImprintBlock(image_shape=(1, 28, 28), num_bins=128).calibrate(split["prior"][0])
    model = nn.Sequential(block, digit_cnn())
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        poisson_sampling=True,
    )
    return model, optimizer, loader, engine


def _train(model, optimizer, loader, steps: int, auditor: DMAuditor, bar) -> None:
    """``steps`` DP-SGD steps over as many epochs as it takes; the bar shows the last audit."""
    done = 0
    while done < steps:
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            done += 1
            bar.update(1)
            if auditor.history and auditor.history[-1].step == done:
                last = auditor.history[-1]
                bar.set_postfix(
                    ssim_raw=f"{last.mean('ssim', 'raw') or float('nan'):.2f}",
                    ssim_dm=f"{last.mean('ssim', 'dm') or float('nan'):.2f}",
                )
            if done == steps:
                return
