"""The audit record: what one line of ``audit.jsonl`` holds, written down once for every sink.

An audit *record* is a JSON object per audited step. Its parts, in the order of the data flow:

* the step and the mechanism it ran under: ``step``, ``mode`` (:data:`MODES`),
  ``noise_multiplier``, ``max_grad_norm``, ``sample_rate``, ``clipping``, ``batch_size``;
* the accountant's view: ``epsilon``, ``epsilon_accountant``, ``delta``, ``mu_step`` (1/σ) and
  ``epsilon_note`` (why a large ε carries no meaningful guarantee, or ``None``);
* the readout: ``num_bins``, ``occupied_bins``, ``true_singletons``, ``found_singletons``,
  ``collisions_flagged``, ``detection`` (the occupancy test, its threshold and power);
* the scores: ``images`` (one dict per recovered image, metric keys ``<metric>_<stage>``, see
  :func:`metric_key`), ``summary`` (their means), ``success_criterion`` and ``success``
  (per stage, the share of the batch reconstructed to the criterion), ``identification``;
* bounds on the *same* event as ``success``: ``kappa`` (used), ``kappa_baseline`` (κ̂, measured on
  public data), ``kappa_uniform`` (1/N) and ``bounds`` (this step's own Gaussian mechanism);
  whole-run bounds (any step, subsampled and composed) are a separate quantity, ``run_bounds``;
* ``privacy_measured``: empirical estimates (a measured per-step µ, an ε lower bound);
* ``prior_fit`` (with a prior): how faithful the prior was on this audit's lone images,
  re-noised at their noise std (``images``, ``noise_std``, ``faithful_share``, ``mse_dm``,
  ``mse_classical``, ``lpips_dm``/``ssim_dm``, ``..._classical``; see :mod:`.prior_fit`); each
  image dict then carries ``dm_faithful``;
* ``checks``: a list of :func:`check` entries; ``valid`` is ``False`` when any check failed, in
  which case no "no leakage" reading may be drawn from the record.

Records without ``record_version`` are version 1 (before ``checks``); :func:`upgrade_record` reads
them, so ``dmaudit report`` works on logs of either version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .checks.entries import is_valid

__all__ = [
    "RECORD_VERSION",
    "STAGES",
    "MODES",
    "MetricSpec",
    "METRICS",
    "HIGHER_IS_BETTER",
    "metric_key",
    "parse_metric_key",
    "meets",
    "upgrade_record",
]

RECORD_VERSION = 2

#: The reconstruction stages, with what each one is (shown in reports and TensorBoard).
STAGES: dict[str, str] = {
    "raw": "privatised readout (what the attacker reads from the noised gradient)",
    "dm": "DM reconstruction (the raw readout denoised with the diffusion prior)",
    "clean": "clean clipped sum (the same readout without DP noise)",
}

#: How a record was produced.
MODES: dict[str, str] = {
    "imprint": "live imprint layer in the trained model",
    "shadow": "simulated adversary (shadow): a worst-case imprint layer at this run's mechanism",
    "mechanism": "mechanism checks only (no imprint layer)",
}


@dataclass(frozen=True)
class MetricSpec:
    """One image-quality metric: its name, direction and unit."""

    name: str
    higher_is_better: bool
    label: str
    unit: str = ""


METRICS: dict[str, MetricSpec] = {
    "mse": MetricSpec("mse", False, "MSE"),
    "psnr": MetricSpec("psnr", True, "PSNR", "dB"),
    "ssim": MetricSpec("ssim", True, "SSIM"),
    "lpips": MetricSpec("lpips", False, "LPIPS"),
}

HIGHER_IS_BETTER: dict[str, bool] = {name: m.higher_is_better for name, m in METRICS.items()}


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


# -- reading ----------------------------------------------------------------------------------
def upgrade_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record of any version in the current layout (missing parts are ``None`` or empty).

    Version 1 records have no ``checks``: their ``valid`` is ``None`` (unknown), never ``True``.
    """
    out = dict(record)
    version = int(out.get("record_version") or 1)
    out["record_version"] = version
    out.setdefault("mode", "imprint")
    out.setdefault("checks", [])
    out.setdefault("summary", {})
    out.setdefault("images", [])
    out.setdefault("success", {})
    out.setdefault("bounds", None)
    out.setdefault("run_bounds", None)
    out.setdefault("privacy_measured", None)
    if version == 1:
        out.setdefault("valid", None)
        bounds = out.get("bounds") or {}
        if out["run_bounds"] is None and bounds:  # v1 mixed one-step and whole-run bounds
            out["run_bounds"] = {k: v for k, v in bounds.items() if k != "single_step"}
            out["bounds"] = {"single_step": bounds.get("single_step")}
    else:
        out.setdefault("valid", is_valid(out["checks"]))
    return out
