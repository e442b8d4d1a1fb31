"""The verdict: what a run's audits show, as a table of small rules tried in order.

A verdict is a claim and is earned:

* any failed check makes the run's audit **invalid**, and the verdict says why instead of
  drawing a conclusion;
* reconstructions that meet the success criterion are compared with the baseline κ (what a guess
  without the gradient achieves at the same criterion): a rate at or below κ is not evidence of
  leakage;
* reconstructions that single out their own image among the N images of their batch more often
  than chance are leakage too, whether or not they meet the success criterion (a one-sided test
  at level :data:`IDENTIFICATION_LEVEL`);
* "no visible leakage" is said only when every check passed, the occupancy test had high power
  against a lone image of this data (measured from the clean sums), and no reconstruction beat
  either baseline; where nothing rose above the noise with low power, the verdict says the audit
  could not tell, and gives the power.

:data:`RULES` is the table: the first rule whose condition holds words the verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..checks.entries import is_finite_number
from ..schema import stage_label
from .run_summary import RunSummary, Verdict
from .text import count, fmt

__all__ = [
    "Verdict",
    "verdict",
    "RULES",
    "VERDICT_STATUSES",
    "POWER_FOR_NEGATIVE",
    "IDENTIFICATION_LEVEL",
]

#: A negative verdict needs the occupancy test to detect a lone image with at least this
#: probability (mean over audits).
POWER_FOR_NEGATIVE = 0.9

#: Identification above chance is leakage when its one-sided p-value is below this level.
IDENTIFICATION_LEVEL = 1e-3

VERDICT_STATUSES = {
    "no_audits": "no audit recorded",
    "invalid": "audit invalid",
    "leakage": "training images recovered",
    "not_above_baseline": "no reconstruction beyond what a guess achieves",
    "no_visible_leakage": "no visible leakage to this attack",
    "undetectable": "nothing detectable; the audit cannot tell",
    "mechanism_ok": "mechanism checks passed (no images audited)",
}


@dataclass(frozen=True)
class Evidence:
    """What the rules read, computed once from the summary."""

    summary: RunSummary
    context: str  # "Over N audits (steps a–b) at noise multiplier σ = … (ε = … at δ = …)"
    tail: list[str]  # sentences every verdict ends with (ε note, bounds, membership bound)
    attack: dict[str, int]  # recovered samples of the attack stages (raw, dm)
    best_stage: str | None  # the attack stage with the highest success rate
    identification: tuple[str, int, int, float] | None  # (stage, count, chance, p) above chance

    @property
    def success_above_kappa(self) -> bool:
        s = self.summary
        if self.best_stage is None or self.attack[self.best_stage] <= 0:
            return False
        return s.kappa is None or (s.success_rate.get(self.best_stage) or 0.0) > s.kappa


def _evidence(summary: RunSummary) -> Evidence:
    n = summary.audits
    context = (
        f"Over {n} audit{'s' if n != 1 else ''} (steps {summary.first_step}–"
        f"{summary.last_step}) at noise multiplier σ = {fmt(summary.noise_multiplier)} (ε = "
        f"{fmt(summary.epsilon)} at δ = {fmt(summary.delta)})"
    )
    note = summary.epsilon_note
    tail = ([note.rstrip(".") + "."] if note else []) + _bound_text(summary)
    rates = summary.success_rate
    attack = {s: summary.recovered.get(s, 0) for s in ("raw", "dm") if s in rates}
    best = max(attack, key=lambda s: rates.get(s) or 0.0, default=None)
    return Evidence(summary, context, tail, attack, best, _identification_leak(summary))


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
    return (
        "The DP mechanism matched the accountant at every audit.",
        f"{e.context}, the noise, clipping, sampling and accountant checks found the "
        "mechanism the accountant assumes"
        + (f" (warnings: {', '.join(warned)})" if warned else "")
        + ". No images were audited (no ImprintBlock, no shadow audit), so this says nothing "
        "about what an attacker could reconstruct.",
    )


def _identified(e: Evidence) -> tuple[str, str]:
    stage, count, chance, p_value = e.identification
    rule = _criterion_text(e.summary)
    visible = stage == "raw"
    return (
        "Reconstructions single out their own training images"
        + ("." if visible else " (with the diffusion prior)."),
        f"{e.context}, {count} {stage_label(stage)} reconstructions were nearer to their own "
        f"training image than to every other image of their batch, where a guess without the "
        f"gradient would manage at most {chance} (1/N per batch; one-sided p "
        f"{_p_text(p_value)}). That is leakage: the attacker tells which training image was in "
        "the step"
        + (
            f", even though no reconstruction met the criterion {rule} more often than a guess"
            if e.attack
            else ""
        )
        + ". "
        + " ".join(e.tail + _membership_text(e.summary)),
    )


def _success_parts(e: Evidence) -> str:
    rates = e.summary.success_rate
    return "; ".join(
        f"{stage_label(s)}: {fmt(rates.get(s), '.1%')} of each audited batch on average "
        f"({count(e.attack[s], 'image')})"
        for s in e.attack
    )


def _reconstructed(e: Evidence) -> tuple[str, str]:
    visible = e.attack.get("raw", 0) > 0
    return (
        "Training images were reconstructed from single privatised gradients"
        + ("." if visible else " (only with the diffusion prior)."),
        f"{e.context}, reconstructions met the criterion {_criterion_text(e.summary)}: "
        + _success_parts(e)
        + ". Training images are recoverable from one privatised step by an attacker who "
        "controls the model"
        + ("" if visible else " and has a prior for this kind of image")
        + ". "
        + " ".join(e.tail + _membership_text(e.summary)),
    )


def _at_baseline(e: Evidence) -> tuple[str, str]:
    return (
        "Some reconstructions met the criterion, but no more than a guess would.",
        f"{e.context}, reconstructions met the criterion {_criterion_text(e.summary)}: "
        + _success_parts(e)
        + f". That is no more than the baseline κ = {fmt(e.summary.kappa)}, the success of the "
        "best guess without the gradient at the same criterion, so it is not evidence of "
        "leakage. " + " ".join(e.tail + _membership_text(e.summary)),
    )


def _nothing_read(e: Evidence) -> str:
    """What the detection saw, and its power (the start of both negative verdicts)."""
    s = e.summary
    power = (
        f"the occupancy test detects a lone image of this data at this σ with probability "
        f"{fmt(s.detection_power, '.0%')} (measured from the clean gradient sums)"
        if s.detection_power is not None
        else "the occupancy test's power at this σ is unknown"
    )
    if s.lone_found == 0:
        return (
            f"{e.context}, no lone image rose above the noise ({s.lone_in_batch} lone images "
            f"were in the audited batches); {power}"
        )
    return (
        f"{e.context}, {s.lone_found} of {s.lone_in_batch} lone images rose above the noise, "
        f"but none was reconstructed to the criterion {_criterion_text(s)} or identified more "
        f"often than chance; {power}"
    )


def _no_visible(e: Evidence) -> tuple[str, str]:
    warned = e.summary.warned_checks
    return (
        "No visible leakage to this attack at this noise level.",
        f"{_nothing_read(e)}. "
        + (f"No check failed (warnings: {', '.join(warned)})" if warned else "Every check passed")
        + ", so at this noise level the audit shows no visible leakage: evidence about this "
        "attack with this prior, not a proof. " + " ".join(e.tail + _membership_text(e.summary)),
    )


def _cannot_tell(e: Evidence) -> tuple[str, str]:
    return (
        "Nothing rose above the noise; the audit cannot tell whether images leak.",
        f"{_nothing_read(e)}. The test is too weak at this σ to find most lone images, so this "
        "is not evidence of privacy: it shows only that single images are mostly buried in "
        "noise for this attacker. " + " ".join(e.tail + _membership_text(e.summary)),
    )


@dataclass(frozen=True)
class Rule:
    """A verdict ``status`` whose ``words`` apply when ``holds``."""

    status: str
    holds: Callable[[Evidence], bool]
    words: Callable[[Evidence], tuple[str, str]]


def _has_attack(e: Evidence) -> bool:
    return e.best_stage is not None and e.attack[e.best_stage] > 0


def _powerful(e: Evidence) -> bool:
    power = e.summary.detection_power
    return power is not None and power >= POWER_FOR_NEGATIVE


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
    Rule(
        "leakage",
        lambda e: e.identification is not None and not e.success_above_kappa,
        _identified,
    ),
    Rule("leakage", lambda e: e.success_above_kappa, _reconstructed),
    Rule("not_above_baseline", _has_attack, _at_baseline),
    Rule("no_visible_leakage", _powerful, _no_visible),
    Rule("undetectable", lambda e: True, _cannot_tell),
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
def _identification_leak(summary: RunSummary) -> tuple[str, int, int, float] | None:
    """``(stage, identified, chance, p)`` for the stage that identifies above chance, if any.

    A guess without the gradient is nearest its own image among the N of its batch with
    probability ≤ 1/N, so at most one sample per audit in expectation (``chance``); the count is
    tested against a Poisson tail with that mean (conservative for sums of independent trials).
    """
    from scipy import stats

    chance = summary.identification_chance
    if not summary.identified or chance <= 0:
        return None
    for stage in ("raw", "dm"):  # the raw readout first: leakage visible without a prior
        count = summary.identified.get(stage)
        if not count:
            continue
        p_value = float(stats.poisson.sf(count - 1, chance))
        if p_value < IDENTIFICATION_LEVEL:
            return stage, int(count), int(chance), p_value
    return None


def _criterion_text(summary: RunSummary) -> str:
    crit = summary.success_criterion
    return crit.text if crit is not None else "?"


def _p_text(p_value: float) -> str:
    return "< 1e-12" if p_value < 1e-12 else f"= {p_value:.1g}"


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
        base = (
            f"the larger of κ̂ = {fmt(measured)}, what the best fixed guess achieves on public "
            "images at this criterion, and 1/N"
            if measured is not None and kappa == max(measured, uniform or 0.0)
            else "as configured"
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
            f"image of its batch with probability above {fmt(ident)} (κ = 1/N exact)."
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
