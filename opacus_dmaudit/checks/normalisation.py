"""Is the noised sum divided by a data-independent number? The ``normalisation`` check.

Opacus divides the noised sum by the *expected* batch size ``⌊N·q⌋`` (``loss_reduction="mean"``),
never by the batch's actual size: the actual size is private (it reveals how many samples
Poisson sampling picked), and dividing by it changes the scale of the released gradient with
the data. A custom optimizer or a patched ``scale_grad`` that divides by ``len(batch)`` does
exactly that. The expected batch size is data-dependent too when ``⌊N·q⌋`` changes with one
record more or less (opacus#571, #819): in high dimension the scale of the released noise
reveals the divisor, and so whether that record is in the dataset.

At an audited step the capture multiplies ``p.grad`` by the optimizer's divisor D and subtracts
the clean sum S. When the gradient was divided by D·(1+d)⁻¹ instead, that "noise" is
``d·S + (1+d)·Z``: part of the clean sum remains (slope ``⟨noise, S⟩/‖S‖² = d``) and the rest is
the noise scaled by 1+d. Under a correct mechanism the slope is N(0, (σC)²/‖S‖²) exactly (Z is
independent of S) and the residual's scale is 1 to within the χ² interval. With the step's
actual batch size B, dividing by B instead of D gives ``1 + d = D/B``: the check tests that
direction with both statistics at once (and then says so, provided the slope sides with D/B − 1
rather than with 0, which tells it from noise merely scaled by another factor), and any
significant slope in general.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .entries import FALSE_ALARM, check

if TYPE_CHECKING:
    from ..capture.step import CapturedStep

__all__ = ["check_normalisation", "normaliser_changes", "normalisation_evidence"]


def normaliser_changes(dataset_size: int | None, sample_rate: float | None) -> bool:
    """Whether ``⌊N·q⌋`` (Opacus's divisor) changes with one record more or less."""
    if not dataset_size or not sample_rate:
        return False
    n, q = int(dataset_size), float(sample_rate)
    here = math.floor(n * q + 1e-9)
    return math.floor((n - 1) * q + 1e-9) != here or math.floor((n + 1) * q + 1e-9) != here


def _actual_batch(captured: CapturedStep) -> int | None:
    sizes = captured.batch_sizes
    size = sizes[-1] if sizes else captured.batch_size
    return int(size) if size is not None and size > 0 else None


def normalisation_evidence(captured: CapturedStep) -> dict[str, float] | None:
    """``{"scale", "se", "ratio"}`` of this audit for the run's pool: the noise's measured scale,
    its standard error and D/B (the scale dividing by the actual batch size B would give)."""
    noise = (captured.mechanism or {}).get("noise")
    stat = _statistics(noise) if noise and noise["count"] else None
    size = _actual_batch(captured)
    if stat is None or size is None or not captured.denominator > 0:
        return None
    return {"scale": stat["scale"], "se": stat["scale_se"], "ratio": captured.denominator / size}


def _statistics(stats: dict[str, Any]) -> dict[str, float] | None:
    """Slope of the measured noise on the clean sum, and the residual's scale, with errors."""
    n, s = stats["count"], stats["expected_std"]
    clean_sq, dot = stats.get("clean_sq"), stats.get("dot")
    if clean_sq is None or dot is None or not clean_sq > 0 or not s > 0 or n < 3:
        return None
    slope = dot / clean_sq
    residual = max(stats["sum_sq"] - dot**2 / clean_sq, 0.0)
    # the round-off of the sums, bounded (Cauchy-Schwarz), widens the slope's allowance
    rounding = math.sqrt(stats["rounding_sq"]) / math.sqrt(clean_sq)
    return {
        "slope": slope,
        "slope_se": s / math.sqrt(clean_sq),
        "scale": math.sqrt(residual / (n - 1)) / s,
        "scale_se": 1 / math.sqrt(2 * n),
        "rounding": rounding,
    }


def check_normalisation(captured: CapturedStep, run: Any = None) -> dict[str, Any] | None:
    """``fail`` when the gradient was divided by the actual batch size (or by anything but the
    optimizer's divisor); ``warn`` when the expected batch size itself depends on the dataset's
    size (opacus#571). ``run.scales`` (earlier audits' :func:`normalisation_evidence`) lets two
    audits whose noise scales differ as their batch sizes do tell the normalisation apart from
    noise scaled by one constant."""
    from scipy import stats as st

    mech = captured.mechanism or {}
    noise = mech.get("noise")
    if not noise or not noise["count"]:
        return None
    stat = _statistics(noise)
    if stat is None:
        return None
    z_limit = float(st.norm.isf(FALSE_ALARM / 4))
    divisor = captured.denominator
    base = (
        f"the released gradient is the noised sum divided by {divisor:g} (measured slope of the "
        f"noise on the clean sum {stat['slope']:+.4f} ± {stat['slope_se']:.4f}, noise scale "
        f"{stat['scale']:.4f})"
    )
    values = {
        "value": stat["slope"],
        "scale": stat["scale"],
        "detectable": z_limit * stat["slope_se"],
    }
    actual = _by_actual_batch(stat, captured, z_limit, getattr(run, "scales", None))
    if actual is not None:
        return check(
            "normalisation",
            "fail",
            f"the released gradient was divided by the batch's actual size {actual} instead of "
            f"the expected {divisor:g} (measured scale {stat['scale']:.4f} and slope "
            f"{stat['slope']:+.4f} against {divisor / actual - 1:+.4f} expected for it): the "
            "actual batch size is private under Poisson sampling and dividing by it changes "
            "the released gradient's scale with the data, which the accountant's ε does not "
            "cover. Divide by the expected batch size (Opacus's scale_grad) or use "
            'loss_reduction="sum"',
            **values,
        )
    if abs(stat["slope"]) > z_limit * stat["slope_se"] + stat["rounding"]:
        return check(
            "normalisation",
            "fail",
            base + f": the clean sum is scaled by {1 + stat['slope']:.4f} relative to the "
            "optimizer's divisor, so the gradient was divided by something else (a "
            "data-dependent normaliser?), which the accountant's ε does not cover",
            **values,
        )
    sampling = mech.get("sampling") or {}
    mean = sampling.get("loss_reduction") == "mean"
    if mean and normaliser_changes(sampling.get("dataset_size"), sampling.get("sample_rate")):
        size, q = sampling["dataset_size"], sampling["sample_rate"]
        return check(
            "normalisation",
            "warn",
            base + f"; but that divisor ⌊N·q⌋ = {math.floor(size * q + 1e-9)} changes with one "
            f"record more or less in the dataset (N = {size}, q = {q:.4g}), and the released "
            "gradient's scale reveals the divisor: the presence of a record leaks beyond the "
            'accountant\'s ε (opacus#571, #819). loss_reduction="sum" (with the learning rate '
            "divided by N·q) or a dataset size with N·q away from an integer avoids it",
            **values,
        )
    return check("normalisation", "pass", base, **values)


def _by_actual_batch(
    stat: dict[str, float], captured: CapturedStep, z_limit: float, earlier=None
) -> int | None:
    """The actual batch size B when the statistics say the gradient was divided by B instead of
    the optimizer's divisor D (the scale, and the slope or an earlier audit, point at D/B − 1),
    else ``None``."""
    size = _actual_batch(captured)
    divisor = captured.denominator
    if size is None or not divisor > 0:
        return None
    d = divisor / size - 1
    if d == 0:
        return None  # dividing by B = D changes nothing at this step
    w_scale, w_slope = 1 / stat["scale_se"] ** 2, 1 / stat["slope_se"] ** 2
    score = (w_scale * (stat["scale"] - 1) + w_slope * stat["slope"]) * math.copysign(1, d)
    score /= math.sqrt(w_scale + w_slope)
    near_scale = abs(stat["scale"] - (1 + d)) <= z_limit * stat["scale_se"] * (1 + abs(d))
    near_slope = abs(stat["slope"] - d) <= z_limit * stat["slope_se"] + stat["rounding"]
    # the slope must side with D/B − 1 rather than with 0: noise merely scaled by another factor
    # (noise at 0.9×, a scale the checks call noise_scale's) leaves the slope at 0
    sides = abs(stat["slope"] - d) < abs(stat["slope"])
    if not (score > z_limit and near_scale and near_slope):
        return None
    if sides or _tracks_batch_size(stat, earlier or [], captured.step, z_limit):
        return size
    return None


def _tracks_batch_size(stat: dict[str, float], earlier, step: int, z_limit: float) -> bool:
    """Whether a recent audit's noise scale also matched its own D/B (and not 1) while differing
    from this audit's: scales that follow the batch size, which one constant noise factor cannot
    give."""
    for other_step, other in list(earlier)[-8:]:
        if other_step >= step:
            continue
        se, ratio = other["se"] * (1 + abs(other["ratio"] - 1)), other["ratio"]
        matches = abs(other["scale"] - ratio) <= z_limit * se
        not_one = abs(other["scale"] - 1) > z_limit * other["se"]
        apart = abs(other["scale"] - stat["scale"]) > z_limit * math.hypot(se, stat["scale_se"])
        if matches and not_one and apart:
            return True
    return False
