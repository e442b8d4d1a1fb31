"""The run summary's types: :class:`RunSummary`, its :class:`CheckOverview` per check and its
:class:`Verdict`, with the JSON form ``report.json`` holds (release 0.1's keys).

:func:`~.summary.summarize` builds a :class:`RunSummary` from a run's records and
:func:`~.verdict.verdict` words its :class:`Verdict`; both read the types defined here, so neither
imports the other's module in a loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..record import RecordError, SuccessCriterion, json_view

__all__ = ["RunSummary", "CheckOverview", "Verdict", "TargetTest", "TargetEvidence"]


@dataclass(frozen=True)
class Verdict:
    """What the audit found: a status (:data:`~.verdict.VERDICT_STATUSES`), a headline a
    non-expert can act on, and the evidence in words."""

    status: str
    headline: str
    text: str

    def to_json(self) -> dict[str, str]:
        return {"status": self.status, "headline": self.headline, "text": self.text}

    def __getitem__(self, key: str) -> str:
        """Release 0.1's ``verdict["status"]``; read the attributes instead."""
        return json_view(self)[key]


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


@dataclass(frozen=True)
class TargetTest:
    """One per-target test, pooled over a run's audits (see :mod:`~opacus_dmaudit.score.binomial`).

    Attributes:
        kind: ``"success"`` or ``"identification"``.
        metric: the success metric, or the distance identification is decided in.
        stage: ``"raw"`` or ``"dm"``.
        hits: targets reconstructed (or identified).
        targets: targets attempted.
        baseline: the baseline's upper limit per target (the largest over the audits).
        p_value: ``P(X ≥ hits)``, ``X ~ Binomial(targets, baseline)``.
        level: this test's level (the run's level divided among its tests).
        power: the probability of rejecting at ``level`` had the per-target rate been
            ``alternative``.
        alternative: the stated alternative, ``baseline + 0.1`` (at most 1).
        needed: the fewest targets that give power 0.9 (``None``: more than a million).
    """

    kind: str
    metric: str
    stage: str
    hits: int
    targets: int
    baseline: float
    p_value: float
    level: float
    power: float
    alternative: float
    needed: int | None

    @property
    def significant(self) -> bool:
        return self.p_value < self.level

    @property
    def expected(self) -> float:
        """Hits a guess without the gradient would get at most, on average."""
        return self.targets * self.baseline

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TargetTest:
        if not isinstance(data, Mapping):
            raise RecordError(f"a target test must be an object, got {data!r}")
        try:
            return cls(**{f.name: data[f.name] for f in fields(cls)})
        except KeyError as err:
            raise RecordError(f"a target test needs {err}") from None


@dataclass
class TargetEvidence:
    """The run's per-target evidence: the targets, the tests that ran and the baselines missing.

    Attributes:
        attempted: targets attempted over the audits.
        audits: audits that attempted targets (records with per-target counts).
        per_audit: targets per audit over the last few audits (``None``: unknown).
        tests: every test run (Bonferroni over them).
        missing: ``{"success" or "identification": why it was not tested}``.
        level: the run's level, shared by the tests.
        success_basis: ``"measured"`` (public images) or ``"configured"`` (``kappa=``).
        more_images: the audits found more lone samples than they scored (``max_images``).
    """

    attempted: int = 0
    audits: int = 0
    per_audit: float | None = None
    tests: list[TargetTest] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    level: float = 1e-3
    success_basis: str | None = None
    more_images: bool = False

    @property
    def significant(self) -> list[TargetTest]:
        return [t for t in self.tests if t.significant]

    @property
    def powerful(self) -> bool:
        """Every test ran with power ≥ 0.9 against its alternative (and at least one ran)."""
        return bool(self.tests) and all(t.power >= 0.9 for t in self.tests)

    @property
    def needed(self) -> int | None:
        """Targets that would give every test power 0.9."""
        if any(t.needed is None for t in self.tests):
            return None
        return max((t.needed for t in self.tests), default=None)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["tests"] = [t.to_json() for t in self.tests]
        return out

    @classmethod
    def from_json(cls, data: Any) -> TargetEvidence | None:
        if data is None:
            return None
        if not isinstance(data, Mapping):
            raise RecordError(f"the per-target evidence must be an object, got {data!r}")
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["tests"] = [TargetTest.from_json(t) for t in data.get("tests") or []]
        values["missing"] = dict(data.get("missing") or {})
        return cls(**values)


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
            samples whose reconstruction is nearest its own image (in the success metric);
            ``identification_chance``: one per audit, release 0.1's "1/N" chance level (the
            verdict no longer reads it: a guess that knows the bin does better).
        targets: the per-target evidence the verdict decides on (:class:`TargetEvidence`).
        exposure: ``{"success" or "identification": {stage: share}}``: the share of all audited
            batches' samples reconstructed (or identified), pooled; how much of a batch an
            attacker gets, never compared with a per-target baseline.
        bounds, run_bounds: the last audit's bounds of one step and of the whole run.
        means: per ``<metric>_<stage>``, the mean over audits of the per-audit means.
        lone_found, lone_in_batch: lone samples the audits found, and those in their batches.
        detection_power: mean over audits of the occupancy test's power.
        measured: the membership test's estimates at the last audit (``epsilon_lower``,
            ``epsilon_step_claimed``, ``mu_step_measured``, ``mu_step_ci``).
        checks: per check, a :class:`CheckOverview`.
        valid: ``False`` if a check failed, ``None`` if validity is unknown (audits that ran no
            check), else ``True``.
        failed_stages: per audit stage that failed (``stage_errors``: prior, metrics, shadow,
            identification, …), how many audits lost it; a negative verdict needs none.
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
    targets: TargetEvidence | None = None
    exposure: dict[str, dict[str, float | None]] = field(default_factory=dict)
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
    failed_stages: dict[str, int] = field(default_factory=dict)
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
            elif f.name == "targets":
                value = None if value is None else value.to_json()
            elif isinstance(value, SuccessCriterion):
                value = value.to_json()
            out[_JSON_KEYS.get(f.name, f.name)] = value
        for key in ("epsilon_lower", "epsilon_step_claimed", "mu_step_measured", "mu_step_ci"):
            out[key] = self.measured.get(key)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], verdict: Mapping[str, Any] | None = None):
        """Read a summary written by :meth:`to_json` (``report.json``'s ``summary``) with its
        verdict's JSON (``None`` leaves the verdict unset; :func:`~.summary.summary_from_json`
        words it anew from the numbers)."""
        if not isinstance(data, Mapping):
            raise RecordError(f"a run summary must be an object, got {data!r}")
        names = {f.name for f in fields(cls)} - {"verdict", "measured", "checks"}
        keys = {_JSON_KEYS.get(n, n): n for n in names}
        values = {keys[k]: v for k, v in data.items() if k in keys}
        values["targets"] = TargetEvidence.from_json(values.get("targets"))
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
        if isinstance(verdict, Mapping):
            values["verdict"] = Verdict(
                status=str(verdict.get("status", "")),
                headline=str(verdict.get("headline", "")),
                text=str(verdict.get("text", "")),
            )
        return cls(**values)
