"""Check entries: the one shape every check result has, and how statuses rank.

A check returns ``{"name", "status", "detail", ...}`` (:func:`check`); extra keys hold measured
values, ``value`` being the headline number. Statuses rank ``pass < warn < fail``
(:data:`CHECK_STATUSES`); a ``fail`` makes an audit invalid (:func:`is_valid`).
:func:`is_finite_number` says which record values are numbers to average or chart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "CHECK_STATUSES",
    "FALSE_ALARM",
    "status_rank",
    "check",
    "worst_status",
    "is_valid",
    "failed_checks",
    "is_finite_number",
]

CHECK_STATUSES = ("pass", "warn", "fail")

#: Per-check probability of a false ``fail`` (or sampling ``warn``) on a correct mechanism.
FALSE_ALARM = 1e-6
_RANK = {status: i for i, status in enumerate(CHECK_STATUSES)}


def status_rank(status: str) -> int:
    """``0`` pass, ``1`` warn, ``2`` fail (the number TensorBoard charts)."""
    return _RANK[status]


def check(name: str, status: str, detail: str, **values: Any) -> dict[str, Any]:
    """One check entry ``{"name", "status", "detail", ...}``; extra keys hold measured values.

    ``value`` (a number) is the check's headline measurement, logged to TensorBoard as
    ``checks/<name>/value``.
    """
    if status not in _RANK:
        raise ValueError(f"check status must be one of {CHECK_STATUSES}, got {status!r}")
    value = values.get("value")
    if status != "fail" and isinstance(value, float) and math.isnan(value):
        # a check never passes on a statistic that is not a number (NaN inputs or gradients)
        status = "fail"
        detail = (
            f"{detail} (its statistic is not a number: NaN inputs or gradients at this step, "
            "so this could not be checked)"
        )
    return {"name": name, "status": status, "detail": detail, **values}


def worst_status(checks: Iterable[Mapping[str, Any]]) -> str:
    """``"fail"`` if any check failed, else ``"warn"`` if any warned, else ``"pass"``."""
    return max((c["status"] for c in checks), key=_RANK.__getitem__, default="pass")


def is_valid(checks: Iterable[Mapping[str, Any]]) -> bool:
    """An audit is valid unless a check failed."""
    return worst_status(checks) != "fail"


def failed_checks(checks: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [c for c in checks if c["status"] == "fail"]


def is_finite_number(value: Any) -> bool:
    """Whether a record value is a finite number (``int`` or ``float``; not ``bool``, NaN or ±inf).

    The one test of "a number a mean or a chart can use" for check values, metrics and records.
    """
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
