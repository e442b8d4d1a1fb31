"""Detection: which imprint bins hold a sample, decided by a test with an exact level.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special, stats

from .bins import bin_rows

__all__ = [
    "OCCUPANCY_TESTS",
    "OccupancyTest",
    "occupancy_test",
    "occupancy_statistics",
    "PinnedProjection",
    "pinned_projection",
    "detection_power",
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

# Grid of the Fisher test's power integral over the projected component (normal deviates).
_POWER_GRID = np.linspace(-8.0, 8.0, 321)


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


class PinnedProjection:
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


def pinned_projection(measurement, bin_edges, d: int, k: int) -> PinnedProjection | None:
    if measurement is None and bin_edges is None:
        return None
    if measurement is None or bin_edges is None:
        raise ValueError(
            "give both measurement and bin_edges (ImprintGeometry has them), or neither"
        )
    pinned = PinnedProjection(measurement, bin_edges, k)
    if pinned.h.numel() != d:
        raise ValueError(f"measurement has {pinned.h.numel()} values for {d} pixels")
    return pinned


def occupancy_statistics(
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
    pinned = pinned_projection(measurement, bin_edges, dim, dw.shape[0])
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
