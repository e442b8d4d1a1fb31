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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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
    "CHECK_STATUSES",
    "check",
    "worst_status",
    "is_valid",
    "failed_checks",
    "upgrade_record",
    "record_scalars",
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


# -- checks ------------------------------------------------------------------------------------
CHECK_STATUSES = ("pass", "warn", "fail")
_RANK = {status: i for i, status in enumerate(CHECK_STATUSES)}


def check(name: str, status: str, detail: str, **values: Any) -> dict[str, Any]:
    """One check entry ``{"name", "status", "detail", ...}``; extra keys hold measured values.

    ``value`` (a number) is the check's headline measurement, logged to TensorBoard as
    ``checks/<name>/value``.
    """
    if status not in _RANK:
        raise ValueError(f"check status must be one of {CHECK_STATUSES}, got {status!r}")
    value = values.get("value")
    if status != "fail" and isinstance(value, float) and math.isnan(value):
        # a check never passes on a statistic that is not a number (NaN inputs or gradients)
        status = "fail"
        detail = (
            f"{detail} (its statistic is not a number: NaN inputs or gradients at this step, "
            "so this could not be checked)"
        )
    return {"name": name, "status": status, "detail": detail, **values}


def worst_status(checks: Iterable[Mapping[str, Any]]) -> str:
    """``"fail"`` if any check failed, else ``"warn"`` if any warned, else ``"pass"``."""
    return max((c["status"] for c in checks), key=_RANK.__getitem__, default="pass")


def is_valid(checks: Iterable[Mapping[str, Any]]) -> bool:
    """An audit is valid unless a check failed."""
    return worst_status(checks) != "fail"


def failed_checks(checks: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [c for c in checks if c["status"] == "fail"]


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


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def record_scalars(record: Mapping[str, Any]) -> dict[str, Any]:
    """Every chart value of a record as ``{tag: value}`` (TensorBoard tags; ``inf`` kept as is).

    The one place that maps record fields to chart names: ``privacy/*``, ``quality/<stage>/*``,
    ``bounds/*`` (this step's bounds), ``run_bounds/*`` (whole run), ``checks/<name>/*``. A
    shadow audit's ``quality/*`` and ``detection/*`` tags are prefixed ``shadow/``: they describe
    the simulated adversary (:data:`MODES`), not the trained model.
    """
    out: dict[str, Any] = {
        "privacy/epsilon": record.get("epsilon"),
        "privacy/mu_step": record.get("mu_step"),
    }
    for name, value in (record.get("privacy_measured") or {}).items():
        if _finite_number(value) or (isinstance(value, float) and math.isinf(value)):
            out[f"privacy/{name}"] = value
    for key, value in (record.get("summary") or {}).items():
        parsed = parse_metric_key(key)
        if parsed is not None:
            out[f"quality/{parsed[1]}/{parsed[0]}"] = value
    for stage, value in (record.get("success") or {}).items():
        out[f"quality/{stage}/success_rate"] = value
    for key, value in (record.get("prior_fit") or {}).items():  # beside the DM metrics
        if _finite_number(value):
            out[f"quality/dm/fit_{key}"] = value
    for stage, value in (record.get("identification") or {}).items():
        out[f"quality/{stage}/identification_rate"] = value
    for name, value in (record.get("bounds") or {}).items():
        out[f"bounds/{name}"] = value
    for name, value in (record.get("run_bounds") or {}).items():
        out[f"run_bounds/{name}"] = value
    detection = record.get("detection") or {}
    if _finite_number(detection.get("power")):
        out["detection/power"] = detection["power"]
    for key in ("found_singletons", "true_singletons"):
        if _finite_number(record.get(key)):
            out[f"detection/{key}"] = record[key]
    for entry in record.get("checks") or []:
        out[f"checks/{entry['name']}/status"] = _RANK[entry["status"]]
        if _finite_number(entry.get("value")):
            out[f"checks/{entry['name']}/value"] = entry["value"]
    if record.get("mode") == "shadow":  # a simulated adversary's numbers: never beside live ones
        out = {
            (f"shadow/{tag}" if tag.startswith(("quality/", "detection/")) else tag): value
            for tag, value in out.items()
        }
    return {tag: value for tag, value in out.items() if value is not None}
