"""The verdict: what a run's audits show, as a table of small rules tried in order.

A verdict is a claim and is earned:

* any failed check makes the run's audit **invalid**, and the verdict says why instead of
  drawing a conclusion;
* success and identification are decided **per target** (a lone sample the audit found and
  scored), pooled over the run's audits: k of n targets against the upper confidence limit of
  what a guess without the gradient achieves per target (measured on public images,
  :mod:`~opacus_dmaudit.score.baseline`), by an exact one-sided binomial test; the tests share
  the level :data:`DECISION_LEVEL` (Bonferroni). Any test below its level is **leakage**; the
  batch share (how much of a batch an attacker gets) is reported beside it as exposure and never
  compared with a baseline;
* a negative verdict ("no visible leakage", "not evidence of leakage") is said only when no
  check failed, every baseline could be measured and every test had power ≥
  :data:`POWER_FOR_NEGATIVE` against a per-target rate 0.1 above its baseline; otherwise the
  verdict says the evidence is too thin and how many more targets (audits, images) would do;
  where nothing rose above the noise and the occupancy test is weak, it says the audit could not
  tell, and gives the power.

:data:`RULES` is the table: the first rule whose condition holds words the verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..checks.entries import is_finite_number
from ..schema import METRICS, stage_label
from ..score.binomial import ALTERNATIVE_GAP, DECISION_LEVEL
from ..score.binomial import POWER_FOR_NEGATIVE as TEST_POWER
from .run_summary import RunSummary, TargetEvidence, TargetTest, Verdict
from .text import count, fmt

__all__ = [
    "Verdict",
    "verdict",
    "RULES",
    "VERDICT_STATUSES",
    "POWER_FOR_NEGATIVE",
    "IDENTIFICATION_LEVEL",
    "DECISION_LEVEL",
]

#: A negative verdict needs the occupancy test to detect a lone image with at least this
#: probability (mean over audits) where nothing rose above the noise, and every per-target test
#: this power against its alternative.
POWER_FOR_NEGATIVE = TEST_POWER

#: Release 0.1's name of the tests' level (:data:`DECISION_LEVEL`, shared by all the tests).
IDENTIFICATION_LEVEL = DECISION_LEVEL

VERDICT_STATUSES = {
    "no_audits": "no audit recorded",
    "invalid": "audit invalid",
    "leakage": "training images recovered",
    "not_above_baseline": "no reconstruction beyond what a guess achieves",
    "no_visible_leakage": "no visible leakage to this attack",
    "inconclusive": "too little evidence to tell",
    "undetectable": "nothing detectable; the audit cannot tell",
    "mechanism_ok": "mechanism checks passed (no images audited)",
}


@dataclass(frozen=True)
class Evidence:
    """What the rules read, computed once from the summary."""

    summary: RunSummary
    context: str  # "Over N audits (steps a–b) at noise multiplier σ = … (ε = … at δ = …)"
    tail: list[str]  # sentences every verdict ends with (ε note, bounds, membership bound)
    targets: TargetEvidence | None

    @property
    def significant(self) -> list[TargetTest]:
        return self.targets.significant if self.targets is not None else []

    @property
    def negative_earned(self) -> bool:
        """Every baseline measured, every test powerful and none even near its level (no
        p-value below :data:`DECISION_LEVEL` before the split among tests): a negative claim is
        earned."""
        t = self.targets
        if t is None or not t.powerful or t.missing or self.summary.failed_stages:
            return False
        return all(x.p_value >= DECISION_LEVEL for x in t.tests)

    @property
    def hits(self) -> int:
        return sum(t.hits for t in self.targets.tests) if self.targets is not None else 0


def _evidence(summary: RunSummary) -> Evidence:
    n = summary.audits
    context = (
        f"Over {n} audit{'s' if n != 1 else ''} (steps {summary.first_step}–"
        f"{summary.last_step}) at noise multiplier σ = {fmt(summary.noise_multiplier)} (ε = "
        f"{fmt(summary.epsilon)} at δ = {fmt(summary.delta)})"
    )
    note = summary.epsilon_note
    tail = ([note.rstrip(".") + "."] if note else []) + _bound_text(summary)
    return Evidence(summary, context, tail, summary.targets)


# -- the rules ----------------------------------------------------------------------------------
def _no_audits(e: Evidence) -> tuple[str, str]:
    return (
        "No audit was recorded.",
        "No audit was recorded, so nothing can be said about this run.",
    )


def _invalid(e: Evidence) -> tuple[str, str]:
    s = e.summary
    failed = {name: c for name, c in s.checks.items() if c.status == "fail"}
    reasons = "; ".join(
        f"{name} failed in {c.failed} of {s.audits} audits (first at step {c.first_step}): "
        f"{(c.detail or '').rstrip('.')}"
        for name, c in failed.items()
    )
    return (
        "This audit is invalid: " + ", ".join(failed) + " failed.",
        f"This audit is invalid: {reasons}. Nothing in this report can be read as "
        "'no leakage'." + _seen(s),
    )


def _nothing_audited(e: Evidence) -> tuple[str, str]:
    return (
        "Nothing was audited.",
        f"{e.context}, nothing was audited: no ImprintBlock, no shadow audit and no "
        "mechanism checks.",
    )


def _mechanism_ok(e: Evidence) -> tuple[str, str]:
    warned = e.summary.warned_checks
    accountant = e.summary.checks.get("accountant")
    if accountant is None or accountant.status != "pass":  # nothing to match against
        return (
            "No check failed, but no accountant was compared: the audit cannot say the mechanism "
            "is the one an ε assumes.",
            f"{e.context}, no check of the noise, clipping or sampling failed"
            + (f" (warnings: {', '.join(warned)})" if warned else "")
            + ". The accountant check did not pass"
            + (f" ({accountant.detail})" if accountant is not None and accountant.detail else "")
            + ". No images were audited (no ImprintBlock, no shadow audit).",
        )
    return (
        "The DP mechanism matched the accountant at every audit.",
        f"{e.context}, the noise, clipping, sampling and accountant checks found the "
        "mechanism the accountant assumes"
        + (f" (warnings: {', '.join(warned)})" if warned else "")
        + ". No images were audited (no ImprintBlock, no shadow audit), so this says nothing "
        "about what an attacker could reconstruct.",
    )


def _leak(e: Evidence) -> tuple[str, str]:
    sig = e.significant
    raw = any(t.stage == "raw" for t in sig)
    success = any(t.kind == "success" for t in sig)
    headline = (
        "Training images were reconstructed from single privatised gradients"
        if success
        else "Reconstructions single out their own training images"
    )
    return (
        headline + ("." if raw else " (only with the diffusion prior)."),
        f"{e.context}, {_tests_text(e.targets, e.summary)} "
        f"{len(sig)} of {count(len(e.targets.tests), 'test')} "
        f"{'is' if len(sig) == 1 else 'are'} below {'its' if len(sig) == 1 else 'their'} "
        "level: leakage. "
        + (
            "Training images are recoverable from one privatised step by an attacker who "
            "controls the model"
            if success
            else "The attacker tells which training image was in the step"
        )
        + ("" if raw else ", with a prior for this kind of image")
        + ". "
        + " ".join(_exposure_text(e.summary) + e.tail + _membership_text(e.summary)),
    )


def _tests_text(t: TargetEvidence, summary: RunSummary) -> str:
    """The targets, the strongest test in words, and every count in short."""
    best = min(t.tests, key=lambda x: x.p_value)
    return (
        f"{count(t.attempted, 'target')} (lone images read and scored) were tested against "
        f"what a guess without the gradient achieves per target: {_test_text(best, summary)} "
        f"(the strongest of {count(len(t.tests), 'exact one-sided binomial test')} sharing the "
        f"level {DECISION_LEVEL:g}). All counts: {_counts_text(t, summary)}."
    )


def _counts_text(t: TargetEvidence, summary: RunSummary) -> str:
    """``"reconstructed to LPIPS ≤ 0.1: raw readout 0, diffusion prior 40 of 65 (a guess ≤ 13);
    identified in MSE: raw readout 20, diffusion prior 18 of 65 (a guess ≤ 3.2); ..."``."""
    groups: dict[tuple[str, str], list[TargetTest]] = {}
    for x in t.tests:
        groups.setdefault((x.kind, x.metric), []).append(x)
    parts = []
    for (kind, metric), tests in groups.items():
        label = METRICS[metric].label if metric in METRICS else metric
        what = (
            f"reconstructed to {_criterion_text(summary)}"
            if kind == "success"
            else f"identified in {label}"
        )
        stages = ", ".join(f"{stage_label(x.stage)} {x.hits}" for x in tests)
        parts.append(f"{what}: {stages} of {tests[0].targets} (a guess ≤ {tests[0].expected:.3g})")
    return "; ".join(parts)


def _not_above(e: Evidence) -> tuple[str, str]:
    return (
        "Some reconstructions met the criterion, but no more often than a guess would.",
        f"{e.context}, {_tests_text(e.targets, e.summary)} No test is near its level, and "
        f"each had power ≥ {POWER_FOR_NEGATIVE:.0%} against a per-target rate "
        f"{ALTERNATIVE_GAP:g} above its baseline, so this is not evidence of leakage. "
        + " ".join(_exposure_text(e.summary) + e.tail + _membership_text(e.summary)),
    )


def _nothing_read(e: Evidence) -> str:
    """What the detection saw, and its power (the start of the weak-detection verdict)."""
    s = e.summary
    power = (
        f"the occupancy test detects a lone image of this data at this σ with probability "
        f"{fmt(s.detection_power, '.0%')} (measured from the clean gradient sums)"
        if s.detection_power is not None
        else "the occupancy test's power at this σ is unknown"
    )
    return (
        f"{e.context}, no lone image rose above the noise ({s.lone_in_batch} lone images "
        f"were in the audited batches); {power}"
    )


def _no_visible(e: Evidence) -> tuple[str, str]:
    warned = e.summary.warned_checks
    return (
        "No visible leakage to this attack at this noise level.",
        f"{e.context}, {_tests_text(e.targets, e.summary)} No test is near its level; each "
        f"had power ≥ {POWER_FOR_NEGATIVE:.0%} against a per-target rate {ALTERNATIVE_GAP:g} "
        "above its baseline, and "
        + (f"no check failed (warnings: {', '.join(warned)})" if warned else "every check passed")
        + ", so at this noise level the audit shows no visible leakage: evidence about this "
        "attack with this prior, not a proof. "
        + " ".join(_exposure_text(e.summary) + e.tail + _membership_text(e.summary)),
    )


def _cannot_tell(e: Evidence) -> tuple[str, str]:
    return (
        "Nothing rose above the noise; the audit cannot tell whether images leak.",
        f"{_nothing_read(e)}. The test is too weak at this σ to find most lone images, so this "
        "is not evidence of privacy: it shows only that single images are mostly buried in "
        "noise for this attacker. " + " ".join(e.tail + _membership_text(e.summary)),
    )


def _inconclusive(e: Evidence) -> tuple[str, str]:
    t = e.targets or TargetEvidence()
    public = any("public images" in why for why in t.missing.values())
    headline = (
        "Without public images the audit cannot tell a reconstruction from a good guess: "
        "give it public images like the training data."
        if public and "success" in t.missing
        else "Too little evidence to tell whether images leak: audit more steps or more images."
    )
    if t.tests:
        start = f"{e.context}, {_tests_text(t, e.summary)}"
    else:
        start = (
            f"{e.context}, {count(t.attempted, 'target')} (lone images read and scored) were "
            "attempted, and nothing could be tested."
        )
    text = " ".join([start, *_lost_text(e.summary), *_missing_text(t), *_thin_text(t)])
    return headline, text + " " + " ".join(
        _exposure_text(e.summary) + e.tail + _membership_text(e.summary)
    )


@dataclass(frozen=True)
class Rule:
    """A verdict ``status`` whose ``words`` apply when ``holds``."""

    status: str
    holds: Callable[[Evidence], bool]
    words: Callable[[Evidence], tuple[str, str]]


def _detected_nothing(e: Evidence) -> bool:
    power = e.summary.detection_power
    weak = power is None or power < POWER_FOR_NEGATIVE
    return e.summary.lone_found == 0 and weak


#: The rules, tried in order; the first that holds words the verdict.
RULES: tuple[Rule, ...] = (
    Rule("no_audits", lambda e: not e.summary.audits, _no_audits),
    Rule("invalid", lambda e: bool(e.summary.failed_checks), _invalid),
    Rule(
        "undetectable",
        lambda e: e.summary.mode == "mechanism" and not e.summary.checks,
        _nothing_audited,
    ),
    Rule("mechanism_ok", lambda e: e.summary.mode == "mechanism", _mechanism_ok),
    Rule("leakage", lambda e: bool(e.significant), _leak),
    Rule("undetectable", _detected_nothing, _cannot_tell),
    Rule("not_above_baseline", lambda e: e.negative_earned and e.hits > 0, _not_above),
    Rule("no_visible_leakage", lambda e: e.negative_earned, _no_visible),
    Rule("inconclusive", lambda e: True, _inconclusive),
)


def verdict(summary: RunSummary) -> Verdict:
    """The :class:`Verdict` of a run summary (the first rule of :data:`RULES` that holds).

    ``summarize(records).verdict`` and ``summary_from_json(report["summary"]).verdict`` call it.
    """
    evidence = _evidence(summary)
    rule = next(r for r in RULES if r.holds(evidence))
    headline, text = rule.words(evidence)
    return Verdict(status=rule.status, headline=headline, text=text)


# -- pieces of text -----------------------------------------------------------------------------
def _criterion_text(summary: RunSummary) -> str:
    crit = summary.success_criterion
    return crit.text if crit is not None else "?"


def _p_text(p_value: float) -> str:
    return "p < 1e-12" if p_value < 1e-12 else f"p = {p_value:.2g}"


def _test_text(t: TargetTest, summary: RunSummary) -> str:
    """``"identification in LPIPS, raw readout: 9 of 65 targets against ≤ 3.2 expected by chance
    (≤ 0.049 per target), p = 0.004"``."""
    label = METRICS[t.metric].label if t.metric in METRICS else t.metric
    what = (
        f"reconstructed to {_criterion_text(summary)}"
        if t.kind == "success"
        else f"identified in {label}"
    )
    return (
        f"{stage_label(t.stage)}: {t.hits} of {count(t.targets, 'target')} {what}, against ≤ "
        f"{t.expected:.3g} expected from a guess without the gradient (≤ {t.baseline:.3g} per "
        f"target), {_p_text(t.p_value)}"
    )


def _lost_text(summary: RunSummary) -> list[str]:
    """The audit stages that failed: their evidence is missing, so no negative claim is made."""
    if not summary.failed_stages:
        return []
    lost = ", ".join(f"{name} in {count(n, 'audit')}" for name, n in summary.failed_stages.items())
    return [f"Stages of the audit failed ({lost}; see each record's stage_errors): no negative "
            "claim rests on an audit that lost part of its evidence."]  # fmt: skip


def _missing_text(t: TargetEvidence) -> list[str]:
    out = []
    for kind, why in t.missing.items():
        what = (
            "No success claim is tested: the success baseline is missing"
            if kind == "success"
            else "Identification is not tested: its baseline is missing"
        )
        out.append(f"{what} ({why.rstrip('.')}).")
    if "identification" in t.missing and "public images" in t.missing["identification"]:
        out.append(
            "1/N is no valid baseline here: the scorer hands each reconstruction its bin, and a "
            "guess that knows the bin is identified more often than 1/N."
        )
    return out


def _thin_text(t: TargetEvidence) -> list[str]:
    """Why a negative claim is not earned, and what would earn it."""
    if not t.tests:
        return []
    near = [x for x in t.tests if x.p_value < DECISION_LEVEL and not x.significant]
    if near:
        return [
            f"{count(len(near), 'test')} came below {DECISION_LEVEL:g} but not below its share "
            f"of the run's level ({near[0].level:.2g}): suggestive, not conclusive; more audits "
            "will tell."
        ]
    weakest = min(t.tests, key=lambda x: x.power)
    if weakest.power >= POWER_FOR_NEGATIVE:
        return []
    out = [
        f"With {count(t.attempted, 'target')} the tests are too weak for a negative claim: "
        f"against a per-target rate {ALTERNATIVE_GAP:g} above its baseline, the weakest has "
        f"power {weakest.power:.0%} (a negative verdict needs {POWER_FOR_NEGATIVE:.0%})."
    ]
    needed = t.needed
    if needed is None:
        out.append("No practical number of targets would give that power.")
        return out
    more = max(needed - t.attempted, 1)
    text = f"About {more} more targets would"
    if t.per_audit:
        audits = math.ceil(more / t.per_audit)
        text += (
            f": at the recent {t.per_audit:.3g} targets per audit, about "
            f"{count(audits, 'more audit')}"
        )
    if t.more_images:
        text += " (or fewer with a larger max_images: the audits found more lone images than they scored)"
    out.append(text + ".")
    return out


def _exposure_text(summary: RunSummary) -> list[str]:
    """How much of a batch an attacker gets (the batch share, reported beside the tests)."""
    shares = (summary.exposure or {}).get("success") or {}
    parts = [f"{stage_label(s)} {fmt(shares.get(s), '.1%')}" for s in ("raw", "dm") if s in shares]
    if not parts:
        return []
    return [
        f"Exposure (the share of all audited batches' samples reconstructed to "
        f"{_criterion_text(summary)}): " + ", ".join(parts) + "."
    ]


def _membership_text(summary: RunSummary) -> list[str]:
    """The membership lower bound, where it is positive (it rules out a clean reading)."""
    lower = summary.measured.get("epsilon_lower")
    if not is_finite_number(lower) or lower <= 0:
        return []
    return [
        f"The membership test on the imprint bins measured ε ≥ {fmt(lower)} for one step "
        "(95 % confidence, given the sample is in the step): whether a known image was in a "
        "step is detectable from its gradient."
    ]


def _bound_text(summary: RunSummary) -> list[str]:
    """The one-step ReRo bounds, stated only where no guess without the gradient beats them."""
    bounds = summary.bounds or {}
    out = []
    bound, kappa = bounds.get("single_step"), summary.kappa
    measured, uniform = summary.kappa_baseline, summary.kappa_uniform
    if bound is not None and measured is None and kappa == uniform:
        out.append(
            f"No public images measured what a guess without the gradient achieves at this "
            f"criterion, so its bound (κ = 1/N = {fmt(kappa)}: {fmt(bound)}) may be beaten by a "
            "fixed guess and is not stated as a limit; give public images for a baseline."
        )
    elif bound is not None and bound >= 0.9995:
        out.append(
            f"The ReRo bound of one step is {fmt(bound)} at this σ: it rules out nothing here."
        )
    elif bound is not None:
        basis = summary.targets.success_basis if summary.targets is not None else None
        base = (
            "as configured"
            if basis == "configured" or measured is None
            else f"the 95 % upper limit of what the best fixed or bin-knowing guess achieves on "
            f"held-out public images at this criterion (the fixed guess: κ̂ = {fmt(measured)})"
        )
        out.append(
            f"For the step an audit reads, no attack can reach a success rate above "
            f"{fmt(bound)} at this criterion (ReRo bound of one Gaussian step, baseline κ = "
            f"{fmt(kappa)}: {base})."
        )
    ident = bounds.get("single_step_identification")
    if ident is not None and ident < 0.9995:
        out.append(
            f"No attack can make a reconstruction nearer to its own image than to every other "
            f"image of its batch with probability above {fmt(ident)} (ReRo bound of one step; "
            "κ: the informed adversary, who knows the other images of the batch, measured on "
            "public batches, 95 % upper limit)."
        )
    return out


def _seen(summary: RunSummary) -> str:
    rates = summary.success_rate
    seen = [
        f"{stage_label(s)} {fmt(rates.get(s), '.1%')} ({count(summary.recovered.get(s, 0), 'image')})"
        for s in ("raw", "dm")
        if s in rates
    ]
    if not seen:
        return ""
    return (
        " What was measured all the same: reconstructions to the criterion " + ", ".join(seen) + "."
    )
