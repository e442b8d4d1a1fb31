"""Image-quality metrics of reconstructions against ground truth: MSE, PSNR, SSIM and LPIPS.

All functions take batches ``(N, C, H, W)`` in [0, 1] (predictions are clipped to [0, 1] first, as
an image viewer would show them) and return one value per image as a float64 tensor. LPIPS uses the
VGG backbone, the paper's choice, through the ``lpips`` package (see :mod:`.lpips_weights`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import lpips as lpips_lib
import numpy as np
import torch
from skimage.metrics import structural_similarity

from .lpips_weights import load_lpips
from .schema import HIGHER_IS_BETTER

__all__ = ["mse", "psnr", "ssim", "LPIPS", "HIGHER_IS_BETTER", "image_metrics", "stage_metrics"]


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
        return self.compare([pred], target)[0]

    @torch.no_grad()
    def compare(self, preds: Sequence[torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
        """LPIPS of each of several predictions against one target batch.

        The target's features are computed once and shared, so scoring k reconstructions of the
        same images costs k + 1 backbone passes instead of 2k; the values equal ``self(p, target)``
        exactly.
        """
        if not preds:
            return []
        pairs = [_prepare(pred, target) for pred in preds]
        target = pairs[0][1]
        if min(target.shape[-2:]) < 16:
            raise ValueError("LPIPS needs images of at least 16x16 pixels")
        out: list[list[torch.Tensor]] = [[] for _ in preds]
        for i in range(0, target.shape[0], self.batch_size):
            ref = self._features(target[i : i + self.batch_size])
            for k, (pred, _) in enumerate(pairs):
                out[k].append(self._distance(self._features(pred[i : i + self.batch_size]), ref))
        return [
            torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.float64) for chunks in out
        ]

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised backbone activations per layer of images in [0, 1]."""
        x = images.float() * 2 - 1
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        model = self.model
        return [lpips_lib.normalize_tensor(f) for f in model.net(model.scaling_layer(x))]

    def _distance(self, feats: list[torch.Tensor], ref: list[torch.Tensor]) -> torch.Tensor:
        """The learned, spatially averaged distance between two feature stacks (per image)."""
        lins = self.model.lins
        total = 0
        for layer, (a, b) in enumerate(zip(feats, ref)):
            total = total + lins[layer]((a - b) ** 2).mean(dim=(2, 3), keepdim=True)
        return total.flatten().double()


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


def stage_metrics(
    stages: Mapping[str, torch.Tensor],
    target: torch.Tensor,
    *,
    names: Sequence[str] = ("mse", "psnr", "ssim", "lpips"),
    lpips: LPIPS | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`image_metrics` of several reconstructions of the same images, as
    ``{stage: {name: (N,) tensor}}``; LPIPS computes the target's features once for all stages."""
    rest = [name for name in names if name != "lpips"]
    out = {stage: image_metrics(img, target, names=rest) for stage, img in stages.items()}
    if "lpips" in names:
        scores = (lpips or LPIPS()).compare(list(stages.values()), target)
        for stage, values in zip(stages, scores):
            out[stage]["lpips"] = values
        out = {stage: {name: out[stage][name] for name in names} for stage in out}
    return out
