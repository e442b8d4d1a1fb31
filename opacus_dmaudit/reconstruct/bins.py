"""Imprint bins: each readout bin's gradient row, and which bins hold a lone sample.

A *lone* sample is one that sits alone in its bin: the bin holds exactly one sample of the batch,
once. Only a lone sample's image can be read out of the bin's row (several samples blend), so
"lone" is the unit every part of the audit counts in: the readout and its detection power, the
validity checks, the clipping check on lone rows, the membership scores. :func:`lone_bins` is the
one definition; the record's keys ``true_singletons``/``found_singletons`` keep their old name on
disk and mean lone samples.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "STRUCTURES",
    "bin_rows",
    "rows_per_sample",
    "lone_bins",
    "lone_count",
    "lone_members",
    "expected_lone",
    "lone_share",
    "bins_for_lone_share",
    "lone_sample_moments",
]

#: The imprint structures (see :class:`~opacus_dmaudit.ImprintBlock`).
STRUCTURES = ("sparse", "cumulative")


def bin_rows(
    weight_sum: torch.Tensor, bias_sum: torch.Tensor, *, structure: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each readout bin's row ``(ΔW_i, Δb_i)`` and its noise factor ``f`` (float64).

    Sparse: the rows themselves (``f = 1``). Cumulative: differences of neighbouring rows
    (``f = √2``, the last row ``f = 1``).

    Returns:
        ``(dw (K, d), db (K,), f (K,))``.
    """
    weight, bias = weight_sum.detach().double(), bias_sum.detach().double()
    if structure == "sparse":
        return weight, bias, torch.ones(bias.numel(), dtype=torch.float64)
    if structure == "cumulative":
        dw = weight - torch.cat([weight[1:], torch.zeros_like(weight[:1])])
        db = bias - torch.cat([bias[1:], torch.zeros_like(bias[:1])])
        factor = torch.full((bias.numel(),), math.sqrt(2.0), dtype=torch.float64)
        factor[-1] = 1.0
        return dw, db, factor
    raise ValueError(f"structure must be 'sparse' or 'cumulative', got {structure!r}")


def rows_per_sample(structure: str, k: int) -> torch.Tensor:
    """How many imprint rows one sample of each readout bin activates."""
    if structure == "cumulative":
        return torch.arange(1, k + 1, dtype=torch.float64)
    return torch.ones(k, dtype=torch.float64)


def lone_bins(membership: torch.Tensor) -> torch.Tensor:
    """``(K,)`` bool: the bins that hold exactly one sample, once (a lone sample).

    Args:
        membership: ``(K, B)`` integer matrix of each bin's members among the step's samples
            (:meth:`~opacus_dmaudit.ImprintBlock.membership`).
    """
    if membership.numel() == 0:
        return torch.zeros(membership.shape[0], dtype=torch.bool)
    return ((membership != 0).sum(dim=1) == 1) & (membership.max(dim=1).values == 1)


def lone_count(membership: torch.Tensor) -> int:
    """The number of lone samples of a step."""
    return int(lone_bins(membership).sum())


def lone_members(membership: torch.Tensor, bins: torch.Tensor) -> list[int]:
    """The index of the one sample in each of ``bins`` (lone bins)."""
    return [int((membership[int(b)] != 0).nonzero()[0, 0]) for b in bins]


def expected_lone(num_samples: int, num_bins: int) -> float:
    """Expected number of lone samples among ``num_samples`` in ``num_bins`` equal-mass bins."""
    if num_samples <= 0:
        return 0.0
    return num_samples * (1.0 - 1.0 / num_bins) ** (num_samples - 1)


def lone_share(num_bins: int, batch: int) -> float:
    """The expected share of a batch of ``batch`` samples that sits alone in one of ``num_bins``
    equal-mass bins: ``(1 − 1/K)^(B − 1)`` (1 for a batch of one)."""
    if batch <= 1:
        return 1.0
    if num_bins <= 1:
        return 0.0
    return (1.0 - 1.0 / num_bins) ** (batch - 1)


def bins_for_lone_share(batch: int, share: float = 0.9) -> int:
    """The fewest equal-mass bins that leave at least ``share`` of a batch of ``batch`` alone.

    The smallest ``K`` with ``(1 − 1/K)^(B − 1) ≥ share`` (about ``9.5·B`` for 0.9); 2 for a
    batch of one.
    """
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    if batch <= 1:
        return 2
    # (1 - 1/K)^(B-1) >= s  <=>  K >= 1 / (1 - s^(1/(B-1)))
    k = max(2, math.ceil(1.0 / -math.expm1(math.log(share) / (batch - 1))))
    while lone_share(k - 1, batch) >= share and k > 2:  # guard against round-off
        k -= 1
    while lone_share(k, batch) < share:
        k += 1
    return k


def lone_sample_moments(batch: int, num_bins: int, structure: str) -> tuple[float, float]:
    """Mean and std of the number of lone samples, for equal-mass bins.

    ``batch`` samples fall independently into ``m`` equal-mass cells (``m = K`` for the sparse
    structure; ``K + 1`` for the cumulative one, whose lowest cell is not imprinted), of which
    ``K`` are read out.
    """
    if batch <= 0:
        return 0.0, 0.0
    k = num_bins
    m = k if structure == "sparse" else k + 1
    p1 = batch / m * (1 - 1 / m) ** (batch - 1)
    p2 = batch * (batch - 1) / m**2 * (1 - 2 / m) ** (batch - 2) if batch >= 2 else 0.0
    mean = k * p1
    var = k * p1 + k * (k - 1) * p2 - mean**2
    return mean, math.sqrt(max(var, 0.0))


#: Release 0.1's name of :func:`expected_lone`.
expected_singletons = expected_lone
