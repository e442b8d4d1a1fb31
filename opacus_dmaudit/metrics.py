"""Image-quality metrics of reconstructions against ground truth: MSE, PSNR, SSIM and LPIPS.

All functions take batches ``(N, C, H, W)`` in [0, 1] (predictions are clipped to [0, 1] first, as
an image viewer would show them) and return one value per image as a float64 tensor. LPIPS uses the
VGG backbone, the paper's choice, through the ``lpips`` package (see :mod:`.lpips_weights`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from skimage.metrics import structural_similarity

from .lpips_weights import load_lpips

__all__ = ["mse", "psnr", "ssim", "LPIPS", "HIGHER_IS_BETTER", "image_metrics"]

HIGHER_IS_BETTER = {"mse": False, "psnr": True, "ssim": True, "lpips": False}


def _prepare(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(
            f"pred and target must both be (N, C, H, W), got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    return pred.detach().double().clamp(0.0, 1.0).cpu(), target.detach().double().cpu()


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image."""
    pred, target = _prepare(pred, target)
    return ((pred - target) ** 2).flatten(1).mean(dim=1)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (data range 1; ``inf`` for a perfect match)."""
    err = mse(pred, target)
    return torch.where(err > 0, -10.0 * torch.log10(err), torch.full_like(err, float("inf")))


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image (scikit-image, Gaussian-free 7×7 windows, data range 1)."""
    pred, target = _prepare(pred, target)
    size = min(pred.shape[-2:])
    win = min(7, size if size % 2 else size - 1)
    if win < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {tuple(pred.shape[-2:])}")
    out = []
    for p, t in zip(pred.numpy(), target.numpy()):
        out.append(structural_similarity(p, t, data_range=1.0, channel_axis=0, win_size=win))
    return torch.tensor(np.asarray(out, dtype=np.float64))


@functools.lru_cache(maxsize=2)
def _lpips_model(net: str) -> torch.nn.Module:
    return load_lpips(net)


class LPIPS:
    """Learned perceptual distance (lower is closer), VGG backbone by default.

    Args:
        net: ``"vgg"`` (default, as in the paper) or ``"alex"``.
        batch_size: images per forward pass.
    """

    higher_is_better = False

    def __init__(self, *, net: str = "vgg", batch_size: int = 64) -> None:
        self.net = net
        self.batch_size = batch_size
        self.model = _lpips_model(net)

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = _prepare(pred, target)
        if min(pred.shape[-2:]) < 16:
            raise ValueError("LPIPS needs images of at least 16x16 pixels")
        out = []
        for i in range(0, pred.shape[0], self.batch_size):
            p = pred[i : i + self.batch_size].float() * 2 - 1
            t = target[i : i + self.batch_size].float() * 2 - 1
            if p.shape[1] == 1:
                p, t = p.expand(-1, 3, -1, -1), t.expand(-1, 3, -1, -1)
            out.append(self.model(p, t).flatten().double())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def image_metrics(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    names: Sequence[str] = ("mse", "psnr", "ssim", "lpips"),
    lpips: LPIPS | None = None,
) -> dict[str, torch.Tensor]:
    """Every requested metric per image, as ``{name: (N,) tensor}``."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "mse":
            out[name] = mse(pred, target)
        elif name == "psnr":
            out[name] = psnr(pred, target)
        elif name == "ssim":
            out[name] = ssim(pred, target)
        elif name == "lpips":
            out[name] = (lpips or LPIPS())(pred, target)
        else:
            raise ValueError(f"unknown metric {name!r}; choose from {sorted(HIGHER_IS_BETTER)}")
    return out
