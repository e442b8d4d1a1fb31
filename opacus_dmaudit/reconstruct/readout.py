"""Readout: from imprint-layer gradient sums to candidate images (pure functions).

Notation (DESIGN §4): for bin ``i`` with exactly one sample ``x`` of clipped upstream weight ``w``,
the bin's *row* is ``(ΔW_i, Δb_i) = w·(x, 1) + n`` with Gaussian noise ``n`` of std ``σC·f`` per
coordinate (``f = 1`` for the sparse structure; ``f = √2`` for the cumulative difference of two
rows, except its last row, ``f = 1``). The readout is ``ΔW_i / ŵ_i`` with ``ŵ_i`` an estimate of
``w``; its per-pixel noise std is ``σC·f / |ŵ_i|`` and the error of ``ŵ_i`` adds a shared contrast
error.

**Occupancy** is decided by :mod:`.detection`.

**Normaliser.** ``Δb_i`` estimates ``w`` with noise std ``σCf``. The pinned projection gives a
second estimate, ``h·ΔW_i / c_i``, with noise std ``σCf·‖h‖/|c_i|`` plus the bin's width; for the
brightness direction that is ``√d·c_i`` times less noisy. ``"pinned"`` combines both by inverse
variance (it reduces to ``Δb`` where the projection says little: random or DCT directions, wide
bins, no noise). ``"bias"`` is ``Δb`` alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from scipy import stats

from .bins import bin_rows, rows_per_sample
from .detection import occupancy_statistics, occupancy_test, pinned_projection

__all__ = ["Readout", "read_imprint", "NORMALISERS"]

#: The estimates of a bin's gradient weight that divide ``ΔW`` into an image.
NORMALISERS: dict[str, str] = {
    "pinned": "inverse-variance combination of Δb and h·ΔW/c (the projection the bin pins)",
    "bias": "Δb alone",
}

# Relative size under which a noise-free bin counts as empty (float round-off of the sums).
_CLEAN_REL_TOL = 1e-5


@dataclass(frozen=True)
class Readout:
    """Candidate images of one imprint readout, one row per bin.

    Attributes:
        images: ``(K, C, H, W)`` candidates ``ΔW/ŵ`` (zeros where ``ŵ == 0``), not clipped.
        bins: ``(K,)`` bin index of each candidate.
        signal: ``(K,)`` ``Δb``, the bin's (noised) bias-gradient sum.
        weight: ``(K,)`` ``ŵ``, the estimate of the bin's gradient weight that normalises the
            image (``Δb`` for the ``"bias"`` normaliser and without noise).
        statistic: ``(K,)`` the occupancy test's statistic (``inf`` without noise).
        zscore: ``(K,)`` the test's p-value as a two-sided normal deviate (for ``"bias-z"``
            exactly ``|Δb|/σCf``; ``inf`` without noise).
        occupied: ``(K,)`` the statistical decision that the bin holds at least one sample.
        collision: ``(K,)`` evidence that an occupied bin holds several samples.
        noise_std: ``(K,)`` predicted per-pixel noise std of each candidate, in image units.
        contrast_std: ``(K,)`` relative std of ``ŵ``: the candidate's shared contrast error.
    """

    images: torch.Tensor
    bins: torch.Tensor
    signal: torch.Tensor
    weight: torch.Tensor
    statistic: torch.Tensor
    zscore: torch.Tensor
    occupied: torch.Tensor
    collision: torch.Tensor
    noise_std: torch.Tensor
    contrast_std: torch.Tensor

    def select(self, mask: torch.Tensor) -> Readout:
        """The rows where ``mask`` (bool or indices) selects."""
        return Readout(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})

    def occupied_only(self) -> Readout:
        """The bins decided to hold at least one sample."""
        return self.select(self.occupied)

    def __len__(self) -> int:
        return int(self.bins.numel())


def _weights(
    name: str, dw: torch.Tensor, db: torch.Tensor, std: torch.Tensor, pinned
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normaliser ``ŵ`` per bin and its variance."""
    var_b = std**2
    if name == "bias" or pinned is None:
        return db, var_b
    c = pinned.centre
    usable = c.abs() > 1e-12 * math.sqrt(pinned.h_norm2)
    safe_c = torch.where(usable, c, torch.ones_like(c))
    est_h = (dw @ pinned.h) / safe_c
    var_noise = var_b * pinned.h_norm2 / safe_c**2

    def combine(var_h):
        inv_h = torch.where(usable, 1.0 / var_h, torch.zeros_like(var_h))
        total = 1.0 / var_b + inv_h
        return (db / var_b + est_h * inv_h) / total, 1.0 / total

    # the bin's width gives an error proportional to the (unknown) weight itself: size it by
    # the larger of two plausible magnitudes, so that a wide bin cannot pull the estimate
    first, _ = combine(var_noise)
    magnitude2 = torch.maximum(first**2, db**2 + var_b)
    return combine(var_noise + magnitude2 * (pinned.half_width / safe_c) ** 2)


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
    test: str | None = None,
    false_bins_per_audit: float = 0.01,
    occupancy_z: float | None = None,
    measurement: torch.Tensor | None = None,
    bin_edges: Sequence[float] | None = None,
    normaliser: str | None = None,
    collision_level: float = 0.005,
) -> Readout:
    """Turn imprint-layer gradient *sums* into candidate images.

    Args:
        weight_sum: ``(K, d)`` summed (clipped, possibly noised) gradient of the imprint weight.
        bias_sum: ``(K,)`` summed gradient of the imprint bias, same units.
        structure: ``"sparse"`` or ``"cumulative"``.
        image_shape: ``(C, H, W)`` with ``C·H·W == d``.
        noise_std: std of the Gaussian noise per coordinate of the sums (``σ·C``; 0 if none).
            Without noise a bin is occupied when its ``Δb`` is non-zero, exactly.
        clip_norm: the flat clipping bound ``C``; enables the norm test for collisions (one
            clipped sample gives a row of norm at most ``C``, ``C/√(i+1)`` in cumulative bin
            ``i``). ``None`` skips that test (per-layer or adaptive clipping).
        value_range: the pixel range of the inputs; pixels outside it by more than the noise
            and the contrast error explain reveal a blend of samples.
        test: the occupancy test (:data:`OCCUPANCY_TESTS`). ``None``: ``"bias-z"`` if
            ``occupancy_z`` is given, else ``"row-fisher"`` with ``measurement`` and
            ``bin_edges``, else ``"row-chi2"``.
        false_bins_per_audit: the row tests' budget of expected false bins per readout
            (per-bin level ``false_bins_per_audit / K``).
        occupancy_z: threshold of the ``"bias-z"`` test.
        measurement: the block's measurement direction ``h`` (``ImprintGeometry.measurement``).
        bin_edges: ``K + 1`` finite bin edges in ``h·x`` units (``ImprintGeometry.bin_edges``).
        normaliser: ``"pinned"`` or ``"bias"`` (:data:`NORMALISERS`); ``None``: ``"pinned"``
            with ``measurement`` and ``bin_edges``, else ``"bias"``.
        collision_level: the collision flag's probability of flagging a bin that holds one
            sample (split evenly between the contrast, the pixel and the norm parts).

    Returns:
        A :class:`Readout` with one candidate per bin.
    """
    _check_inputs(weight_sum, bias_sum, image_shape, noise_std, collision_level)
    dw, db, factor = bin_rows(weight_sum, bias_sum, structure=structure)
    k, d = dw.shape
    pinned = pinned_projection(measurement, bin_edges, d, k)
    test, normaliser = _settings(test, normaliser, pinned=pinned, occupancy_z=occupancy_z)
    rule = occupancy_test(
        test,
        num_bins=k,
        dim=d,
        false_bins_per_audit=false_bins_per_audit,
        occupancy_z=occupancy_z,
    )
    std_b = noise_std * factor  # noise std of Δb and of each coordinate of ΔW
    if noise_std > 0:
        stat, z = occupancy_statistics(rule, dw, db, std_b, pinned)
        statistic, zscore = torch.from_numpy(stat), torch.from_numpy(z)
        occupied = statistic > rule.threshold
        weight, var_w = _weights(normaliser, dw, db, std_b, pinned)
    else:  # no noise: a bin is occupied exactly when its Δb is non-zero
        statistic, occupied = _noise_free_occupancy(db)
        zscore = statistic
        weight, var_w = db, torch.zeros_like(db)
    images, pred_std, contrast = _candidates(dw, weight, var_w, std_b)
    collision = occupied & _out_of_range(dw, weight, var_w, std_b, value_range, collision_level)
    if clip_norm is not None and clip_norm > 0:
        collision |= occupied & _over_norm(
            dw, db, std_b, structure, clip_norm, collision_level, rule.level
        )
    return Readout(
        images=images.float().reshape(k, *image_shape),
        bins=torch.arange(k),
        signal=db.float(),
        weight=weight.float(),
        statistic=statistic.float(),
        zscore=zscore.float(),
        occupied=occupied,
        collision=collision,
        noise_std=pred_std.float(),
        contrast_std=contrast.float(),
    )


def _check_inputs(
    weight_sum: torch.Tensor,
    bias_sum: torch.Tensor,
    image_shape: tuple[int, int, int],
    noise_std: float,
    collision_level: float,
) -> None:
    """Raise ``ValueError`` on sums, an image shape, a noise std or a level that cannot be read."""
    if weight_sum.dim() != 2 or bias_sum.shape != weight_sum.shape[:1]:
        raise ValueError(
            f"expected weight_sum (K, d) and bias_sum (K,), got {tuple(weight_sum.shape)} and "
            f"{tuple(bias_sum.shape)}"
        )
    if math.prod(image_shape) != weight_sum.shape[1]:
        raise ValueError(f"image_shape {image_shape} does not have {weight_sum.shape[1]} pixels")
    if noise_std < 0:
        raise ValueError(f"noise_std must be non-negative, got {noise_std}")
    if not 0 < collision_level < 1:
        raise ValueError(f"collision_level must be in (0, 1), got {collision_level}")


def _settings(
    test: str | None, normaliser: str | None, *, pinned, occupancy_z: float | None
) -> tuple[str, str]:
    """The occupancy test and the normaliser, defaulted from what is given (see
    :func:`read_imprint`), or ``ValueError`` when the projection they need is missing."""
    if test is None:
        test = "bias-z" if occupancy_z is not None else "row-fisher" if pinned else "row-chi2"
    if test == "row-fisher" and pinned is None:
        raise ValueError("the 'row-fisher' test needs measurement and bin_edges")
    if normaliser is None:
        normaliser = "pinned" if pinned is not None else "bias"
    if normaliser not in NORMALISERS:
        raise ValueError(f"normaliser must be one of {sorted(NORMALISERS)}, got {normaliser!r}")
    if normaliser == "pinned" and pinned is None:
        raise ValueError("the 'pinned' normaliser needs measurement and bin_edges")
    return test, normaliser


def _noise_free_occupancy(db: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(statistic, occupied)`` without noise: ``inf`` where ``Δb`` is non-zero (beyond the
    round-off of the sums), else 0."""
    statistic = torch.where(db != 0, torch.full_like(db, math.inf), torch.zeros_like(db))
    scale = db.abs().max() if db.numel() else torch.tensor(0.0, dtype=torch.float64)
    return statistic, db.abs() > _CLEAN_REL_TOL * scale


def _candidates(
    dw: torch.Tensor, weight: torch.Tensor, var_w: torch.Tensor, std_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each bin's candidate image ``ΔW/ŵ``, its predicted noise std and contrast std
    (0 images and ``inf`` stds where ``ŵ = 0``)."""
    nonzero = weight != 0
    safe = torch.where(nonzero, weight, torch.ones_like(weight))
    images = torch.where(nonzero[:, None], dw / safe[:, None], torch.zeros_like(dw))
    inf = torch.full_like(weight, math.inf)
    pred_std = torch.where(nonzero, std_b / safe.abs(), inf)
    contrast = torch.where(nonzero, var_w.sqrt() / safe.abs(), inf)
    return images, pred_std, contrast


def _out_of_range(dw, weight, var_w, std_b, value_range, level: float) -> torch.Tensor:
    """Pixels larger than one sample of the value range can give (a blend of samples).

    A lone sample's row is ``w·x + n`` with ``x`` in the value range: with ``|w|`` at most
    ``|ŵ| + z_c·std(ŵ)`` (and its sign uncertain where ``z_c·std(ŵ) > |ŵ|``), each pixel of
    ``ΔW·sign(ŵ)`` lies in ``x·[|ŵ| − z_c·std(ŵ), |ŵ| + z_c·std(ŵ)]`` up to ``z_p`` noise stds.
    ``z_c`` and ``z_p`` make each part flag a lone sample with probability ``level/3`` (the
    pixel part with a Bonferroni correction over the ``d`` pixels and both sides). Testing in
    ``ΔW`` units keeps the test sharp where ``ŵ`` is near zero: opposite-signed samples whose
    weights cancel.
    """
    lo, hi = value_range
    d = dw.shape[1]
    z_c = float(stats.norm.isf(level / 6))
    z_p = float(stats.norm.isf(level / 6 / d))
    reach = z_c * var_w.sqrt()
    w_hi = weight.abs() + reach
    w_lo = weight.abs() - reach
    corners = torch.stack([lo * w_lo, lo * w_hi, hi * w_lo, hi * w_hi])
    tol = 1e-4 * (hi - lo) * weight.abs()  # float round-off of noise-free sums
    upper = corners.max(dim=0).values + z_p * std_b + tol
    lower = corners.min(dim=0).values - z_p * std_b - tol
    signed = dw * torch.where(weight < 0, -1.0, 1.0)[:, None]
    return ((signed > upper[:, None]) | (signed < lower[:, None])).any(dim=1)


def _over_norm(
    dw, db, std_b, structure: str, clip_norm: float, level: float, occupancy_level: float
) -> torch.Tensor:
    """More row energy than one clipped sample can carry (exact noncentral χ² test).

    One sample of cumulative bin ``i`` activates ``i + 1`` rows with the same gradient, so its
    row has norm at most ``C/√(i+1)``; the noised row's ``‖·‖²/(σCf)²`` is then at most
    noncentral χ²(d+1) with noncentrality ``λ² = C²/((i+1)(σCf)²)``. The flag is only read on
    bins the occupancy test found, which a large noise draw helps to pass where power is low,
    so the level is taken *given detection*: ``level/3`` times the probability ``P`` that a
    lone sample of norm ``C`` is found (χ² test at the occupancy level; the threshold is
    ``ncχ²``'s ``(level/3)·P`` tail, and a lone bin found with probability ``P`` is flagged
    with probability at most ``level/3`` given that it was found).
    """
    k, d = dw.shape
    energy = (dw**2).sum(dim=1) + db**2
    max_norm2 = clip_norm**2 / rows_per_sample(structure, k)
    if float(std_b.max()) == 0.0:
        return energy > max_norm2 * (1 + 1e-3) ** 2
    nc = (max_norm2 / std_b**2).numpy()
    found = stats.ncx2.sf(stats.chi2.isf(occupancy_level, d + 1), d + 1, nc)
    tail = level / 3 * found
    threshold = np.full(k, np.inf)
    ok = tail > 1e-12  # below that the test could not flag anything anyway
    threshold[ok] = stats.ncx2.isf(tail[ok], d + 1, nc[ok])
    return energy / std_b**2 > torch.from_numpy(threshold)
