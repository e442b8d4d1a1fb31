"""opacus-dmaudit: visual privacy auditing of Opacus DP-SGD training.

Data flow: training step -> capture -> readout -> (denoise) -> score -> log/report.
"""

from .audit_log import AuditLog, read_audit_log
from .auditor import DMAuditor
from .capture import CapturedStep, GradientCapture
from .imprint import ImprintBlock, find_imprint_block
from .pipeline import AuditResult
from .prior import DiffusionPrior
from .readout import Readout, expected_singletons, read_imprint

__version__ = "0.1.0"

__all__ = [
    "AuditLog",
    "AuditResult",
    "CapturedStep",
    "DMAuditor",
    "DiffusionPrior",
    "GradientCapture",
    "ImprintBlock",
    "Readout",
    "expected_singletons",
    "find_imprint_block",
    "read_audit_log",
    "read_imprint",
]
