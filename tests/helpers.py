"""What the tests share: the real evaluation data, the small CNN and one audited DP-SGD run.

Fixtures live in ``conftest.py``; everything a test imports lives here. Nothing here comes from
``benchmarks/``: the tests stand on the package alone.

    model = imprint_model(public, num_bins=128)
    model, opt, loader, engine = make_private(model, x, y, sigma=0.01)
    train_steps(model, opt, loader, 3)

or, all in one (a ``DMAuditor`` attached, every step audited):

    auditor, engine = audited_run(mnist5k, tmp_path, sigma=0.01, steps=3, close=True)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opacus_dmaudit import DMAuditor, ImprintBlock
from opacus_dmaudit.assets import models

#: The checkout's root (``tests/`` is one level below it).
REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The project's evaluation data, if present: ``$DMAUDIT_SHARED_DATA``, else ``../shared/data``
    beside the checkout (or beside the working directory). Development data, never packaged."""
    env = os.environ.get("DMAUDIT_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), None)


def small_cnn(channels: int = 1, size: int = 28, num_classes: int = 10) -> nn.Sequential:
    """A normalisation-free CNN (8 and 16 channels) that Opacus supports in hooks, functorch and
    ghost modes: the package's ``small_cnn`` without GroupNorm, at width 8."""
    return models.small_cnn(channels, size, num_classes, width=8, groupnorm=False)


def imprint_model(public: torch.Tensor, *, seed: int = 0, **block_kwargs: Any) -> nn.Sequential:
    """An ``ImprintBlock`` calibrated on ``public`` in front of ``small_cnn``, built after
    ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    block = ImprintBlock(image_shape=tuple(public.shape[1:]), **block_kwargs).calibrate(public)
    return nn.Sequential(block, small_cnn(public.shape[1], public.shape[-1]))


@dataclass
class Private:
    """What ``PrivacyEngine.make_private`` gave back, and the loss to train with."""

    model: nn.Module
    optimizer: Any
    loader: Any
    engine: Any
    criterion: Callable[..., torch.Tensor]


def private_training(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sigma: float = 1.0,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.0,
    accountant: str = "rdp",
    max_grad_norm: float | list[float] = 1.0,
    clipping: str = "flat",
    loss_reduction: str = "mean",
    grad_sample_mode: str = "hooks",
    shuffle: bool = False,
    loader_generator: torch.Generator | None = None,
    **make_private_kwargs: Any,
) -> Private:
    """``PrivacyEngine(accountant=...).make_private`` with SGD over a ``TensorDataset(x, y)``.

    ``clipping="per_layer"`` with one float ``max_grad_norm`` C splits it equally over the
    parameters (C/√n each). In ghost mode the returned criterion is Opacus's wrapped loss.
    Other keywords (``poisson_sampling``, ``noise_generator``, ...) go to ``make_private``.
    """
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=accountant)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=loader_generator,
    )
    if clipping == "per_layer" and not isinstance(max_grad_norm, list):
        n_params = len(list(model.parameters()))
        max_grad_norm = [max_grad_norm / n_params**0.5] * n_params
    criterion = nn.CrossEntropyLoss(reduction=loss_reduction)
    if grad_sample_mode == "ghost":
        make_private_kwargs["criterion"] = criterion
    out = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=max_grad_norm,
        clipping=clipping,
        loss_reduction=loss_reduction,
        grad_sample_mode=grad_sample_mode,
        **make_private_kwargs,
    )
    if grad_sample_mode == "ghost":
        model, optimizer, criterion, loader = out
    else:
        model, optimizer, loader = out
    return Private(model, optimizer, loader, engine, criterion)


def make_private(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> tuple:
    """``private_training`` as the four things a plain loop needs: model, optimizer, loader,
    engine (train with cross-entropy; for ghost mode use ``private_training``)."""
    if kwargs.get("grad_sample_mode") == "ghost":
        raise ValueError("ghost mode needs its wrapped criterion: use private_training")
    p = private_training(model, x, y, **kwargs)
    return p.model, p.optimizer, p.loader, p.engine


def train_steps(
    model: nn.Module,
    optimizer: Any,
    loader: Any,
    steps: int,
    after_step: Callable[[int], Any] | None = None,
    *,
    criterion: Callable[..., torch.Tensor] = nn.functional.cross_entropy,
    bmm: int | None = None,
) -> None:
    """Run ``steps`` DP-SGD steps, over as many passes of ``loader`` as that takes.

    A step is one that ran (under a ``BatchMemoryManager`` of physical batch ``bmm`` the skipped
    physical steps do not count); ``after_step(i)`` runs after the i-th one (1-based).
    """
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    done = 0

    def one_pass(batches) -> bool:
        nonlocal done
        for xb, yb in batches:
            optimizer.zero_grad()
            criterion(model(xb), yb).backward()
            optimizer.step()
            if getattr(optimizer, "_is_last_step_skipped", False):
                continue
            done += 1
            if after_step is not None:
                after_step(done)
            if done == steps:
                return True
        return False

    while True:
        before = done
        if bmm:
            with BatchMemoryManager(
                data_loader=loader, max_physical_batch_size=bmm, optimizer=optimizer
            ) as physical:
                if one_pass(physical):
                    return
        elif one_pass(loader):
            return
        if done == before:
            raise RuntimeError("the loader gave no batch: cannot train")


def audited_run(
    mnist5k: dict,
    log_dir: str | os.PathLike,
    *,
    sigma: float,
    steps: int,
    every: int = 1,
    train: tuple[torch.Tensor, torch.Tensor] | None = None,
    calibration: int | torch.Tensor = 1000,
    block: dict | None = None,
    seed: int = 0,
    model: nn.Module | None = None,
    private: dict | None = None,
    after_step: Callable[[int], Any] | None = None,
    bmm: int | None = None,
    close: bool = False,
    **auditor_kwargs: Any,
) -> tuple[DMAuditor, Any]:
    """Train ``steps`` DP-SGD steps with a ``DMAuditor`` attached, auditing every ``every`` steps.

    Args:
        mnist5k: the ``mnist5k`` fixture (its ``"private"`` digits train, its ``"prior"`` digits
            calibrate the imprint bins).
        log_dir: the auditor's log folder.
        sigma: the noise multiplier.
        steps: DP-SGD steps (see ``train_steps``).
        every: the auditor's ``every_n_steps``.
        train: ``(x, y)`` to train on instead of the private digits.
        calibration: the first N prior digits, or the images, that calibrate the bins.
        block: ``ImprintBlock`` keywords (default 128 sparse bins).
        seed: the seed ``imprint_model`` builds the model under.
        model: a model without an imprint block, used as given and attached as ``model=``
            (shadow mode); ``calibration``, ``block`` and ``seed`` are then unused.
        private: keywords of ``private_training`` (``accountant``, ``batch_size``, ...).
        after_step, bmm: as in ``train_steps``.
        close: close the auditor after training (also when training raises).
        auditor_kwargs: ``DMAuditor`` settings (``metrics`` defaults to mse, ssim, lpips).

    Returns:
        The auditor (open unless ``close``) and the privacy engine.
    """
    x, y = train if train is not None else mnist5k["private"]
    attach_model = model
    if model is None:
        public = mnist5k["prior"][0][:calibration] if isinstance(calibration, int) else calibration
        model = imprint_model(public, seed=seed, **{"num_bins": 128, **(block or {})})
    p = private_training(model, x, y, sigma=sigma, **(private or {}))
    auditor_kwargs.setdefault("metrics", ("mse", "ssim", "lpips"))
    auditor = DMAuditor(
        privacy_engine=p.engine, log_dir=log_dir, every_n_steps=every, **auditor_kwargs
    ).attach(p.optimizer, model=None if attach_model is None else p.model)
    try:
        train_steps(
            p.model, p.optimizer, p.loader, steps, after_step, criterion=p.criterion, bmm=bmm
        )
    finally:
        if close:
            auditor.close()
    return auditor, p.engine
