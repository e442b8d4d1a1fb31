"""The exceptions a user of opacus-dmaudit catches, in one place (all exported at the top level).

* :class:`AuditCheckFailed`: a check failed and the auditor runs with ``strict=True``.
* :class:`LogDirInUse`: ``log_dir`` already holds another run's audit.
* :class:`UnsafeLogDir`: a name the auditor writes in ``log_dir`` is a symbolic link.
* :class:`AuditLogError`: a file is not an audit log (the message names the line).
* :class:`BackboneUnavailable`: the LPIPS backbone weights cannot be found offline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "AuditCheckFailed",
    "LogDirInUse",
    "UnsafeLogDir",
    "AuditLogError",
    "BackboneUnavailable",
]


class AuditCheckFailed(RuntimeError):
    """A check failed and the auditor runs with ``strict=True``.

    Attributes:
        step: the audited step.
        failures: the failed check entries (``{"name", "status", "detail", ...}``).
    """

    def __init__(self, step: int, failures: list[Mapping[str, Any]]) -> None:
        self.step = step
        self.failures = failures
        text = "; ".join(f"{c['name']}: {c['detail']}" for c in failures)
        super().__init__(f"audit of step {step} failed its checks: {text}")


class LogDirInUse(FileExistsError):
    """``log_dir`` already holds an audit and this run is not its resume."""


class UnsafeLogDir(PermissionError):
    """A name the auditor writes, changes or deletes in ``log_dir`` is a symbolic link."""


class AuditLogError(ValueError):
    """An audit log that cannot be read as audit records (the message says where and why)."""


class BackboneUnavailable(RuntimeError):
    """The LPIPS backbone's weights cannot be found offline (the message says how to get them)."""
