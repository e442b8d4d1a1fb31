"""The identification criterion: a second notion of success, whose baseline κ = 1/N is exact.

"LPIPS ≤ 0.1" asks for a close copy; a recognisable 32×32 colour reconstruction can miss it while
being plainly the right image, and a fixed guess can meet it for several percent of digits. The
identification criterion asks instead: is the reconstruction nearer, in the audit's own metric, to
its own image than to each of the N − 1 other real images of the audited batch? A guess made
without the gradient is independent of which of the N exchangeable candidates is the target, so it
succeeds with probability at most 1/N: κ = 1/N exactly, and the one-step ReRo bound
``Φ(Φ⁻¹(1/N) + µ)`` is the bound for this event (``bounds["single_step_identification"]``).

:func:`identification_rates` is pure: it reads a scored step's tensors and the step's inputs.
"""

from __future__ import annotations

import torch

from ..capture.step import CapturedStep
from ..schema import HIGHER_IS_BETTER
from .metrics import LPIPS, identified, pairwise

__all__ = ["identification_rates"]


def identification_rates(
    scored,
    captured: CapturedStep,
    *,
    metric: str,
    lpips: LPIPS | None = None,
) -> dict[str, float | None]:
    """Per stage, the share of the batch whose reconstruction singles out its own image.

    Args:
        scored: the step's :class:`~opacus_dmaudit.scoring.ScoredStep` (its ``truth_index`` and
            the ``raw``, ``clean`` and ``dm`` images of the found rows with a real sample).
        captured: the step; its inputs (all N real images of the batch) are the candidates.
        metric: the audit's success metric (``config.success_metric``).
        lpips: the LPIPS model, when ``metric`` is ``"lpips"``.

    Returns:
        ``{stage: identified distinct samples / N}`` for the stages ``scored`` has (``None`` for
        an empty batch).
    """
    batch = captured.batch_size
    stages = {"raw": scored.raw, "clean": scored.clean}
    if scored.dm is not None:
        stages["dm"] = scored.dm
    own = [t for t in scored.truth_index if t is not None]
    if not batch:
        return dict.fromkeys(stages)
    if not own:
        return dict.fromkeys(stages, 0.0)
    lo, hi = captured.imprint.geometry.value_range
    candidates = ((captured.inputs.float() - lo) / (hi - lo)).clamp(0, 1)
    names = list(stages)
    recon = torch.cat([stages[s] for s in names])
    scores = pairwise(metric, recon, candidates, lpips=lpips)
    hits = identified(scores, own * len(names), higher_is_better=HIGHER_IS_BETTER[metric])
    m = len(own)
    out: dict[str, float | None] = {}
    for k, stage in enumerate(names):
        rows = hits[k * m : (k + 1) * m]
        out[stage] = len({own[j] for j in range(m) if bool(rows[j])}) / batch
    return out
