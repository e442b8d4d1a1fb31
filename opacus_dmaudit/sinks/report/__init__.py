"""The audit report (``report.json``, ``report.html``) and the comparison page across runs."""

from ..._compat import lazy_exports

_NAMES = {
    "build_report": "build",
    "build_comparison": "build",
    "load_audit_images": "build",
    "PRIVATE_NOTICE": "build",
}
__all__ = list(_NAMES)
__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
