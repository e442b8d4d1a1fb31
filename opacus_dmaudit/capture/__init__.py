"""Capture: what an audited optimizer step reveals, taken inside ``optimizer.step``.

* :mod:`.imprint`: the ``ImprintBlock`` (the live imprint layer) and its geometry;
* :mod:`.hooks`: ``GradientCapture``, chained onto the ``DPOptimizer``'s step hook;
* :mod:`.mechanism`: the DP mechanism's statistics measured in the step (noise, clipping);
* :mod:`.step`: ``CapturedStep``, the one object the rest of the audit reads;
* :mod:`.shadow`: the worst-case imprint adversary simulated on the real batch.
"""

from .._compat import lazy_exports

_NAMES = {
    "CapturedStep": "step",
    "ImprintSums": "step",
    "GradientCapture": "hooks",
    "clipping_mode": "hooks",
    "ImprintBlock": "imprint",
    "ImprintGeometry": "imprint",
    "find_imprint_block": "imprint",
    "ShadowAdversary": "shadow",
}
__all__ = list(_NAMES)
__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
