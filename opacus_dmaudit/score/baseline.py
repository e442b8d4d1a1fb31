"""The baseline κ̂: how often a guess made *without* the gradient meets the success criterion.

A ReRo bound ``Φ(Φ⁻¹(κ) + µ)`` is only as good as its baseline κ: the success rate, at the same
metric and threshold as the success it is compared with, of the best attack that never sees the
gradient. Such an attack can only output an image chosen in advance (a random choice does no
better than the best fixed one), so κ is the largest share of training images that one fixed
image meets the criterion for. ``1/N`` ("name the right one of N training images") is the
baseline of another criterion, identification; for "LPIPS ≤ 0.1" a fixed public digit already
meets it for several percent of MNIST test digits, far above 1/N.

:func:`estimate_kappa` measures κ̂ on *public* images only, never on the audited batch: a pool of
candidate guesses (public images, their mean image and, with a prior, unconditional prior
samples) is scored against the public images (each public image against all the others), and κ̂
is the best candidate's share. Choosing the best candidate on the images it is scored against
makes κ̂ lean high (the safe side for a bound); the pool is finite, which makes it lean low. κ̂
describes the public images' distribution: when the training data differ from them, so may the
true κ.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..schema import HIGHER_IS_BETTER
from .metrics import LPIPS, pairwise

__all__ = ["Baseline", "estimate_kappa", "MIN_TARGETS"]

logger = logging.getLogger(__name__)

#: κ̂ needs at least this many public images (its resolution is 1 / images).
MIN_TARGETS = 16

_CACHE: OrderedDict[tuple, Baseline] = OrderedDict()
_CACHE_SIZE = 16


@dataclass(frozen=True)
class Baseline:
    """A measured baseline success rate.

    Attributes:
        kappa: κ̂, the best candidate's share of held-out public images that it meets the
            criterion for.
        metric, threshold: the success criterion.
        candidates: the number of guesses tried (public images, their mean, prior samples).
        targets: the number of public images they were scored against (a public image
            candidate against all but itself).
        best: what the best guess was (``"public image 12"``, ``"mean image"``,
            ``"prior sample 3"``).
        guess: that image, ``(1, C, H, W)`` in [0, 1].
    """

    kappa: float
    metric: str
    threshold: float
    candidates: int
    targets: int
    best: str
    guess: torch.Tensor = field(repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "kappa": self.kappa,
            "metric": self.metric,
            "threshold": self.threshold,
            "candidates": self.candidates,
            "targets": self.targets,
            "best": self.best,
        }


def _key(public: torch.Tensor, **settings) -> tuple:
    digest = hashlib.blake2b(public.numpy().tobytes(), digest_size=16).hexdigest()
    return (digest, tuple(public.shape), tuple(sorted(settings.items())))


def estimate_kappa(
    public: torch.Tensor,
    *,
    metric: str,
    threshold: float,
    value_range: tuple[float, float] = (0.0, 1.0),
    lpips: LPIPS | None = None,
    prior=None,
    max_images: int = 384,
    prior_samples: int = 8,
    seed: int = 0,
) -> Baseline | None:
    """κ̂ at ``metric`` ≤ (or ≥) ``threshold`` from public images alone (cached).

    Up to ``max_images`` public images (a random sample) are both the candidate guesses and the
    images they are scored against: each public image is scored against all the *others*
    (leave one out), their mean image and the prior's samples against all of them. κ̂ is the best
    candidate's share. Every candidate's rate is an unbiased estimate of its success on the
    public distribution; taking the best of them leans high, the safe side for a bound.

    Args:
        public: ``(N, C, H, W)`` public images in ``value_range`` (never training data).
        metric, threshold: the audit's success criterion.
        value_range: the images' value range (scaled to [0, 1] like the audit's images).
        lpips: the LPIPS model, when ``metric`` is ``"lpips"``.
        prior: a :class:`~opacus_dmaudit.DiffusionPrior` whose unconditional samples join the
            candidates (the adversary's prior is public knowledge), or ``None``.
        max_images: most public images used (each costs one LPIPS backbone pass).
        prior_samples: prior samples tried as guesses.
        seed: seed of the sample (a generator of its own; never the global RNG).

    Returns:
        The :class:`Baseline`, or ``None`` with fewer than :data:`MIN_TARGETS` public images.
    """
    public = _checked_public(public, metric)
    lo, hi = value_range
    n = public.shape[0]
    if min(n, max_images) < MIN_TARGETS:
        logger.info(
            "too few public images (%d) to measure the baseline κ̂ (at least %d)", n, MIN_TARGETS
        )
        return None
    source = getattr(prior, "source", None) if prior is not None else None
    key = _key(
        public,
        metric=metric,
        threshold=float(threshold),
        value_range=(float(lo), float(hi)),
        lpips=getattr(lpips, "net", None),
        prior=source if source is not None else (None if prior is None else id(prior)),
        max_images=max_images,
        prior_samples=prior_samples,
        seed=seed,
    )
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)[:max_images]
    targets = ((public[order] - lo) / (hi - lo)).clamp(0, 1)
    guesses, names = _guesses(targets, order, prior, prior_samples, gen)
    rates = _leave_one_out_rates(pairwise(metric, guesses, targets, lpips=lpips), metric, threshold)
    best = int(rates.argmax())
    result = Baseline(
        kappa=float(rates[best]),
        metric=metric,
        threshold=float(threshold),
        candidates=int(guesses.shape[0]),
        targets=targets.shape[0],
        best=names[best],
        guess=guesses[best : best + 1].clone(),
    )
    _CACHE[key] = result
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return result


def _checked_public(public: torch.Tensor, metric: str) -> torch.Tensor:
    """The public images as a float CPU tensor, or ``ValueError`` on what cannot be scored."""
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}; choose from {sorted(HIGHER_IS_BETTER)}")
    public = torch.as_tensor(public).detach().float().cpu()
    if public.dim() != 4:
        raise ValueError(f"public images must be (N, C, H, W), got {tuple(public.shape)}")
    if not torch.isfinite(public).all():
        raise ValueError("public images hold NaN or infinite pixels: remove or repair them")
    return public


def _guesses(
    targets: torch.Tensor,
    order: torch.Tensor,
    prior,
    prior_samples: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, list[str]]:
    """The candidate guesses and their names: the public images, their mean image, and the
    prior's samples where they have the images' shape."""
    pool = [targets, targets.mean(dim=0, keepdim=True)]
    names = [f"public image {int(i)}" for i in order] + ["mean image"]
    if prior is not None and prior_samples > 0:
        try:
            samples = prior.sample(prior_samples, steps=10, generator=generator)
            if tuple(samples.shape[1:]) == tuple(targets.shape[1:]):
                pool.append(samples.float().clamp(0, 1))
                names += [f"prior sample {i}" for i in range(samples.shape[0])]
            else:
                logger.info(
                    "prior samples %s do not fit the images %s: κ̂ uses public images only",
                    tuple(samples.shape[1:]),
                    tuple(targets.shape[1:]),
                )
        except Exception as err:  # the prior is optional here
            logger.info("could not draw prior samples for κ̂ (%s): public images only", err)
    return torch.cat(pool), names


def _leave_one_out_rates(scores: torch.Tensor, metric: str, threshold: float) -> torch.Tensor:
    """Each guess's share of targets it meets the criterion on; the first ``M`` guesses are the
    ``M`` targets themselves, each left out of its own targets."""
    m = scores.shape[1]
    if HIGHER_IS_BETTER[metric]:
        hits = scores >= threshold
    else:
        hits = scores <= threshold
    hits &= ~torch.isnan(scores)
    hits[torch.arange(m), torch.arange(m)] = False
    counts = torch.full((scores.shape[0],), float(m), dtype=torch.float64)
    counts[:m] = m - 1
    return hits.double().sum(dim=1) / counts
