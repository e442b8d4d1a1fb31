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
rewards it); worse at both means the prior does not fit the data. Either gives a ``"warn"``
check entry (never ``"fail"``: the raw readout and the metrics stay valid), and DM panels of
images where the prior was unfaithful are marked in the report.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..reconstruct.classical import CLASSICAL_GRIDS, classical_denoise
from ..score.metrics import LPIPS, mse, ssim
from .entries import check

__all__ = [
    "FIT_LEVELS",
    "PublicFit",
    "AuditFit",
    "public_fit",
    "audit_fit",
    "faithful",
]

logger = logging.getLogger(__name__)

#: Noise stds (in [0, 1] pixel units) at which :func:`public_fit` restores public images.
FIT_LEVELS = (0.1, 0.2, 0.4)

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
    """``None`` when faithful, else ``"hallucination"`` or ``"loses"``."""
    if faithful(mse_dm, mse_cl, perc_dm, perc_cl, higher_is_better=higher_is_better):
        return None
    perc_better = perc_dm > perc_cl if higher_is_better else perc_dm < perc_cl
    return "hallucination" if mse_dm > mse_cl and perc_better else "loses"


def _perceptual(lpips: LPIPS | None, shape: Sequence[int]) -> str:
    return "lpips" if lpips is not None and min(shape[-2:]) >= 16 else "ssim"


def _score(name: str, preds: list[torch.Tensor], target: torch.Tensor, lpips) -> list[torch.Tensor]:
    if name == "lpips":
        return lpips.compare(preds, target)
    return [ssim(p, target) for p in preds]


def _denoise(prior, images, noise_std, config, generator) -> torch.Tensor:
    return prior.denoise(
        images,
        noise_std=noise_std,
        sampler=config.sampler,
        steps=config.sampler_steps,
        min_stride=config.sampler_min_stride,
        generator=generator,
    )


def public_fit(
    public: torch.Tensor,
    prior,
    *,
    config,
    lpips: LPIPS | None,
    generator: torch.Generator,
    value_range: tuple[float, float] = (0.0, 1.0),
    images: int = 8,
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
        A :class:`PublicFit` whose check is ``"warn"`` at any level where the prior loses to
        the best classical denoiser or shows the hallucination signature, else ``"pass"``.
    """
    start = time.perf_counter()
    lo, hi = value_range
    x = ((torch.as_tensor(public).detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    n = x.shape[0]
    order = torch.randperm(n, generator=generator)
    n_score = min(images, max(1, n - 1))
    scored = x[order[:n_score]]
    tuning = x[order[n_score : n_score + min(MAX_TUNING_IMAGES, max(1, n_score // 2))]]
    if tuning.shape[0] == 0:  # a single public image: tune on it too (said in the detail)
        tuning = scored
    perc = _perceptual(lpips, x.shape)
    hib = perc == "ssim"
    noisy_scored, noisy_tuning = [], []
    for level in levels:
        noisy_scored.append(scored + level * torch.randn(scored.shape, generator=generator))
        noisy_tuning.append(tuning + level * torch.randn(tuning.shape, generator=generator))
    stds = torch.tensor([lv for lv in levels for _ in range(n_score)], dtype=torch.float64)
    dm_all = _denoise(prior, torch.cat(noisy_scored), stds, config, generator)
    rows: list[dict[str, Any]] = []
    knobs: dict[float, dict[str, Any]] = {}
    classical_mse: dict[float, dict[str, float]] = {}
    for i, level in enumerate(levels):
        dm = dm_all[i * n_score : (i + 1) * n_score]
        knobs[level], outputs = {}, {}
        for method in CLASSICAL_GRIDS:
            best = min(
                CLASSICAL_GRIDS[method],
                key=lambda knob: float(
                    mse(
                        classical_denoise(
                            noisy_tuning[i], method=method, noise_std=level, knob=knob
                        ),
                        tuning,
                    ).mean()
                ),
            )
            knobs[level][method] = best
            outputs[method] = classical_denoise(
                noisy_scored[i], method=method, noise_std=level, knob=best
            )
        names = list(outputs)
        mses = [float(mse(o, scored).mean()) for o in outputs.values()]
        percs = [float(v.mean()) for v in _score(perc, [dm, *outputs.values()], scored, lpips)]
        classical_mse[level] = dict(zip(names, mses))
        perc_dm, perc_cl = percs[0], percs[1:]
        best_perc = max(perc_cl) if hib else min(perc_cl)
        row = {
            "level": level,
            "mse_dm": float(mse(dm, scored).mean()),
            "mse_classical": min(mses),
            "classical_mse_method": names[mses.index(min(mses))],
            f"{perc}_dm": perc_dm,
            f"{perc}_classical": best_perc,
            f"classical_{perc}_method": names[perc_cl.index(best_perc)],
        }
        row["verdict"] = _verdict(
            row["mse_dm"], row["mse_classical"], perc_dm, best_perc, higher_is_better=hib
        )
        rows.append(row)
    bad = [r for r in rows if r["verdict"] is not None]
    label = "LPIPS" if perc == "lpips" else "SSIM"
    parts = [
        f"std {r['level']:g}: MSE {r['mse_dm']:.4f} vs {r['mse_classical']:.4f}, {label} "
        f"{r[f'{perc}_dm']:.3f} vs {r[f'{perc}_classical']:.3f}"
        for r in rows
    ]
    head = (
        f"{n_score} {source} with synthetic noise, restored by the prior vs the best classical "
        f"denoiser (TV, wavelet, NLM; knobs tuned for MSE on {tuning.shape[0]} other public "
        f"images): " + "; ".join(parts)
    )
    values = dict(
        value=1.0 - len(bad) / len(rows),
        levels=list(levels),
        images=n_score,
        perceptual=perc,
        mse_dm=[r["mse_dm"] for r in rows],
        mse_classical=[r["mse_classical"] for r in rows],
        **{f"{perc}_dm": [r[f"{perc}_dm"] for r in rows]},
        **{f"{perc}_classical": [r[f"{perc}_classical"] for r in rows]},
        verdicts=[r["verdict"] or "faithful" for r in rows],
        seconds=time.perf_counter() - start,
    )
    if not bad:
        entry = check(
            "prior_fit",
            "pass",
            head + ". The prior beats classical denoising at MSE and " + label + " at every "
            "level: on data like these public images its reconstructions add information.",
            **values,
        )
    else:
        why = []
        halluc = [r["level"] for r in bad if r["verdict"] == "hallucination"]
        loses = [r["level"] for r in bad if r["verdict"] == "loses"]
        if halluc:
            why.append(
                f"at std {', '.join(f'{lv:g}' for lv in halluc)} its MSE is worse while its "
                f"{label} is better, the signature of hallucination: it paints detail the images "
                "do not have"
            )
        if loses:
            why.append(
                f"at std {', '.join(f'{lv:g}' for lv in loses)} it loses to classical denoising"
            )
        entry = check(
            "prior_fit",
            "warn",
            head + ". The prior does not fit these images: " + "; ".join(why) + ". Its DM "
            "reconstructions may show the prior rather than the data; read the raw readouts "
            "and the metrics, or use a prior trained on images like yours (dmaudit "
            "train-prior).",
            **values,
        )
    return PublicFit(check=entry, knobs=knobs, classical_mse=classical_mse)


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
    lone = [
        (j, row)
        for j, row in enumerate(rows)
        if scored.images[row].get("true_count") == 1
        and not scored.images[row].get("collision")
        and math.isfinite(scored.images[row].get("noise_std", math.nan))
    ]
    if not lone or images < 1:
        return None
    lone.sort(key=lambda jr: scored.images[jr[1]]["noise_std"])
    if len(lone) > images:  # spread over the noise levels: evenly spaced ranks
        picks = torch.linspace(0, len(lone) - 1, images).round().long().unique().tolist()
        lone = [lone[k] for k in picks]
    clean = scored.clean[[j for j, _ in lone]].float()
    stds = torch.tensor([scored.images[row]["noise_std"] for _, row in lone], dtype=torch.float64)
    noisy = clean + stds.float().view(-1, 1, 1, 1) * torch.randn(clean.shape, generator=generator)
    dm = _denoise(prior, noisy, stds, config, generator)
    fit = public if public is not None else PublicFit(check={})
    classical = torch.cat(
        [
            classical_denoise(
                noisy[k : k + 1],
                method=fit.per_audit_denoiser(float(s))[0],
                noise_std=float(s),
                knob=fit.per_audit_denoiser(float(s))[1],
            )
            for k, s in enumerate(stds)
        ]
    )
    perc = _perceptual(lpips, clean.shape)
    hib = perc == "ssim"
    mse_dm, mse_cl = mse(dm, clean), mse(classical, clean)
    perc_dm, perc_cl = _score(perc, [dm, classical], clean, lpips)
    per_image = []
    for k, (_, row) in enumerate(lone):
        ok = faithful(
            float(mse_dm[k]),
            float(mse_cl[k]),
            float(perc_dm[k]),
            float(perc_cl[k]),
            higher_is_better=hib,
        )
        per_image.append((float(stds[k]), row, ok))
    flags: dict[int, dict[str, Any]] = {}
    for k, (_, row, ok) in enumerate(per_image):
        flags[row] = {
            "dm_faithful": ok,
            "dm_fit_bin": scored.images[row].get("bin"),
            "fit_mse_dm": float(mse_dm[k]),
            "fit_mse_classical": float(mse_cl[k]),
            f"fit_{perc}_dm": float(perc_dm[k]),
            f"fit_{perc}_classical": float(perc_cl[k]),
        }
    for row in rows:  # the others: the fitted image nearest in noise std speaks for them
        if row in flags:
            continue
        s = scored.images[row].get("noise_std", math.nan)
        if not math.isfinite(s):
            continue
        _, near, ok = min(per_image, key=lambda p: abs(p[0] - s))
        flags[row] = {"dm_faithful": ok, "dm_fit_bin": scored.images[near].get("bin")}
    share = sum(ok for _, _, ok in per_image) / len(per_image)
    means = {
        "mse_dm": float(mse_dm.mean()),
        "mse_classical": float(mse_cl.mean()),
        f"{perc}_dm": float(perc_dm.mean()),
        f"{perc}_classical": float(perc_cl.mean()),
    }
    summary = {
        "images": len(per_image),
        "noise_std": float(stds.median()),
        "faithful_share": share,
        **means,
    }
    verdict = _verdict(
        means["mse_dm"],
        means["mse_classical"],
        means[f"{perc}_dm"],
        means[f"{perc}_classical"],
        higher_is_better=hib,
    )
    label = "LPIPS" if perc == "lpips" else "SSIM"
    method = fit.per_audit_denoiser(float(stds.median()))[0]
    head = (
        f"{len(per_image)} lone images of this audit, their clean readouts re-noised at their "
        f"noise std (median {float(stds.median()):.3g}): prior MSE {means['mse_dm']:.4f} vs "
        f"{means['mse_classical']:.4f} for classical denoising ({method}"
        f"{'' if public is not None and public.knobs else ', untuned'}), {label} "
        f"{means[f'{perc}_dm']:.3f} vs {means[f'{perc}_classical']:.3f}; faithful on "
        f"{sum(ok for _, _, ok in per_image)} of {len(per_image)}"
    )
    values = dict(
        value=share,
        **summary,
        perceptual=perc,
        classical=method,
        seconds=time.perf_counter() - start,
    )
    if verdict is None:
        entry = check("prior_fit_audit", "pass", head + ".", **values)
    elif verdict == "hallucination":
        entry = check(
            "prior_fit_audit",
            "warn",
            head + f": worse MSE but better {label}, the signature of hallucination. At this "
            "noise level the DM reconstructions show what the prior expects, not necessarily "
            "the image; DM panels of unfaithful images are marked.",
            **values,
        )
    else:
        entry = check(
            "prior_fit_audit",
            "warn",
            head + ": the prior loses to classical denoising on this data at this noise level; "
            "its DM reconstructions are no evidence of leakage beyond the raw readout.",
            **values,
        )
    return AuditFit(check=entry, summary=summary, flags=flags)
