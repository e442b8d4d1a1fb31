"""Reconstruct: from the imprint layer's gradient sums to images.

* :mod:`.bins`: each bin's gradient row, and which bins hold a lone sample;
* :mod:`.detection`: the occupancy tests (which bins hold a sample) and their power;
* :mod:`.readout`: candidate images, their predicted noise and the collision flag;
* :mod:`.prior`: the diffusion-model prior that denoises readouts (Algorithm 1);
* :mod:`.classical`: classical denoisers (the prior-fit check's reference).
"""

from .._compat import lazy_exports

_NAMES = {
    "Readout": "readout",
    "read_imprint": "readout",
    "bin_rows": "bins",
    "lone_bins": "bins",
    "expected_lone": "bins",
    "occupancy_test": "detection",
    "detection_power": "detection",
    "DiffusionPrior": "prior",
}
__all__ = list(_NAMES)
__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
