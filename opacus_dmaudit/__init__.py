"""opacus-dmaudit: visual privacy auditing of Opacus DP-SGD training.

The package follows the data flow of one audit: ``capture`` (inside ``optimizer.step``) ->
``reconstruct`` (readout, detection, prior) -> ``score`` -> ``checks`` -> ``privacy`` -> ``sinks``
(log, TensorBoard, report); ``auditor`` schedules it, ``pipeline`` runs it, ``config`` says what it
computes. Example::

    from opacus_dmaudit import DMAuditor

    with DMAuditor(privacy_engine=engine, log_dir="runs/audit", shadow=True) as auditor:
        auditor.attach(optimizer, model=model)
        ...  # your training loop
"""

from typing import TYPE_CHECKING

from ._compat import install as _install_old_paths
from ._compat import lazy_exports as _lazy_exports

__version__ = "0.1.0"

_install_old_paths()

_PUBLIC = {
    "DMAuditor": "auditor",
    "AuditConfig": "config",
    "ImprintBlock": "capture.imprint",
    "ShadowAdversary": "capture.shadow",
    "DiffusionPrior": "reconstruct.prior",
    "build_report": "sinks.report",
    "build_comparison": "sinks.report",
    "RunSummary": "sinks.summary",
    "AuditRecord": "record",
    "read_audit_log": "sinks.audit_log",
    "AuditCheckFailed": "errors",
    "LogDirInUse": "errors",
    "UnsafeLogDir": "errors",
    "AuditLogError": "errors",
    "BackboneUnavailable": "errors",
}

#: Names exported by release 0.1 that now live in their wing (still importable from here).
_FORMER = {
    "AuditLog": "sinks.audit_log",
    "AuditResult": "pipeline",
    "CapturedStep": "capture.step",
    "GradientCapture": "capture.hooks",
    "Readout": "reconstruct.readout",
    "expected_singletons": "reconstruct.bins",
    "find_imprint_block": "capture.imprint",
    "read_imprint": "reconstruct.readout",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load when first used
    from .auditor import DMAuditor
    from .capture.imprint import ImprintBlock
    from .capture.shadow import ShadowAdversary
    from .config import AuditConfig
    from .errors import (
        AuditCheckFailed,
        AuditLogError,
        BackboneUnavailable,
        LogDirInUse,
        UnsafeLogDir,
    )
    from .reconstruct.prior import DiffusionPrior
    from .record import AuditRecord
    from .sinks.audit_log import read_audit_log
    from .sinks.report import build_comparison, build_report
    from .sinks.summary import RunSummary

__all__ = [
    "AuditCheckFailed",
    "AuditConfig",
    "AuditLogError",
    "AuditRecord",
    "BackboneUnavailable",
    "DMAuditor",
    "DiffusionPrior",
    "ImprintBlock",
    "LogDirInUse",
    "RunSummary",
    "ShadowAdversary",
    "UnsafeLogDir",
    "build_comparison",
    "build_report",
    "read_audit_log",
]
__getattr__, __dir__ = _lazy_exports(__name__, {**_PUBLIC, **_FORMER})
