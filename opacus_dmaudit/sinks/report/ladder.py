"""The comparison page's ladder: the same training images across runs of different noise.

Runs of the demo share their seed and data, so the same training image sits in the same step's
batch in every run; whether the attack detects it, and how recognisable its readout is, depends
on the run's noise. Images are matched across runs by their pixels (the truth arrays of each
run's image files, scored or missed). Where a run never saw a target image, the ladder shows the
closest image that run did see (smallest pixel distance) and says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...record import AuditRecord
from ...schema import METRICS, meets
from ..audit_log import read_audit_log
from ..logdir import LogDir
from ..text import fmt
from .images import image_png, ranking_metric

__all__ = ["Sighting", "LadderCell", "run_sightings", "ladder"]


@dataclass
class Sighting:
    """One training image as one run saw it.

    Attributes:
        step, bin: where it was read.
        truth, raw, dm: ``(C, H, W)`` uint8 arrays (``dm`` is ``None`` for a missed image or a
            run without a prior).
        detected: the occupancy test found its bin (``False``: a missed lone image).
        score: the ranking metric at the DM stage (raw without a prior), or ``None``.
        success: the score meets the run's success criterion (``None`` without a score).
        unfaithful: the prior-fit check judged the prior unfaithful at this image's noise.
        order: the score oriented so that smaller is better (``inf`` without a score).
    """

    step: int
    bin: int
    truth: np.ndarray
    raw: np.ndarray
    dm: np.ndarray | None
    detected: bool
    score: float | None = None
    success: bool | None = None
    unfaithful: bool = False
    order: float = math.inf


@dataclass
class LadderCell:
    """A run's column for one target image: what it saw, and whether it is the same image."""

    sighting: Sighting | None
    exact: bool


def _scored(data, record: AuditRecord, ranking, crit) -> list[Sighting]:
    out = []
    for im in record.scored:
        if im.row is None or im.row >= len(data.get("truth", ())) or "raw" not in data:
            continue
        score = im.metric(*ranking) if ranking else None
        ok = None
        if score is not None and crit is not None and crit.metric == ranking[0]:
            ok = meets(crit.metric, score, crit.threshold)
        dm = data["dm"][im.row] if "dm" in data else None
        order = math.inf
        if score is not None and math.isfinite(score):
            order = -score if METRICS[ranking[0]].higher_is_better else score
        out.append(
            Sighting(
                record.step, im.bin, data["truth"][im.row], data["raw"][im.row], dm, True,
                score, ok, im.dm_faithful is False, order,
            )
        )  # fmt: skip
    return out


def _missed(data, record: AuditRecord) -> list[Sighting]:
    out = []
    for j, m in enumerate(record.missed):
        if j < len(data.get("missed_truth", ())) and "missed_raw" in data:
            raw = data["missed_raw"][j]
            out.append(Sighting(record.step, m.bin, data["missed_truth"][j], raw, None, False))
    return out


def run_sightings(run_dir: str | Path) -> tuple[list[Sighting], str | None]:
    """Every image a run's image files hold (scored and missed) and the ranking metric's label."""
    logdir = LogDir(run_dir)
    if not logdir.audit_log.is_file():
        return [], None
    records = read_audit_log(logdir.audit_log, problems=[])
    ranking = ranking_metric(records)
    crit = next((r.success_criterion for r in reversed(records) if r.success_criterion), None)
    out: list[Sighting] = []
    for record in records:
        if not record.scored and not record.missed:
            continue
        data = logdir.load_images(record.step)
        if data is None:
            continue
        out += _scored(data, record, ranking, crit) + _missed(data, record)
    label = f"{METRICS[ranking[0]].label} ({ranking[1]})" if ranking else None
    return out, label


def _key(image: np.ndarray) -> bytes:
    return image.tobytes() + repr(image.shape).encode()


def _targets(runs: Sequence[list[Sighting]], count: int) -> list[Sighting]:
    """Scored images of the first run that has any, those seen by the most runs first."""
    seen: dict[bytes, int] = {}
    for sightings in runs:
        for key in {_key(s.truth) for s in sightings}:
            seen[key] = seen.get(key, 0) + 1
    first = next((s for s in runs if any(x.detected for x in s)), [])
    pool = [s for s in first if s.detected]
    if not pool:
        return []
    # seen by most runs, then recovered, then best scored
    pool.sort(key=lambda s: (-seen.get(_key(s.truth), 0), not s.success, s.order))
    picked, keys = [], set()
    for s in pool:
        if _key(s.truth) not in keys:
            picked.append(s)
            keys.add(_key(s.truth))
    return picked[:count]


def _closest(target: np.ndarray, sightings: list[Sighting]) -> LadderCell:
    key = _key(target)
    exact = [s for s in sightings if _key(s.truth) == key]
    if exact:
        exact.sort(key=lambda s: (not s.detected, s.step))  # detected first
        return LadderCell(exact[0], True)
    same_shape = [s for s in sightings if s.truth.shape == target.shape]
    if not same_shape:
        return LadderCell(None, False)
    ref = target.astype(np.float32)
    dist = [float(np.square(s.truth.astype(np.float32) - ref).sum()) for s in same_shape]
    return LadderCell(same_shape[int(np.argmin(dist))], False)


def ladder(
    runs: Sequence[list[Sighting]], *, count: int = 4
) -> list[tuple[Sighting, list[LadderCell]]]:
    """Up to ``count`` target images, each with one :class:`LadderCell` per run (in order)."""
    return [(t, [_closest(t.truth, s) for s in runs]) for t in _targets(runs, count)]


def cell_pictures(cell: LadderCell) -> list[tuple[str, str | None]]:
    """``[(row label, base64 PNG or None)]`` for truth / raw readout / DM."""
    s = cell.sighting
    if s is None:
        return [("truth", None), ("raw readout", None), ("DM", None)]
    dm = image_png(s.dm) if s.dm is not None else None
    return [("truth", image_png(s.truth)), ("raw readout", image_png(s.raw)), ("DM", dm)]


def cell_caption(cell: LadderCell, metric: str | None) -> list[str]:
    """The visible caption of a ladder cell."""
    s = cell.sighting
    if s is None:
        return ["no image saved in this run"]
    lines = [f"step {s.step} bin {s.bin}"]
    if not cell.exact:
        lines.append("closest equivalent (not the same image)")
    if not s.detected:
        lines.append("not detected (no DM)")
    elif s.score is not None:
        verdict = {True: " ✓ recovered", False: " ✗", None: ""}[s.success]
        lines.append(f"{metric or 'score'} {fmt(s.score, '.3f')}{verdict}")
    if s.unfaithful:
        lines.append("DM: prior unfaithful")
    return lines
