"""Privacy numbers: ε from the user's accountant, ReRo bounds, and what the audit measured.

* :mod:`.accountant`: ε read cheaply and in context from the Opacus accountant;
* :mod:`.bounds`: reconstruction-robustness bounds of one step and of the whole run;
* :mod:`.empirical`: a measured per-step µ and an ε lower bound from the imprint bins;
* :mod:`.canaries`: the one-run canary audit (opt-in).
"""

from .._compat import lazy_exports

_NAMES = {
    "EpsilonReading": "accountant",
    "read_epsilon": "accountant",
    "epsilon_note": "accountant",
    "epsilon_from_accountant": "accountant",
    "epsilon_at_audit": "accountant",
    "history_from_accountant": "accountant",
    "steps_from_accountant": "accountant",
    "sample_rate_from_accountant": "accountant",
    "PRV_MIN_SIGMA": "accountant",
    "MEANINGLESS_EPSILON": "accountant",
    "NO_GUARANTEE": "accountant",
}
__all__ = list(_NAMES)
__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
