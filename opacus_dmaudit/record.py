"""The audit record: one audited step, typed, and its JSON form (one line of ``audit.jsonl``).

:class:`AuditRecord` is what the pipeline builds once per audit and what every sink reads: the
audit log writes :meth:`AuditRecord.to_json`, the TensorBoard sink, the summary, the report, the
CLI and the demo read its attributes. :meth:`AuditRecord.from_json` reads a record of any version
written by this package (version 1 had no checks: its ``valid`` is ``None``, unknown) and says
precisely what is wrong with one that is not a record.

Its parts, in the order of the data flow:

* the step and its mechanism: ``step``, ``mode`` (:data:`~opacus_dmaudit.schema.MODES`),
  ``noise_multiplier``, ``max_grad_norm``, ``sample_rate``, ``clipping``, ``batch_size``;
* the accountant's view: ``epsilon``, ``epsilon_accountant``, ``epsilon_note``, ``delta``,
  ``mu_step`` (1/σ);
* the readout: :class:`Counts` (``num_bins``, ``occupied_bins``, lone samples in the batch and
  found, ``collisions_flagged``) and ``detection`` (the occupancy test, its level and power);
* the scores: ``images`` (one :class:`ImageScore` per recovered image, ``missed`` lone images
  the test did not find), ``means`` (mean of each metric at each stage), ``success_criterion`` and
  ``success`` (per stage, the share of the batch reconstructed to it), ``identification``;
* ``targets`` (:class:`Targets`): the per-target counts the verdict tests (lone samples found and
  scored; how many were reconstructed and identified) and the baselines' upper limits they are
  tested against; ``success`` and ``identification`` are the batch shares beside them (exposure);
* the baselines and bounds of this step (``kappa``, ``kappa_baseline``, ``kappa_uniform``,
  ``bounds``) and of the whole run (``run_bounds``);
* ``privacy_measured`` (the membership test's estimates), ``prior_fit``, ``denoiser``;
* the run's ε measured (:mod:`~opacus_dmaudit.privacy.measured`): ``epsilon_measured``, its 95 %
  interval ``epsilon_measured_ci`` and what it rests on, ``epsilon_measured_basis``; the compact
  per-audit ``evidence`` the pooled numbers are recomputed from (noise χ² and coordinates, batch
  sizes since the previous audit, noise signs at fixed coordinates, membership scores);
* ``checks`` (:class:`CheckEntry` list) and ``valid`` (``False`` when a check failed);
* ``stage_errors``: the stages of the audit that failed (``[{"stage", "error"}]``; a failed
  stage is not a failed check, but what it would have computed is missing).

On disk the keys keep the names of release 0.1 (``summary`` for the means,
``true_singletons``/``found_singletons`` for lone samples).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .checks.entries import CHECK_STATUSES, is_valid
from .errors import AuditLogError
from .schema import METRICS, STAGES, metric_key, parse_metric_key

__all__ = [
    "RECORD_VERSION",
    "RecordError",
    "AuditRecord",
    "CheckEntry",
    "Counts",
    "ImageScore",
    "MissedImage",
    "SuccessCriterion",
    "Targets",
    "validity",
]

#: 1: release 0.1; 2: checks, validity and mode in every record; 3: per-target counts
#: (``targets``), the measured ε and its ``evidence``, ``stage_errors``. An older release refuses a
#: newer record instead of reading it without the fields its verdict would need.
RECORD_VERSION = 3


class RecordError(AuditLogError):
    """A JSON object that is not an audit record (the message names the field and the problem)."""


# -- reading JSON values ----------------------------------------------------------------------
def _where(data: Mapping[str, Any]) -> str:
    step = data.get("step") if isinstance(data, Mapping) else None
    return f"record of step {step}" if isinstance(step, int) else "record"


def _number(data: Mapping[str, Any], key: str, *, where: str = "") -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"{where or _where(data)}: {key!r} must be a number, got {value!r}")
    return float(value)


def _integer(data: Mapping[str, Any], key: str, *, where: str = "") -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(f"{where or _where(data)}: {key!r} must be an integer, got {value!r}")
    return value


def _text(data: Mapping[str, Any], key: str, *, where: str = "") -> str | None:
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value
    raise RecordError(f"{where or _where(data)}: {key!r} must be text, got {value!r}")


def _mapping(data: Mapping[str, Any], key: str, *, where: str = "") -> dict[str, Any] | None:
    value = data.get(key)
    if value is None or isinstance(value, dict):
        return value
    raise RecordError(f"{where or _where(data)}: {key!r} must be an object, got {value!r}")


def _numbers(data: Mapping[str, Any], key: str, *, where: str = "") -> dict[str, float | None]:
    """A ``{name: number or null}`` object (rates per stage, bounds, means)."""
    value = _mapping(data, key, where=where) or {}
    return {str(k): _number(value, k, where=f"{where or _where(data)}: {key!r}") for k in value}


def _items(data: Mapping[str, Any], key: str, parse: Callable[[Any, str], Any], where: str):
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecordError(f"{where}: {key!r} must be a list, got {value!r}")
    return [parse(item, f"{where}: {key}[{i}]") for i, item in enumerate(value)]


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise RecordError(f"{where} must be an object, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    """JSON-safe: numpy and torch scalars to Python numbers, NaN to ``None``."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return _plain(value.item())
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# -- parts ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckEntry:
    """One check's result (see :mod:`opacus_dmaudit.checks`).

    Attributes:
        name: the check (``"noise_scale"``, ``"value_range"``, ...).
        status: ``"pass"``, ``"warn"`` or ``"fail"``.
        detail: what was measured and what it means, in words.
        values: the measured values (``value`` is the headline number).
    """

    name: str
    status: str
    detail: str
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float | None:
        value = self.values.get("value")
        return (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, **self.values}

    @classmethod
    def from_json(cls, data: Any, where: str = "check") -> CheckEntry:
        data = _object(data, where)
        name, status = data.get("name"), data.get("status")
        if not isinstance(name, str) or not name:
            raise RecordError(f"{where}: a check needs a 'name' (text), got {name!r}")
        if status not in CHECK_STATUSES:
            raise RecordError(
                f"{where}: check {name!r} has status {status!r}; expected one of {CHECK_STATUSES}"
            )
        detail = _text(data, "detail", where=where) or ""
        rest = {k: v for k, v in data.items() if k not in ("name", "status", "detail")}
        return cls(name=name, status=status, detail=detail, values=rest)


@dataclass(frozen=True)
class SuccessCriterion:
    """A reconstruction succeeds when ``metric`` meets ``threshold`` (≥ or ≤ by its direction)."""

    metric: str
    threshold: float
    higher_is_better: bool

    @property
    def text(self) -> str:
        """``"LPIPS ≤ 0.1"``."""
        label = METRICS[self.metric].label if self.metric in METRICS else self.metric.upper()
        return f"{label} {'≥' if self.higher_is_better else '≤'} {self.threshold:.3g}"

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "threshold": self.threshold,
            "higher_is_better": self.higher_is_better,
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "success_criterion") -> SuccessCriterion | None:
        if data is None:
            return None
        data = _object(data, where)
        metric = _text(data, "metric", where=where)
        threshold = _number(data, "threshold", where=where)
        if metric is None or threshold is None:
            raise RecordError(f"{where}: needs 'metric' and 'threshold'")
        higher = data.get("higher_is_better")
        if not isinstance(higher, bool):
            higher = METRICS[metric].higher_is_better if metric in METRICS else False
        return cls(metric=metric, threshold=threshold, higher_is_better=higher)


@dataclass(frozen=True)
class Counts:
    """What the readout of one step found.

    Attributes:
        num_bins: readout bins.
        occupied_bins: bins the occupancy test decided hold a sample.
        lone_in_batch: samples alone in their bin (``true_singletons`` on disk).
        lone_found: of those, the ones the test found (``found_singletons`` on disk).
        collisions_flagged: occupied bins flagged as holding several samples.
    """

    num_bins: int | None = None
    occupied_bins: int | None = None
    lone_in_batch: int | None = None
    lone_found: int | None = None
    collisions_flagged: int | None = None

    _DISK = {
        "num_bins": "num_bins",
        "occupied_bins": "occupied_bins",
        "lone_in_batch": "true_singletons",
        "lone_found": "found_singletons",
        "collisions_flagged": "collisions_flagged",
    }

    def to_json(self) -> dict[str, int | None]:
        return {disk: getattr(self, name) for name, disk in self._DISK.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> Counts | None:
        if not any(disk in data for disk in cls._DISK.values()):
            return None
        return cls(**{name: _integer(data, disk, where=where) for name, disk in cls._DISK.items()})


_IMAGE_FIELDS = ("bin", "occupied", "zscore", "collision", "noise_std", "true_count")


@dataclass
class ImageScore:
    """One recovered image: where it was read, how noisy, and how close to its training image.

    Attributes:
        bin: the readout bin.
        zscore: the occupancy test's p-value as a normal deviate.
        collision: the bin was flagged as holding several samples.
        noise_std: the readout's predicted per-pixel noise std (in [0, 1] pixel units).
        true_count: real samples in the bin (1 for a lone sample).
        row: index of this image in the step's image file (``truth``/``raw``/``dm`` arrays), or
            ``None`` when no real sample was behind it (a false detection).
        metrics: ``{"<metric>_<stage>": value}`` (:func:`~opacus_dmaudit.schema.metric_key`).
        residual_std_raw: std of the raw readout minus the truth.
        dm_faithful: the prior-fit check's judgement of the prior at this noise (``None``: not
            judged).
        extra: other keys of the JSON object, kept as they are.
    """

    bin: int
    zscore: float | None = None
    collision: bool = False
    noise_std: float | None = None
    true_count: int | None = None
    occupied: bool = True
    row: int | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    residual_std_raw: float | None = None
    dm_faithful: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str, stage: str) -> float | None:
        """The value of ``name`` at ``stage``, or ``None``."""
        return self.metrics.get(metric_key(name, stage))

    @property
    def blend(self) -> bool:
        """The bin held several samples, or the readout says so."""
        return self.collision or (self.true_count or 1) > 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bin": self.bin,
            "occupied": self.occupied,
            "zscore": self.zscore,
            "collision": self.collision,
            "noise_std": self.noise_std,
            "true_count": self.true_count,
        }
        if self.residual_std_raw is not None:
            out["residual_std_raw"] = self.residual_std_raw
        out.update(self.metrics)
        if self.dm_faithful is not None:
            out["dm_faithful"] = self.dm_faithful
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "image", row: int | None = None) -> ImageScore:
        data = _object(data, where)
        bin_ = _integer(data, "bin", where=where)
        if bin_ is None:
            raise RecordError(f"{where}: an image needs its 'bin' (an integer)")
        metrics = {k: _number(data, k, where=where) for k in data if parse_metric_key(k)}
        known = set(_IMAGE_FIELDS) | set(metrics) | {"residual_std_raw", "dm_faithful"}
        faithful = data.get("dm_faithful")
        return cls(
            bin=bin_,
            occupied=bool(data.get("occupied", True)),
            zscore=_number(data, "zscore", where=where),
            collision=bool(data.get("collision", False)),
            noise_std=_number(data, "noise_std", where=where),
            true_count=_integer(data, "true_count", where=where),
            row=row,
            metrics=metrics,
            residual_std_raw=_number(data, "residual_std_raw", where=where),
            dm_faithful=faithful if isinstance(faithful, bool) else None,
            extra={k: v for k, v in data.items() if k not in known},
        )


def _has_truth(data: Mapping[str, Any]) -> bool:
    """Whether an image entry was scored against a real image (so it has a row in the file)."""
    return "residual_std_raw" in data or any(parse_metric_key(k) for k in data)


@dataclass(frozen=True)
class MissedImage:
    """A lone image the occupancy test did not find, and its readout's predicted noise."""

    bin: int
    noise_std: float | None

    def to_json(self) -> dict[str, Any]:
        return {"bin": self.bin, "noise_std": self.noise_std}

    @classmethod
    def from_json(cls, data: Any, where: str = "missed") -> MissedImage:
        data = _object(data, where)
        bin_ = _integer(data, "bin", where=where)
        if bin_ is None:
            raise RecordError(f"{where}: needs its 'bin' (an integer)")
        return cls(bin=bin_, noise_std=_number(data, "noise_std", where=where))


def _counts_by_stage(value: Any, where: str) -> dict[str, int]:
    value = _object(value or {}, where)
    out = {}
    for stage, n in value.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise RecordError(f"{where}: {stage!r} must be a count, got {n!r}")
        out[str(stage)] = n
    return out


@dataclass(frozen=True)
class Targets:
    """Per-target counts of one audit: the trials the verdict's tests pool over audits.

    A *target* is a lone sample the audit found and scored (one image alone in its bin, read and
    compared with its training image); ``max_images`` changes how many are attempted.

    Attributes:
        attempted: targets attempted.
        success: ``{stage: targets reconstructed to the success criterion}`` (raw, dm).
        identified: ``{metric: {stage: targets nearer their own image than every other image of
            the batch}}``.
        baselines: the upper limits they are tested against: ``"success"`` (a number or
            ``None``), ``"identification"`` (``{metric: the larger of the bin-knowing and the
            informed adversary's limits}``), ``"identification_informed"`` (``{metric: the
            informed adversary's limit}``, the identification bound's κ), ``"success_basis"``
            (``"measured"`` or ``"configured"``).
        missing: ``{"success" or "identification": why that baseline is missing}``.
    """

    attempted: int = 0
    success: dict[str, int] = field(default_factory=dict)
    identified: dict[str, dict[str, int]] = field(default_factory=dict)
    baselines: dict[str, Any] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def baseline(self, kind: str, metric: str | None = None) -> float | None:
        """The upper limit of ``kind`` (``"success"``, ``"identification"``,
        ``"identification_informed"``), for ``metric`` where it is per metric."""
        value = self.baselines.get(kind)
        if isinstance(value, Mapping):
            value = value.get(metric)
        return (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "attempted": self.attempted,
            "success": dict(self.success),
            "identified": {m: dict(v) for m, v in self.identified.items()},
            "baselines": dict(self.baselines),
            "missing": dict(self.missing),
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "targets") -> Targets | None:
        if data is None:
            return None
        data = _object(data, where)
        attempted = _integer(data, "attempted", where=where)
        identified = _object(data.get("identified") or {}, f"{where}: identified")
        return cls(
            attempted=attempted or 0,
            success=_counts_by_stage(data.get("success"), f"{where}: success"),
            identified={
                str(m): _counts_by_stage(v, f"{where}: identified: {m}")
                for m, v in identified.items()
            },
            baselines=_mapping(data, "baselines", where=where) or {},
            missing={
                str(k): str(v) for k, v in (_mapping(data, "missing", where=where) or {}).items()
            },
        )


# -- the record -------------------------------------------------------------------------------
@dataclass
class AuditRecord:
    """One audited step (see the module documentation for its parts).

    Example:
        >>> from opacus_dmaudit import read_audit_log
        >>> for record in read_audit_log("runs/audit/audit.jsonl"):  # doctest: +SKIP
        ...     print(record.step, record.epsilon, record.success.get("dm"), record.valid)
    """

    step: int
    mode: str | None = "imprint"
    record_version: int = RECORD_VERSION
    epsilon: float | None = None
    epsilon_accountant: str | None = None
    epsilon_note: str | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    mu_step: float | None = None
    max_grad_norm: float | None = None
    sample_rate: float | None = None
    clipping: str | None = None
    batch_size: int | None = None
    counts: Counts | None = None
    detection: dict[str, Any] | None = None
    means: dict[str, float | None] = field(default_factory=dict)
    success_criterion: SuccessCriterion | None = None
    success: dict[str, float | None] = field(default_factory=dict)
    identification: dict[str, float | None] | None = None
    targets: Targets | None = None
    kappa: float | None = None
    kappa_baseline: float | None = None
    kappa_uniform: float | None = None
    bounds: dict[str, float | None] | None = None
    run_bounds: dict[str, float | None] | None = None
    privacy_measured: dict[str, Any] | None = None
    denoiser: dict[str, Any] | None = None
    checks: list[CheckEntry] = field(default_factory=list)
    valid: bool | None = True
    images: list[ImageScore] = field(default_factory=list)
    missed: list[MissedImage] = field(default_factory=list)
    prior_fit: dict[str, Any] | None = None
    audit_seconds: float | None = None
    epsilon_measured: float | None = None
    epsilon_measured_ci: list[float] | None = None
    epsilon_measured_basis: dict[str, Any] | None = None
    evidence: dict[str, Any] | None = None
    stage_errors: list[dict[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    # -- reading ---------------------------------------------------------------------------------
    @property
    def scored(self) -> list[ImageScore]:
        """The images scored against a real image (those with a row in the image file)."""
        return [im for im in self.images if im.row is not None]

    @property
    def lone_found(self) -> int:
        return (self.counts.lone_found or 0) if self.counts else 0

    @property
    def lone_in_batch(self) -> int:
        return (self.counts.lone_in_batch or 0) if self.counts else 0

    @property
    def detection_power(self) -> float | None:
        power = (self.detection or {}).get("power")
        return (
            float(power) if isinstance(power, int | float) and not isinstance(power, bool) else None
        )

    def mean(self, metric: str, stage: str) -> float | None:
        """The mean of ``metric`` at ``stage`` over this audit's scored images."""
        return self.means.get(metric_key(metric, stage))

    def measured(self, name: str) -> Any:
        """One of the membership test's estimates (``privacy_measured``), or ``None``."""
        return (self.privacy_measured or {}).get(name)

    def check(self, name: str) -> CheckEntry | None:
        return next((c for c in self.checks if c.name == name), None)

    @property
    def failed_checks(self) -> list[CheckEntry]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def failed_stages(self) -> list[str]:
        """The stages that failed at this audit (their results are missing, not negative)."""
        return [e.get("stage", "?") for e in self.stage_errors]

    # -- JSON ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The record as it is written to ``audit.jsonl`` (release 0.1's keys)."""
        out: dict[str, Any] = {
            "record_version": self.record_version,
            "step": self.step,
            "mode": self.mode,
            "epsilon": self.epsilon,
            "epsilon_accountant": self.epsilon_accountant,
            "epsilon_note": self.epsilon_note,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "mu_step": self.mu_step,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "clipping": self.clipping,
            "batch_size": self.batch_size,
        }
        if self.counts is not None:
            out.update(self.counts.to_json())
        if self.detection is not None:
            out["detection"] = self.detection
        out["summary"] = dict(self.means)
        if self.success_criterion is not None:
            out["success_criterion"] = self.success_criterion.to_json()
        out["success"] = dict(self.success)
        if self.identification is not None:
            out["identification"] = dict(self.identification)
        if self.targets is not None:
            out["targets"] = self.targets.to_json()
        out.update(
            kappa=self.kappa,
            kappa_baseline=self.kappa_baseline,
            kappa_uniform=self.kappa_uniform,
            bounds=self.bounds,
            run_bounds=self.run_bounds,
            privacy_measured=self.privacy_measured,
            denoiser=self.denoiser,
            checks=[c.to_json() for c in self.checks],
            valid=self.valid,
            images=[im.to_json() for im in self.images],
            missed=[m.to_json() for m in self.missed],
        )
        if self.prior_fit is not None:
            out["prior_fit"] = self.prior_fit
        if self.audit_seconds is not None:
            out["audit_seconds"] = self.audit_seconds
        if self.epsilon_measured is not None:
            out["epsilon_measured"] = self.epsilon_measured
        for key in ("epsilon_measured_ci", "epsilon_measured_basis", "evidence"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.stage_errors:
            out["stage_errors"] = [dict(e) for e in self.stage_errors]
        out.update(self.extra)
        return _plain(out)

    @classmethod
    def from_json(cls, data: Any) -> AuditRecord:
        """Read a record of any version (raises :class:`RecordError` naming what is wrong)."""
        data = _object(data, "audit record")
        step = data.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise RecordError(f"an audit record needs an integer 'step', got {step!r}")
        where = _where(data)
        version = _integer(data, "record_version", where=where) or 1
        if version < 1 or version > RECORD_VERSION:
            raise RecordError(
                f"{where}: record_version {version} is not one this release reads "
                f"(1–{RECORD_VERSION}); upgrade opacus-dmaudit to read it"
            )
        checks = _items(data, "checks", CheckEntry.from_json, where)
        scored = (d for d in (data.get("images") or []) if isinstance(d, Mapping))
        rows = iter(range(sum(1 for d in scored if _has_truth(d))))
        images = _items(
            data,
            "images",
            lambda d, w: ImageScore.from_json(
                d, w, row=next(rows) if isinstance(d, Mapping) and _has_truth(d) else None
            ),
            where,
        )
        bounds, run_bounds = _bounds(data, version, where)
        known = {f.name for f in fields(cls)} | {"summary", "true_singletons", "found_singletons"}
        known |= set(Counts._DISK.values())
        return cls(
            step=step,
            mode=_text(data, "mode", where=where) or "imprint",
            record_version=version,
            epsilon=_number(data, "epsilon", where=where),
            epsilon_accountant=_text(data, "epsilon_accountant", where=where),
            epsilon_note=_text(data, "epsilon_note", where=where),
            delta=_number(data, "delta", where=where),
            noise_multiplier=_number(data, "noise_multiplier", where=where),
            mu_step=_number(data, "mu_step", where=where),
            max_grad_norm=_number(data, "max_grad_norm", where=where),
            sample_rate=_number(data, "sample_rate", where=where),
            clipping=_text(data, "clipping", where=where),
            batch_size=_integer(data, "batch_size", where=where),
            counts=Counts.from_json(data, where),
            detection=_mapping(data, "detection", where=where),
            means=_numbers(data, "summary", where=where),
            success_criterion=SuccessCriterion.from_json(
                data.get("success_criterion"), f"{where}: success_criterion"
            ),
            success=_numbers(data, "success", where=where),
            identification=_numbers(data, "identification", where=where)
            if data.get("identification") is not None
            else None,
            targets=Targets.from_json(data.get("targets"), f"{where}: targets"),
            kappa=_number(data, "kappa", where=where),
            kappa_baseline=_number(data, "kappa_baseline", where=where),
            kappa_uniform=_number(data, "kappa_uniform", where=where),
            bounds=bounds,
            run_bounds=run_bounds,
            privacy_measured=_mapping(data, "privacy_measured", where=where),
            denoiser=_mapping(data, "denoiser", where=where),
            checks=checks,
            valid=_validity(data, version, checks),
            images=images,
            missed=_items(data, "missed", MissedImage.from_json, where),
            prior_fit=_mapping(data, "prior_fit", where=where),
            audit_seconds=_number(data, "audit_seconds", where=where),
            epsilon_measured=_number(data, "epsilon_measured", where=where),
            epsilon_measured_ci=_interval(data, "epsilon_measured_ci", where),
            epsilon_measured_basis=_mapping(data, "epsilon_measured_basis", where=where),
            evidence=_mapping(data, "evidence", where=where),
            stage_errors=_items(data, "stage_errors", _stage_error, where),
            extra={k: v for k, v in data.items() if k not in known},
        )

    # -- release 0.1 compatibility ---------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        """Release 0.1's dict access (``record["step"]``); read the attributes instead."""
        return json_view(self, stacklevel=3)[key]

    def get(self, key: str, default: Any = None) -> Any:
        """Release 0.1's ``record.get(key)``; read the attributes instead."""
        return json_view(self, stacklevel=3).get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.to_json()


def json_view(obj: Any, *, stacklevel: int = 2) -> dict[str, Any]:
    """The JSON form of a typed object, for release 0.1's dict access (with a warning)."""
    warnings.warn(
        f"{type(obj).__name__} is typed now: read its attributes (record.step, summary.epsilon, "
        "...); dict access reads the JSON form and will go",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )
    return obj.to_json()


def _bounds(data: Mapping[str, Any], version: int, where: str):
    """``(bounds, run_bounds)``; version 1 kept both in ``bounds``."""
    bounds = _numbers(data, "bounds", where=where) if data.get("bounds") is not None else None
    run = _numbers(data, "run_bounds", where=where) if data.get("run_bounds") is not None else None
    if version == 1 and run is None and bounds:
        run = {k: v for k, v in bounds.items() if k != "single_step"}
        bounds = {"single_step": bounds.get("single_step")}
    return bounds, run


def _interval(data: Mapping[str, Any], key: str, where: str) -> list[float] | None:
    """A ``[low, high]`` pair of numbers (either may be null), or ``None``."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise RecordError(f"{where}: {key!r} must be a [low, high] pair, got {value!r}")
    pair = {str(i): v for i, v in enumerate(value)}
    return [
        _number(pair, "0", where=f"{where}: {key}"),
        _number(pair, "1", where=f"{where}: {key}"),
    ]


def _stage_error(value: Any, where: str) -> dict[str, str]:
    value = _object(value, where)
    stage = _text(value, "stage", where=where)
    if not stage:
        raise RecordError(f"{where}: a stage error needs its 'stage' (text)")
    return {"stage": stage, "error": _text(value, "error", where=where) or ""}


def _validity(data: Mapping[str, Any], version: int, checks: list[CheckEntry]) -> bool | None:
    """Version 1 ran no checks: its validity is unknown, never ``True``."""
    if version == 1:
        return None
    return validity(checks)


def validity(checks: Iterable[CheckEntry]) -> bool | None:
    """``False`` when a check failed, ``True`` when checks ran and none failed, ``None`` (unknown)
    when no check ran: an audit that checked nothing cannot be called valid."""
    checks = list(checks)
    if not checks:
        return None
    return is_valid(c.to_json() for c in checks)


def records_from_json(items: Iterable[Any]) -> list[AuditRecord]:
    """Typed records from JSON objects (raises :class:`RecordError` on the first bad one)."""
    return [AuditRecord.from_json(item) for item in items]


def stages_of(records: Iterable[AuditRecord], attribute: str) -> list[str]:
    """The stages (in :data:`~opacus_dmaudit.schema.STAGES` order) any record has a value for."""
    seen = {stage for r in records for stage in (getattr(r, attribute) or {})}
    return [s for s in STAGES if s in seen]
