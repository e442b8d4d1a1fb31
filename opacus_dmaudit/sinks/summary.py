"""One run summary and one verdict, for every place that tells the reader what an audit found.

The CLI, the demo, ``report.json``, ``report.html`` and ``comparison.html`` all show
:func:`summarize` and :func:`verdict`; nothing else words a conclusion.

The verdict is a claim and is earned (DESIGN §6):

* any failed check makes the run's audit **invalid**, and the verdict says why instead of
  drawing a conclusion;
* reconstructions that meet the success criterion are reported with their counts, and compared
  with the baseline κ (what a guess without the gradient achieves at the same criterion): a rate
  at or below κ is not evidence of leakage;
* reconstructions that single out their own image among the N images of their batch more often
  than chance (≤ 1/N for any guess without the gradient, an exact baseline) are leakage too,
  whether or not they meet the success criterion (a one-sided test at level
  :data:`IDENTIFICATION_LEVEL`);
* "no visible leakage" is said only when every check passed, the occupancy test had high power
  against a lone image of this data (measured from the clean sums), and no reconstruction beat
  either baseline; a positive membership lower bound (``epsilon_lower``) is stated beside it. Where nothing rose above the noise with low power, the verdict says the audit
  could not tell, and gives the power.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..checks.entries import is_valid
from ..schema import METRICS, STAGES, upgrade_record

__all__ = [
    "summarize",
    "verdict",
    "fmt",
    "POWER_FOR_NEGATIVE",
    "IDENTIFICATION_LEVEL",
    "VERDICT_STATUSES",
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


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: Iterable[Any]) -> float | None:
    vals = [v for v in values if _finite(v)]
    return sum(vals) / len(vals) if vals else None


def fmt(value: Any, spec: str = ".3g") -> str:
    """A number for people: ``n/a`` for missing, ``∞`` for infinite."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if isinstance(value, int | float):
        return format(value, spec)
    return str(value)


def _check_overview(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per check name: how often it passed, warned and failed, and its first non-pass detail."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        for c in r.get("checks") or []:
            entry = out.setdefault(
                c["name"], {"pass": 0, "warn": 0, "fail": 0, "detail": None, "first_step": None}
            )
            entry[c["status"]] += 1
            rank = {"pass": 0, "warn": 1, "fail": 2}
            shown = entry.get("shown_status", "pass")
            if entry["detail"] is None or rank[c["status"]] > rank[shown]:
                entry["detail"] = c["detail"]
                entry["shown_status"] = c["status"]
                entry["first_step"] = r.get("step")
    for entry in out.values():
        entry["status"] = "fail" if entry["fail"] else "warn" if entry["warn"] else "pass"
        entry.pop("shown_status", None)
    return out


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Run-level numbers from audit records (any record version)."""
    records = [upgrade_record(r) for r in records]
    if not records:
        return {"audits": 0, "valid": None, "checks": {}}
    last = records[-1]
    keys = sorted({k for r in records for k in r["summary"]})
    means = {k: _mean(r["summary"].get(k) for r in records) for k in keys}
    stages = [s for s in STAGES if any(s in (r.get("success") or {}) for r in records)]
    success = {s: _mean((r.get("success") or {}).get(s) for r in records) for s in stages}
    best = {
        s: max((v for r in records if _finite(v := (r.get("success") or {}).get(s))), default=None)
        for s in stages
    }
    ident_stages = [s for s in STAGES if any(s in (r.get("identification") or {}) for r in records)]
    identification = {
        s: _mean((r.get("identification") or {}).get(s) for r in records) for s in ident_stages
    }
    # per stage, the number of audited samples whose reconstruction singles out its own image,
    # and how many a guess without the gradient would (≤ 1/N of each batch of N: ≤ 1 per audit)
    identified = {
        s: sum(
            round((r.get("identification") or {}).get(s) * (r.get("batch_size") or 0))
            for r in records
            if _finite((r.get("identification") or {}).get(s))
        )
        for s in ident_stages
    }
    identification_chance = sum(
        1 for r in records if (r.get("batch_size") or 0) > 1 and r.get("identification")
    )
    # per stage, the number of audited samples reconstructed to the criterion
    recovered = {
        s: sum(
            round((r.get("success") or {}).get(s) * (r.get("batch_size") or 0))
            for r in records
            if _finite((r.get("success") or {}).get(s))
        )
        for s in stages
    }
    sigmas = sorted(
        {r.get("noise_multiplier") for r in records if r.get("noise_multiplier") is not None}
    )
    checks = _check_overview(records)
    versions = {r["record_version"] for r in records}
    valid = None if versions == {1} else all(is_valid(r.get("checks") or []) for r in records)
    powers = [(r.get("detection") or {}).get("power") for r in records]
    measured = last.get("privacy_measured") or {}
    return {
        "audits": len(records),
        "first_step": records[0]["step"],
        "last_step": last["step"],
        "mode": last.get("mode", "imprint"),
        "final_epsilon": last.get("epsilon"),
        "epsilon_accountant": last.get("epsilon_accountant"),
        "epsilon_note": last.get("epsilon_note"),
        "delta": last.get("delta"),
        "noise_multiplier": last.get("noise_multiplier"),
        "noise_multipliers": sigmas,
        "mu_step": last.get("mu_step"),
        "sample_rate": last.get("sample_rate"),
        "kappa": last.get("kappa"),
        "kappa_baseline": last.get("kappa_baseline"),
        "kappa_uniform": last.get("kappa_uniform"),
        "success_criterion": last.get("success_criterion"),
        "mean_success_rate": success,
        "max_success_rate": best,
        "recovered": recovered,
        "mean_identification_rate": identification,
        "identified": identified,
        "identification_chance": identification_chance,
        "bounds": last.get("bounds"),
        "final_run_bounds": last.get("run_bounds"),
        "mean_metrics": means,
        "found_singletons": sum(r.get("found_singletons") or 0 for r in records),
        "true_singletons": sum(r.get("true_singletons") or 0 for r in records),
        "occupied_bins": sum(r.get("occupied_bins") or 0 for r in records),
        "detection_power": _mean(powers),
        "detection_test": (last.get("detection") or {}).get("test"),
        "epsilon_lower": measured.get("epsilon_lower"),
        "epsilon_step_claimed": measured.get("epsilon_step_claimed"),
        "mu_step_measured": measured.get("mu_step_measured"),
        "mu_step_ci": measured.get("mu_step_ci"),
        "checks": checks,
        "valid": valid,
    }


def _criterion_text(summary: Mapping[str, Any]) -> str:
    crit = summary.get("success_criterion") or {}
    metric = str(crit.get("metric", "?"))
    label = METRICS[metric].label if metric in METRICS else metric.upper()
    op = "≥" if crit.get("higher_is_better") else "≤"
    return f"{label} {op} {fmt(crit.get('threshold'))}"


def verdict(summary: Mapping[str, Any]) -> dict[str, str]:
    """What the audit found, as ``{"status", "headline", "text"}`` (see :data:`VERDICT_STATUSES`)."""
    if not summary.get("audits"):
        return {
            "status": "no_audits",
            "headline": "No audit was recorded.",
            "text": "No audit was recorded, so nothing can be said about this run.",
        }
    n = summary["audits"]
    sigma = fmt(summary.get("noise_multiplier"))
    context = (
        f"Over {n} audit{'s' if n != 1 else ''} (steps {summary['first_step']}–"
        f"{summary['last_step']}) at noise multiplier σ = {sigma} (ε = "
        f"{fmt(summary.get('final_epsilon'))} at δ = {fmt(summary.get('delta'))})"
    )
    note = summary.get("epsilon_note")
    tail = [note.rstrip(".") + "."] if note else []
    tail += _bound_text(summary)
    checks = summary.get("checks") or {}
    failed = {name: c for name, c in checks.items() if c["status"] == "fail"}
    if failed:
        reasons = "; ".join(
            f"{name} failed in {c['fail']} of {n} audits (first at step {c['first_step']}): "
            f"{c['detail'].rstrip('.')}"
            for name, c in failed.items()
        )
        return {
            "status": "invalid",
            "headline": "This audit is invalid: " + ", ".join(failed) + " failed.",
            "text": f"This audit is invalid: {reasons}. Nothing in this report can be read as "
            "'no leakage'." + _seen(summary),
        }
    if summary.get("mode") == "mechanism" and not checks:
        return {
            "status": "undetectable",
            "headline": "Nothing was audited.",
            "text": f"{context}, nothing was audited: no ImprintBlock, no shadow audit and no "
            "mechanism checks.",
        }
    if summary.get("mode") == "mechanism":
        warned = [name for name, c in checks.items() if c["status"] == "warn"]
        return {
            "status": "mechanism_ok",
            "headline": "The DP mechanism matched the accountant at every audit.",
            "text": f"{context}, the noise, clipping, sampling and accountant checks found the "
            "mechanism the accountant assumes"
            + (f" (warnings: {', '.join(warned)})" if warned else "")
            + ". No images were audited (no ImprintBlock, no shadow audit), so this says nothing "
            "about what an attacker could reconstruct.",
        }
    rates = summary.get("mean_success_rate") or {}
    recovered = summary.get("recovered") or {}
    kappa = summary.get("kappa")
    rule = _criterion_text(summary)
    attack = {s: recovered.get(s, 0) for s in ("raw", "dm") if s in rates}
    best_stage = max(attack, key=lambda s: rates.get(s) or 0.0, default=None)
    ident = _identification_leak(summary)
    tail += _membership_text(summary)
    if ident is not None and not (
        best_stage is not None
        and attack[best_stage] > 0
        and (kappa is None or (rates.get(best_stage) or 0.0) > kappa)
    ):
        stage, count, chance, p_value = ident
        visible = stage == "raw"
        return {
            "status": "leakage",
            "headline": "Reconstructions single out their own training images"
            + ("." if visible else " (with the diffusion prior)."),
            "text": f"{context}, {count} {stage_name(stage)} reconstructions were nearer to "
            f"their own training image than to every other image of their batch, where a "
            f"guess without the gradient would manage at most {chance} (1/N per batch; "
            f"one-sided p {_p_text(p_value)}). That is leakage: the attacker tells which "
            "training image was in the step"
            + (
                f", even though no reconstruction met the criterion {rule} more often than a guess"
                if attack
                else ""
            )
            + ". "
            + " ".join(tail),
        }
    if best_stage is not None and attack[best_stage] > 0:
        parts = [
            f"{stage_name(s)}: {fmt(rates.get(s), '.1%')} of each audited batch on average "
            f"({_images(attack[s])})"
            for s in attack
        ]
        above = kappa is None or (rates.get(best_stage) or 0.0) > kappa
        if above:
            visible = "raw" in attack and attack["raw"] > 0
            return {
                "status": "leakage",
                "headline": "Training images were reconstructed from single privatised gradients"
                + ("." if visible else " (only with the diffusion prior)."),
                "text": f"{context}, reconstructions met the criterion {rule}: "
                + "; ".join(parts)
                + ". Training images are recoverable from one privatised step by an attacker "
                "who controls the model"
                + ("" if visible else " and has a prior for this kind of image")
                + ". "
                + " ".join(tail),
            }
        return {
            "status": "not_above_baseline",
            "headline": "Some reconstructions met the criterion, but no more than a guess would.",
            "text": f"{context}, reconstructions met the criterion {rule}: "
            + "; ".join(parts)
            + f". That is no more than the baseline κ = {fmt(kappa)}, the success of the best "
            "guess without the gradient at the same criterion, so it is not evidence of leakage. "
            + " ".join(tail),
        }
    warned = [name for name, c in checks.items() if c["status"] == "warn"]
    power = summary.get("detection_power")
    found = summary.get("found_singletons") or 0
    true = summary.get("true_singletons") or 0
    power_text = (
        f"the occupancy test detects a lone image of this data at this σ with probability "
        f"{fmt(power, '.0%')} (measured from the clean gradient sums)"
        if power is not None
        else "the occupancy test's power at this σ is unknown"
    )
    if found == 0:
        head = (
            f"{context}, no lone image rose above the noise ({true} lone images were in the "
            f"audited batches); {power_text}"
        )
    else:
        head = (
            f"{context}, {found} of {true} lone images rose above the noise, but none was "
            f"reconstructed to the criterion {rule} or identified more often than chance; "
            f"{power_text}"
        )
    if power is not None and power >= POWER_FOR_NEGATIVE:
        return {
            "status": "no_visible_leakage",
            "headline": "No visible leakage to this attack at this noise level.",
            "text": f"{head}. "
            + (
                f"No check failed (warnings: {', '.join(warned)})"
                if warned
                else "Every check passed"
            )
            + ", so at this noise level the audit shows no visible leakage: evidence about this "
            "attack with this prior, not a proof. " + " ".join(tail),
        }
    return {
        "status": "undetectable",
        "headline": "Nothing rose above the noise; the audit cannot tell whether images leak.",
        "text": f"{head}. The test is too weak at this σ to find most lone images, so this is "
        "not evidence of privacy: it shows only that single images are mostly buried in noise "
        "for this attacker. " + " ".join(tail),
    }


def _identification_leak(summary: Mapping[str, Any]) -> tuple[str, int, int, float] | None:
    """``(stage, identified, chance, p)`` for the stage that identifies above chance, if any.

    A guess without the gradient is nearest its own image among the N of its batch with
    probability ≤ 1/N, so at most one sample per audit in expectation (``chance``); the count is
    tested against a Poisson tail with that mean (conservative for sums of independent trials).
    """
    from scipy import stats

    identified = summary.get("identified") or {}
    chance = summary.get("identification_chance") or 0
    if not identified or chance <= 0:
        return None
    for stage in ("raw", "dm"):  # the raw readout first: leakage visible without a prior
        count = identified.get(stage)
        if not count:
            continue
        p_value = float(stats.poisson.sf(count - 1, chance))
        if p_value < IDENTIFICATION_LEVEL:
            return stage, int(count), int(chance), p_value
    return None


def _p_text(p_value: float) -> str:
    return "< 1e-12" if p_value < 1e-12 else f"= {p_value:.1g}"


def _membership_text(summary: Mapping[str, Any]) -> list[str]:
    """The membership lower bound, where it is positive (it rules out a clean reading)."""
    lower = summary.get("epsilon_lower")
    if not _finite(lower) or lower <= 0:
        return []
    return [
        f"The membership test on the imprint bins measured ε ≥ {fmt(lower)} for one step "
        "(95 % confidence, given the sample is in the step): whether a known image was in a "
        "step is detectable from its gradient."
    ]


def _bound_text(summary: Mapping[str, Any]) -> list[str]:
    """The one-step ReRo bounds, stated only where no guess without the gradient beats them."""
    bounds = summary.get("bounds") or {}
    out = []
    bound, kappa = bounds.get("single_step"), summary.get("kappa")
    measured, uniform = summary.get("kappa_baseline"), summary.get("kappa_uniform")
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
            if measured is not None and summary.get("kappa") == max(measured, uniform or 0.0)
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


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def stage_name(stage: str) -> str:
    return {"raw": "raw readout", "dm": "diffusion prior", "clean": "without noise"}.get(
        stage, stage
    )


def _seen(summary: Mapping[str, Any]) -> str:
    rates = summary.get("mean_success_rate") or {}
    recovered = summary.get("recovered") or {}
    seen = [
        f"{stage_name(s)} {fmt(rates.get(s), '.1%')} ({_images(recovered.get(s, 0))})"
        for s in ("raw", "dm")
        if s in rates
    ]
    if not seen:
        return ""
    return (
        " What was measured all the same: reconstructions to the criterion " + ", ".join(seen) + "."
    )
