"""The scoring stage: a captured step's imprint sums -> readout -> match -> prior -> metrics -> success.

:func:`score_step` is pure: it reads the :class:`~opacus_dmaudit.capture.CapturedStep`, the
configuration, the prior and the metric models, draws randomness only from the generator it is
given, and returns a :class:`ScoredStep`. The auditor and the benchmarks both call it, so a
benchmark measures exactly what an audit computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..capture.step import CapturedStep, ImprintSums
from ..checks.entries import is_finite_number
from ..reconstruct.bins import lone_bins, lone_members
from ..reconstruct.detection import detection_power, occupancy_test
from ..reconstruct.readout import Readout, read_imprint
from ..schema import meets, metric_key
from .metrics import LPIPS, stage_metrics

if TYPE_CHECKING:  # the configuration is only read here
    from ..config import AuditConfig

__all__ = [
    "ScoredStep",
    "score_step",
    "read_step",
    "match_readouts",
    "detection_settings",
    "detection_summary",
]

#: Lone samples that the occupancy test missed, kept per audit to show what their readout was.
MISSED_SHOWN = 8


@dataclass
class ScoredStep:
    """The scores of one audited step (tensors for the image sinks, numbers for the record).

    Attributes:
        readout: the privatised readout of every bin.
        clean_readout: the readout of the clean clipped sums (no noise).
        found: the rows of ``readout`` decided to hold an image (at most ``max_images``).
        truth_index: per found row, the index into the step's inputs of the real image behind
            it (``None`` where the bin held no real sample: a false detection).
        images: one dict per found row (bin, test statistic, collision flag, predicted noise,
            metrics ``<metric>_<stage>``), in the order of ``found``.
        truth, raw, clean, dm: ``(M, C, H, W)`` images in [0, 1] of the found rows with a real
            sample behind them (``dm`` is ``None`` without a prior).
        success: per stage, the number of distinct samples reconstructed to the criterion.
        counts: ``num_bins``, ``occupied_bins``, ``true_singletons``, ``found_singletons``,
            ``collisions_flagged``.
        detection: the occupancy test that decided ``found``, its level and its power.
        missed: up to :data:`MISSED_SHOWN` lone samples the test did not detect, as dicts
            (bin, predicted noise std), with ``missed_truth`` and ``missed_raw`` images: what
            the attacker's readout of them looked like (so a report can show *why* nothing was
            recovered).
    """

    readout: Readout
    clean_readout: Readout
    found: Readout
    truth_index: list[int | None]
    images: list[dict[str, Any]]
    truth: torch.Tensor
    raw: torch.Tensor
    clean: torch.Tensor
    dm: torch.Tensor | None
    success: dict[str, int]
    counts: dict[str, int]
    detection: dict[str, Any] = field(default_factory=dict)
    missed: list[dict[str, Any]] = field(default_factory=list)
    missed_truth: torch.Tensor | None = None
    missed_raw: torch.Tensor | None = None

    def summary(self, metrics: Sequence[str]) -> dict[str, float | None]:
        """Mean of every metric at every stage over the scored images (finite values only)."""
        out: dict[str, float | None] = {}
        keys = sorted({k for im in self.images for k in im if k.partition("_")[0] in metrics})
        for key in keys:
            vals = [im[key] for im in self.images if key in im and is_finite_number(im[key])]
            out[key] = sum(vals) / len(vals) if vals else None
        return out


def _pinned(geometry: Any) -> dict[str, Any]:
    """The projection the bins pin (measurement and bin edges), where the geometry has it."""
    measurement = getattr(geometry, "measurement", None)
    edges = getattr(geometry, "bin_edges", None)
    if measurement is None or edges is None:
        return {}
    return {"measurement": measurement, "bin_edges": edges}


def detection_settings(config: AuditConfig, geometry: Any = None) -> dict[str, Any]:
    """The occupancy test's keyword arguments for :func:`~opacus_dmaudit.readout.read_imprint`.

    ``config.occupancy_z`` set: the older bias-only test at that z. Otherwise the whole-row
    test at ``config.false_bins_per_audit`` expected false bins per audit: ``"row-fisher"``
    where the geometry gives the projection each bin pins, else ``"row-chi2"``.
    """
    if config.occupancy_z is not None:
        return {"test": "bias-z", "occupancy_z": float(config.occupancy_z)}
    return {
        "test": "row-fisher" if _pinned(geometry) else "row-chi2",
        "false_bins_per_audit": float(config.false_bins_per_audit),
    }


def read_step(captured: CapturedStep, config: AuditConfig) -> tuple[Readout, Readout]:
    """The privatised and the clean readout of a captured step's imprint sums."""
    sums = _sums(captured)
    geo = sums.geometry
    common = dict(structure=geo.structure, image_shape=geo.image_shape, value_range=geo.value_range)
    noised = read_imprint(
        sums.weight_noised,
        sums.bias_noised,
        noise_std=captured.noise_std,
        clip_norm=captured.max_grad_norm if captured.clipping == "flat" else None,
        **detection_settings(config, geo),
        **_pinned(geo),
        **common,
    )
    clean = read_imprint(sums.weight_clean, sums.bias_clean, noise_std=0.0, **common)
    return noised, clean


def _sums(captured: CapturedStep) -> ImprintSums:
    if captured.imprint is None:
        raise ValueError(f"step {captured.step} has no imprint sums to score")
    return captured.imprint


def match_readouts(
    found: Readout, inputs: torch.Tensor, membership: torch.Tensor
) -> list[int | None]:
    """Index into ``inputs`` of the real image behind each readout (nearest member on blends)."""
    out: list[int | None] = []
    for row in range(len(found)):
        idx = (membership[int(found.bins[row])] != 0).nonzero().flatten()
        if idx.numel() == 0:
            out.append(None)
        elif idx.numel() == 1:
            out.append(int(idx[0]))
        else:
            cand = inputs[idx].flatten(1).double()
            err = ((cand - found.images[row].flatten().double()) ** 2).mean(dim=1)
            out.append(int(idx[err.argmin()]))
    return out


def detection_summary(
    captured: CapturedStep, config: AuditConfig, lone_bins: torch.Tensor
) -> dict[str, Any]:
    """The ``detection`` record: the occupancy test, its level and budget, and its power.

    ``power`` is the mean, over the bins that truly hold one sample, of the probability that the
    test detects that bin at this step's noise (exact, from the clean clipped sums); ``None``
    when no sample sits alone in a bin, 1 without noise.
    """
    sums = _sums(captured)
    geo = sums.geometry
    settings = detection_settings(config, geo)
    name = settings.pop("test")
    test = occupancy_test(
        name,
        num_bins=int(sums.bias_clean.numel()),
        dim=int(sums.weight_clean.shape[1]),
        **settings,
    )
    power = None
    if lone_bins.numel():
        per_bin = detection_power(
            sums.weight_clean,
            sums.bias_clean,
            structure=geo.structure,
            noise_std=captured.noise_std,
            bins=lone_bins,
            test=test,
            **_pinned(geo),
        )
        power = float(per_bin.mean())
    out: dict[str, Any] = test.describe()
    out["normaliser"] = "pinned" if _pinned(geo) else "bias"
    if captured.noise_std == 0:  # no noise: a bin is occupied exactly when it is non-empty
        out.update(threshold=None, level=0.0, false_bins_per_audit=0.0, normaliser="bias")
    out.update(power=power, lone_bins=int(lone_bins.numel()))
    return out


def score_step(
    captured: CapturedStep,
    config: AuditConfig,
    *,
    prior=None,
    lpips: LPIPS | None = None,
    generator: torch.Generator | None = None,
) -> ScoredStep:
    """Read, match and score one captured step (no side effects).

    Args:
        captured: a step with imprint sums (live or simulated).
        config: what to compute (metrics, success criterion, detection, sampler).
        prior: a :class:`~opacus_dmaudit.DiffusionPrior` for the ``dm`` stage, or ``None``.
        lpips: the LPIPS model (required when ``"lpips"`` is among the metrics).
        generator: randomness of the prior's sampler (a fresh seeded one if ``None``).
    """
    sums = _sums(captured)
    noised, clean = read_step(captured, config)
    found = noised.occupied_only()
    if config.max_images is not None:
        found = found.select(torch.arange(min(len(found), config.max_images)))
    truth_idx = match_readouts(found, captured.inputs, sums.membership)
    images = _found_images(found, sums.membership, sums.geometry.value_range)
    rows = [i for i, t in enumerate(truth_idx) if t is not None]
    truth, stages = _reconstructions(
        captured, found, clean, truth_idx, rows, config=config, prior=prior, generator=generator
    )
    success: dict[str, int] = dict.fromkeys(
        ("raw", "clean", "dm") if prior is not None else ("raw", "clean"), 0
    )
    if rows:
        scores = stage_metrics(stages, truth, names=config.metrics, lpips=lpips)
        _add_scores(images, rows, scores, residual=(stages["raw"] - truth).flatten(1).std(dim=1))
        success.update(_successes(scores, [truth_idx[row] for row in rows], config))
    lone = lone_bins(sums.membership)
    missed, missed_truth, missed_raw = _missed(captured, noised, lone)
    return ScoredStep(
        readout=noised,
        clean_readout=clean,
        found=found,
        truth_index=truth_idx,
        images=images,
        truth=truth,
        raw=stages["raw"].clamp(0, 1),
        clean=stages["clean"],
        dm=stages.get("dm"),
        success=success,
        counts=_counts(noised, lone),
        detection=detection_summary(captured, config, lone.nonzero().flatten()),
        missed=missed,
        missed_truth=missed_truth,
        missed_raw=missed_raw,
    )


def _unit(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Pixels of ``value_range`` in [0, 1] units (not clamped)."""
    lo, hi = value_range
    return (x - lo) / (hi - lo)


def _found_images(
    found: Readout, membership: torch.Tensor, value_range: tuple[float, float]
) -> list[dict[str, Any]]:
    """One dict per found row: its bin, test statistic, collision flag, noise and true count."""
    lo, hi = value_range
    images = []
    for row in range(len(found)):
        b = int(found.bins[row])
        images.append(
            {
                "bin": b,
                "occupied": True,
                "zscore": float(found.zscore[row]),
                "collision": bool(found.collision[row]),
                "noise_std": float(found.noise_std[row]) / (hi - lo),
                "true_count": int((membership[b] != 0).sum()),
            }
        )
    return images


def _reconstructions(
    captured: CapturedStep,
    found: Readout,
    clean: Readout,
    truth_idx: list[int | None],
    rows: list[int],
    *,
    config: AuditConfig,
    prior,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The real images behind the found ``rows`` and each stage's reconstruction of them.

    Returns ``(truth, {"raw", "clean"[, "dm"]})`` in [0, 1] units; ``raw`` is not clamped (its
    residual is measured as read), ``clean`` is. Empty ``(0, C, H, W)`` tensors without rows.
    """
    geo = _sums(captured).geometry
    if not rows:
        empty = torch.zeros((0, *geo.image_shape))
        return empty, {"raw": empty, "clean": empty, **({"dm": empty} if prior is not None else {})}
    truth = _unit(captured.inputs[[truth_idx[i] for i in rows]].float(), geo.value_range)
    raw = _unit(found.images[rows], geo.value_range)
    stages = {"raw": raw, "clean": _unit(clean.images[found.bins[rows]], geo.value_range)}
    stages["clean"] = stages["clean"].clamp(0, 1)
    if prior is not None:
        lo, hi = geo.value_range
        std = found.noise_std[rows].double() / (hi - lo)
        finite = torch.isfinite(raw).flatten(1).all(1)  # the prior refuses NaN readouts
        stages["dm"] = torch.full_like(raw, float("nan"))
        if finite.any():
            stages["dm"][finite] = prior.denoise(
                raw[finite],
                noise_std=torch.nan_to_num(std[finite], posinf=1e6),
                sampler=config.sampler,
                steps=config.sampler_steps,
                min_stride=config.sampler_min_stride,
                generator=generator,
            )
    return truth, stages


def _add_scores(
    images: list[dict[str, Any]],
    rows: list[int],
    scores: dict[str, dict[str, torch.Tensor]],
    *,
    residual: torch.Tensor,
) -> None:
    """Write each scored row's raw residual std and ``<metric>_<stage>`` values into its dict."""
    for j, row in enumerate(rows):
        images[row]["residual_std_raw"] = float(residual[j])
        for stage, values in scores.items():
            for name, vals in values.items():
                images[row][metric_key(name, stage)] = float(vals[j])


def _successes(
    scores: dict[str, dict[str, torch.Tensor]], samples: list[int | None], config: AuditConfig
) -> dict[str, int]:
    """Per stage, the distinct samples whose reconstruction meets the success criterion."""
    out = {}
    for stage, values in scores.items():
        vals = values[config.success_metric]
        hits = {
            sample
            for j, sample in enumerate(samples)
            if meets(config.success_metric, float(vals[j]), config.success_threshold)
        }
        out[stage] = len(hits)
    return out


def _missed(
    captured: CapturedStep, noised: Readout, lone: torch.Tensor
) -> tuple[list[dict[str, Any]], torch.Tensor | None, torch.Tensor | None]:
    """Up to :data:`MISSED_SHOWN` lone samples the test missed: their bins, truth and readout."""
    geo = _sums(captured).geometry
    lo, hi = geo.value_range
    missed_bins = (lone & ~noised.occupied).nonzero().flatten()[:MISSED_SHOWN]
    missed = [
        {"bin": int(b), "noise_std": float(noised.noise_std[b]) / (hi - lo)} for b in missed_bins
    ]
    if not missed:
        return missed, None, None
    idx = lone_members(_sums(captured).membership, missed_bins)
    truth = _unit(captured.inputs[idx].float(), geo.value_range)
    return missed, truth, _unit(noised.images[missed_bins], geo.value_range).clamp(0, 1)


def _counts(noised: Readout, lone: torch.Tensor) -> dict[str, int]:
    """The record's bin counts (``*_singletons`` on disk: lone samples)."""
    return {
        "num_bins": int(noised.bins.numel()),
        "occupied_bins": int(noised.occupied.sum()),
        "true_singletons": int(lone.sum()),
        "found_singletons": int((lone & noised.occupied).sum()),
        "collisions_flagged": int((noised.collision & noised.occupied).sum()),
    }
