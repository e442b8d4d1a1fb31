"""Targets: the trials of one audit that the verdict's per-target tests count.

A *target* is a lone sample the audit found and scored: an image alone in its bin, read out and
compared with its training image. Each target is one trial of success (the reconstruction meets
the success criterion) and of identification (it is nearer its own image than every other image
of the batch, in each distance). ``max_images`` changes how many targets are attempted, never the
denominator. Samples that share a bin (blends) are not targets: their readout is matched to the
nearest of several images after the fact, which favours the attacker.

:func:`count_targets` turns a scored step and its identification into the record's
:class:`~opacus_dmaudit.record.Targets`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..record import Targets
from ..schema import meets, metric_key

if TYPE_CHECKING:
    from ..config import AuditConfig
    from .identification import Identification

__all__ = ["count_targets", "target_rows", "ATTACK_STAGES"]

#: The stages an attacker has (the clean readout is the auditor's oracle).
ATTACK_STAGES = ("raw", "dm")


def target_rows(scored) -> list[int]:
    """The rows of ``scored.truth`` (and its stages) that are targets: lone samples, once each."""
    rows, seen, j = [], set(), 0
    for image, truth in zip(scored.images, scored.truth_index):
        if truth is None:
            continue
        if image.get("true_count") == 1 and truth not in seen:
            rows.append(j)
            seen.add(truth)
        j += 1
    return rows


def count_targets(
    scored,
    identification: Identification,
    config: AuditConfig,
    *,
    baselines: dict[str, Any],
    missing: dict[str, str],
) -> Targets:
    """The per-target counts of one scored step.

    Args:
        scored: the step's :class:`~opacus_dmaudit.score.scoring.ScoredStep`.
        identification: its :func:`~opacus_dmaudit.score.identification.identify`.
        config: the audit's configuration (the success criterion).
        baselines, missing: the baselines' upper limits and why any is missing (see
            :class:`~opacus_dmaudit.record.Targets`).
    """
    truth_rows = [i for i, t in enumerate(scored.truth_index) if t is not None]
    images = [scored.images[truth_rows[j]] for j in target_rows(scored)]
    stages = [s for s in ATTACK_STAGES if s != "dm" or scored.dm is not None]
    success = {
        stage: sum(
            meets(
                config.success_metric,
                im.get(metric_key(config.success_metric, stage)),
                config.success_threshold,
            )
            for im in images
        )
        for stage in stages
    }
    return Targets(
        attempted=len(images),
        success=success,
        identified={m: dict(c) for m, c in identification.identified.items()},
        baselines=baselines,
        missing=missing,
    )
