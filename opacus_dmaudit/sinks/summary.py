"""The run summary: what a run's audits add up to, typed, in one place.

:func:`summarize` turns a run's :class:`~opacus_dmaudit.record.AuditRecord` list into a
:class:`RunSummary`, one helper per group of the record (the accountant's view, success and
identification, detection, the membership test, the checks). The CLI, the demo,
``report.json``/``report.html``, ``comparison.html`` and ``DMAuditor.close()`` all show this
object; its :attr:`RunSummary.verdict` (:mod:`.verdict`) is the only place a conclusion is
worded. :meth:`RunSummary.to_json` keeps the keys ``report.json`` had in release 0.1.

Example:
    >>> from opacus_dmaudit import read_audit_log
    >>> from opacus_dmaudit.sinks.summary import summarize
    >>> summary = summarize(read_audit_log("runs/audit/audit.jsonl"))  # doctest: +SKIP
    >>> print(summary.verdict.headline, summary.epsilon)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..checks.entries import is_finite_number, status_rank
from ..record import AuditRecord, RecordError, SuccessCriterion, json_view, stages_of
from .text import fmt
from .verdict import Verdict, verdict

__all__ = ["RunSummary", "CheckOverview", "Verdict", "summarize", "fmt"]


def _mean(values: Iterable[Any]) -> float | None:
    vals = [v for v in values if is_finite_number(v)]
    return sum(vals) / len(vals) if vals else None


@dataclass
class CheckOverview:
    """One check over a run's audits: how often it passed, warned and failed.

    Attributes:
        status: the worst status it reached.
        detail: the detail of its first audit at that status.
        first_step: the step of that audit.
    """

    name: str
    passed: int = 0
    warned: int = 0
    failed: int = 0
    status: str = "pass"
    detail: str | None = None
    first_step: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "pass": self.passed,
            "warn": self.warned,
            "fail": self.failed,
            "detail": self.detail,
            "first_step": self.first_step,
            "status": self.status,
        }


#: RunSummary attribute -> report.json key, where they differ.
_JSON_KEYS = {
    "epsilon": "final_epsilon",
    "success_rate": "mean_success_rate",
    "identification_rate": "mean_identification_rate",
    "run_bounds": "final_run_bounds",
    "means": "mean_metrics",
    "lone_found": "found_singletons",
    "lone_in_batch": "true_singletons",
}


@dataclass
class RunSummary:
    """A run's audits in numbers (see :func:`summarize`), and its :class:`Verdict`.

    Attributes:
        audits: how many audits were recorded; ``first_step``/``last_step`` their range.
        mode: ``"imprint"``, ``"shadow"`` or ``"mechanism"``.
        epsilon: the accountant's ε at the last audit (``epsilon_accountant``: how computed;
            ``epsilon_note``: why it carries no meaningful guarantee, or ``None``).
        success_rate, max_success_rate: per stage, the mean and the largest share of an audited
            batch reconstructed to ``success_criterion``; ``recovered``: how many samples.
        identification_rate, identified: per stage, the mean share and the number of audited
            samples whose reconstruction is nearest its own image; ``identification_chance``:
            how many a guess without the gradient would single out (at most one per audit).
        bounds, run_bounds: the last audit's bounds of one step and of the whole run.
        means: per ``<metric>_<stage>``, the mean over audits of the per-audit means.
        lone_found, lone_in_batch: lone samples the audits found, and those in their batches.
        detection_power: mean over audits of the occupancy test's power.
        measured: the membership test's estimates at the last audit (``epsilon_lower``,
            ``epsilon_step_claimed``, ``mu_step_measured``, ``mu_step_ci``).
        checks: per check, a :class:`CheckOverview`.
        valid: ``False`` if a check failed, ``None`` if validity is unknown (audits that ran no
            check), else ``True``.
        verdict: what it adds up to.
    """

    audits: int = 0
    first_step: int | None = None
    last_step: int | None = None
    mode: str | None = None
    epsilon: float | None = None
    epsilon_accountant: str | None = None
    epsilon_note: str | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    noise_multipliers: list[float] = field(default_factory=list)
    mu_step: float | None = None
    sample_rate: float | None = None
    kappa: float | None = None
    kappa_baseline: float | None = None
    kappa_uniform: float | None = None
    success_criterion: SuccessCriterion | None = None
    success_rate: dict[str, float | None] = field(default_factory=dict)
    max_success_rate: dict[str, float | None] = field(default_factory=dict)
    recovered: dict[str, int] = field(default_factory=dict)
    identification_rate: dict[str, float | None] = field(default_factory=dict)
    identified: dict[str, int] = field(default_factory=dict)
    identification_chance: int = 0
    bounds: dict[str, float | None] | None = None
    run_bounds: dict[str, float | None] | None = None
    means: dict[str, float | None] = field(default_factory=dict)
    lone_found: int = 0
    lone_in_batch: int = 0
    occupied_bins: int = 0
    detection_power: float | None = None
    detection_test: str | None = None
    measured: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, CheckOverview] = field(default_factory=dict)
    valid: bool | None = None
    verdict: Verdict | None = None

    @property
    def failed_checks(self) -> list[str]:
        return [name for name, c in self.checks.items() if c.status == "fail"]

    def __getitem__(self, key: str) -> Any:
        """Release 0.1's ``summary["final_epsilon"]``; read the attributes instead."""
        return json_view(self)[key]

    def get(self, key: str, default: Any = None) -> Any:
        """Release 0.1's ``summary.get(key)``; read the attributes instead."""
        return json_view(self).get(key, default)

    @property
    def warned_checks(self) -> list[str]:
        return [name for name, c in self.checks.items() if c.status == "warn"]

    def to_json(self) -> dict[str, Any]:
        """The summary as ``report.json`` holds it (release 0.1's keys; the verdict apart)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("verdict", "measured"):
                continue
            value = getattr(self, f.name)
            if f.name == "checks":
                value = {name: c.to_json() for name, c in value.items()}
            elif isinstance(value, SuccessCriterion):
                value = value.to_json()
            out[_JSON_KEYS.get(f.name, f.name)] = value
        for key in ("epsilon_lower", "epsilon_step_claimed", "mu_step_measured", "mu_step_ci"):
            out[key] = self.measured.get(key)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], verdict_json: Mapping[str, Any] | None = None):
        """Read a summary written by :meth:`to_json` (``report.json``'s ``summary``) and its
        verdict (worded anew from the numbers when ``verdict_json`` is not given)."""
        if not isinstance(data, Mapping):
            raise RecordError(f"a run summary must be an object, got {data!r}")
        names = {f.name for f in fields(cls)} - {"verdict", "measured", "checks"}
        keys = {_JSON_KEYS.get(n, n): n for n in names}
        values = {keys[k]: v for k, v in data.items() if k in keys}
        if isinstance(values.get("success_criterion"), Mapping):
            values["success_criterion"] = SuccessCriterion.from_json(values["success_criterion"])
        checks = data.get("checks") if isinstance(data.get("checks"), Mapping) else {}
        values["checks"] = {
            name: CheckOverview(
                name=name,
                passed=int(c.get("pass", 0)),
                warned=int(c.get("warn", 0)),
                failed=int(c.get("fail", 0)),
                status=str(c.get("status", "pass")),
                detail=c.get("detail"),
                first_step=c.get("first_step"),
            )
            for name, c in checks.items()
            if isinstance(c, Mapping)
        }
        values["measured"] = {
            k: data.get(k)
            for k in ("epsilon_lower", "epsilon_step_claimed", "mu_step_measured", "mu_step_ci")
        }
        summary = cls(**values)
        if isinstance(verdict_json, Mapping):
            summary.verdict = Verdict(
                status=str(verdict_json.get("status", "")),
                headline=str(verdict_json.get("headline", "")),
                text=str(verdict_json.get("text", "")),
            )
        else:  # worded anew from the numbers
            summary.verdict = verdict(summary)
        return summary


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
    return {"checks": out, "valid": valid}


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
        for group in (_accounting, _success, _identification, _detection, _measured, _checks):
            values.update(group(records))
        summary = RunSummary(**values)
    summary.verdict = verdict(summary)
    return summary


def __getattr__(name: str) -> Any:
    """Release 0.1 kept the verdict's constants here; they live in :mod:`.verdict` now."""
    if name in ("VERDICT_STATUSES", "POWER_FOR_NEGATIVE", "IDENTIFICATION_LEVEL"):
        from . import verdict as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
