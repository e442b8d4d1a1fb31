"""Checks: whether an audit could see leakage, and whether the DP mechanism is what ε assumes.

Every check returns an entry ``{"name", "status", "detail", ...}`` (:mod:`.entries`); a ``fail``
makes the audit invalid. :mod:`.validity` (value range, blind, calibration, bins),
:mod:`.mechanism` (noise, clipping, sampling, accountant), :mod:`.prior_fit` (does the prior fit
the data?).
"""

from .._compat import lazy_exports

_NAMES = {
    "AuditCheckFailed": "validity",
    "validity_checks": "validity",
    "check_value_range": "validity",
    "check_blind": "validity",
    "check_calibration": "validity",
    "check_bins": "validity",
    "raise_on_failure": "validity",
    "lone_sample_moments": "validity",
    "mechanism_checks": "mechanism",
    "check": "entries",
    "worst_status": "entries",
    "is_valid": "entries",
}
__all__ = list(_NAMES)
__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
