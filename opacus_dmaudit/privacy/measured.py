"""The run's ε measured beside the accountant's: what the run actually did, re-accounted.

Every ε an accountant prints is a function of three things it was *told*: the noise multiplier
σ, the sampling rate q and the number of steps T. The audit *measures* each of them:

* σ̂: the noise actually added, pooled over every audited coordinate of every audit so far
  (``‖noise‖²`` is χ² under a correct mechanism), divided by the sensitivity Ĉ = C·max(1, largest
  clipped contribution / C that the clipping check measured): noise at 0.97×, or clipping at
  1.1·C with the noise at σC, both show as a smaller σ̂;
* q̂: the samples of every step (counted at every step, audited or not) over steps × N, N the
  dataset's size (the privacy engine's), with an exact (Clopper–Pearson) interval;
* T: the steps the capture counted (resumes included).

ε̂ is the user's own accountant type re-run on the accountant's history with σ and q replaced by
the measured ones and T steps (for a run at one σ and q: ``[(σ̂, q̂, T)]``), with RDP standing in
for PRV below σ = 0.3 as :func:`~.accountant.read_epsilon` does. Its 95 % interval comes from the
corners of the (σ, q) box of the two 97.5 % intervals (ε grows with q and shrinks with σ, so two
corners bound it). On a correct run ε̂/ε lies within a few per cent of 1 and the interval holds ε.

What ε̂ assumes, each covered by a check: Gaussian noise (``noise_shape``) drawn afresh at every
step (``noise_freshness``), Poisson sampling (``sampling``), a data-independent normaliser
(``normalisation``). What it cannot see: steps between audits (their noise; their batch sizes
are counted), anything before the auditor attached, per-record sampling rates (weighted
sampling at the right mean rate), and the noise's source (``secure_mode``).

The evidence is pooled by :class:`RunEvidence`, whose per-audit part goes into every record
(``AuditRecord.evidence``) so that a resumed run pools everything again
(:meth:`RunEvidence.restore`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .packing import decode_signs, encode_signs
from .reaccount import rescaled_epsilons
from .tradeoff import auroc, gaussian_tradeoff, roc_points, tpr_at_fpr

if TYPE_CHECKING:
    from ..capture.step import CapturedStep

__all__ = [
    "RunEvidence",
    "measured_epsilon",
    "step_evidence",
    "ASSUMES",
    "CANNOT_SEE",
    "measured_rows",
    "roc_points",
    "gaussian_tradeoff",
    "auroc",
    "tpr_at_fpr",
]

#: Confidence of each of the σ and q intervals (their box then holds both at ≥ 95 %).
EACH_LEVEL = 0.975

#: What ε̂ assumes, and the check that covers each assumption.
ASSUMES = {
    "Gaussian noise": "noise_shape",
    "noise drawn afresh at every step": "noise_freshness",
    "Poisson sampling of every record at one rate": "sampling",
    "a divisor that does not depend on the data": "normalisation",
    "every contribution clipped to the measured bound": "clipping",
}

#: What ε̂ cannot see.
CANNOT_SEE = (
    "the noise of steps that were not audited (their batch sizes are counted)",
    "steps before the auditor attached",
    "per-record sampling rates (weighted sampling at the right mean rate)",
    "whether the noise generator is cryptographically secure (secure_mode)",
)


# -- one audit's evidence -----------------------------------------------------------------------


class NonFiniteMeasurement(ValueError):
    """The run's statistics hold a NaN or an infinity (from the gradients of an audited step),
    so ε is not re-accounted: a property of the data, said without a traceback."""


def step_evidence(captured: CapturedStep) -> dict[str, Any]:
    """The compact part of one captured step that the run's pooled numbers need (JSON-safe).

    ``{"steps", "batches": {"sizes": {size: steps}, ...}}`` always; with mechanism statistics
    also ``"noise"`` (χ² statistic, coordinates, round-off, σ the noise was added at),
    ``"signs"`` and ``"clip"`` (:func:`~opacus_dmaudit.checks.mechanism.clip_ratio`).
    """
    from ..checks.mechanism import clip_ratio
    from ..checks.normalisation import normalisation_evidence

    sizes: dict[str, int] = {}
    for size in captured.batch_sizes:
        key = str(-1 if size < 0 else int(size))
        sizes[key] = sizes.get(key, 0) + 1
    out: dict[str, Any] = {"steps": int(captured.step), "batches": {"sizes": sizes}}
    mech = captured.mechanism or {}
    sampling = mech.get("sampling") or {}
    for key in ("dataset_size", "sample_rate", "expected_batch_size", "slack"):
        if sampling.get(key) is not None:
            out["batches"][key] = sampling[key]
    noise = mech.get("noise")
    if noise and noise["count"] and noise["expected_std"] > 0 and captured.max_grad_norm > 0:
        expected_sq = noise["expected_std"] ** 2
        out["noise"] = {
            "chi2": noise["sum_sq"] / expected_sq,
            "count": int(noise["count"]),
            "rounding": noise["rounding_sq"] / expected_sq,
            "sigma": noise["expected_std"] / captured.max_grad_norm,
        }
        if noise.get("signs") is not None:
            out["signs"] = encode_signs(noise["signs"])
    if mech:
        out["clip"] = clip_ratio(captured)
        scale = normalisation_evidence(captured)
        if scale is not None:
            out["scale"] = scale
    if mech.get("secure_mode") is not None:
        out["secure_mode"] = bool(mech["secure_mode"])
    return out


# -- the pool -----------------------------------------------------------------------------------
@dataclass
class RunEvidence:
    """The mechanism evidence of a run's audits so far, pooled (what the checks and ε̂ read).

    Attributes:
        audits: audits with noise statistics.
        chi2, count, rounding: Σ ‖noise‖²/(σC)², Σ coordinates, Σ round-off bound (relative).
        sigma: the noise multiplier the optimizer added noise at, at the last audit.
        clip: the largest clip ratio measured (≥ 1; ``None`` before any evidence).
        size_counts: batch size -> steps, over every counted step (-1: unknown).
        dataset_size, sample_rate, expected_batch_size, slack: the sampling's parameters.
        steps: the steps taken, by the last audit's count.
        signs: ``(step, signs)`` of each audit's noise at the fixed coordinates.
        scales: ``(step, {"scale", "se", "ratio"})`` of each audit (the normalisation check).
        secure_mode: the optimizer's ``secure_mode`` (``None``: unknown).
    """

    audits: int = 0
    chi2: float = 0.0
    count: int = 0
    rounding: float = 0.0
    sigma: float | None = None
    clip: float | None = None
    size_counts: dict[int, int] = field(default_factory=dict)
    dataset_size: int | None = None
    sample_rate: float | None = None
    expected_batch_size: float | None = None
    slack: float = 1.0
    steps: int = 0
    signs: list[tuple[int, np.ndarray]] = field(default_factory=list)
    scales: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    secure_mode: bool | None = None

    def add(self, captured: CapturedStep) -> dict[str, Any]:
        """Pool one captured step; returns its evidence for the record."""
        evidence = step_evidence(captured)
        self.add_evidence(evidence)
        return evidence

    def add_evidence(self, evidence: dict[str, Any]) -> None:
        """Pool the evidence of one audit (live, or read back from its record)."""
        self.steps = max(self.steps, int(evidence.get("steps") or 0))
        batches = evidence.get("batches") or {}
        for size, n in (batches.get("sizes") or {}).items():
            self.size_counts[int(size)] = self.size_counts.get(int(size), 0) + int(n)
        for key in ("dataset_size", "sample_rate", "expected_batch_size", "slack"):
            if batches.get(key) is not None:
                setattr(self, key, batches[key])
        noise = evidence.get("noise")
        if noise:
            self.audits += 1
            self.chi2 += float(noise["chi2"])
            self.count += int(noise["count"])
            self.rounding += float(noise["rounding"])
            self.sigma = float(noise["sigma"])
        if evidence.get("signs"):
            self.signs.append((self.steps, decode_signs(evidence["signs"])))
        if evidence.get("scale"):
            self.scales.append((self.steps, dict(evidence["scale"])))
        clip = evidence.get("clip")
        if clip is not None:
            self.clip = max(self.clip or 1.0, float(clip))
        if evidence.get("secure_mode") is not None:
            self.secure_mode = bool(evidence["secure_mode"])

    def restore(self, records) -> None:
        """Pool the evidence of records written before a resume (oldest first)."""
        for record in records:
            evidence = getattr(record, "evidence", None)
            if evidence:
                self.add_evidence(evidence)

    @property
    def pooled_noise(self) -> dict[str, Any] | None:
        """``{"chi2", "count", "rounding", "audits"}`` over the audits so far, or ``None``."""
        if not self.count:
            return None
        return {
            "chi2": self.chi2,
            "count": self.count,
            "rounding": self.rounding,
            "audits": self.audits,
        }

    # -- the measured numbers ----------------------------------------------------------------
    def noise_multiplier(self) -> tuple[float, float, float] | None:
        """``(σ̂, low, high)``: the measured noise over the measured sensitivity (97.5 % each)."""
        if not self.count or not self.sigma:
            return None
        from scipy import stats

        alpha = 1 - EACH_LEVEL
        lo_q = float(stats.chi2.ppf(alpha / 2, self.count))
        hi_q = float(stats.chi2.isf(alpha / 2, self.count))
        scale = self.sigma / (self.clip or 1.0)
        point = math.sqrt(self.chi2 / self.count) * scale
        return point, math.sqrt(self.chi2 / hi_q) * scale, math.sqrt(self.chi2 / lo_q) * scale

    def sampling_rate(self) -> dict[str, Any] | None:
        """q̂ with its exact 97.5 % interval, and what N was (``None`` without counted steps)."""
        counts = {k: v for k, v in self.size_counts.items() if k >= 0}
        steps = sum(counts.values())
        if not steps or not self.sample_rate:
            return None
        samples = sum(k * v for k, v in counts.items())
        if self.dataset_size:
            n_low = n_high = int(self.dataset_size)
        elif self.expected_batch_size:
            q = self.sample_rate
            n_low = max(1, round(self.expected_batch_size / q))
            n_high = max(n_low, round((self.expected_batch_size + self.slack) / q))
        else:
            return None
        lo, hi = _clopper_pearson(samples, steps * n_high, 1 - EACH_LEVEL)
        lo_b, hi_b = _clopper_pearson(samples, steps * n_low, 1 - EACH_LEVEL)
        middle = (n_low + n_high) / 2
        return {
            "value": samples / (steps * middle),
            "ci": [min(lo, lo_b), max(hi, hi_b)],
            "steps": steps,
            "samples": samples,
            "population": n_low if n_low == n_high else [n_low, n_high],
        }


def _clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Two-sided exact interval of a binomial rate at level ``alpha``."""
    from scipy import stats

    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k >= n else float(stats.beta.isf(alpha / 2, k + 1, n - k))
    return lo, hi


def measured_epsilon(
    run: RunEvidence, *, kind: str, history, delta: float, orders=None, claimed=None
) -> dict[str, Any] | None:
    """ε̂ of the run so far with its 95 % interval and basis (``None`` without the evidence).

    Args:
        run: the pooled evidence (this audit included).
        kind: the user's accountant type (:func:`~.accountant.accountant_kind`).
        history: the accountant's ``(σ, q, steps)`` entries.
        delta: the run's δ.
        orders: RDP orders (the user's RDP accountant's).
        claimed: the accountant's own ε (a long PRV run rescales it instead of re-running PRV).

    Returns:
        ``{"epsilon_measured", "epsilon_measured_ci", "epsilon_measured_basis"}``.
    """
    sigma = run.noise_multiplier()
    rate = run.sampling_rate()
    history = [(float(s), float(q), int(t)) for s, q, t in history or []]
    if sigma is None or rate is None or not history or not history[-1][0] > 0:
        return None
    measured = [*sigma, rate["value"], *rate["ci"]]
    if not all(math.isfinite(v) for v in measured):
        raise NonFiniteMeasurement(
            f"the measured noise multiplier {sigma} or sample rate {rate['value']} is not finite "
            "(a NaN or an infinity in the gradients of an audited step): ε is not re-accounted"
        )
    claimed_sigma, claimed_q = history[-1][0], history[-1][1]
    steps = max(run.steps, 1)
    factors = [
        (sigma[0] / claimed_sigma, rate["value"] / claimed_q),
        (sigma[2] / claimed_sigma, rate["ci"][0] / claimed_q),  # most noise, lowest rate
        (sigma[1] / claimed_sigma, rate["ci"][1] / claimed_q),  # least noise, highest rate
    ]
    from .._opacus import rdp_orders

    (value, low, high), how = rescaled_epsilons(
        kind,
        history,
        factors,
        steps=steps,
        delta=delta,
        orders=tuple(orders or rdp_orders()),
        claimed=claimed,
    )
    basis = {
        "accountant": how,
        "noise_multiplier": sigma[0],
        "noise_multiplier_ci": [sigma[1], sigma[2]],
        "noise_multiplier_claimed": claimed_sigma,
        "coordinates": run.count,
        "audits": run.audits,
        "clip_ratio": run.clip,
        "sample_rate": rate["value"],
        "sample_rate_ci": rate["ci"],
        "sample_rate_claimed": claimed_q,
        "steps_counted": rate["steps"],
        "dataset_size": rate["population"],
        "steps": steps,
        "steps_accountant": sum(t for _, _, t in history),
        "secure_mode": run.secure_mode,
        "assumes": {k: f"checked by {v}" for k, v in ASSUMES.items()},
        "cannot_see": list(CANNOT_SEE),
    }
    return {
        "epsilon_measured": value,
        "epsilon_measured_ci": [low, high],
        "epsilon_measured_basis": basis,
    }


def measured_rows(records) -> dict[str, Any]:
    """The report's rows for the run's measured ε and the attack's composed estimate (the last
    record that has them), for ``report.json``'s ``privacy`` table."""
    last = next((r for r in reversed(list(records)) if r.epsilon_measured is not None), None)
    if last is None:
        return {}
    basis = last.epsilon_measured_basis or {}
    rows: dict[str, Any] = {
        "epsilon_measured (the run's noise, sampling and steps, re-accounted)": (
            last.epsilon_measured
        ),
        "epsilon_measured 95% CI": last.epsilon_measured_ci,
        "noise_multiplier measured": basis.get("noise_multiplier"),
        "sample_rate measured": basis.get("sample_rate"),
        "secure_mode": basis.get("secure_mode"),
    }
    composed = (last.privacy_measured or {}).get("epsilon_composed")
    if composed is not None:
        rows["epsilon_composed (attack's per-step mu composed; a heuristic, not a bound)"] = (
            composed
        )
    return rows
