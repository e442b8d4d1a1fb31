"""Score: how close each reconstruction comes to its training image, and against what baseline.

* :mod:`.scoring`: readout -> match -> prior -> metrics -> success, for one captured step;
* :mod:`.metrics`: MSE, PSNR, SSIM, LPIPS (and :mod:`.lpips_weights`, offline backbones);
* :mod:`.identification`: is a reconstruction nearest its own image among the batch's?;
* :mod:`.targets`: the per-target counts of one audit (lone samples found and scored);
* :mod:`.baseline`: what a guess without the gradient achieves per target (upper limits);
* :mod:`.binomial`: the per-target test against a baseline, its power and the targets it needs.
"""

from .._compat import lazy_exports

_NAMES = {
    "ScoredStep": "scoring",
    "score_step": "scoring",
    "LPIPS": "metrics",
    "identification_rates": "identification",
    "identify": "identification",
    "count_targets": "targets",
    "estimate_kappa": "baseline",
    "estimate_baselines": "baseline",
    "Baseline": "baseline",
    "Baselines": "baseline",
}
__all__ = list(_NAMES)
__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
