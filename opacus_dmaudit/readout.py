"""Readout: from imprint-layer gradient sums to candidate images (pure functions).

Notation (DESIGN §4): for bin ``i`` with exactly one sample ``x`` of clipped upstream weight ``w``,
the bin's *row* is ``(ΔW_i, Δb_i) = w·(x, 1) + n`` with Gaussian noise ``n`` of std ``σC·f`` per
coordinate (``f = 1`` for the sparse structure; ``f = √2`` for the cumulative difference of two
rows, except its last row, ``f = 1``). The readout is ``ΔW_i / ŵ_i`` with ``ŵ_i`` an estimate of
``w``; its per-pixel noise std is ``σC·f / |ŵ_i|`` and the error of ``ŵ_i`` adds a shared contrast
error.

**Occupancy.** On an empty bin the row is pure noise, so ``‖(ΔW_i, Δb_i)‖² / (σC f)²`` is exactly
χ²(d+1) (``"row-chi2"``). The bin also pins the projection ``h·x`` of its sample to the bin's
interval, so the row's mean lies (up to the bin's width) along the known direction
``v_i = (c_i·h/‖h‖², 1)`` with ``c_i`` the bin's centre. ``"row-fisher"`` (the auditor's default)
tests the row's component along ``v_i`` (two-sided normal) and the χ²(d) of the rest, independent
of it on an empty bin, and combines the two p-values with Fisher's method (exactly χ²(4) on an empty
bin). For the brightness direction ``|c_i|/‖h‖`` is a large part of ``‖x‖`` (most of it for
natural images), and this test finds half the lone images at 3.5× the σ of the plain χ² on
CIFAR-10 and 1.25× on MNIST digits (``benchmarks/detection.py``); for random or DCT directions it
is within a few points of the χ². Both have an exact per-bin level; the cumulative
structure's neighbouring differences share one noise row (correlation −½), which changes nothing for
each bin's level, so the expected number of false bins per audit is the number of empty bins times
the level, at most ``K × level``.
``"bias-z"`` is the older test on the bias alone, ``|Δb_i| / σCf > z``.

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
from scipy import special, stats

__all__ = [
    "Readout",
    "read_imprint",
    "expected_singletons",
    "OCCUPANCY_TESTS",
    "NORMALISERS",
    "OccupancyTest",
    "occupancy_test",
    "detection_power",
    "bin_rows",
]

#: The occupancy tests, by name, with what each one is.
OCCUPANCY_TESTS: dict[str, str] = {
    "row-fisher": (
        "whole imprint row: its component along the projection the bin pins (two-sided z) and "
        "the χ²(d) of the rest, combined by Fisher's method; exact per-bin level"
    ),
    "row-chi2": "whole imprint row: ‖(ΔW, Δb)‖²/(σCf)² against χ²(d+1); exact per-bin level",
    "bias-z": "bias gradient alone: |Δb|/(σCf) > z (the older test)",
}

#: The estimates of a bin's gradient weight that divide ``ΔW`` into an image.
NORMALISERS: dict[str, str] = {
    "pinned": "inverse-variance combination of Δb and h·ΔW/c (the projection the bin pins)",
    "bias": "Δb alone",
}

# Relative size under which a noise-free bin counts as empty (float round-off of the sums).
_CLEAN_REL_TOL = 1e-5
# Grid of the Fisher test's power integral over the projected component (normal deviates).
_POWER_GRID = np.linspace(-8.0, 8.0, 321)


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


@dataclass(frozen=True)
class OccupancyTest:
    """An occupancy test at a given per-bin level.

    Attributes:
        name: one of :data:`OCCUPANCY_TESTS`.
        level: probability that the test declares an empty bin occupied.
        threshold: the statistic above which a bin is occupied (χ²(d+1) for ``"row-chi2"``,
            Fisher's ``−2 Σ log p`` for ``"row-fisher"``, ``|z|`` for ``"bias-z"``).
        num_bins: ``K``; the expected number of false bins per audit is ``K × level`` (at most:
            bins that hold a sample cannot be false).
    """

    name: str
    level: float
    threshold: float
    num_bins: int

    @property
    def false_bins_per_audit(self) -> float:
        return self.level * self.num_bins

    def describe(self) -> dict[str, float | str]:
        """JSON-safe description for records."""
        return {
            "test": self.name,
            "description": OCCUPANCY_TESTS[self.name],
            "threshold": self.threshold,
            "level": self.level,
            "false_bins_per_audit": self.false_bins_per_audit,
        }


def occupancy_test(
    name: str,
    *,
    num_bins: int,
    dim: int,
    false_bins_per_audit: float = 0.01,
    occupancy_z: float | None = None,
) -> OccupancyTest:
    """The test ``name`` for ``num_bins`` bins of ``dim`` pixels.

    Args:
        name: one of :data:`OCCUPANCY_TESTS`.
        num_bins: ``K``.
        dim: ``d``, pixels per image.
        false_bins_per_audit: expected empty bins wrongly declared occupied per audit; the
            per-bin level is ``false_bins_per_audit / K`` (row tests only).
        occupancy_z: the threshold of ``"bias-z"`` (default 4).
    """
    if name not in OCCUPANCY_TESTS:
        raise ValueError(f"occupancy test must be one of {sorted(OCCUPANCY_TESTS)}, got {name!r}")
    if name == "bias-z":
        z = 4.0 if occupancy_z is None else float(occupancy_z)
        if not z > 0:
            raise ValueError(f"occupancy_z must be positive, got {occupancy_z}")
        return OccupancyTest(name, float(2 * stats.norm.sf(z)), z, int(num_bins))
    if occupancy_z is not None:
        raise ValueError(f"occupancy_z sets the threshold of 'bias-z' only, not of {name!r}")
    if not 0 < false_bins_per_audit < num_bins:
        raise ValueError(
            f"false_bins_per_audit must be in (0, num_bins={num_bins}), got {false_bins_per_audit}"
        )
    level = float(false_bins_per_audit) / num_bins
    dof = dim + 1 if name == "row-chi2" else 4
    return OccupancyTest(name, level, float(stats.chi2.isf(level, dof)), int(num_bins))


def _chi2_logsf(x: np.ndarray, k: int) -> np.ndarray:
    """``log P(χ²(k) > x)``, finite far in the tail (Wilson–Hilferty where scipy underflows)."""
    x = np.asarray(x, dtype=np.float64)
    out = stats.chi2.logsf(x, k)
    bad = ~np.isfinite(out) & np.isfinite(x)
    if bad.any():
        a = 2.0 / (9.0 * k)
        z = (np.cbrt(x[bad] / k) - (1.0 - a)) / math.sqrt(a)
        out[bad] = special.log_ndtr(-z)
    return out


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


def bin_rows(
    weight_sum: torch.Tensor, bias_sum: torch.Tensor, *, structure: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each readout bin's row ``(ΔW_i, Δb_i)`` and its noise factor ``f`` (float64).

    Returns:
        ``(dw (K, d), db (K,), f (K,))``.
    """
    return _bin_differences(weight_sum.detach().double(), bias_sum.detach().double(), structure)


class _Pinned:
    """The projection each bin pins: centre ``c_i``, half-width, and the direction ``v_i``."""

    def __init__(self, measurement: torch.Tensor, bin_edges: Sequence[float], num_bins: int):
        h = torch.as_tensor(measurement).detach().double().flatten()
        edges = torch.as_tensor(list(bin_edges), dtype=torch.float64)
        if edges.numel() != num_bins + 1:
            raise ValueError(f"bin_edges must have num_bins + 1 = {num_bins + 1} values")
        if not bool(torch.isfinite(edges).all()):
            raise ValueError("bin_edges must be finite (clip the outer edges to the value range)")
        self.h = h
        self.h_norm2 = float(h @ h)
        if not self.h_norm2 > 0:
            raise ValueError("the measurement direction must be non-zero")
        self.centre = (edges[1:] + edges[:-1]) / 2
        # |h·x - c_i| <= half the width; taken as the position's std, a bound that stays honest
        # in the outer bins, where the mass crowds against the inner edge
        self.half_width = (edges[1:] - edges[:-1]).abs() / 2
        # v_i = (c_i h / ‖h‖², 1): the row's mean direction when h·x = c_i
        self.v_norm = torch.sqrt(self.centre**2 / self.h_norm2 + 1.0)

    def component(self, dw: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
        """``⟨(ΔW_i, Δb_i), v_i⟩ / ‖v_i‖`` per bin."""
        return (self.centre * (dw @ self.h) / self.h_norm2 + db) / self.v_norm


def _check_pinned(measurement, bin_edges, d: int, k: int) -> _Pinned | None:
    if measurement is None and bin_edges is None:
        return None
    if measurement is None or bin_edges is None:
        raise ValueError(
            "give both measurement and bin_edges (ImprintGeometry has them), or neither"
        )
    pinned = _Pinned(measurement, bin_edges, k)
    if pinned.h.numel() != d:
        raise ValueError(f"measurement has {pinned.h.numel()} values for {d} pixels")
    return pinned


def _statistics(
    test: OccupancyTest, dw: torch.Tensor, db: torch.Tensor, std: torch.Tensor, pinned
) -> tuple[np.ndarray, np.ndarray]:
    """The test statistic and the two-sided-normal-deviate z-score of its p-value, per bin."""
    d = dw.shape[1]
    if test.name == "bias-z":
        z = (db.abs() / std).numpy()
        return z, z
    q = ((dw**2).sum(dim=1) + db**2) / std**2
    if test.name == "row-chi2":
        stat = q.numpy()
        logp = _chi2_logsf(stat, d + 1)
    else:
        t = (pinned.component(dw, db) / std).numpy()
        rest = np.clip(q.numpy() - t**2, 0.0, None)
        logp_v = math.log(2.0) + stats.norm.logsf(np.abs(t))
        logp_r = _chi2_logsf(rest, d)
        stat = -2.0 * (logp_v + logp_r)
        logp = -stat / 2 + np.log1p(stat / 2)  # P(χ²(4) > s) = e^{-s/2} (1 + s/2)
    zscore = np.clip(-special.ndtri_exp(np.minimum(logp - math.log(2.0), -1e-300)), 0.0, None)
    return stat, zscore


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
    dw, db, factor = bin_rows(weight_sum, bias_sum, structure=structure)
    k, d = dw.shape
    pinned = _check_pinned(measurement, bin_edges, d, k)
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
    rule = occupancy_test(
        test,
        num_bins=k,
        dim=d,
        false_bins_per_audit=false_bins_per_audit,
        occupancy_z=occupancy_z,
    )
    std_b = noise_std * factor  # noise std of Δb and of each coordinate of ΔW

    if noise_std > 0:
        stat, z = _statistics(rule, dw, db, std_b, pinned)
        statistic = torch.from_numpy(stat)
        zscore = torch.from_numpy(z)
        occupied = statistic > rule.threshold
        weight, var_w = _weights(normaliser, dw, db, std_b, pinned)
    else:
        statistic = zscore = torch.where(
            db != 0, torch.full_like(db, math.inf), torch.zeros_like(db)
        )
        scale = db.abs().max() if k else torch.tensor(0.0, dtype=torch.float64)
        occupied = db.abs() > _CLEAN_REL_TOL * scale
        weight, var_w = db, torch.zeros_like(db)

    nonzero = weight != 0
    safe = torch.where(nonzero, weight, torch.ones_like(weight))
    images = torch.where(nonzero[:, None], dw / safe[:, None], torch.zeros_like(dw))
    inf = torch.full_like(weight, math.inf)
    pred_std = torch.where(nonzero, std_b / safe.abs(), inf)
    contrast = torch.where(nonzero, var_w.sqrt() / safe.abs(), inf)

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


def _rows_per_sample(structure: str, k: int) -> torch.Tensor:
    """How many imprint rows one sample of each readout bin activates."""
    if structure == "cumulative":
        return torch.arange(1, k + 1, dtype=torch.float64)
    return torch.ones(k, dtype=torch.float64)


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
    max_norm2 = clip_norm**2 / _rows_per_sample(structure, k)
    if float(std_b.max()) == 0.0:
        return energy > max_norm2 * (1 + 1e-3) ** 2
    nc = (max_norm2 / std_b**2).numpy()
    found = stats.ncx2.sf(stats.chi2.isf(occupancy_level, d + 1), d + 1, nc)
    tail = level / 3 * found
    threshold = np.full(k, np.inf)
    ok = tail > 1e-12  # below that the test could not flag anything anyway
    threshold[ok] = stats.ncx2.isf(tail[ok], d + 1, nc[ok])
    return energy / std_b**2 > torch.from_numpy(threshold)


@torch.no_grad()
def detection_power(
    weight_clean: torch.Tensor,
    bias_clean: torch.Tensor,
    *,
    structure: str,
    noise_std: float,
    bins: torch.Tensor | Sequence[int],
    test: OccupancyTest,
    measurement: torch.Tensor | None = None,
    bin_edges: Sequence[float] | None = None,
) -> torch.Tensor:
    """Probability that ``test`` finds each of ``bins`` at this noise, from the clean sums.

    Exact for each bin: the noised row is its clean row plus independent Gaussian noise, so the
    statistic is noncentral (χ²(d+1) with noncentrality ``‖clean row‖²/(σCf)²`` for
    ``"row-chi2"``; for ``"row-fisher"`` a normal and an independent noncentral χ²(d), integrated
    numerically over the normal; a folded normal for ``"bias-z"``).

    Args:
        weight_clean, bias_clean: the clean clipped sums ``(K, d)``, ``(K,)``.
        structure: ``"sparse"`` or ``"cumulative"``.
        noise_std: ``σC``; without noise the power is 1 for every non-empty bin.
        bins: the readout bins to evaluate (typically those holding exactly one sample).
        test: the test and its threshold (:func:`occupancy_test`).
        measurement, bin_edges: as for :func:`read_imprint` (needed by ``"row-fisher"``).

    Returns:
        ``(len(bins),)`` float64 probabilities.
    """
    dw, db, factor = bin_rows(weight_clean, bias_clean, structure=structure)
    idx = torch.as_tensor(bins, dtype=torch.long).flatten()
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    if noise_std <= 0:
        return ((db[idx] != 0) | (dw[idx] != 0).any(dim=1)).double()
    std = noise_std * factor
    dim = dw.shape[1]
    if test.name == "bias-z":
        lam = (db[idx].abs() / std[idx]).numpy()
        z = test.threshold
        return torch.from_numpy(stats.norm.sf(z - lam) + stats.norm.sf(z + lam))
    nc = (((dw[idx] ** 2).sum(dim=1) + db[idx] ** 2) / std[idx] ** 2).numpy()
    if test.name == "row-chi2":
        return torch.from_numpy(stats.ncx2.sf(test.threshold, dim + 1, nc))
    pinned = _check_pinned(measurement, bin_edges, dim, dw.shape[0])
    if pinned is None:
        raise ValueError("the power of 'row-fisher' needs measurement and bin_edges")
    lam_v = (pinned.component(dw, db)[idx] / std[idx]).numpy()
    lam_r = np.clip(nc - lam_v**2, 0.0, None)
    t = lam_v[:, None] + _POWER_GRID[None, :]  # (n, G): the projected component
    weights = stats.norm.pdf(_POWER_GRID)
    weights = weights / weights.sum()
    # reject when log p_rest < L = -threshold/2 - log p_v(t); sure rejection when L >= 0
    bound = -test.threshold / 2 - (math.log(2.0) + stats.norm.logsf(np.abs(t)))
    sure = bound >= 0
    q_star = stats.chi2.isf(np.exp(np.minimum(bound, 0.0)), dim)
    nc_grid = np.broadcast_to(lam_r[:, None], t.shape)
    p_rest = np.where(sure, 1.0, stats.ncx2.sf(q_star, dim, nc_grid))
    return torch.from_numpy(np.clip((p_rest * weights).sum(axis=1), 0.0, 1.0))


def expected_singletons(num_samples: int, num_bins: int) -> float:
    """Expected number of bins holding exactly one of ``num_samples`` samples (equal-mass bins)."""
    if num_samples <= 0:
        return 0.0
    return num_samples * (1.0 - 1.0 / num_bins) ** (num_samples - 1)
