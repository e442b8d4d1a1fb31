"""The DP mechanism, checked at every audit: noise, its shape, clipping, sampling, the accountant.

Every ε an accountant prints rests on four assumptions: the noise on every coordinate of the
summed gradient is N(0, σ²C²); every sample's contribution was clipped to norm C; batches are
Poisson samples at the rate q the accountant was told; and σ (and q) at every step are the ones in
the accountant's history. At an audited step the capture holds, for every parameter, the noised
sum *and* the clean clipped sum, and in most grad-sample modes the per-sample gradients: their
difference is the noise itself, and the per-sample gradients say what clipping should have
produced. The capture measures both, cheaply, on audit steps only
(:mod:`opacus_dmaudit.capture.mechanism`, called from the step hook); this module turns the measurements into
:func:`~opacus_dmaudit.schema.check` entries (:func:`mechanism_checks`, pure functions of a
:class:`~opacus_dmaudit.capture.CapturedStep`):

* ``noise_scale``: the RMS of (noised − clean) over all captured coordinates against the
  predicted std σC, with a χ² interval (millions of coordinates: a ±0.1 %-level measurement), its
  mean, and each parameter on its own (noise missing on one re-created parameter shows there);
* ``noise_shape``: a Kolmogorov–Smirnov test of a fixed-size subsample of the noise against a
  Gaussian of the measured std (non-Gaussian noise of the right variance, e.g. uniform, voids the
  Gaussian accounting);
* ``clipping``: the clean sum equals the sum of the per-sample gradients clipped to C (so every
  contribution had norm ≤ C), where Opacus keeps per-sample gradients; with an imprint layer also
  directly from the lone bins' clean rows (one sample each, norm ≤ C), which works in ghost mode;
* ``sampling``: the batch sizes counted at every step against Poisson sampling at the
  accountant's rate q (mean: ``fail``; fixed-size or shuffled batches under Poisson accounting,
  visible as far too regular sizes: ``warn``);
* ``accountant``: the accountant's σ for the step is the optimizer's, and it counted every step.

Thresholds come from the statistics, not from any data set: every test fails at a per-check
false-alarm probability of at most :data:`FALSE_ALARM` (10⁻⁶) when the mechanism is correct, so
thousands of audits with five checks each give no false failure by design. Rounding is accounted
for exactly: float32 sums carry a relative error of about 10⁻⁷ per coordinate, bounded and added
to the interval rather than hidden in a tolerance.

What these checks cannot see: bugs that leave the noise, the clipped sum and the batch sizes as
the accountant assumes (e.g. the same noise reused across steps, or noise from a predictable
seed); anything between audited steps (batch sizes excepted, which are counted at every step);
and, without per-sample gradients or an imprint layer (ghost mode in the mechanism-only mode),
whether the summed gradient was really clipped (the check then reports the module's clipping
bound only).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..capture.mechanism import SUM_TOLERANCE, TOLERANCE_UNITS, rounding_unit
from .entries import FALSE_ALARM, check
from .freshness import check_noise_freshness
from .normalisation import check_normalisation

if TYPE_CHECKING:
    from ..capture.step import CapturedStep

__all__ = [
    "CHECK_NAMES",
    "FALSE_ALARM",
    "mechanism_checks",
    "check_noise_scale",
    "check_noise_shape",
    "check_clipping",
    "check_sampling",
    "check_accountant",
]

#: The mechanism checks, in the order they run.
CHECK_NAMES = (
    "noise_scale",
    "noise_shape",
    "clipping",
    "sampling",
    "accountant",
    "noise_freshness",
    "normalisation",
)


#: A contribution may exceed C by this relative amount (float32 round-off of norms and factors);
#: lower precisions allow :data:`~opacus_dmaudit.capture.mechanism.TOLERANCE_UNITS` round-offs.
CLIP_TOLERANCE = 1e-3


def clip_tolerance(dtype: torch.dtype | None) -> float:
    """How far above C a norm computed in ``dtype`` may read on a correct mechanism."""
    return max(CLIP_TOLERANCE, TOLERANCE_UNITS * rounding_unit(dtype))


# ---------------------------------------------------------------------------------------------
# checks (pure functions of a captured step)
def _chi2_interval(count: int, level: float) -> tuple[float, float]:
    from scipy import stats

    return float(stats.chi2.ppf(level / 2, count)), float(stats.chi2.isf(level / 2, count))


def check_noise_scale(captured: CapturedStep, run: Any = None) -> dict[str, Any] | None:
    """``fail`` when the measured noise is smaller than σC (or biased), ``warn`` when larger.

    Under a correct mechanism ``‖noise‖²/(σC)²`` is χ²(n) over the n captured coordinates; the
    test allows the bounded float round-off on top. A quarter of :data:`FALSE_ALARM` each goes to
    the whole-vector test, the mean, the per-parameter tests (Bonferroni over parameters) and
    the test pooled over every audit of the run so far (``run.pooled_noise``: noise is drawn
    independently at every step, so the χ² statistics add up and the detection limit shrinks as
    1/√(coordinates × audits)). Each records the smallest deficit it detects at this size.
    """
    stats = (captured.mechanism or {}).get("noise")
    if not stats or not stats["count"]:
        return None
    if stats["expected_std"] <= 0:
        return _noise_without_sigma(stats)
    n, sum_sq, expected = stats["count"], stats["sum_sq"], stats["expected_std"]
    c_lo, c_hi = _chi2_interval(n, 0.05)
    ratio = math.sqrt(sum_sq / n) / expected
    ci = [math.sqrt(sum_sq / c_hi) / expected, math.sqrt(sum_sq / c_lo) / expected]
    alpha = FALSE_ALARM / 4
    pooled = _pooled_noise(run, alpha)
    base = (
        f"measured noise std / predicted σC = {ratio:.4f} (95% CI {ci[0]:.4f}–{ci[1]:.4f}) over "
        f"{n:,} coordinates of all parameters (predicted σC = {expected:.4g}; this audit "
        f"detects a deficit of {detectable_deficit(n, alpha):.2%}"
    )
    base += f"{pooled['text']})" if pooled else ")"
    values = {"value": ratio, "ci": ci, "coordinates": n, "predicted_std": expected}
    values["detectable"] = detectable_deficit(n, alpha)
    if pooled:
        values.update({k: v for k, v in pooled.items() if k != "text" and k != "low"})
    low, high, z = _noise_scale_tests(stats, alpha)
    if low or (pooled and pooled["low"]):
        shown = ratio if low else pooled["pooled_value"]
        return check(
            "noise_scale",
            "fail",
            base + f": the gradient carries {1 - shown:.1%} less noise than the accountant "
            f"assumes{'' if low else ' (pooled over the run)'}, so the reported ε understates "
            "the privacy loss (check the noise multiplier, a custom optimizer's add_noise, or "
            "noise generated on some parameters only)",
            **values,
        )
    missing = _parameters_short_of_noise(stats["params"], expected, alpha)
    if missing:
        label, share = missing[0]
        return check(
            "noise_scale",
            "fail",
            base + f", but {len(missing)} parameter(s) carry too little noise, e.g. {label} at "
            f"{share:.3f}× σC: noise is missing where the accountant assumes it (a parameter "
            "re-created or excluded from the noised ones?)",
            **values,
        )
    if z is not None:
        return check(
            "noise_scale",
            "fail",
            base + f", but the noise has a non-zero mean (z = {z:.1f}): it is not the "
            "zero-mean Gaussian the accountant assumes",
            **values,
        )
    if high:
        return check(
            "noise_scale",
            "warn",
            base + ": more noise than the accountant assumes; ε is conservative (is the noise "
            "generated with a larger σ or C than the optimizer reports?)",
            **values,
        )
    return check("noise_scale", "pass", base, **values)


def detectable_deficit(count: int, alpha: float) -> float:
    """The smallest relative noise deficit ``1 − ratio`` a χ²(count) test at ``alpha`` fails on."""
    if count <= 0:
        return 1.0
    from scipy import stats

    return 1.0 - math.sqrt(float(stats.chi2.ppf(alpha, count)) / count)


def _pooled_noise(run: Any, alpha: float) -> dict[str, Any] | None:
    """The noise scale pooled over the run's audits (``None`` with fewer than two audits)."""
    pooled = getattr(run, "pooled_noise", None)
    if not pooled or pooled["audits"] < 2 or not pooled["count"]:
        return None
    n, chi2, rounding = pooled["count"], pooled["chi2"], pooled["rounding"]
    q_lo, _ = _chi2_interval(n, alpha)
    ratio = math.sqrt(chi2 / n)
    detect = detectable_deficit(n, alpha)
    return {
        "low": not math.sqrt(chi2) >= math.sqrt(q_lo) - math.sqrt(rounding),
        "pooled_value": ratio,
        "pooled_coordinates": n,
        "pooled_audits": pooled["audits"],
        "detectable_pooled": detect,
        "text": f"; pooled over {pooled['audits']} audits: {ratio:.4f} over {n:,} coordinates, "
        f"detects {detect:.2%}",
    }


def _noise_without_sigma(stats: dict[str, Any]) -> dict[str, Any]:
    """σ = 0: ``pass`` when no noise was added either, ``warn`` when some was."""
    measured = math.sqrt(stats["sum_sq"] / stats["count"])
    if math.sqrt(stats["sum_sq"]) <= 1.01 * math.sqrt(stats["rounding_sq"]) + 1e-30:
        return check("noise_scale", "pass", "σ = 0 and no noise was added (ε = ∞)", value=0.0)
    return check(
        "noise_scale",
        "warn",
        f"σ = 0, yet noise of RMS {measured:.4g} was added to the gradient sums: the run is "
        "more private than its accountant says (ε = ∞)",
        value=math.inf,
        measured_std=measured,
    )


def _noise_scale_tests(stats: dict[str, Any], alpha: float) -> tuple[bool, bool, float | None]:
    """``(too little, too much, z of a biased mean or None)`` at level ``alpha`` each.

    Under a correct mechanism ``‖noise‖²/(σC)²`` is χ²(n) and the sum of the noise N(0, n(σC)²);
    the bounded float round-off of the sums widens both intervals (by Cauchy–Schwarz for the
    sum: at most √n·‖round-off‖).
    """
    from scipy import stats as st

    n, expected = stats["count"], stats["expected_std"]
    rounding = math.sqrt(stats["rounding_sq"])
    norm = math.sqrt(stats["sum_sq"])
    q_lo, q_hi = _chi2_interval(n, alpha)
    low = not norm >= math.sqrt(q_lo) * expected - rounding  # NaN noise fails
    high = not norm <= math.sqrt(q_hi) * expected + rounding
    z_limit = float(st.norm.isf(alpha / 2))
    biased = abs(stats["sum"]) > z_limit * math.sqrt(n) * expected + math.sqrt(n) * rounding
    return low, high, stats["sum"] / (math.sqrt(n) * expected) if biased else None


def _parameters_short_of_noise(params, expected: float, alpha: float) -> list[tuple[str, float]]:
    from scipy import stats

    level = alpha / max(len(params), 1)
    out = []
    for label, sq, count in params:
        if count == 0:
            continue
        if sq / expected**2 < float(stats.chi2.ppf(level, count)):
            out.append((label, math.sqrt(sq / count) / expected))
    return sorted(out, key=lambda item: item[1])


def check_noise_shape(captured: CapturedStep) -> dict[str, Any] | None:
    """``fail`` when a subsample of the noise is not Gaussian (Kolmogorov–Smirnov, p < 10⁻⁶).

    The sample is compared with N(0, ŝ²), ŝ the RMS over *all* coordinates: estimating the scale
    from the data only makes the test conservative, so the false-alarm rate stays below
    :data:`FALSE_ALARM` (the scale itself is ``noise_scale``'s job).
    """
    stats = (captured.mechanism or {}).get("noise")
    if not stats or not stats["count"]:
        return None
    sample = stats["sample"].double()
    scale = math.sqrt(stats["sum_sq"] / stats["count"])
    if stats["expected_std"] <= 0 or scale == 0 or sample.numel() < 20:
        return check("noise_shape", "pass", "no noise to test (σ = 0 or too few coordinates)")
    if stats["rounding_sq"] > 1e-4 * stats["sum_sq"]:
        return check(
            "noise_shape",
            "pass",
            "not tested: the noise is too small against the float round-off of the sums",
        )
    from scipy import stats as st

    result = st.kstest(sample.numpy() / scale, "norm")
    detail = (
        f"Kolmogorov–Smirnov distance {result.statistic:.4f} of {sample.numel()} noise "
        f"coordinates from a Gaussian (p = {result.pvalue:.2g})"
    )
    if result.pvalue < FALSE_ALARM:
        return check(
            "noise_shape",
            "fail",
            detail + ": the noise is not Gaussian, which the accountant assumes (a different "
            "noise distribution, or noise on only part of the coordinates)",
            value=float(result.statistic),
            p_value=float(result.pvalue),
        )
    return check(
        "noise_shape", "pass", detail, value=float(result.statistic), p_value=float(result.pvalue)
    )


def _lone_rows(captured: CapturedStep) -> tuple[float, int, float] | None:
    """Largest clean-row norm of a bin holding exactly one sample, over C, how many bins, and the
    tolerance the clean sums' dtype allows."""
    sums = captured.imprint
    if sums is None or sums.simulated or sums.membership.numel() == 0:
        return None
    from ..reconstruct.bins import bin_rows, lone_bins

    lone = lone_bins(sums.membership)
    if not bool(lone.any()):
        return None
    dw, db, _ = bin_rows(sums.weight_clean, sums.bias_clean, structure=sums.geometry.structure)
    rows = torch.cat([dw.double(), db.double()[:, None]], dim=1)[lone].norm(dim=1)
    tolerance = clip_tolerance(sums.weight_clean.dtype)
    return float(rows.max()) / captured.max_grad_norm, int(lone.sum()), tolerance


def check_clipping(captured: CapturedStep) -> dict[str, Any] | None:
    """``fail`` when a sample contributed more than C to the clean sum.

    Evidence, strongest first: the per-sample gradients (the clean sum must equal their sum, each
    clipped to C); the imprint layer's lone bins (a bin with one sample holds part of that one
    sample's clipped gradient, so its clean row's norm is at most C; works in ghost mode); in
    ghost mode without an imprint layer, only the clipping bound of the module (the summed
    gradient cannot be recomputed there). ``None`` when there is no evidence at all.
    """
    stats = (captured.mechanism or {}).get("clipping")
    lone = _lone_rows(captured) if captured.max_grad_norm > 0 else None
    bound = captured.max_grad_norm
    if lone is not None and lone[0] > 1 + lone[2]:
        return check(
            "clipping",
            "fail",
            f"a bin holding a single sample carries a clean gradient of norm {lone[0]:.3g}× C "
            f"(C = {bound:.4g}; at most 1× when every sample is clipped to C): per-sample "
            "clipping is not applied as the accountant assumes, so the noise does not cover one "
            "sample's influence",
            value=lone[0],
            detectable=lone[2],
        )
    if stats and stats["source"] == "per_sample" and stats.get("partial"):
        stats = None  # the per-sample gradients cover part of the step only
    if stats and stats["source"] == "per_sample":
        entry = _per_sample_clipping(stats, lone, bound)
        if entry is not None:
            return entry
    if lone is not None:
        return check(
            "clipping",
            "pass",
            f"{lone[1]} imprint bins holding a single sample carry clean gradients of norm at most "
            f"{lone[0]:.4f}× C (C = {bound:.4g}; detects an excess of {lone[2]:.1%})",
            value=lone[0],
            detectable=lone[2],
        )
    if stats and stats["source"] == "ghost":
        return _ghost_clipping(stats, bound)
    return None


def _per_sample_clipping(
    stats: dict[str, Any], lone: tuple[float, int] | None, bound: float
) -> dict[str, Any] | None:
    """The clean sum against the per-sample gradients clipped to C (``None``: no samples, and the
    lone bins speak instead)."""
    if stats["samples"] == 0:
        if lone is None:
            return check("clipping", "pass", "no samples at this step", value=0.0)
        return None
    tolerance = stats.get("tolerance", SUM_TOLERANCE)
    if stats["residual"] > tolerance:
        return _clipped_sum_differs(stats)
    text = (
        f"the clean sum is the sum of {stats['samples']} per-sample gradients clipped to "
        f"C = {bound:.4g} (relative difference {stats['residual']:.1e}, tolerance "
        f"{tolerance:.1e} for {'/'.join(stats.get('dtypes') or ['float32'])}); largest "
        f"contribution {stats['max_clipped']:.4f}× C, largest unclipped norm "
        f"{stats['max_norm']:.3g}× C"
    )
    if lone is not None:
        text += f"; {lone[1]} lone imprint bins at most {lone[0]:.4f}× C"
    return check(
        "clipping",
        "pass",
        text,
        value=stats["max_clipped"],
        residual=stats["residual"],
        detectable=tolerance,
    )


def _clipped_sum_differs(stats: dict[str, Any]) -> dict[str, Any]:
    """``fail``: the clean sum is not the per-sample gradients clipped to C (and what it is)."""
    eff = stats.get("effective_max")
    tolerance = stats.get("tolerance", SUM_TOLERANCE)
    unclipped = stats.get("unclipped_residual", math.inf)
    fitted, fit_residual = stats.get("fitted_bound"), stats.get("fitted_residual", math.inf)
    if unclipped <= tolerance:
        what = "it equals the sum of the *unclipped* per-sample gradients"
    elif fitted is not None and fit_residual <= tolerance:
        what = f"it is the sum of the per-sample gradients clipped at {fitted:.4f}× C"
    else:
        what = "it is not the sum of the per-sample gradients clipped to C"
    eff_text = (
        f"; the per-sample factors that fit it give contributions up to {eff:.3g}× C"
        if eff is not None
        else ""
    )
    return check(
        "clipping",
        "fail",
        f"the clean clipped sum differs from the per-sample gradients clipped to C "
        f"(relative difference {stats['residual']:.3g}): {what}{eff_text} (largest "
        f"per-sample norm {stats['max_norm']:.3g}× C). The noise σC covers one sample's "
        "influence only when every sample is clipped to C.",
        value=clipped_ratio(stats),
        residual=stats["residual"],
        detectable=tolerance,
    )


def clipped_ratio(stats: dict[str, Any]) -> float:
    """The largest contribution over C that explains a clean sum the check found wrong: the
    fitted bound when it explains the sum, else the least-squares factors' largest
    contribution, else the largest unclipped norm (nothing was clipped)."""
    tolerance = stats.get("tolerance", SUM_TOLERANCE)
    if stats.get("unclipped_residual", math.inf) <= tolerance:
        return float(stats["max_norm"])
    fitted = stats.get("fitted_bound")
    if fitted is not None and stats.get("fitted_residual", math.inf) <= tolerance:
        return float(fitted)
    candidates = [stats.get("effective_max"), fitted]
    known = [float(c) for c in candidates if c is not None]
    return max(known) if known else float(stats["max_norm"])


def clip_ratio(captured: CapturedStep) -> float | None:
    """The largest contribution of one sample to this step's clean sum, over C (at least 1).

    What the clipping check measured: 1 when every sample was clipped to C, more when some
    contributed more (a lone imprint bin above C, a clean sum clipped at a larger bound, a ghost
    module clipping at a larger bound). ``None`` without evidence. The measured ε divides the
    measured noise by C times this (the sensitivity the noise has to cover).
    """
    if captured.max_grad_norm <= 0:
        return None
    stats = (captured.mechanism or {}).get("clipping")
    lone = _lone_rows(captured)
    ratios = []
    if lone is not None:
        ratios.append(lone[0] if lone[0] > 1 + lone[2] else 1.0)
    if stats and stats["source"] == "per_sample" and not stats.get("partial"):
        if stats["samples"] and stats["residual"] > stats.get("tolerance", SUM_TOLERANCE):
            ratios.append(clipped_ratio(stats))
        else:
            ratios.append(1.0)
    elif stats and stats["source"] == "ghost":
        bound = stats.get("module_bound")
        ratios.append(max(1.0, bound / captured.max_grad_norm) if bound else 1.0)
    return max(1.0, *ratios) if ratios else None


def _ghost_clipping(stats: dict[str, Any], bound: float) -> dict[str, Any]:
    """Ghost clipping without lone bins: only the model's clipping bound can be compared with C."""
    module_bound = stats.get("module_bound")
    if module_bound is not None and module_bound > bound * (
        1 + stats.get("tolerance", 0) + CLIP_TOLERANCE
    ):
        return check(
            "clipping",
            "fail",
            f"the model clips per-sample gradients at {module_bound:.4g} while the "
            f"optimizer's noise is calibrated to C = {bound:.4g}",
            value=module_bound / bound,
        )
    where = (
        f"the model's ghost clipping bound {module_bound:.4g}"
        if module_bound is not None
        else "the optimizer's C"
    )
    return check(
        "clipping",
        "pass",
        f"ghost clipping: per-sample norms (largest {stats['max_norm']:.3g}× C) are scaled "
        f"to {where}; the summed gradient itself cannot be recomputed without per-sample "
        "gradients (an imprint layer checks it through its lone bins)",
        value=stats["max_clipped"],
    )


def _binomial_trials(lam: float, q: float) -> int:
    return max(1, round(lam / q)) if q > 0 else 1


def _most_regular(
    counts: dict[int, int], steps: int, trials: tuple[int, int], q: float
) -> tuple[float, int | None]:
    """``(p, value)``: a p-value of the most over-represented batch size under Binomial(N, q).

    For each observed size v, ``t_v = P[Bin(steps, p_v) ≥ count_v]`` with ``p_v`` the largest
    probability of v over the admissible N. The smallest ``t`` is turned into a p-value by a
    union bound over *every* size that could have been observed:
    ``Σ_v min(t, P[size v occurs at all]) ≤ Σ_v min(t, steps·p_v)``.
    """
    from scipy import stats

    n_lo, n_hi = trials
    top = int(n_hi * q + 40 * math.sqrt(n_hi * q + 1) + 40)
    values = np.arange(0, max(top, max(counts) + 1) + 1)
    mode_n = np.clip(np.round(values / q), n_lo, n_hi)
    p_v = np.max(
        [stats.binom.pmf(values, n, q) for n in (n_lo, n_hi)]
        + [stats.binom.pmf(values, mode_n, q)],
        axis=0,
    )
    worst, worst_value = 1.0, None
    for size, c in counts.items():
        tail = float(stats.binom.sf(c - 1, steps, p_v[size]))
        if tail < worst:
            worst, worst_value = tail, size
    bound = float(np.minimum(worst, steps * p_v).sum()) + steps * float(
        stats.binom.sf(values[-1], n_hi, q)
    )
    return min(bound, 1.0), worst_value


def check_sampling(captured: CapturedStep, run: Any = None) -> dict[str, Any] | None:
    """Batch sizes against Poisson sampling at the accountant's rate q.

    Under Poisson sampling of N examples at rate q, each step's batch size is Binomial(N, q),
    independently. N is the dataset's size when the privacy engine knows it, else bracketed from
    the optimizer's expected batch size (Opacus sets it to ⌊N·q⌋, so N·q lies within one of it;
    both ends are tried). ``fail`` when the total over all counted steps is impossible under that
    law (q is not the rate the batches were drawn at: a sampler at another rate, a data loader
    replaced after ``make_private``); ``warn`` when some batch size recurs far more often than
    Binomial(N, q) allows (fixed-size, shuffled or weighted batches accounted as Poisson). The
    counts are pooled over the run (``run.size_counts``, resumes included) when given.
    """
    mech = captured.mechanism or {}
    sampling = mech.get("sampling")
    if not sampling:
        return None
    pooled = getattr(run, "size_counts", None)
    source = pooled if pooled else sampling["counts"]
    counts = {int(k): int(v) for k, v in source.items()}
    unknown = counts.pop(-1, 0)
    q = sampling.get("sample_rate")
    lam = sampling.get("expected_batch_size")
    if unknown:
        return check(
            "sampling",
            "warn",
            f"the batch size of {unknown} step(s) is unknown (several physical batches per step "
            "and no model to count inputs): pass model= to attach() to check the sampling",
        )
    steps = sum(counts.values())
    if not steps or not q or not lam:
        return None
    from scipy import stats

    trials = _trials(sampling, q, lam)
    total = sum(size * c for size, c in counts.items())
    mean = total / steps
    # the total over `steps` independent Binomial(N, q) is Binomial(steps·N, q)
    p_low = max(float(stats.binom.cdf(total, steps * n, q)) for n in trials)
    p_high = max(float(stats.binom.sf(total - 1, steps * n, q)) for n in trials)
    z = float(stats.norm.isf(FALSE_ALARM / 6))
    detect = z * math.sqrt((1 - q) / (steps * trials[0] * q))
    population = (
        f"N = {trials[0]:,}" if trials[0] == trials[1] else f"N in {trials[0]:,}–{trials[1]:,}"
    )
    detail = (
        f"{steps} steps, mean batch size {mean:.2f} against N·q ≈ {trials[0] * q:.4g} at the "
        f"accountant's q = {q:.4g} ({population}; detects a rate off by {detect:.1%})"
    )
    values = {"value": mean / (trials[0] * q), "steps": steps, "detectable": detect}
    if min(p_low, p_high) < FALSE_ALARM / 3:
        return check(
            "sampling",
            "fail",
            detail + f": batches are {'smaller' if p_low < p_high else 'larger'} than Poisson "
            "sampling at the accountant's rate allows, so the accountant's q (and ε) is not "
            "this run's (a sampler at another rate, or a data loader replaced after "
            "make_private?)",
            **values,
        )
    # too regular: a value that recurs more often than Binomial(N, q) could make it
    worst, worst_value = _most_regular(counts, steps, trials, q)
    if worst < FALSE_ALARM / 3:
        share = counts[worst_value] / steps
        return check(
            "sampling",
            "warn",
            detail + f": {share:.0%} of the batches have exactly {worst_value} samples, far "
            "more regular than Poisson sampling (fixed-size, shuffled or weighted batches, e.g. "
            "a WeightedRandomSampler or a data loader replaced after make_private?). The "
            "accountant's ε assumes Poisson sampling; for such batches it is not a valid bound "
            "(use make_private's poisson_sampling=True loader)",
            **values,
        )
    return check("sampling", "pass", detail + ": consistent with Poisson sampling", **values)


def _trials(sampling: dict[str, Any], q: float, lam: float) -> tuple[int, int]:
    """``(N low, N high)``: the dataset's size, or the range the expected batch size allows."""
    size = sampling.get("dataset_size")
    if size:
        return int(size), int(size)
    lams = (lam, lam + sampling.get("slack", 1.0))
    low, high = (_binomial_trials(x, q) for x in lams)
    return low, high


def check_accountant(captured: CapturedStep) -> dict[str, Any] | None:
    """``fail`` when the accountant's σ is not the optimizer's at this step, or it missed steps.

    Opacus accountants record ``(σ, q, steps)``; C is not part of their history, so C is checked
    through the noise (σC) and clipping checks. ``warn`` when there is no accountant.
    """
    mech = captured.mechanism or {}
    if "accountant" not in mech:
        return None
    acc = mech["accountant"]
    if acc is None:
        return check(
            "accountant",
            "warn",
            "no accountant to compare with (pass privacy_engine= to the auditor)",
        )
    sigma = captured.noise_multiplier
    if not acc.get("history"):
        return check(
            "accountant",
            "fail",
            "the accountant has recorded no step although the optimizer took one: its step "
            "hook is not running, so ε is not accounted (was the optimizer's step_hook "
            "replaced?)",
        )
    acc_sigma, acc_q, _ = acc["history"][-1]
    counted, taken = acc.get("counted"), acc.get("taken")
    total_counted, total_taken = acc.get("total_counted"), acc.get("total_taken")
    if acc_sigma != sigma:
        return check(
            "accountant",
            "fail",
            f"the accountant recorded σ = {acc_sigma:.6g} for this step but the optimizer used "
            f"σ = {sigma:.6g}: ε is computed for another mechanism than the one that ran",
            value=acc_sigma / sigma if sigma else math.inf,
        )
    if counted is not None and taken is not None and counted != taken:
        return check(
            "accountant",
            "fail",
            f"the accountant counted {counted} steps since the audit started, the optimizer "
            f"took {taken}: ε misses steps (was its step hook replaced or detached?)",
            value=float(counted - taken),
        )
    if total_counted is not None and total_taken is not None and total_counted != total_taken:
        fewer = total_counted < total_taken
        return check(
            "accountant",
            "fail" if fewer else "warn",
            f"the accountant holds {total_counted} steps in all, the optimizer has taken "
            f"{total_taken} (this auditor's count, resumes included): "
            + (
                "ε leaves steps out. Was the accountant restored from a step count such as "
                "len(accountant), which counts history entries, not steps (opacus#834)? "
                "Save and restore accountant.state_dict()"
                if fewer
                else "ε counts steps this run did not take (an accountant carried over from "
                "another run, or restored from a later checkpoint?); it is conservative"
            ),
            value=float(total_counted - total_taken),
        )
    return check(
        "accountant",
        "pass",
        f"σ = {sigma:.6g} and q = {acc_q:.4g} as the accountant recorded; it counted every step "
        f"({taken} since the audit started)",
        value=0.0,
    )


def mechanism_checks(captured: CapturedStep, run: Any = None) -> list[dict[str, Any]]:
    """Every mechanism check that has something to check at this step (see the module doc).

    Args:
        captured: the audited step.
        run: what the run's audits so far pooled (:class:`~opacus_dmaudit.privacy.measured.
            RunEvidence`, this audit included): the pooled noise scale, the batch sizes of every
            step, earlier audits' noise signs. ``None``: this audit alone.
    """
    if captured.mechanism is None:
        return []
    out = []
    for fn in (
        check_noise_scale,
        check_noise_shape,
        check_clipping,
        check_sampling,
        check_accountant,
        check_noise_freshness,
        check_normalisation,
    ):
        entry = fn(captured, run) if fn in _POOLED else fn(captured)
        if entry is not None:
            out.append(entry)
    return out


_POOLED = {check_noise_scale, check_sampling, check_noise_freshness, check_normalisation}
