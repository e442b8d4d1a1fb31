"""Prior fit: does the diffusion prior restore *this* data faithfully, or does it guess?

A diffusion prior trained on other images turns noise into what it knows: garments into digit
strokes, grey X-rays into brown photographs. Its reconstructions then look convincing while they
show the prior, not the data. Two measurements tell the reader when that happens, both against the
best classical denoiser (scikit-image TV, wavelet, non-local means; see :mod:`.classical`), which
smooths but never invents:

* :func:`public_fit`, once at attach: public images (``AuditConfig.public`` or the ones given to
  ``ImprintBlock.calibrate``) with synthetic Gaussian noise at a few levels, restored by the
  prior (the auditor's sampler settings) and by each classical method (its knob tuned for MSE on
  other public images), scored by MSE and a perceptual metric (LPIPS, or SSIM without LPIPS).
* :func:`audit_fit`, at every audit: the clean (noise-free) readouts of a few lone images,
  re-noised with the auditor's own generator at each image's predicted noise std, restored by the
  prior and by a classical method whose knob scales with the noise (wavelet or NLM, the better
  one at the nearest attach level), scored against the clean readout. An estimate of how
  faithful the prior is on this run's data at this audit's noise levels.

The rule, at each level or on each image: the prior is *faithful* when it beats the classical
denoiser at MSE and at the perceptual metric. Worse MSE with a better perceptual score is the
signature of hallucination (the prior paints plausible detail that is not in the image; LPIPS
rewards it); worse at both means the prior *loses* (it does not fit the data); better MSE with a
worse perceptual score is *mixed* (it smooths, adds no detail). Grey images through a colour
prior are also checked for colour they do not have: a faithful restoration of a grey image is
grey, so a prior whose three output channels differ by more than :data:`COLOUR_TOLERANCE` on
average paints what it knows (photos) onto the data. Anything but faithful gives a ``"warn"``
check entry (never ``"fail"``: the raw readout and the metrics stay valid), and DM panels of
images where the prior was unfaithful are marked in the report.

**The fit never passes by default.** Without public images (or with ``prior_fit_public=0``) the
attach-time fit is *unknown* (a ``"warn"`` whose values say ``fit="unknown"``), and the per-audit
comparison against an untuned classical denoiser cannot pass either. At attach the prior must
win by a margin: on each metric the mean of the paired per-image differences must lie
:data:`DECISION_SE` standard errors from zero (else the level is *undecided*), over
``prior_fit_public`` images per level (16 by default), so that two runs on the same public
images do not reach opposite decisions.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..reconstruct.classical import CLASSICAL_GRIDS, classical_denoise, tune_classical
from ..score.metrics import LPIPS, mse, ssim
from .entries import check

__all__ = [
    "FIT_LEVELS",
    "PublicFit",
    "AuditFit",
    "public_fit",
    "audit_fit",
    "faithful",
    "unknown_fit",
    "DECISION_SE",
    "COLOUR_TOLERANCE",
]

logger = logging.getLogger(__name__)

#: Noise stds (in [0, 1] pixel units) at which :func:`public_fit` restores public images.
FIT_LEVELS = (0.1, 0.2, 0.4)

#: At attach, the prior wins or loses on a metric only when the mean paired per-image difference
#: lies this many standard errors from zero.
DECISION_SE = 2.0

#: Grey images restored through a colour prior: more than this mean spread of the three output
#: channels (half a grey level of an 8-bit image) is colour the input does not have.
COLOUR_TOLERANCE = 0.5 / 255

#: Classical methods whose knob is a multiple of the noise std, so a knob tuned at one level
#: carries over to another (TV's weight does not); the per-audit comparison uses these.
SIGMA_SCALED = ("wavelet", "nlm")

#: The knob used per audit when no public images were available to tune one.
UNTUNED = ("wavelet", ("BayesShrink", 1.0))

#: At most this many public images tune the classical knobs (they are never the scored ones).
MAX_TUNING_IMAGES = 4


@dataclass
class PublicFit:
    """The attach-time fit: its check entry and the classical knobs it tuned.

    Attributes:
        check: the ``prior_fit`` check entry (levels and measured means as extra keys).
        knobs: per level, per classical method, the knob with the lowest MSE on tuning images.
        classical_mse: per level, per method, the MSE on the scored images (to pick the method
            the per-audit comparison uses).
    """

    check: dict[str, Any]
    knobs: dict[float, dict[str, Any]] = field(default_factory=dict)
    classical_mse: dict[float, dict[str, float]] = field(default_factory=dict)

    def per_audit_denoiser(self, noise_std: float) -> tuple[str, Any]:
        """The σ-scaled classical method and knob tuned at the level nearest ``noise_std``."""
        if not self.knobs:
            return UNTUNED
        level = min(self.knobs, key=lambda lv: abs(math.log(lv) - math.log(max(noise_std, 1e-6))))
        scores = self.classical_mse.get(level, {})
        method = min(SIGMA_SCALED, key=lambda m: scores.get(m, math.inf))
        return method, self.knobs[level][method]


@dataclass
class AuditFit:
    """One audit's fit on re-noised lone images.

    Attributes:
        check: the ``prior_fit_audit`` check entry.
        summary: means for the record's ``prior_fit`` field (TensorBoard ``quality/dm/fit_*``).
        flags: per row of ``ScoredStep.images``, the keys to add to that image dict.
    """

    check: dict[str, Any]
    summary: dict[str, Any]
    flags: dict[int, dict[str, Any]]


def faithful(
    mse_dm: float,
    mse_classical: float,
    perc_dm: float,
    perc_classical: float,
    *,
    higher_is_better: bool,
) -> bool:
    """Whether the prior beat the classical denoiser at MSE and at the perceptual metric."""
    perc_ok = perc_dm >= perc_classical if higher_is_better else perc_dm <= perc_classical
    return mse_dm <= mse_classical and perc_ok


def _verdict(mse_dm, mse_cl, perc_dm, perc_cl, *, higher_is_better: bool) -> str | None:
    """``None`` when faithful, else ``"hallucination"`` (worse MSE, better perceptual),
    ``"loses"`` (worse at both) or ``"mixed"`` (better MSE, worse perceptual)."""
    if faithful(mse_dm, mse_cl, perc_dm, perc_cl, higher_is_better=higher_is_better):
        return None
    perc_better = perc_dm >= perc_cl if higher_is_better else perc_dm <= perc_cl
    if mse_dm > mse_cl:
        return "hallucination" if perc_better else "loses"
    return "mixed"


def _side(diff: torch.Tensor) -> int:
    """-1 where the prior is better (a negative mean paired difference) by :data:`DECISION_SE`
    standard errors, +1 where it is worse by as much, 0 (undecided) in between."""
    diff = diff.double().flatten()
    if diff.numel() < 2:
        return 0
    mean, se = float(diff.mean()), float(diff.std()) / math.sqrt(diff.numel())
    if mean + DECISION_SE * se < 0:
        return -1
    if mean - DECISION_SE * se > 0:
        return 1
    return 0


def _decided(mse_side: int, perc_side: int) -> str | None:
    """The level's verdict from the two sides (see :func:`_verdict`); ``"undecided"`` on a tie."""
    if 0 in (mse_side, perc_side):
        return "undecided"
    return {(-1, -1): None, (1, -1): "hallucination", (1, 1): "loses", (-1, 1): "mixed"}[
        (mse_side, perc_side)
    ]


def unknown_fit(reason: str) -> dict[str, Any]:
    """The ``prior_fit`` entry when the fit could not be measured: ``warn``, fit unknown."""
    return check(
        "prior_fit",
        "warn",
        f"unknown: {reason.rstrip('.')}, so whether the prior restores this kind of image or "
        "paints what it knows is not measured; read the DM reconstructions with care, or give "
        "public images like the training data (AuditConfig.public) to measure it",
        fit="unknown",
    )


#: How the perceptual metrics are named in a check's detail.
_LABELS = {"lpips": "LPIPS", "ssim": "SSIM"}


def _perceptual(lpips: LPIPS | None, shape: Sequence[int]) -> str:
    return "lpips" if lpips is not None and min(shape[-2:]) >= 16 else "ssim"


def _score(name: str, preds: list[torch.Tensor], target: torch.Tensor, lpips) -> list[torch.Tensor]:
    if name == "lpips":
        return lpips.compare(preds, target)
    return [ssim(p, target) for p in preds]


def _denoise(
    prior, images, noise_std, config, generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prior's restorations and, for grey images through a colour prior, each restoration's
    mean spread of the three channels before they are averaged back to grey (``None`` else).

    The grey channel is replicated with its noise std scaled by √3 and the channels averaged
    back, exactly as :meth:`~opacus_dmaudit.DiffusionPrior.denoise` maps grey images, so the
    restoration is the one the audit's DM stage makes.
    """
    settings = dict(
        sampler=config.sampler,
        steps=config.sampler_steps,
        min_stride=config.sampler_min_stride,
        generator=generator,
    )
    grey_to_colour = images.shape[1] == 1 and prior.fit_plan(images.shape[1:])[0] == "grey->rgb"
    if not grey_to_colour:
        return prior.denoise(images, noise_std=noise_std, **settings), None
    std = torch.as_tensor(noise_std, dtype=torch.float64) * math.sqrt(3.0)
    colour = prior.denoise(images.expand(-1, 3, -1, -1), noise_std=std, **settings)
    chroma = colour.double().std(dim=1, unbiased=False).mean(dim=(1, 2))
    return colour.mean(dim=1, keepdim=True), chroma


def public_fit(
    public: torch.Tensor,
    prior,
    *,
    config,
    lpips: LPIPS | None,
    generator: torch.Generator,
    value_range: tuple[float, float] = (0.0, 1.0),
    images: int = 16,
    levels: Sequence[float] = FIT_LEVELS,
    source: str = "public images",
) -> PublicFit:
    """Restore public images from synthetic noise with the prior and with classical denoisers.

    Args:
        public: ``(N, C, H, W)`` public images in ``value_range`` (never training data).
        prior: the :class:`~opacus_dmaudit.DiffusionPrior` the audit uses.
        config: the :class:`~opacus_dmaudit.config.AuditConfig` (its sampler settings).
        lpips: the LPIPS model, or ``None`` to use SSIM as the perceptual metric.
        generator: draws the image selection and the noise (never the global RNG).
        value_range: the pixel range of ``public``.
        images: public images scored per level; half as many others (at most
            :data:`MAX_TUNING_IMAGES`) tune the classical knobs.
        levels: noise stds in [0, 1] units.
        source: where the public images came from (for the check's detail).

    Returns:
        A :class:`PublicFit` whose check is ``"pass"`` only where the prior beats the best
        classical denoiser at both metrics by the margin (:data:`DECISION_SE`) at every level
        and paints no colour onto grey images, else ``"warn"``.
    """
    start = time.perf_counter()
    scored, tuning = _split_public(public, value_range, images=images, generator=generator)
    perc = _perceptual(lpips, scored.shape)
    noisy_scored, noisy_tuning = _noisy_copies(scored, tuning, levels, generator)
    stds = torch.tensor([lv for lv in levels for _ in range(len(scored))], dtype=torch.float64)
    restored, chroma = _denoise(prior, torch.cat(noisy_scored), stds, config, generator)
    dm = restored.split(len(scored))
    rows: list[dict[str, Any]] = []
    knobs: dict[float, dict[str, Any]] = {}
    classical_mse: dict[float, dict[str, float]] = {}
    for i, level in enumerate(levels):
        knobs[level] = tune_classical(
            tuning, noisy_tuning[i], noise_std=level, score=mse, methods=tuple(CLASSICAL_GRIDS)
        )
        row, classical_mse[level] = _level_row(
            level, dm[i], noisy_scored[i], scored, knobs[level], perc=perc, lpips=lpips
        )
        if chroma is not None:
            row["chroma_dm"] = float(chroma.split(len(scored))[i].mean())
            if row["chroma_dm"] > COLOUR_TOLERANCE:
                row["verdict"] = "colour"
        rows.append(row)
    entry = _public_check(
        rows,
        perc=perc,
        levels=levels,
        images=len(scored),
        tuning=len(tuning),
        source=source,
        start=start,
    )
    return PublicFit(check=entry, knobs=knobs, classical_mse=classical_mse)


def _split_public(
    public: torch.Tensor,
    value_range: tuple[float, float],
    *,
    images: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Public images in [0, 1], drawn apart: ``images`` to score, others to tune the knobs on.

    At most one image is kept out of scoring; a single public image tunes the knobs too.
    """
    lo, hi = value_range
    x = ((torch.as_tensor(public).detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    n = x.shape[0]
    order = torch.randperm(n, generator=generator)
    n_score = min(images, max(1, n - 1))
    scored = x[order[:n_score]]
    tuning = x[order[n_score : n_score + min(MAX_TUNING_IMAGES, max(1, n_score // 2))]]
    if tuning.shape[0] == 0:  # a single public image: tune on it too (said in the detail)
        tuning = scored
    return scored, tuning


def _noisy_copies(
    scored: torch.Tensor,
    tuning: torch.Tensor,
    levels: Sequence[float],
    generator: torch.Generator,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Both image sets with Gaussian noise at each level (drawn level by level, scored first)."""
    noisy_scored, noisy_tuning = [], []
    for level in levels:
        noisy_scored.append(scored + level * torch.randn(scored.shape, generator=generator))
        noisy_tuning.append(tuning + level * torch.randn(tuning.shape, generator=generator))
    return noisy_scored, noisy_tuning


def _level_row(
    level: float,
    dm: torch.Tensor,
    noisy: torch.Tensor,
    clean: torch.Tensor,
    knobs: dict[str, Any],
    *,
    perc: str,
    lpips: LPIPS | None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """One level: the prior against the best classical method at MSE and at the perceptual metric.

    The best classical method at each metric is the one with the best mean; the prior wins or
    loses a metric by the paired per-image differences (:func:`_side`).

    Returns:
        ``(row, classical MSE per method)``; the row holds the prior's and the best classical
        means, which method was best at each, and the verdict (:func:`_decided`).
    """
    outputs = {
        method: classical_denoise(noisy, method=method, noise_std=level, knob=knob)
        for method, knob in knobs.items()
    }
    names = list(outputs)
    mses = [mse(o, clean) for o in outputs.values()]
    percs = _score(perc, [dm, *outputs.values()], clean, lpips)
    hib = perc == "ssim"
    best_mse = min(range(len(names)), key=lambda k: float(mses[k].mean()))
    means = [float(v.mean()) for v in percs[1:]]
    best_perc = (max if hib else min)(range(len(names)), key=lambda k: means[k])
    mse_dm = mse(dm, clean)
    perc_diff = percs[0] - percs[1 + best_perc]
    row = {
        "level": level,
        "mse_dm": float(mse_dm.mean()),
        "mse_classical": float(mses[best_mse].mean()),
        "classical_mse_method": names[best_mse],
        f"{perc}_dm": float(percs[0].mean()),
        f"{perc}_classical": means[best_perc],
        f"classical_{perc}_method": names[best_perc],
    }
    row["verdict"] = _decided(
        _side(mse_dm - mses[best_mse]), _side(-perc_diff if hib else perc_diff)
    )
    return row, {n: float(m.mean()) for n, m in zip(names, mses)}


def _public_check(
    rows: list[dict[str, Any]],
    *,
    perc: str,
    levels: Sequence[float],
    images: int,
    tuning: int,
    source: str,
    start: float,
) -> dict[str, Any]:
    """The ``prior_fit`` entry: ``pass`` when the prior is faithful at every level, else ``warn``."""
    label = _LABELS[perc]
    parts = [
        f"std {r['level']:g}: MSE {r['mse_dm']:.4f} vs {r['mse_classical']:.4f}, {label} "
        f"{r[f'{perc}_dm']:.3f} vs {r[f'{perc}_classical']:.3f}"
        for r in rows
    ]
    head = (
        f"{images} {source} with synthetic noise, restored by the prior vs the best classical "
        f"denoiser (TV, wavelet, NLM; knobs tuned for MSE on {tuning} other public "
        f"images): " + "; ".join(parts)
    )
    bad = [r for r in rows if r["verdict"] is not None]
    values = dict(
        value=1.0 - len(bad) / len(rows),
        fit="faithful" if not bad else "unfaithful",
        levels=list(levels),
        images=images,
        perceptual=perc,
        mse_dm=[r["mse_dm"] for r in rows],
        mse_classical=[r["mse_classical"] for r in rows],
        **{f"{perc}_dm": [r[f"{perc}_dm"] for r in rows]},
        **{f"{perc}_classical": [r[f"{perc}_classical"] for r in rows]},
        verdicts=[r["verdict"] or "faithful" for r in rows],
        seconds=time.perf_counter() - start,
    )
    if any("chroma_dm" in r for r in rows):
        values["chroma_dm"] = [r.get("chroma_dm") for r in rows]
    if not bad:
        return check(
            "prior_fit",
            "pass",
            head + ". The prior beats classical denoising at MSE and " + label + " at every "
            f"level (each by more than {DECISION_SE:g} standard errors of the paired "
            "differences): on data like these public images its reconstructions add "
            "information.",
            **values,
        )
    return check(
        "prior_fit",
        "warn",
        head + ". The prior does not fit these images: " + _unfaithful_levels(bad, label) + ". "
        "Its DM reconstructions may show the prior rather than the data; read the raw readouts "
        "and the metrics, or use a prior trained on images like yours (dmaudit train-prior).",
        **values,
    )


#: Per verdict, what it means at the listed levels (``{label}``: LPIPS or SSIM).
_LEVEL_WORDS = {
    "hallucination": "its MSE is worse while its {label} is better, the signature of "
    "hallucination: it paints detail the images do not have",
    "loses": "it loses to classical denoising at both MSE and {label}",
    "mixed": "its MSE is better but its {label} worse: it smooths and adds no detail",
    "undecided": "it is not clearly better than classical denoising at MSE or {label} over "
    "these images (more public images, prior_fit_public, would decide)",
    "colour": "it paints colour onto these grey images (their restorations' channels differ; "
    "a faithful restoration of a grey image is grey): it models colour photos, not these images",
}


def _unfaithful_levels(bad: list[dict[str, Any]], label: str) -> str:
    """Where the prior hallucinated, lost, smoothed, was undecided or added colour, in words."""
    why = []
    for verdict, words in _LEVEL_WORDS.items():
        levels = [r["level"] for r in bad if r["verdict"] == verdict]
        if levels:
            why.append(
                f"at std {', '.join(f'{lv:g}' for lv in levels)} " + words.format(label=label)
            )
    return "; ".join(why)


def audit_fit(
    scored,
    prior,
    *,
    config,
    lpips: LPIPS | None,
    generator: torch.Generator,
    public: PublicFit | None = None,
    images: int = 4,
) -> AuditFit | None:
    """Re-noise the clean readouts of a few lone images and restore them (see the module).

    Args:
        scored: the audit's :class:`~opacus_dmaudit.scoring.ScoredStep`.
        prior: the prior the audit used.
        config: the auditor's configuration (sampler settings).
        lpips: the LPIPS model, or ``None`` to use SSIM as the perceptual metric.
        generator: the auditor's own generator (the re-noising draws).
        public: the attach-time fit, whose tuned knobs the classical denoiser uses (untuned
            wavelet shrinkage without it).
        images: at most this many lone images are re-noised, spread over the audit's noise
            levels; every scored image gets the flag of the fitted image nearest its noise std.

    Returns:
        An :class:`AuditFit`, or ``None`` when the audit has no lone image with a finite noise std.
    """
    start = time.perf_counter()
    rows = [i for i, t in enumerate(scored.truth_index) if t is not None]  # rows of scored.clean
    lone = _lone_rows(scored, rows)
    if not lone or images < 1:
        return None
    lone = _spread(lone, images)
    clean = scored.clean[[j for j, _, _ in lone]].float()
    stds = torch.tensor([s for _, _, s in lone], dtype=torch.float64)
    perc = _perceptual(lpips, clean.shape)
    fit = public if public is not None else PublicFit(check={})
    measures = _measure_restorations(
        clean, stds, prior, fit, perc=perc, config=config, lpips=lpips, generator=generator
    )
    per_image = [
        (float(stds[k]), row, _faithful_at(measures, k, perc)) for k, (_, row, _) in enumerate(lone)
    ]
    flags = _fit_flags(scored, rows, per_image, measures)
    summary = {
        "images": len(per_image),
        "noise_std": float(stds.median()),
        "faithful_share": sum(ok for _, _, ok in per_image) / len(per_image),
        **{key: float(values.mean()) for key, values in measures.items()},
    }
    entry = _audit_check(
        summary,
        perc=perc,
        method=fit.per_audit_denoiser(float(stds.median()))[0],
        tuned=public is not None and bool(public.knobs),
        faithful_count=sum(ok for _, _, ok in per_image),
        start=start,
    )
    return AuditFit(check=entry, summary=summary, flags=flags)


def _lone_rows(scored, rows: list[int]) -> list[tuple[int, int, float]]:
    """``(index into scored.clean, image row, noise std)`` of the lone, uncollided images with a
    finite noise std, by increasing noise std."""
    lone = []
    for j, row in enumerate(rows):
        image = scored.images[row]
        std = image.get("noise_std", math.nan)
        if image.get("true_count") == 1 and not image.get("collision") and math.isfinite(std):
            lone.append((j, row, std))
    return sorted(lone, key=lambda item: item[2])


def _spread(lone: list, images: int) -> list:
    """At most ``images`` of ``lone`` (sorted by noise), at evenly spaced ranks."""
    if len(lone) <= images:
        return lone
    picks = torch.linspace(0, len(lone) - 1, images).round().long().unique().tolist()
    return [lone[k] for k in picks]


def _measure_restorations(
    clean: torch.Tensor,
    stds: torch.Tensor,
    prior,
    fit: PublicFit,
    *,
    perc: str,
    config,
    lpips: LPIPS | None,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Re-noise ``clean`` at ``stds``, restore it with the prior and the classical denoiser.

    Returns:
        Per image: ``mse_dm``, ``mse_classical``, ``<perc>_dm``, ``<perc>_classical`` (and
        ``chroma_dm`` for grey images through a colour prior).
    """
    noisy = clean + stds.float().view(-1, 1, 1, 1) * torch.randn(clean.shape, generator=generator)
    dm, chroma = _denoise(prior, noisy, stds, config, generator)
    classical = []
    for k, s in enumerate(stds.tolist()):
        method, knob = fit.per_audit_denoiser(s)
        classical.append(classical_denoise(noisy[k : k + 1], method=method, noise_std=s, knob=knob))
    classical = torch.cat(classical)
    perc_dm, perc_cl = _score(perc, [dm, classical], clean, lpips)
    out = {
        "mse_dm": mse(dm, clean),
        "mse_classical": mse(classical, clean),
        f"{perc}_dm": perc_dm,
        f"{perc}_classical": perc_cl,
    }
    if chroma is not None:
        out["chroma_dm"] = chroma
    return out


def _faithful_at(measures: dict[str, torch.Tensor], k: int, perc: str) -> bool:
    """:func:`faithful` for image ``k`` of :func:`_measure_restorations`' measures (and no
    colour painted onto a grey image)."""
    if "chroma_dm" in measures and float(measures["chroma_dm"][k]) > COLOUR_TOLERANCE:
        return False
    return faithful(
        float(measures["mse_dm"][k]),
        float(measures["mse_classical"][k]),
        float(measures[f"{perc}_dm"][k]),
        float(measures[f"{perc}_classical"][k]),
        higher_is_better=perc == "ssim",
    )


def _fit_flags(
    scored,
    rows: list[int],
    per_image: list[tuple[float, int, bool]],
    measures: dict[str, torch.Tensor],
) -> dict[int, dict[str, Any]]:
    """Per image row, ``dm_faithful`` and the bin of the fitted image that decided it.

    The fitted images carry their measures too (``fit_<measure>``); every other scored image
    with a finite noise std takes the flag of the fitted image nearest in noise std.
    """
    flags: dict[int, dict[str, Any]] = {}
    for k, (_, row, ok) in enumerate(per_image):
        flags[row] = {
            "dm_faithful": ok,
            "dm_fit_bin": scored.images[row].get("bin"),
            **{f"fit_{key}": float(values[k]) for key, values in measures.items()},
        }
    for row in rows:
        if row in flags:
            continue
        s = scored.images[row].get("noise_std", math.nan)
        if not math.isfinite(s):
            continue
        _, near, ok = min(per_image, key=lambda p: abs(p[0] - s))
        flags[row] = {"dm_faithful": ok, "dm_fit_bin": scored.images[near].get("bin")}
    return flags


#: What a per-audit ``warn`` adds, per :func:`_verdict` (``{label}``: LPIPS or SSIM).
_AUDIT_WARNINGS = {
    "hallucination": ": worse MSE but better {label}, the signature of hallucination. At this "
    "noise level the DM reconstructions show what the prior expects, not necessarily "
    "the image; DM panels of unfaithful images are marked.",
    "loses": ": the prior loses to classical denoising at MSE and {label} on this data at this "
    "noise level; its DM reconstructions are no evidence of leakage beyond the raw readout.",
    "mixed": ": better MSE but worse {label}: the prior smooths like a classical denoiser and "
    "adds no detail at this noise level.",
    "colour": ": the prior paints colour onto these grey images (mean channel spread {chroma} "
    "against at most {tolerance}): it models colour photos, not these images, and its DM "
    "reconstructions show what it expects.",
    "unknown": ": the prior beat an untuned classical denoiser, but without public images to "
    "tune one the fit is unknown (AuditConfig.public).",
}


def _audit_check(
    summary: dict[str, Any],
    *,
    perc: str,
    method: str,
    tuned: bool,
    faithful_count: int,
    start: float,
) -> dict[str, Any]:
    """The ``prior_fit_audit`` entry from the means of :func:`audit_fit`'s summary."""
    label = _LABELS[perc]
    verdict = _verdict(
        summary["mse_dm"],
        summary["mse_classical"],
        summary[f"{perc}_dm"],
        summary[f"{perc}_classical"],
        higher_is_better=perc == "ssim",
    )
    if summary.get("chroma_dm", 0.0) > COLOUR_TOLERANCE:
        verdict = "colour"
    elif verdict is None and not tuned:
        verdict = "unknown"
    head = (
        f"{summary['images']} lone images of this audit, their clean readouts re-noised at their "
        f"noise std (median {summary['noise_std']:.3g}): prior MSE {summary['mse_dm']:.4f} vs "
        f"{summary['mse_classical']:.4f} for classical denoising ({method}"
        f"{'' if tuned else ', untuned'}), {label} "
        f"{summary[f'{perc}_dm']:.3f} vs {summary[f'{perc}_classical']:.3f}; faithful on "
        f"{faithful_count} of {summary['images']}"
    )
    values = dict(
        value=summary["faithful_share"],
        **summary,
        perceptual=perc,
        classical=method,
        seconds=time.perf_counter() - start,
    )
    if verdict is None:
        return check("prior_fit_audit", "pass", head + ".", **values)
    tail = _AUDIT_WARNINGS[verdict].format(
        label=label,
        chroma=f"{summary.get('chroma_dm', 0.0):.3g}",
        tolerance=f"{COLOUR_TOLERANCE:.3g}",
    )
    values["fit"] = verdict
    return check("prior_fit_audit", "warn", head + tail, **values)
