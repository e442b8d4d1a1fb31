"""Classical denoisers of scikit-image as baselines for the diffusion prior, tuned on held-out data.

Three methods, each with one tuning knob searched on a grid:

* ``"tv"``: total-variation (Chambolle), knob: the weight;
* ``"wavelet"``: wavelet shrinkage with the known noise std, knob: BayesShrink/VisuShrink and the
  factor on σ;
* ``"nlm"``: non-local means with the known noise std, knob: the filter strength ``h`` in units of σ.

"Tuned honestly" means the knob is chosen per noise level on images that are *not* the ones scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["CLASSICAL_GRIDS", "classical_denoise", "tune_classical"]

CLASSICAL_GRIDS: dict[str, list[Any]] = {
    "tv": [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8],
    "wavelet": [(m, f) for m in ("BayesShrink", "VisuShrink") for f in (0.5, 0.75, 1.0, 1.5)],
    "nlm": [0.4, 0.6, 0.8, 1.0, 1.3, 1.7],
}


def _one(img: np.ndarray, method: str, sigma: float, knob) -> np.ndarray:
    from skimage.restoration import denoise_nl_means, denoise_tv_chambolle, denoise_wavelet

    axis = -1 if img.ndim == 3 else None  # HWC colour or HW grey
    if method == "tv":
        return denoise_tv_chambolle(img, weight=knob, channel_axis=axis)
    if method == "wavelet":
        mode, factor = knob
        return denoise_wavelet(
            img,
            sigma=factor * sigma,
            method=mode,
            mode="soft",
            rescale_sigma=True,
            channel_axis=axis,
        )
    if method == "nlm":
        return denoise_nl_means(
            img,
            h=knob * sigma,
            sigma=sigma,
            patch_size=5,
            patch_distance=6,
            fast_mode=True,
            channel_axis=axis,
        )
    raise ValueError(f"unknown classical method {method!r}; choose from {sorted(CLASSICAL_GRIDS)}")


def classical_denoise(
    images: torch.Tensor, *, method: str, noise_std: float, knob: Any
) -> torch.Tensor:
    """Denoise ``(N, C, H, W)`` images (pixel noise std ``noise_std``) with one method and knob."""
    arr = images.detach().double().cpu().numpy()
    out = []
    for img in arr:
        hwc = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
        den = _one(hwc, method, float(noise_std), knob)
        out.append(den[None] if img.shape[0] == 1 else np.moveaxis(den, -1, 0))
    return torch.from_numpy(np.stack(out)).float().clamp(0, 1)


def tune_classical(
    clean: torch.Tensor,
    noisy: torch.Tensor,
    *,
    noise_std: float,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    methods: Sequence[str] = ("tv", "wavelet", "nlm"),
) -> dict[str, Any]:
    """The knob of each method with the lowest mean ``score(denoised, clean)`` on a tuning set."""
    best: dict[str, Any] = {}
    for method in methods:
        results = []
        for knob in CLASSICAL_GRIDS[method]:
            den = classical_denoise(noisy, method=method, noise_std=noise_std, knob=knob)
            results.append((float(score(den, clean).mean()), knob))
        best[method] = min(results, key=lambda r: r[0])[1]
    return best
