"""Baselines: what an adversary who never sees the gradient achieves per target, as upper limits.

An audit's success and identification are events of one *target* (a lone sample the audit found
and scored). Each is compared with what a guess made without the gradient achieves on the same
event, and a guess can do much better than "one of N": a fixed public digit is within LPIPS 0.1
of several percent of MNIST digits, and the scorer pairs each reconstruction with its own bin, so
a guess that knows the bin (a brightness interval) is nearer its own image than to the N − 1
others more often than 1/N. The baselines, all measured on *public* images (never the audited
batch), once per run and cached:

* **success** (κ, at the audit's criterion): (a) the best fixed guesses: every public image, their
  mean and unconditional prior samples are candidates; a shortlist of the best
  (:data:`SHORTLIST`) is *chosen on one half* of the public images and each is *scored on the
  other half* (an in-sample maximum over hundreds of candidates reads high and low by chance; a
  held-out score does not, and a shortlist keeps a lucky winner from hiding the best guess);
  (b) and (c) a guess that knows the target's bin (:data:`BIN_STRATEGIES`), each half's guesses
  made from the other half.
* **identification** (is a guess nearer to its target than to each other image of the batch?),
  per metric, on public batches of the run's batch size drawn from the held-out half: (a) and (b)
  the bin-knowing guesses, and (c) the *informed* adversary of the ReRo theorem, who knows the
  other N − 1 images of the batch and guesses the public image (of the other half) farthest from
  all of them.

Every rate comes with a one-sided Clopper–Pearson upper limit; the largest of m upper limits,
each at level ``(1 − confidence)/m``, is an upper limit of all m rates at ``confidence``
(Bonferroni). The success test and the bounds use the success limit; the identification test
uses the larger identification limit, and the identification bound the informed one (the ReRo
theorem's adversary). A baseline describes the public images' distribution: where the training
data differ from them, so may the true baselines.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from ..schema import HIGHER_IS_BETTER, identification_metrics
from .metrics import LPIPS, pairwise

__all__ = [
    "Rate",
    "Baseline",
    "IdentificationBaseline",
    "Baselines",
    "estimate_baselines",
    "estimate_kappa",
    "identification_metrics",
    "upper_limit",
    "MIN_TARGETS",
    "BIN_STRATEGIES",
    "CONFIDENCE",
]

logger = logging.getLogger(__name__)

#: Each half of the public images needs at least this many images for a baseline.
MIN_TARGETS = 16

#: Confidence of every baseline's upper limit.
CONFIDENCE = 0.95

#: The fixed guesses chosen on one half of the public images and scored on the other: a single
#: winner of hundreds of noisy rates is often not the best guess, so a few are held out.
SHORTLIST = 8

#: The guesses of an adversary who knows the target's bin, and what each is.
BIN_STRATEGIES = {
    "bin_mean": "the mean of the public images of the target's bin (the public image nearest "
    "the bin's centre where the bin holds none)",
    "bin_centre": "the public image whose projection is nearest the centre of the target's bin",
}

_CACHE: OrderedDict[tuple, Baselines] = OrderedDict()
_CACHE_SIZE = 16


def upper_limit(hits: int, trials: int, alpha: float) -> float:
    """One-sided Clopper–Pearson upper limit of a rate at level ``alpha`` (1 without trials)."""
    from scipy import stats

    if trials <= 0 or hits >= trials:
        return 1.0
    return float(stats.beta.isf(alpha, hits + 1, trials - hits))


@dataclass(frozen=True)
class Rate:
    """A measured rate: ``hits`` of ``trials``, and its one-sided ``upper`` limit at ``level``
    (the limit's own confidence, ``1 − alpha``)."""

    hits: int
    trials: int
    upper: float
    level: float

    @property
    def rate(self) -> float | None:
        return self.hits / self.trials if self.trials else None

    @classmethod
    def of(cls, hits: int, trials: int, alpha: float) -> Rate:
        return cls(int(hits), int(trials), upper_limit(hits, trials, alpha), 1.0 - alpha)

    def to_json(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "trials": self.trials,
            "rate": self.rate,
            "upper": self.upper,
            "level": self.level,
        }


@dataclass(frozen=True)
class Baseline:
    """The success baseline at the audit's criterion.

    Attributes:
        kappa: κ̂, the held-out rate of the best fixed guess of the shortlist chosen on the
            other half.
        kappa_upper: the success baseline's upper limit: the largest of the shortlist's and the
            bin-knowing guesses' upper limits (each at ``(1 − confidence)/m``, m of them).
        metric, threshold: the success criterion.
        candidates: fixed guesses tried (public images, their mean, prior samples).
        targets: held-out public images the chosen guess was scored on.
        best: what the chosen fixed guess was (``"public image 12"``, ``"mean image"``, ...).
        rates: ``{"fixed", "bin_mean", "bin_centre"}`` -> :class:`Rate` (``fixed``: the
            shortlist's best on the held-out half; bin-knowing guesses only where the bins are
            known).
        guess: the chosen fixed guess, ``(1, C, H, W)`` in [0, 1].
    """

    kappa: float
    kappa_upper: float
    metric: str
    threshold: float
    candidates: int
    targets: int
    best: str
    rates: dict[str, Rate] = field(default_factory=dict)
    guess: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kappa": self.kappa,
            "kappa_upper": self.kappa_upper,
            "metric": self.metric,
            "threshold": self.threshold,
            "candidates": self.candidates,
            "targets": self.targets,
            "best": self.best,
            "rates": {k: r.to_json() for k, r in self.rates.items()},
        }


@dataclass(frozen=True)
class IdentificationBaseline:
    """Identification in one metric by adversaries without the gradient, on public batches.

    Attributes:
        metric: the distance (``"mse"``, ``"ssim"``, ``"lpips"``).
        batch_size: the run's expected batch size N.
        batch_used: the public batches' size (smaller than N only with too few public images: a
            smaller batch has fewer images to be confused with, so its rates lean high).
        rates: ``{"bin_mean", "bin_centre", "informed"}`` -> :class:`Rate` (the bin-knowing
            guesses only where the bins are known).
    """

    metric: str
    batch_size: int
    batch_used: int
    rates: dict[str, Rate]

    @property
    def upper(self) -> float:
        """The test's baseline: the largest upper limit."""
        return max(r.upper for r in self.rates.values())

    @property
    def informed_upper(self) -> float | None:
        """The ReRo theorem's adversary's upper limit (the identification bound's κ)."""
        rate = self.rates.get("informed")
        return rate.upper if rate is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "batch_size": self.batch_size,
            "batch_used": self.batch_used,
            "upper": self.upper,
            "rates": {k: r.to_json() for k, r in self.rates.items()},
        }


@dataclass(frozen=True)
class Baselines:
    """A run's baselines, and why any is missing.

    Attributes:
        success: the success baseline, or ``None``.
        identification: per metric, the identification baseline.
        missing: ``{"success" or "identification": why it could not be measured}``.
        notes: what a reader should know (a public batch smaller than the run's, ...).
        public_images: public images used.
    """

    success: Baseline | None = None
    identification: dict[str, IdentificationBaseline] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    public_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": None if self.success is None else self.success.to_dict(),
            "identification": {m: b.to_dict() for m, b in self.identification.items()},
            "missing": dict(self.missing),
            "notes": list(self.notes),
            "public_images": self.public_images,
        }


# -- estimation -----------------------------------------------------------------------------------
def _key(public: torch.Tensor, **settings) -> tuple:
    digest = hashlib.blake2b(public.numpy().tobytes(), digest_size=16).hexdigest()
    return (digest, tuple(public.shape), tuple(sorted(settings.items())))


def _geometry_key(geometry) -> Any:
    if geometry is None or getattr(geometry, "bin_edges", None) is None:
        return None
    h = getattr(geometry, "measurement", None)
    digest = (
        None
        if h is None
        else hashlib.blake2b(h.double().numpy().tobytes(), digest_size=8).hexdigest()
    )
    return (geometry.structure, tuple(geometry.bin_edges), digest)


def estimate_baselines(
    public: torch.Tensor,
    *,
    metric: str,
    threshold: float,
    metrics=("mse", "ssim", "lpips"),
    batch_size: int | None = None,
    geometry=None,
    value_range: tuple[float, float] = (0.0, 1.0),
    lpips: LPIPS | None = None,
    prior=None,
    max_images: int = 384,
    prior_samples: int = 8,
    seed: int = 0,
) -> Baselines:
    """Every baseline of a run from public images alone (cached; see the module documentation).

    Args:
        public: ``(P, C, H, W)`` public images in ``value_range`` (never training data).
        metric, threshold: the audit's success criterion.
        metrics: the metrics the audit computes (identification is tested in each, see
            :func:`identification_metrics`).
        batch_size: the run's expected batch size N (``None`` or 1: no identification baseline).
        geometry: the imprint layer's :class:`~opacus_dmaudit.capture.imprint.ImprintGeometry`
            (its bins), or ``None`` (no bin-knowing guess).
        value_range: the images' value range (scaled to [0, 1] like the audit's images).
        lpips: the LPIPS model, when LPIPS is among the metrics.
        prior: a :class:`~opacus_dmaudit.DiffusionPrior` whose samples join the fixed guesses.
        max_images: most public images used (a random sample; the cost grows with its square).
        prior_samples: prior samples tried as fixed guesses.
        seed: seed of the sample and the split (a generator of its own).
    """
    public = _checked_public(public, metric)
    source = getattr(prior, "source", None) if prior is not None else None
    key = _key(
        public,
        metric=metric,
        threshold=float(threshold),
        metrics=tuple(identification_metrics(metrics)),
        batch_size=batch_size,
        geometry=_geometry_key(geometry),
        value_range=tuple(float(v) for v in value_range),
        lpips=getattr(lpips, "net", None),
        prior=source if source is not None else (None if prior is None else id(prior)),
        max_images=max_images,
        prior_samples=prior_samples,
        seed=seed,
    )
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    result = _estimate(
        public,
        metric=metric,
        threshold=float(threshold),
        metrics=identification_metrics(metrics),
        batch_size=batch_size,
        geometry=geometry,
        value_range=value_range,
        lpips=lpips,
        prior=prior,
        max_images=max_images,
        prior_samples=prior_samples,
        seed=seed,
    )
    _CACHE[key] = result
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return result


@dataclass
class _Pool:
    """The public sample in [0, 1] (``x``), split in two halves ``a`` and ``b``, with each image's
    bin and projection and the bins' centres (``None`` without bins)."""

    x: torch.Tensor
    names: list[str]
    a: torch.Tensor  # indices of the first half
    b: torch.Tensor  # indices of the second half
    bins: torch.Tensor | None = None
    proj: torch.Tensor | None = None
    centres: torch.Tensor | None = None


def _estimate(public: torch.Tensor, **kw) -> Baselines:
    n = min(public.shape[0], kw["max_images"])
    missing: dict[str, str] = {}
    if n < 2 * MIN_TARGETS:
        reason = (
            f"{public.shape[0]} public images; a baseline needs at least {2 * MIN_TARGETS} "
            "(half to choose a guess on, half to score it on)"
        )
        return Baselines(missing={"success": reason, "identification": reason}, public_images=n)
    gen = torch.Generator().manual_seed(kw["seed"])
    pool = _split(public, n, kw["value_range"], kw["geometry"], gen)
    guesses = _guesses(pool, kw["prior"], kw["prior_samples"], gen)
    matrices = {}  # metric -> (guesses, public images), the blocks that are used
    for metric in dict.fromkeys([kw["metric"], *kw["metrics"]]):
        matrices[metric] = _scores(metric, pool, guesses, kw["lpips"], kw["metric"] == metric)
    success = _success_baseline(pool, guesses, matrices[kw["metric"]], **kw)
    ident, notes = _identification_baselines(pool, guesses, matrices, missing, gen=gen, **kw)
    if pool.bins is None:
        notes.append("no bins known: the baselines have no bin-knowing guess")
    return Baselines(
        success=success, identification=ident, missing=missing, notes=notes, public_images=n
    )


def _split(public, n, value_range, geometry, gen) -> _Pool:
    order = torch.randperm(public.shape[0], generator=gen)[:n]
    lo, hi = value_range
    raw = public[order]
    half = n // 2
    pool = _Pool(
        x=((raw - lo) / (hi - lo)).clamp(0, 1),
        names=[f"public image {int(i)}" for i in order],
        a=torch.arange(half),
        b=torch.arange(half, n),
    )
    edges = None if geometry is None else getattr(geometry, "bin_edges", None)
    h = None if geometry is None else getattr(geometry, "measurement", None)
    if edges is not None and h is not None:
        edges_t = torch.as_tensor(edges, dtype=torch.float64)
        pool.proj = raw.flatten(1).double() @ h.double().flatten()
        k = edges_t.numel() - 1
        # bin i holds edges[i] <= h·x < edges[i + 1]; -1: below a cumulative block's first edge
        pool.bins = (torch.bucketize(pool.proj, edges_t, right=True) - 1).clamp(max=k - 1)
        pool.centres = (edges_t[:-1] + edges_t[1:]) / 2
    return pool


@dataclass(frozen=True)
class _Guesses:
    """Every guess, as rows of one image stack: the public images (rows ``0..n−1``, in ``x``'s
    order), the mean of ``a`` and prior samples (the other fixed guesses, up to row ``fixed``),
    then per held-out image its bin's mean (``bin_mean[i]``: the row of image ``i``'s guess) and
    the public image nearest its bin's centre (``bin_centre[i]``), each made from the other half.
    """

    images: torch.Tensor
    names: list[str]
    fixed: int
    bin_mean: torch.Tensor | None
    bin_centre: torch.Tensor | None


def _guesses(pool: _Pool, prior, prior_samples: int, gen: torch.Generator) -> _Guesses:
    parts = [pool.x, pool.x[pool.a].mean(dim=0, keepdim=True)]
    names = pool.names + ["mean image"]
    samples = _prior_samples(prior, prior_samples, tuple(pool.x.shape[1:]), gen)
    if samples is not None:
        parts.append(samples)
        names += [f"prior sample {i}" for i in range(samples.shape[0])]
    fixed = sum(p.shape[0] for p in parts)
    if pool.bins is None:
        return _Guesses(torch.cat(parts), names, fixed, None, None)
    n = pool.x.shape[0]
    mean_row = torch.zeros(n, dtype=torch.long)
    centre = torch.zeros(n, dtype=torch.long)
    means, row = [], fixed
    for known, targets in ((pool.a, pool.b), (pool.b, pool.a)):
        known_bins, known_proj = pool.bins[known], pool.proj[known]
        for t in targets.tolist():
            b = int(pool.bins[t])
            # below the first edge of a cumulative block (never read out): the lowest bin
            near = int(known[(known_proj - pool.centres[max(b, 0)]).abs().argmin()])
            centre[t] = near
            members = known[known_bins == b]
            means.append(pool.x[members].mean(dim=0) if members.numel() else pool.x[near])
            mean_row[t], row = row, row + 1
    parts.append(torch.stack(means))
    return _Guesses(torch.cat(parts), names, fixed, mean_row, centre)


def _prior_samples(prior, count: int, shape: tuple, gen: torch.Generator) -> torch.Tensor | None:
    """The prior's unconditional samples, where they have the images' shape."""
    if prior is None or count <= 0:
        return None
    try:
        samples = prior.sample(count, steps=10, generator=gen)
    except Exception as err:  # the prior is optional here
        logger.info("could not draw prior samples for κ̂ (%s): public images only", err)
        return None
    if tuple(samples.shape[1:]) != shape:
        logger.info(
            "prior samples %s do not fit the images %s: κ̂ uses public images only",
            tuple(samples.shape[1:]),
            shape,
        )
        return None
    return samples.float().clamp(0, 1)


def _scores(metric: str, pool: _Pool, guesses: _Guesses, lpips, criterion: bool) -> torch.Tensor:
    """``metric`` of the guesses (rows) against the public images (columns), computed only where
    it is used (NaN elsewhere): each half's images against the other half's and against their
    own bins' guesses, and, for the success criterion, every fixed guess against ``a`` (where
    the best one is chosen; :func:`_success_baseline` scores it on ``b``)."""
    out = torch.full((guesses.images.shape[0], pool.x.shape[0]), math.nan, dtype=torch.float64)
    for known, targets in ((pool.a, pool.b), (pool.b, pool.a)):
        rows = [known]
        if guesses.bin_mean is not None:
            rows.append(guesses.bin_mean[targets])
        if criterion and targets is pool.a:
            rows.append(torch.arange(guesses.fixed))
        rows = torch.unique(torch.cat(rows))
        out[rows[:, None], targets[None, :]] = pairwise(
            metric, guesses.images[rows], pool.x[targets], lpips=lpips
        )
    return out


def _hits(values: torch.Tensor, metric: str, threshold: float) -> torch.Tensor:
    if HIGHER_IS_BETTER[metric]:
        hits = values >= threshold
    else:
        hits = values <= threshold
    return hits & ~torch.isnan(values)


def _success_baseline(pool: _Pool, guesses: _Guesses, scores: torch.Tensor, **kw) -> Baseline:
    """κ̂: a shortlist of the best fixed guesses on ``a`` (:data:`SHORTLIST`), each scored on
    ``b``; the bin guesses on every public image (each half's guesses made from the other)."""
    metric, threshold = kw["metric"], kw["threshold"]
    hits = _hits(scores, metric, threshold)
    on_a = hits[: guesses.fixed, pool.a].clone()
    on_a[pool.a, torch.arange(pool.a.numel())] = False  # an image of `a` is not its own target
    counts = torch.full((guesses.fixed,), float(pool.a.numel()), dtype=torch.float64)
    counts[pool.a] -= 1
    rate_a = on_a.double().sum(dim=1) / counts
    shortlist = rate_a.argsort(descending=True, stable=True)[:SHORTLIST].tolist()
    m = len(shortlist) + (2 if guesses.bin_mean is not None else 0)
    alpha = (1 - CONFIDENCE) / m
    fixed: dict[int, Rate] = {}
    for g in shortlist:
        row = scores[g, pool.b]
        if torch.isnan(row).any():
            row = pairwise(metric, guesses.images[g : g + 1], pool.x[pool.b], lpips=kw["lpips"])[0]
        on_b = _hits(row, metric, threshold)
        trials = pool.b.numel()
        if g in pool.b.tolist():  # an image of `b` as the guess is not its own target
            on_b[g - pool.a.numel()] = False
            trials -= 1
        fixed[g] = Rate.of(int(on_b.sum()), trials, alpha)
    best = max(fixed, key=lambda g: (fixed[g].rate, -shortlist.index(g)))
    rates = {"fixed": fixed[best]}
    if guesses.bin_mean is not None:
        every = torch.arange(pool.x.shape[0])
        for name, rows in (("bin_mean", guesses.bin_mean), ("bin_centre", guesses.bin_centre)):
            rates[name] = Rate.of(int(hits[rows, every].sum()), every.numel(), alpha)
    upper = max([r.upper for r in fixed.values()] + [r.upper for r in rates.values()])
    return Baseline(
        kappa=rates["fixed"].rate or 0.0,
        kappa_upper=upper,
        metric=metric,
        threshold=threshold,
        candidates=guesses.fixed,
        targets=rates["fixed"].trials,
        best=guesses.names[best],
        rates=rates,
        guess=guesses.images[best : best + 1].clone(),
    )


def _identification_baselines(pool: _Pool, guesses: _Guesses, matrices, missing, *, gen, **kw):
    """Per metric, the identification baselines on public batches drawn from each half (the
    adversary's own public images are the other half)."""
    n_batch = kw["batch_size"]
    notes: list[str] = []
    if n_batch is None or n_batch < 2:
        missing["identification"] = (
            "a batch of one: identification is no test (the only candidate is the target)"
            if n_batch is not None
            else "the run's batch size is not known"
        )
        return {}, notes
    used = min(int(n_batch), pool.a.numel())
    if used < n_batch:
        notes.append(
            f"identification baselines on public batches of {used} (the run's batch is "
            f"{n_batch}; {2 * n_batch} public images would give full batches): fewer images to "
            "be confused with, so they lean high"
        )
    folds = []
    for known, targets in ((pool.a, pool.b), (pool.b, pool.a)):
        order = targets[torch.randperm(targets.numel(), generator=gen)]
        folds.append((known, order[: (order.numel() // used) * used].view(-1, used)))
    out = {}
    for metric in kw["metrics"]:
        d = matrices[metric]
        d = torch.nan_to_num(-d if HIGHER_IS_BETTER[metric] else d, nan=math.inf)
        out[metric] = _identification_in(metric, d, pool, guesses, folds, n_batch, used)
    return out, notes


def _identification_in(metric, d, pool: _Pool, guesses: _Guesses, folds, n_batch, used):
    """The three adversaries' identification rates in ``metric`` (``d``: guesses × public
    images as a distance) on both folds' batches."""
    strategies = {}
    if guesses.bin_mean is not None:
        strategies = {"bin_mean": guesses.bin_mean, "bin_centre": guesses.bin_centre}
    hits = dict.fromkeys(["informed", *strategies], 0)
    trials = 0
    for known, batches in folds:
        for batch in batches:
            for t in _lone_in(batch, pool.bins).tolist():
                others = batch[batch != t]
                trials += 1
                for name, rows in strategies.items():
                    row = d[int(rows[t])]
                    hits[name] += bool(row[t] < row[others].min())
                # the informed adversary: the known image farthest from the N − 1 others
                pick = int(known[d[known][:, others].min(dim=1).values.argmax()])
                hits["informed"] += bool(d[pick, t] < d[pick, others].min())
    alpha = (1 - CONFIDENCE) / len(hits)
    rates = {name: Rate.of(k, trials, alpha) for name, k in hits.items()}
    return IdentificationBaseline(
        metric=metric, batch_size=int(n_batch), batch_used=int(used), rates=rates
    )


def _lone_in(batch: torch.Tensor, bins: torch.Tensor | None) -> torch.Tensor:
    """The images of a public batch alone in their bin (every image without bins)."""
    if bins is None:
        return batch
    b = bins[batch]
    counts = (b[:, None] == b[None, :]).sum(dim=1)
    return batch[(counts == 1) & (b >= 0)]


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
    """The success baseline alone (:func:`estimate_baselines` without bins or batches), or
    ``None`` with fewer than ``2 · MIN_TARGETS`` public images."""
    return estimate_baselines(
        public,
        metric=metric,
        threshold=threshold,
        metrics=(),
        batch_size=None,
        value_range=value_range,
        lpips=lpips,
        prior=prior,
        max_images=max_images,
        prior_samples=prior_samples,
        seed=seed,
    ).success
