"""The audit report (``report.json``, ``report.html``) and the comparison page across runs.

:mod:`.build` reads a log directory, :mod:`.html` lays out the page from :mod:`.page`'s pieces,
:mod:`.plots` draws the charts, :mod:`.images` the truth / readout / DM grids, and
:mod:`.comparison` puts several runs on one page.
"""

from ..._compat import lazy_exports

_NAMES = {
    "build_report": "build",
    "load_audit_images": "build",
    "PRIVATE_NOTICE": "page",
    "build_comparison": "comparison",
}
__all__ = list(_NAMES)
__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
