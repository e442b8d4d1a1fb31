"""The run summary: what a run's audits add up to, typed, in one place.

:func:`summarize` turns a run's :class:`~opacus_dmaudit.record.AuditRecord` list into a
:class:`RunSummary`, one helper per group of the record (the accountant's view, success and
identification, detection, the membership test, the checks). The CLI, the demo,
``report.json``/``report.html``, ``comparison.html`` and ``DMAuditor.close()`` all show this
object; its :attr:`RunSummary.verdict` (:mod:`.verdict`) is the only place a conclusion is
worded. :meth:`RunSummary.to_json` keeps the keys ``report.json`` had in release 0.1. The types
live in :mod:`.run_summary` (so that :mod:`.verdict` reads them without importing this module)
and are re-exported here.

Example:
    >>> from opacus_dmaudit import read_audit_log
    >>> from opacus_dmaudit.sinks.summary import summarize
    >>> summary = summarize(read_audit_log("runs/audit/audit.jsonl"))  # doctest: +SKIP
    >>> print(summary.verdict.headline, summary.epsilon)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..checks.entries import is_finite_number, status_rank
from ..record import AuditRecord, Targets, stages_of
from ..schema import meets, metric_key
from ..score import binomial
from .run_summary import CheckOverview, RunSummary, TargetEvidence, TargetTest, Verdict
from .text import fmt
from .verdict import verdict

__all__ = [
    "RunSummary",
    "CheckOverview",
    "Verdict",
    "TargetEvidence",
    "TargetTest",
    "summarize",
    "summary_from_json",
    "fmt",
]

#: Targets per audit are averaged over at most this many of the last audits ("the recent rate").
RECENT_AUDITS = 5


def _mean(values: Iterable[Any]) -> float | None:
    vals = [v for v in values if is_finite_number(v)]
    return sum(vals) / len(vals) if vals else None


# -- summarize ----------------------------------------------------------------------------------
def _accounting(records: Sequence[AuditRecord]) -> dict[str, Any]:
    """The run's mechanism and the accountant's view at the last audit."""
    last = records[-1]
    return {
        "audits": len(records),
        "first_step": records[0].step,
        "last_step": last.step,
        "mode": last.mode or "imprint",
        "epsilon": last.epsilon,
        "epsilon_accountant": last.epsilon_accountant,
        "epsilon_note": last.epsilon_note,
        "delta": last.delta,
        "noise_multiplier": last.noise_multiplier,
        "noise_multipliers": sorted(
            {r.noise_multiplier for r in records if r.noise_multiplier is not None}
        ),
        "mu_step": last.mu_step,
        "sample_rate": last.sample_rate,
        "kappa": last.kappa,
        "kappa_baseline": last.kappa_baseline,
        "kappa_uniform": last.kappa_uniform,
        "bounds": last.bounds,
        "run_bounds": last.run_bounds,
    }


def _count(records: Sequence[AuditRecord], rate_of, stage: str) -> int:
    """Samples behind a per-batch share, summed over audits (share × batch size)."""
    return sum(
        round(rate_of(r)[stage] * (r.batch_size or 0))
        for r in records
        if is_finite_number((rate_of(r) or {}).get(stage))
    )


def _success(records: Sequence[AuditRecord]) -> dict[str, Any]:
    """Success to the criterion, per stage, and the metrics' means."""
    stages = stages_of(records, "success")
    criterion = next((r.success_criterion for r in reversed(records) if r.success_criterion), None)
    return {
        "success_criterion": criterion,
        "success_rate": {s: _mean(r.success.get(s) for r in records) for s in stages},
        "max_success_rate": {s: _largest(r.success.get(s) for r in records) for s in stages},
        "recovered": {s: _count(records, lambda r: r.success, s) for s in stages},
        "means": {
            k: _mean(r.means.get(k) for r in records)
            for k in sorted({k for r in records for k in r.means})
        },
    }


def _identification(records: Sequence[AuditRecord]) -> dict[str, Any]:
    """Identification per stage, and what a guess without the gradient would single out."""
    stages = stages_of(records, "identification")
    return {
        "identification_rate": {
            s: _mean((r.identification or {}).get(s) for r in records) for s in stages
        },
        "identified": {s: _count(records, lambda r: r.identification, s) for s in stages},
        # a guess without the gradient is nearest its own image with probability ≤ 1/N per
        # batch of N: at most one sample per audit in expectation
        "identification_chance": sum(
            1 for r in records if (r.batch_size or 0) > 1 and r.identification
        ),
    }


def _exposure(records: Sequence[AuditRecord]) -> dict[str, Any]:
    """The share of all audited batches' samples reconstructed or identified (pooled)."""
    out: dict[str, dict[str, float | None]] = {}
    for name in ("success", "identification"):
        stages = stages_of(records, name)
        total = {s: 0.0 for s in stages}
        samples = {s: 0 for s in stages}
        for r in records:
            for s, share in (getattr(r, name) or {}).items():
                if s in total and is_finite_number(share) and r.batch_size:
                    total[s] += share * r.batch_size
                    samples[s] += r.batch_size
        out[name] = {s: (total[s] / samples[s] if samples[s] else None) for s in stages}
    return {"exposure": out}


_OLD_RECORD = (
    "records written by an earlier release carry no held-out baseline for this test; audit "
    "again with this release"
)


def _targets_of(record: AuditRecord) -> Targets | None:
    """The record's per-target counts; an earlier release's record gives its targets and their
    successes (from its images) but no baseline and no per-target identification."""
    if record.targets is not None:
        return record.targets
    crit = record.success_criterion
    if record.counts is None or crit is None:
        return None
    images = [im for im in record.scored if im.true_count == 1]
    stages = [s for s in ("raw", "dm") if s in record.success]
    return Targets(
        attempted=len(images),
        success={
            s: sum(
                meets(crit.metric, im.metrics.get(metric_key(crit.metric, s)), crit.threshold)
                for im in images
            )
            for s in stages
        },  # fmt: skip
        missing={"success": _OLD_RECORD, "identification": _OLD_RECORD},
    )


def _pooled_baselines(parts: Sequence[Targets]) -> tuple[dict[tuple[str, str], float], dict]:
    """The largest upper limit per test over the audits (conservative for a pooled test), and
    the first reason given for each missing baseline."""
    limits: dict[tuple[str, str], float] = {}
    missing: dict[str, str] = {}
    for t in parts:
        for kind, reason in t.missing.items():
            missing.setdefault(kind, reason)
        keys = [("success", s) for s in t.success]
        keys += [("identification", m) for m in t.identified]
        for kind, metric in keys:
            value = t.baseline(kind, None if kind == "success" else metric)
            if value is not None:
                key = (kind, metric if kind == "identification" else "")
                limits[key] = max(limits.get(key, 0.0), value)
    return limits, missing


def _targets(records: Sequence[AuditRecord]) -> dict[str, Any]:
    """Per-target counts pooled over the audits, each tested against its baseline's upper limit
    (exact binomial, Bonferroni over the tests that can run)."""
    pairs = [(r, t) for r in records if (t := _targets_of(r)) is not None]
    if not pairs:
        return {"targets": None}
    parts = [t for _, t in pairs]
    limits, missing = _pooled_baselines(parts)
    counts = _pooled_counts(parts, limits)
    _untested(missing, limits, batch_of_one=any((r.batch_size or 0) <= 1 for r, _ in pairs))
    criterion = next((r.success_criterion for r in reversed(records) if r.success_criterion), None)
    level = binomial.DECISION_LEVEL / max(len(counts), 1)
    tests = [
        _test(kind, metric or (criterion.metric if criterion else "?"), stage, hits, n,
              limits[(kind, metric)], level)
        for (kind, metric, stage), (hits, n) in sorted(counts.items(), key=_test_order)
    ]  # fmt: skip
    recent = [t.attempted for t in parts[-RECENT_AUDITS:]]
    basis = next((t.baselines.get("success_basis") for t in reversed(parts)), None)
    return {
        "targets": TargetEvidence(
            attempted=sum(t.attempted for t in parts),
            audits=len(parts),
            per_audit=sum(recent) / len(recent) if recent else None,
            tests=tests,
            missing=missing,
            level=binomial.DECISION_LEVEL,
            success_basis=basis if isinstance(basis, str) else None,
            more_images=any(r.lone_found > t.attempted for r, t in pairs),
        )
    }


def _untested(missing: dict[str, str], limits, *, batch_of_one: bool) -> None:
    """What no test ran for, and why: kinds with a baseline are tested; at a batch of one,
    identification is no test."""
    for kind, _ in limits:
        missing.pop(kind, None)
    if batch_of_one and not any(k == "identification" for k, _ in limits):
        missing.setdefault(
            "identification",
            "a batch of one: identification is no test (the only candidate is the target)",
        )


def _pooled_counts(parts, limits) -> dict[tuple[str, str, str], list[int]]:
    """``{(kind, metric, stage): [hits, targets]}`` summed over the audits, for the tests that
    have a baseline."""
    counts: dict[tuple[str, str, str], list[int]] = {}
    for t in parts:
        rows = [("success", "", s, k) for s, k in t.success.items()]
        rows += [("identification", m, s, k) for m, c in t.identified.items() for s, k in c.items()]
        for kind, metric, stage, k in rows:
            if (kind, metric) in limits:
                hit = counts.setdefault((kind, metric, stage), [0, 0])
                hit[0] += k
                hit[1] += t.attempted
    return counts


def _test_order(item) -> tuple:
    """Success first, then identification in MSE, SSIM, LPIPS; the raw readout before DM."""
    kind, metric, stage = item[0]
    metrics = ("", "mse", "ssim", "lpips")
    return (
        kind != "success",
        metrics.index(metric) if metric in metrics else 9,
        ("raw", "dm").index(stage) if stage in ("raw", "dm") else 9,
    )


def _test(kind, metric, stage, hits, targets, baseline, level) -> TargetTest:
    return TargetTest(
        kind=kind,
        metric=metric,
        stage=stage,
        hits=hits,
        targets=targets,
        baseline=baseline,
        p_value=binomial.p_value(hits, targets, baseline),
        level=level,
        power=binomial.power(targets, baseline, level),
        alternative=binomial.alternative(baseline),
        needed=binomial.targets_needed(baseline, level),
    )


def _largest(values: Iterable[Any]) -> float | None:
    return max((v for v in values if is_finite_number(v)), default=None)


def _detection(records: Sequence[AuditRecord]) -> dict[str, Any]:
    """Lone samples found and in the batches, and the occupancy test's power."""
    return {
        "lone_found": sum(r.lone_found for r in records),
        "lone_in_batch": sum(r.lone_in_batch for r in records),
        "occupied_bins": sum((r.counts.occupied_bins or 0) if r.counts else 0 for r in records),
        "detection_power": _mean(r.detection_power for r in records),
        "detection_test": (records[-1].detection or {}).get("test"),
    }


def _measured(records: Sequence[AuditRecord]) -> dict[str, Any]:
    """The membership test's pooled estimates, as of the last audit."""
    last = records[-1]
    keys = ("epsilon_lower", "epsilon_step_claimed", "mu_step_measured", "mu_step_ci")
    return {"measured": {k: last.measured(k) for k in keys}}


def _checks(records: Sequence[AuditRecord]) -> dict[str, Any]:
    """Per check, its counts and the first detail at its worst status; and the run's validity."""
    out: dict[str, CheckOverview] = {}
    for r in records:
        for c in r.checks:
            entry = out.setdefault(c.name, CheckOverview(name=c.name))
            counter = {"pass": "passed", "warn": "warned", "fail": "failed"}[c.status]
            setattr(entry, counter, getattr(entry, counter) + 1)
            if entry.detail is None or status_rank(c.status) > status_rank(entry.status):
                entry.status, entry.detail, entry.first_step = c.status, c.detail, r.step
    for entry in out.values():  # the worst status over all audits
        entry.status = "fail" if entry.failed else "warn" if entry.warned else "pass"
    validity = [r.valid for r in records]
    valid = False if False in validity else None if None in validity else True
    lost: dict[str, int] = {}
    for r in records:
        for name in dict.fromkeys(r.failed_stages):
            lost[name] = lost.get(name, 0) + 1
    return {"checks": out, "valid": valid, "failed_stages": lost}


def summarize(records: Sequence[AuditRecord | Mapping[str, Any]]) -> RunSummary:
    """A run's audits in one :class:`RunSummary` with its :class:`Verdict`.

    Args:
        records: the run's audit records (typed, or their JSON objects of any record version).
    """
    records = [r if isinstance(r, AuditRecord) else AuditRecord.from_json(r) for r in records]
    if not records:
        summary = RunSummary()
    else:
        values: dict[str, Any] = {}
        groups = (
            _accounting,
            _success,
            _identification,
            _exposure,
            _targets,
            _detection,
            _measured,
            _checks,
        )
        for group in groups:
            values.update(group(records))
        summary = RunSummary(**values)
    summary.verdict = verdict(summary)
    return summary


def summary_from_json(
    data: Mapping[str, Any], verdict_json: Mapping[str, Any] | None = None
) -> RunSummary:
    """A summary from ``report.json`` (its ``summary`` and ``verdict``); without the verdict's JSON
    the verdict is worded anew from the numbers."""
    summary = RunSummary.from_json(data, verdict_json)
    if summary.verdict is None:
        summary.verdict = verdict(summary)
    return summary


def __getattr__(name: str) -> Any:
    """Release 0.1 kept the verdict's constants here; they live in :mod:`.verdict` now."""
    if name in ("VERDICT_STATUSES", "POWER_FOR_NEGATIVE", "IDENTIFICATION_LEVEL"):
        from . import verdict as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
