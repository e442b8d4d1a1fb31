"""The report's images: truth, raw readout and DM reconstruction of audited images, side by side.

Each audit's images are read from its image file (:meth:`~..logdir.LogDir.load_images`) and paired
with their scores through :attr:`~opacus_dmaudit.record.ImageScore.row`. Every image becomes a
tiny inline PNG of its own (the page scales it up without smoothing), so each one carries its
own alt text and caption. A file that cannot be read or holds arrays of the wrong shape is left
out and named in the report.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ...record import AuditRecord, ImageScore
from ...schema import METRICS, SUCCESS_PREFERENCE
from ..logdir import LogDir
from ..text import fmt

__all__ = ["Panel", "ImageGrids", "image_grids", "image_png", "caption", "ranking_metric"]

#: Rows of a reconstruction panel: (label, array of the image file behind it).
ROWS = (("truth", "truth"), ("raw readout", "raw"), ("DM", "dm"))


def image_png(image: np.ndarray) -> str:
    """One ``(C, H, W)`` uint8 image as base64 PNG text (grey or RGB)."""
    from PIL import Image

    pixels = image[0] if image.shape[0] == 1 else np.moveaxis(image[:3], 0, -1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class Panel:
    """One audited (or missed) image: its pictures and what to say about them.

    Attributes:
        step, bin: where it was read.
        pictures: ``[(row label, base64 PNG or None)]`` in :data:`ROWS` order (missed images:
            truth and raw readout only).
        caption: the visible caption (lines).
        unfaithful: the prior-fit check judged the prior unfaithful at this image's noise.
    """

    step: int
    bin: int
    pictures: list[tuple[str, str | None]]
    caption: list[str]
    unfaithful: bool = False


def ranking_metric(records: Sequence[AuditRecord]) -> tuple[str, str] | None:
    """The (metric, stage) that ranks reconstructions: the success metric, at the DM stage if any."""
    crit = next((r.success_criterion for r in reversed(records) if r.success_criterion), None)
    stage = "dm" if any(r.denoiser for r in records) else "raw"
    candidates = ([crit.metric] if crit is not None else []) + list(SUCCESS_PREFERENCE)
    for metric in candidates:
        if metric in METRICS and any(
            im.metric(metric, stage) is not None for r in records for im in r.images
        ):
            return metric, stage
    return None


def caption(step: int, im: ImageScore, metric: str) -> str:
    """An image's caption: where it was read, its scores, and what to be careful about."""
    parts = [f"step {step} bin {im.bin}"]
    for stage in ("raw", "dm"):
        value = im.metric(metric, stage)
        if value is not None:
            parts.append(f"{stage} {METRICS[metric].label} {fmt(value, '.3f')}")
    if im.blend:
        parts.append(f"blend of {im.true_count}")
    if im.dm_faithful is False:  # prior_fit: at this noise level the prior guesses
        parts.append("DM: prior unfaithful")
    return "\n".join(parts)


@dataclass
class ImageGrids:
    """The report's image panels and the image files it could not read.

    Attributes:
        metric: the label of the ranking metric (e.g. ``"LPIPS (dm)"``).
        best, worst: the best and worst scored reconstructions across audits.
        missed: lone images the occupancy test did not detect (truth and raw readout).
        skipped: steps whose image file could not be read.
    """

    metric: str | None = None
    best: list[Panel] = field(default_factory=list)
    worst: list[Panel] = field(default_factory=list)
    missed: list[Panel] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


class _Files:
    """Each audit's image arrays, read once; unreadable or malformed files are noted."""

    def __init__(self, logdir: LogDir, skipped: list[int]) -> None:
        self.logdir, self.skipped, self.cache = logdir, skipped, {}

    def __call__(self, step: int) -> dict[str, np.ndarray] | None:
        if step not in self.cache:
            data = self.logdir.load_images(step)
            if data is not None and any(a.ndim != 4 or a.dtype != np.uint8 for a in data.values()):
                data = None  # not an image file this package wrote
            if data is None and self.logdir.image_file(step).exists():
                self.skipped.append(step)
            self.cache[step] = data
        return self.cache[step]


def ranked(records, metric: str, stage: str) -> list[tuple[float, AuditRecord, ImageScore]]:
    """Every scored image with a finite ``metric`` at ``stage``, best first."""
    items = []
    for r in records:
        for im in r.scored:
            value = im.metric(metric, stage)
            if value is not None and math.isfinite(value):
                items.append((value, r, im))
    items.sort(key=lambda it: it[0], reverse=METRICS[metric].higher_is_better)
    return items


def reconstruction_panel(
    data: dict[str, np.ndarray] | None, step: int, im: ImageScore, metric: str
) -> Panel | None:
    """The panel of one scored image (``None`` when its file lacks it)."""
    if data is None or "truth" not in data or im.row is None or im.row >= len(data["truth"]):
        return None
    pictures = [
        (label, image_png(data[key][im.row]) if key in data else None) for label, key in ROWS
    ]
    if not any(key == "dm" for key in data):
        pictures = pictures[:2]
    return Panel(
        step=step,
        bin=im.bin,
        pictures=pictures,
        caption=caption(step, im, metric).split("\n"),
        unfaithful=im.dm_faithful is False,
    )


def _panels(files: _Files, selection, metric: str) -> list[Panel]:
    out = []
    for _, record, im in selection:
        panel = reconstruction_panel(files(record.step), record.step, im, metric)
        if panel is not None:
            out.append(panel)
    return out


def _missed(files: _Files, records, count: int) -> list[Panel]:
    out = []
    for r in records:
        for j, m in enumerate(r.missed):
            data = files(r.step) if len(out) < count else None
            if data is None or "missed_truth" not in data or j >= len(data["missed_truth"]):
                continue
            pictures = [
                ("truth", image_png(data["missed_truth"][j])),
                ("raw readout", image_png(data["missed_raw"][j])),
            ]
            text = [f"step {r.step} bin {m.bin}", f"noise std {fmt(m.noise_std, '.2g')}"]
            out.append(Panel(step=r.step, bin=m.bin, pictures=pictures, caption=text))
    return out


def image_grids(logdir: LogDir, records: Sequence[AuditRecord], *, count: int = 6) -> ImageGrids:
    """The ``count`` best and worst scored reconstructions across audits, and missed lone
    images."""
    out = ImageGrids()
    files = _Files(logdir, out.skipped)
    ranking = ranking_metric(records)
    if ranking is not None:
        metric, stage = ranking
        items = ranked(records, metric, stage)
        if items:
            out.metric = f"{METRICS[metric].label} ({stage})"
            best = items[:count]
            # the worst that are not already among the best (a run with few images)
            shown = {id(im) for _, _, im in best}
            worst = [it for it in items[::-1] if id(it[2]) not in shown][:count]
            out.best = _panels(files, best, metric)
            out.worst = _panels(files, worst, metric)
    out.missed = _missed(files, records, count)
    return out
