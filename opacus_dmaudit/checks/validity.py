"""The checks stage: can this audit see leakage at all? Pure functions of a captured step.

Each check returns a :func:`~opacus_dmaudit.schema.check` entry ``{"name", "status", "detail"}``.
A ``"fail"`` makes the audit *invalid*: its record may not be read as "no leakage" (the verdict
says why instead). Checks of the audit's own validity live here; checks of the DP mechanism live
in :mod:`.mechanism`, the prior's fit in :mod:`.prior_fit`.

* ``value_range``: the audited inputs lie in the imprint layer's value range. Pixels 0..255 into a
  [0, 1] block, or inputs normalised before the block, put every sample in the outermost bins and
  the audit sees nothing.
* ``blind``: at least one sample of the batch sits alone in a bin. With none, no image can be read
  out, whatever the noise.
* ``calibration``: the bins come from public images (``ImprintBlock.calibrate``), not the default
  guess.
* ``bins``: the share of the batch alone in a bin against what equal-mass bins promise; far fewer
  means the training data is distributed unlike the calibration images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..capture.step import CapturedStep
from ..errors import AuditCheckFailed
from ..reconstruct.bins import lone_count, lone_sample_moments
from .entries import check, failed_checks

__all__ = [
    "AuditCheckFailed",
    "validity_checks",
    "check_value_range",
    "check_blind",
    "check_calibration",
    "check_bins",
    "raise_on_failure",
]

#: Pixels may overshoot the value range by this share of it (float round-off of transforms).
RANGE_TOLERANCE = 1e-3


def check_value_range(captured: CapturedStep) -> dict[str, Any]:
    """``fail`` when audited inputs lie outside the imprint layer's value range."""
    geo = captured.imprint.geometry
    lo, hi = geo.value_range
    x = captured.inputs
    if x.numel() == 0:
        return check("value_range", "pass", "no inputs at this step (empty batch)", value=0.0)
    tol = RANGE_TOLERANCE * (hi - lo)
    x = x.float()
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        images = int(bad.flatten(1).any(dim=1).sum())
        return check(
            "value_range",
            "fail",
            f"{images} of {x.shape[0]} audited images hold NaN or infinite pixels: their "
            "gradients, and so every readout and mechanism statistic of this step, are not "
            "numbers. Find and remove those images from the training data.",
            value=float(bad.float().mean()),
        )
    outside = (x < lo - tol) | (x > hi + tol)
    share = float(outside.float().mean())
    if share == 0.0:
        return check("value_range", "pass", f"all inputs lie in [{lo:g}, {hi:g}]", value=share)
    images = int(outside.flatten(1).any(dim=1).sum())
    if captured.imprint.simulated:  # shadow: the user built no block; the model's inputs count
        fix = (
            "Give the model its pixels before any normalisation (normalise inside the model), "
            "or pass shadow=ShadowAdversary(value_range=(low, high), public=...) with your "
            "data's range."
        )
    else:
        fix = (
            "Put the ImprintBlock first, on the pixels before any normalisation, or construct "
            "it with your data's value_range."
        )
    return check(
        "value_range",
        "fail",
        f"{images} of {x.shape[0]} audited images have pixels outside the imprint layer's "
        f"value range [{lo:g}, {hi:g}] (min {float(x.min()):.4g}, max {float(x.max()):.4g}); "
        f"their bins are meaningless and the audit cannot see them. {fix}",
        value=share,
    )


def check_blind(captured: CapturedStep) -> dict[str, Any]:
    """``fail`` when the batch has samples but none is alone in a bin (nothing can be read)."""
    batch = captured.batch_size
    lone = lone_count(captured.imprint.membership)
    if batch == 0:
        return check(
            "blind",
            "warn",
            "the batch was empty (Poisson sampling): this audit saw no sample",
            value=0.0,
        )
    if lone == 0:
        return check(
            "blind",
            "fail",
            f"none of the {batch} samples of the batch sits alone in a bin, so no image can be "
            "read out at any noise level: this audit is blind. Use more bins (num_bins), a "
            "smaller batch, or calibrate the bins on public images like the training data.",
            value=0.0,
        )
    return check(
        "blind", "pass", f"{lone} of {batch} samples sit alone in a bin", value=lone / batch
    )


def check_calibration(captured: CapturedStep) -> dict[str, Any]:
    """``warn`` when the bins are the block's default guess rather than calibrated."""
    geo = captured.imprint.geometry
    if geo.calibrated:
        return check("calibration", "pass", "bins calibrated on public images")
    return check(
        "calibration",
        "warn",
        "the imprint bins are the block's default guess, not calibrated: call "
        "ImprintBlock.calibrate(public_images) with images like the training data (never the "
        "training data itself) so that samples spread over the bins",
    )


def check_bins(captured: CapturedStep) -> dict[str, Any]:
    """``warn`` when far fewer samples sit alone in a bin than calibrated bins promise."""
    geo = captured.imprint.geometry
    batch = captured.batch_size
    lone = lone_count(captured.imprint.membership)
    mean, std = lone_sample_moments(batch, geo.num_bins, geo.structure)
    if batch == 0 or mean == 0:
        return check("bins", "pass", "no samples at this step", value=None)
    share, promised = lone / batch, mean / batch
    z = (lone - mean) / std if std > 0 else 0.0
    detail = (
        f"{lone} of {batch} samples ({share:.0%}) sit alone in a bin; equal-mass bins promise "
        f"{promised:.0%} (expected {mean:.1f} ± {std:.1f})"
    )
    if z < -4 and lone < 0.8 * mean:
        return check(
            "bins",
            "warn",
            detail + ": the training data spreads over the bins unlike the calibration images, "
            "so fewer images can be read out; calibrate on public images closer to the training "
            "data",
            value=share,
            promised=promised,
        )
    return check("bins", "pass", detail, value=share, promised=promised)


def validity_checks(captured: CapturedStep) -> list[dict[str, Any]]:
    """Every check of whether the audit of this step could see leakage (imprint steps only)."""
    if captured.imprint is None:
        return []
    return [
        check_value_range(captured),
        check_blind(captured),
        check_calibration(captured),
        check_bins(captured),
    ]


def raise_on_failure(step: int, checks: list[Mapping[str, Any]]) -> None:
    """Raise :class:`AuditCheckFailed` if any check failed."""
    failures = failed_checks(checks)
    if failures:
        raise AuditCheckFailed(step, failures)
