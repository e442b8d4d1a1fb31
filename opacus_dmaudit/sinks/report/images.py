"""The report's image grids: truth, raw readout and DM reconstruction, side by side.

Each audit's images are read from its image file (:meth:`~..logdir.LogDir.load_images`) and paired
with their scores through :attr:`~opacus_dmaudit.record.ImageScore.row`. A file that cannot be read
or holds arrays of the wrong shape is left out and named in the report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ...record import AuditRecord, ImageScore
from ...schema import METRICS, SUCCESS_PREFERENCE
from ..logdir import LogDir
from ..text import fmt
from .plots import png, pyplot

__all__ = ["ImageGrids", "image_grids", "grid_png", "caption"]

#: Rows of a reconstruction grid, and the arrays of an image file behind them.
ROWS = (("truth", "truth"), ("raw readout", "raw"), ("DM", "dm"))


def grid_png(
    columns: list[list[np.ndarray | None]], row_names: list[str], captions: list[str]
) -> str:
    """One PNG of images in a grid (a column per sample, a row per stage) with captions."""
    plt = pyplot()
    nrow, ncol = len(row_names), len(columns)
    shapes = [img.shape for col in columns for img in col if img is not None]
    h, w = max(shape[1] for shape in shapes), max(shape[2] for shape in shapes)
    pad = max(2, h // 14)
    mosaic = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for c, col in enumerate(columns):
        for r in range(nrow):
            img = col[r]
            if img is None:
                continue
            rgb = np.repeat(img, 3, axis=0) if img.shape[0] == 1 else img[:3]
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            mosaic[top : top + img.shape[1], left : left + img.shape[2]] = np.moveaxis(rgb, 0, -1)
    fig, ax = plt.subplots(figsize=(1.15 * ncol + 0.9, 1.1 * nrow + 0.6))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks(
        [pad + c * (w + pad) + w / 2 for c in range(ncol)], captions, fontsize=6, linespacing=1.1
    )
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(nrow)], row_names, fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    return png(fig)


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
    """The report's grids (base64 PNGs) and the image files it could not read."""

    metric: str | None = None
    best: str | None = None
    worst: str | None = None
    missed: str | None = None
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


def _ranked(records, metric: str, stage: str) -> list[tuple[float, AuditRecord, ImageScore]]:
    items = []
    for r in records:
        for im in r.scored:
            value = im.metric(metric, stage)
            if value is not None and math.isfinite(value):
                items.append((value, r, im))
    items.sort(key=lambda it: it[0], reverse=METRICS[metric].higher_is_better)
    return items


def _reconstruction_grid(files: _Files, selection, metric: str) -> str | None:
    cols, caps = [], []
    for _, record, im in selection:
        data = files(record.step)
        if data is None or "truth" not in data or im.row >= data["truth"].shape[0]:
            continue
        cols.append([data[key][im.row] if key in data else None for _, key in ROWS])
        caps.append(caption(record.step, im, metric))
    return grid_png(cols, [name for name, _ in ROWS], caps) if cols else None


def _missed_grid(files: _Files, records, count: int) -> str | None:
    cols, caps = [], []
    for r in records:
        for j, m in enumerate(r.missed):
            data = files(r.step) if len(cols) < count else None
            if data is None or "missed_truth" not in data or j >= data["missed_truth"].shape[0]:
                continue
            cols.append([data["missed_truth"][j], data["missed_raw"][j]])
            caps.append(f"step {r.step} bin {m.bin}\nnoise std {fmt(m.noise_std, '.2g')}")
    return grid_png(cols, ["truth", "raw readout"], caps) if cols else None


def image_grids(logdir: LogDir, records: Sequence[AuditRecord], *, count: int = 8) -> ImageGrids:
    """Best and worst scored reconstructions across audits, and missed lone images, as PNGs."""
    out = ImageGrids()
    files = _Files(logdir, out.skipped)
    ranked = ranking_metric(records)
    if ranked is not None:
        metric, stage = ranked
        items = _ranked(records, metric, stage)
        if items:
            out.metric = f"{METRICS[metric].label} ({stage})"
            out.best = _reconstruction_grid(files, items[:count], metric)
            out.worst = _reconstruction_grid(files, items[-count:][::-1], metric)
    out.missed = _missed_grid(files, records, count)
    return out
