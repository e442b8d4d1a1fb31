"""Identification: is a reconstruction nearer to its own image than to each other image of the batch?

"LPIPS ≤ 0.1" asks for a close copy; a recognisable reconstruction can miss it while being plainly
the right image. The identification criterion asks instead whether the reconstruction is nearer,
in a distance the audit computes, to its own training image than to each of the N − 1 other real
images of the audited batch. It is decided per *target* (a lone sample the audit found and
scored) in every distance the audit computes (MSE, SSIM, LPIPS; PSNR ranks as MSE does), for the
raw readout and the DM reconstruction. Its baseline is not 1/N: the scorer pairs each
reconstruction with its own bin, and a guess that knows the bin does better than a blind one
(:mod:`.baseline` measures it, and the informed adversary of the ReRo theorem, on public batches).

:func:`identify` is pure: it reads a scored step's tensors and the step's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture.step import CapturedStep
from ..schema import HIGHER_IS_BETTER, identification_metrics
from .metrics import LPIPS, identified, pairwise
from .targets import ATTACK_STAGES, target_rows

__all__ = ["Identification", "identify", "identification_rates", "target_rows", "ATTACK_STAGES"]


@dataclass(frozen=True)
class Identification:
    """One step's identification.

    Attributes:
        shares: per stage (``raw``, ``clean``, ``dm``), the share of the batch whose
            reconstruction is nearest its own image in the success metric (exposure).
        targets: the lone samples scored (distinct; the denominator of every per-target count).
        identified: ``{metric: {stage: targets identified}}`` for the attack stages.
    """

    shares: dict[str, float | None]
    targets: int
    identified: dict[str, dict[str, int]]


def identify(
    scored,
    captured: CapturedStep,
    *,
    metrics,
    success_metric: str,
    lpips: LPIPS | None = None,
) -> Identification:
    """Identification of one scored step in every distance and stage (see the module).

    Args:
        scored: the step's :class:`~opacus_dmaudit.score.scoring.ScoredStep`.
        captured: the step; its inputs (all N real images of the batch) are the candidates.
        metrics: the metrics the audit computes (identification is decided in each).
        success_metric: the metric of the batch shares (exposure).
        lpips: the LPIPS model, when LPIPS is among the metrics.
    """
    stages = _stages(scored)
    own = [t for t in scored.truth_index if t is not None]
    lone = target_rows(scored)
    batch = captured.batch_size
    attack = [s for s in ATTACK_STAGES if s in stages]
    counts = {m: dict.fromkeys(attack, 0) for m in identification_metrics(metrics)}
    if not batch or not own:
        shares = dict.fromkeys(stages, None if not batch else 0.0)
        return Identification(shares, len(lone), counts)
    lo, hi = captured.imprint.geometry.value_range
    candidates = ((captured.inputs.float() - lo) / (hi - lo)).clamp(0, 1)
    shares: dict[str, float | None] = {}
    for metric in dict.fromkeys([success_metric, *counts]):
        # the shares need every scored row of every stage; the counts only the targets' rows
        # of the attack stages (blends and the auditor's clean readout are no trials)
        exposure = metric == success_metric
        names = list(stages) if exposure else attack
        rows = list(range(len(own))) if exposure else lone
        if not rows:
            continue
        hit = _hits(metric, [stages[s] for s in names], rows, own, candidates, lpips)
        if exposure:
            shares.update(_shares(names, rows, own, hit, batch))
        if metric in counts:
            counts[metric] = {s: sum(hit[names.index(s), j] for j in lone) for s in attack}
    return Identification(shares, len(lone), counts)


def _stages(scored) -> dict[str, torch.Tensor]:
    """The scored step's reconstructions per stage (``dm`` only with a prior)."""
    stages = {"raw": scored.raw, "clean": scored.clean}
    if scored.dm is not None:
        stages["dm"] = scored.dm
    return stages


def _shares(names, rows, own, hit, batch: int) -> dict[str, float]:
    """Per stage, the share of the batch whose reconstruction singles out its own image."""
    return {s: len({own[j] for j in rows if hit[k, j]}) / batch for k, s in enumerate(names)}


def _hits(metric: str, recons: list, rows: list[int], own: list[int], candidates, lpips):
    """``{(stage index, row): identified}`` of ``rows`` of each stage in one distance."""
    recon = torch.cat([r[rows] for r in recons])
    scores = pairwise(metric, recon, candidates, lpips=lpips)
    mine = [own[j] for j in rows] * len(recons)
    hits = identified(scores, mine, higher_is_better=HIGHER_IS_BETTER[metric])
    return {
        (k, j): bool(hits[k * len(rows) + i])
        for k in range(len(recons))
        for i, j in enumerate(rows)
    }


def identification_rates(
    scored,
    captured: CapturedStep,
    *,
    metric: str,
    lpips: LPIPS | None = None,
) -> dict[str, float | None]:
    """Per stage, the share of the batch whose reconstruction singles out its own image
    (:attr:`Identification.shares` in ``metric`` alone)."""
    return identify(scored, captured, metrics=(), success_metric=metric, lpips=lpips).shares
