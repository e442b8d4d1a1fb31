"""Readout: from imprint-layer gradient sums to candidate images (a pure function).

Notation (DESIGN §4): for bin ``i`` with exactly one sample ``x`` of clipped upstream weight ``w``,
``ΔW_i = w·x + n_W`` and ``Δb_i = w + n_b`` with Gaussian noise of std ``σC`` per coordinate
(``√2·σC`` for the cumulative difference). The readout ``ΔW_i / Δb_i`` is ``x`` plus noise of
per-pixel std ``≈ std(n_W) / |Δb_i|``; the denominator noise adds a shared contrast error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

__all__ = ["Readout", "read_imprint", "expected_singletons"]

# Relative size under which a noise-free bin counts as empty (float round-off of the sums).
_CLEAN_REL_TOL = 1e-5


@dataclass(frozen=True)
class Readout:
    """Candidate images of one imprint readout, one row per bin.

    Attributes:
        images: ``(K, C, H, W)`` candidates ``ΔW/Δb`` (zeros where ``Δb == 0``), not clipped.
        bins: ``(K,)`` bin index of each candidate.
        signal: ``(K,)`` ``Δb``, the bin's (noised) bias-gradient sum.
        zscore: ``(K,)`` ``|Δb|`` over its noise std (``inf`` without noise).
        occupied: ``(K,)`` the statistical decision that the bin holds at least one sample.
        collision: ``(K,)`` evidence that an occupied bin holds several samples.
        noise_std: ``(K,)`` predicted per-pixel noise std of each candidate, in image units.
    """

    images: torch.Tensor
    bins: torch.Tensor
    signal: torch.Tensor
    zscore: torch.Tensor
    occupied: torch.Tensor
    collision: torch.Tensor
    noise_std: torch.Tensor

    def select(self, mask: torch.Tensor) -> Readout:
        """The rows where ``mask`` (bool or indices) selects."""
        return Readout(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})

    def occupied_only(self) -> Readout:
        """The bins decided to hold at least one sample."""
        return self.select(self.occupied)

    def __len__(self) -> int:
        return int(self.bins.numel())


def _bin_differences(weight: torch.Tensor, bias: torch.Tensor, structure: str):
    if structure == "sparse":
        return weight, bias, torch.ones(bias.numel(), dtype=torch.float64)
    if structure == "cumulative":
        dw = weight - torch.cat([weight[1:], torch.zeros_like(weight[:1])])
        db = bias - torch.cat([bias[1:], torch.zeros_like(bias[:1])])
        factor = torch.full((bias.numel(),), math.sqrt(2.0), dtype=torch.float64)
        factor[-1] = 1.0
        return dw, db, factor
    raise ValueError(f"structure must be 'sparse' or 'cumulative', got {structure!r}")


@torch.no_grad()
def read_imprint(
    weight_sum: torch.Tensor,
    bias_sum: torch.Tensor,
    *,
    structure: str,
    image_shape: tuple[int, int, int],
    noise_std: float,
    clip_norm: float | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    occupancy_z: float = 4.0,
    collision_z: float = 4.0,
) -> Readout:
    """Turn imprint-layer gradient *sums* into candidate images.

    Args:
        weight_sum: ``(K, d)`` summed (clipped, possibly noised) gradient of the imprint weight.
        bias_sum: ``(K,)`` summed gradient of the imprint bias, same units.
        structure: ``"sparse"`` or ``"cumulative"``.
        image_shape: ``(C, H, W)`` with ``C·H·W == d``.
        noise_std: std of the Gaussian noise per coordinate of the sums (``σ·C``; 0 if none).
        clip_norm: the flat clipping bound ``C``; enables the norm test for collisions (a single
            clipped sample cannot give ``|Δb|·‖(x, 1)‖`` above ``C``). ``None`` skips that test
            (per-layer or adaptive clipping).
        value_range: the pixel range of the inputs; pixels far outside it reveal a blend of samples
            with opposite-signed upstream gradients.
        occupancy_z: a bin is occupied when ``|Δb|`` exceeds this many noise stds.
        collision_z: margin, in noise stds, of the collision tests.

    Returns:
        A :class:`Readout` with one candidate per bin.
    """
    if weight_sum.dim() != 2 or bias_sum.shape != weight_sum.shape[:1]:
        raise ValueError(
            f"expected weight_sum (K, d) and bias_sum (K,), got {tuple(weight_sum.shape)} and "
            f"{tuple(bias_sum.shape)}"
        )
    if math.prod(image_shape) != weight_sum.shape[1]:
        raise ValueError(f"image_shape {image_shape} does not have {weight_sum.shape[1]} pixels")
    if noise_std < 0:
        raise ValueError(f"noise_std must be non-negative, got {noise_std}")
    w = weight_sum.detach().double()
    b = bias_sum.detach().double()
    dw, db, factor = _bin_differences(w, b, structure)
    k, d = dw.shape
    std_b = noise_std * factor  # noise std of Δb and of each coordinate of ΔW

    nonzero = db != 0
    safe = torch.where(nonzero, db, torch.ones_like(db))
    images = torch.where(nonzero[:, None], dw / safe[:, None], torch.zeros_like(dw))
    if noise_std > 0:
        zscore = db.abs() / std_b
        occupied = zscore > occupancy_z
        pred_std = torch.where(nonzero, std_b / db.abs(), torch.full_like(db, math.inf))
    else:
        zscore = torch.where(nonzero, torch.full_like(db, math.inf), torch.zeros_like(db))
        scale = db.abs().max() if k else torch.tensor(0.0, dtype=torch.float64)
        occupied = db.abs() > _CLEAN_REL_TOL * scale
        pred_std = torch.zeros_like(db)

    # Collision test 1: values outside the pixel range by more than the noise explains.
    lo, hi = value_range
    margin = collision_z * pred_std[:, None] + 1e-4 * (hi - lo)
    out_of_range = ((images < lo - margin) | (images > hi + margin)).any(dim=1)
    collision = occupied & out_of_range
    # Collision test 2: one clipped sample has imprint norm |Δb|·‖(x,1)‖·√rows <= C.
    if clip_norm is not None and clip_norm > 0:
        rows = torch.ones(k, dtype=torch.float64)
        if structure == "cumulative":
            rows = torch.arange(1, k + 1, dtype=torch.float64)
        sq = (images**2).sum(dim=1) - d * torch.nan_to_num(pred_std, posinf=0.0) ** 2
        norm = torch.sqrt(sq.clamp_min(0.0) + 1.0) * rows.sqrt()
        ratio = db.abs() * norm / clip_norm
        ratio_std = std_b * norm / clip_norm
        collision |= occupied & (ratio - collision_z * ratio_std > 1.0 + 1e-3)

    return Readout(
        images=images.float().reshape(k, *image_shape),
        bins=torch.arange(k),
        signal=db.float(),
        zscore=zscore.float(),
        occupied=occupied,
        collision=collision,
        noise_std=pred_std.float(),
    )


def expected_singletons(num_samples: int, num_bins: int) -> float:
    """Expected number of bins holding exactly one of ``num_samples`` samples (equal-mass bins)."""
    if num_samples <= 0:
        return 0.0
    return num_samples * (1.0 - 1.0 / num_bins) ** (num_samples - 1)
