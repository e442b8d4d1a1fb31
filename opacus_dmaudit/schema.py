"""The audit's vocabulary, written down once: stages, modes and metrics.

* :data:`STAGES`: the reconstruction stages (``raw``, ``dm``, ``clean``), what each one is and its
  short label (:func:`stage_label`);
* :data:`MODES`: how a record was produced (live imprint, shadow, mechanism checks only);
* :data:`METRICS`: the image-quality metrics, their direction, label, unit and default success
  threshold; :data:`SUCCESS_PREFERENCE` the order in which the success metric is chosen;
  :func:`metric_key` names a metric at a stage (``"lpips_dm"``), :func:`meets` applies a
  threshold.

The audit record itself is :class:`opacus_dmaudit.record.AuditRecord`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "identification_metrics",
    "STAGES",
    "STAGE_LABELS",
    "stage_label",
    "MODES",
    "MetricSpec",
    "METRICS",
    "HIGHER_IS_BETTER",
    "SUCCESS_PREFERENCE",
    "metric_key",
    "parse_metric_key",
    "meets",
]

#: The reconstruction stages, with what each one is (shown in reports and TensorBoard).
STAGES: dict[str, str] = {
    "raw": "privatised readout (what the attacker reads from the noised gradient)",
    "dm": "DM reconstruction (the raw readout denoised with the diffusion prior)",
    "clean": "clean clipped sum (the same readout without DP noise)",
}

#: Short names of the stages in sentences and image captions.
STAGE_LABELS: dict[str, str] = {
    "raw": "raw readout",
    "dm": "diffusion prior",
    "clean": "without noise",
}


def stage_label(stage: str) -> str:
    """``"raw readout"``, ``"diffusion prior"``, ``"without noise"`` (unknown stages as given)."""
    return STAGE_LABELS.get(stage, stage)


#: How a record was produced.
MODES: dict[str, str] = {
    "imprint": "live imprint layer in the trained model",
    "shadow": "simulated adversary (shadow): a worst-case imprint layer at this run's mechanism",
    "mechanism": "mechanism checks only (no imprint layer)",
}


@dataclass(frozen=True)
class MetricSpec:
    """One image-quality metric: its name, direction, label, unit and default success threshold."""

    name: str
    higher_is_better: bool
    label: str
    unit: str = ""
    default_threshold: float | None = None


METRICS: dict[str, MetricSpec] = {
    "mse": MetricSpec("mse", False, "MSE", default_threshold=0.01),
    "psnr": MetricSpec("psnr", True, "PSNR", "dB", default_threshold=20.0),
    "ssim": MetricSpec("ssim", True, "SSIM", default_threshold=0.7),
    "lpips": MetricSpec("lpips", False, "LPIPS", default_threshold=0.1),
}

HIGHER_IS_BETTER: dict[str, bool] = {name: m.higher_is_better for name, m in METRICS.items()}

#: The success metric, when none is given: the first of these that the audit computes (LPIPS,
#: the paper's perceptual criterion, first).
SUCCESS_PREFERENCE = ("lpips", "ssim", "psnr", "mse")


def metric_key(metric: str, stage: str) -> str:
    """The key of one metric at one stage in an image dict or a summary (``"lpips_dm"``)."""
    if metric not in METRICS or stage not in STAGES:
        raise ValueError(f"unknown metric/stage {metric!r}/{stage!r}")
    return f"{metric}_{stage}"


def parse_metric_key(key: str) -> tuple[str, str] | None:
    """``(metric, stage)`` of a key made by :func:`metric_key`, or ``None`` for any other key."""
    metric, sep, stage = key.partition("_")
    if sep and metric in METRICS and stage in STAGES:
        return metric, stage
    return None


def meets(metric: str, value: float, threshold: float) -> bool:
    """Whether ``value`` of ``metric`` meets the success ``threshold`` (≥ or ≤ by direction)."""
    if value is None or math.isnan(value):
        return False
    return value >= threshold if HIGHER_IS_BETTER[metric] else value <= threshold


def identification_metrics(metrics) -> list[str]:
    """The distances identification is tested in: every metric the audit computes, PSNR as MSE
    (it ranks candidates exactly as MSE does), in the order mse, ssim, lpips."""
    names = set(metrics)
    if "psnr" in names:
        names.add("mse")
    return [m for m in ("mse", "ssim", "lpips") if m in names]
