"""The auditor's configuration: one validated object shared by ``DMAuditor`` and the callbacks.

Every setting is checked when the object is built, so a misspelt keyword or a bad value fails at
construction (``DMAuditCallback(every_n_step=5)`` included), never at the first audit.
"""

from __future__ import annotations

import difflib
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .schema import HIGHER_IS_BETTER, METRICS

__all__ = ["AuditConfig", "DEFAULT_SUCCESS_THRESHOLDS", "SAMPLER_NAMES", "EXISTING_POLICIES"]

#: A reconstruction "succeeds" at LPIPS <= 0.1 (SSIM >= 0.7, PSNR >= 20 dB, MSE <= 0.01) by default.
DEFAULT_SUCCESS_THRESHOLDS = {"lpips": 0.1, "ssim": 0.7, "psnr": 20.0, "mse": 0.01}

#: The prior's samplers (see :mod:`.prior`); kept here so the configuration needs no diffusers.
SAMPLER_NAMES = ("ddim", "ddim-every-step", "ancestral", "posterior-mean")

#: What to do when ``log_dir`` already holds an audit and the run is not a resume.
EXISTING_POLICIES = ("error", "overwrite")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """Everything that decides what an audit computes and writes.

    Args:
        every_n_steps: audit every N-th optimizer step (steps are counted from 1).
        delta: δ for ε.
        metrics: any of ``"mse"``, ``"psnr"``, ``"ssim"``, ``"lpips"``.
        lpips_net: LPIPS backbone, ``"vgg"`` (the paper's choice; the default success threshold
            was chosen for it) or ``"alex"``.
        false_bins_per_audit: the occupancy test's false-positive budget: the expected number of
            empty bins wrongly reported as holding an image, per audit (per-bin level
            ``false_bins_per_audit / num_bins``).
        occupancy_z: use the older bias-only test (``|Δb| / σC > occupancy_z``) instead of the
            whole-row test; ``None`` (default) for the whole-row test.
        max_images: score at most this many recovered images per audit (``None``: all).
        prior: a :class:`~opacus_dmaudit.DiffusionPrior`, a name for
            :meth:`~opacus_dmaudit.DiffusionPrior.from_pretrained` (``"embedded:mnist"``, a
            local directory, a hub id), or ``None`` for no DM reconstruction.
        sampler: the prior's sampler: ``"ddim"`` (DDIM η = 0 on a coarse grid, default),
            ``"ddim-every-step"`` (the paper's Algorithm 1: DDIM η = 0 at every timestep from t*),
            ``"ancestral"`` (DDPM ancestral sampling at every timestep) or ``"posterior-mean"``.
        sampler_steps: the most DDIM steps from the matched timestep ``t*`` (``"ddim"`` only).
        sampler_min_stride: fewest timesteps one DDIM step spans (``"ddim"`` only).
        success_metric: the metric that decides whether a reconstruction succeeded (default:
            ``"lpips"`` if computed, else SSIM, PSNR or MSE).
        success_threshold: the threshold of that metric (default: ``DEFAULT_SUCCESS_THRESHOLDS``).
        kappa: baseline success rate κ of the ReRo bounds; ``None``: the larger of the measured
            baseline κ̂ (needs ``public``) and ``1/N``.
        public: public images ``(N, C, H, W)`` in the block's value range (never training data):
            the prior-fit check and the measured baseline κ̂ use them. ``None``: the images given
            to ``ImprintBlock.calibrate`` when the block kept them, else none.
        shadow: without an ``ImprintBlock`` in the model, simulate the worst-case imprint
            adversary on the real batch at this run's mechanism (see :mod:`.shadow`): ``True``
            (128 sparse bins, calibrated on ``public`` when given) or a
            :class:`~opacus_dmaudit.shadow.ShadowAdversary` for another geometry.
        mechanism_checks: check the DP mechanism (noise, clipping, sampling, accountant) at every
            audit.
        strict: raise :class:`~opacus_dmaudit.checks.AuditCheckFailed` on a failed check instead
            of only recording it.
        background: score audits in a background worker (off the training path); results are
            written in step order as they complete, and :meth:`~DMAuditor.close` drains them.
        prior_fit_public: public images the prior restores per noise level in the prior-fit
            check at attach (see :mod:`.prior_fit`; 0 skips it).
        prior_fit_audit: lone images per audit whose clean readouts are re-noised and restored
            by the prior to measure its fit on this data (0 skips it).
        tensorboard: write TensorBoard events (ignored when a ``writer`` is given).
        save_images: keep each audit's truth, raw and DM images (uint8 ``.npz``, owner-only).
        report: write ``report.json`` and ``report.html`` at ``close()``.
        existing: when ``log_dir`` already holds an audit and the run is not a resume:
            ``"error"`` (default; refuse) or ``"overwrite"`` (delete the auditor's own files there).
        seed: seed of the auditor's own generator (never the global RNG).
    """

    every_n_steps: int = 50
    delta: float = 1e-5
    metrics: tuple[str, ...] = ("mse", "psnr", "ssim", "lpips")
    lpips_net: str = "vgg"
    false_bins_per_audit: float = 0.01
    occupancy_z: float | None = None
    max_images: int | None = None
    prior: Any = None
    sampler: str = "ddim"
    sampler_steps: int = 20
    sampler_min_stride: int = 20
    success_metric: str | None = None
    success_threshold: float | None = None
    kappa: float | None = None
    public: Any = field(default=None, repr=False)
    shadow: Any = False
    mechanism_checks: bool = True
    strict: bool = False
    background: bool = False
    prior_fit_public: int = 8
    prior_fit_audit: int = 4
    tensorboard: bool = True
    save_images: bool = True
    report: bool = True
    existing: str = "error"
    seed: int = 0

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        _positive_int("every_n_steps", self.every_n_steps)
        if not 0 < float(self.delta) < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if isinstance(self.metrics, str):
            raise ValueError(
                f"metrics must be a sequence of names, got the string {self.metrics!r}"
            )
        metrics = tuple(self.metrics)
        unknown = set(metrics) - set(METRICS)
        if unknown or not metrics:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {sorted(METRICS)}")
        set_("metrics", metrics)
        if self.lpips_net not in ("vgg", "alex"):
            raise ValueError(f"lpips_net must be 'vgg' or 'alex', got {self.lpips_net!r}")
        if not 0 < float(self.false_bins_per_audit) < 1:
            raise ValueError(
                f"false_bins_per_audit must be in (0, 1), got {self.false_bins_per_audit}"
            )
        if self.occupancy_z is not None and not float(self.occupancy_z) > 0:
            raise ValueError(f"occupancy_z must be positive or None, got {self.occupancy_z}")
        if self.max_images is not None:
            _positive_int("max_images", self.max_images)
        if self.sampler == "ddpm":
            warnings.warn(
                "sampler='ddpm' is now called 'ancestral' (DDPM ancestral sampling); the paper's "
                "Algorithm 1 is 'ddim-every-step'",
                DeprecationWarning,
                stacklevel=4,
            )
            set_("sampler", "ancestral")
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"sampler must be one of {SAMPLER_NAMES}, got {self.sampler!r}")
        _positive_int("sampler_steps", self.sampler_steps)
        _positive_int("sampler_min_stride", self.sampler_min_stride)
        success_metric = self.success_metric
        if success_metric is None:  # LPIPS, the paper's perceptual criterion, when computed
            success_metric = next(m for m in ("lpips", "ssim", "psnr", "mse") if m in metrics)
        if success_metric not in metrics:
            raise ValueError(
                f"success_metric {success_metric!r} must be one of the metrics {metrics}"
            )
        set_("success_metric", success_metric)
        threshold = self.success_threshold
        if threshold is None:
            threshold = DEFAULT_SUCCESS_THRESHOLDS[success_metric]
        if not math.isfinite(float(threshold)):
            raise ValueError(f"success_threshold must be finite, got {threshold}")
        set_("success_threshold", float(threshold))
        if self.kappa is not None and not 0 < float(self.kappa) < 1:
            raise ValueError(f"kappa must be in (0, 1) or None, got {self.kappa}")
        if not isinstance(self.shadow, bool):
            from .capture.shadow import ShadowAdversary

            if not isinstance(self.shadow, ShadowAdversary):
                raise ValueError(
                    f"shadow must be True, False or a ShadowAdversary, got {self.shadow!r}"
                )
        for name in ("prior_fit_public", "prior_fit_audit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.existing not in EXISTING_POLICIES:
            raise ValueError(f"existing must be one of {EXISTING_POLICIES}, got {self.existing!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.public is not None:
            shape = getattr(self.public, "shape", None)
            if shape is None or len(shape) != 4 or shape[0] < 1:
                raise ValueError("public must be a (N, C, H, W) tensor of public images")
        if self.prior is not None and isinstance(self.prior, str | os.PathLike):
            from .reconstruct.prior import check_prior_name

            check_prior_name(self.prior)  # a path that looks local and is missing fails here

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], *, where: str = "DMAuditor") -> AuditConfig:
        """Build from keyword arguments; an unknown name raises ``TypeError`` with a suggestion."""
        names = [f.name for f in fields(cls)]
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"{where} got an unexpected keyword argument {key!r}{hint}")
        return cls(**kwargs)

    def replace(self, **changes: Any) -> AuditConfig:
        """A copy with some settings changed (validated again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return type(self).from_kwargs(values)

    # -- description ----------------------------------------------------------------------------
    @property
    def success_criterion(self) -> dict[str, Any]:
        return {
            "metric": self.success_metric,
            "threshold": self.success_threshold,
            "higher_is_better": HIGHER_IS_BETTER[self.success_metric],
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe settings for ``run.json``, reports and TensorBoard's hyper-parameters."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "prior":
                value = getattr(value, "source", None) or (None if value is None else str(value))
            elif f.name == "public":
                value = None if value is None else "x".join(str(int(s)) for s in value.shape)
            elif f.name == "metrics":
                value = ",".join(value)
            elif f.name == "shadow":
                value = bool(value)
            out[f.name] = value
        if self.prior is None:
            for name in ("sampler", "sampler_steps", "sampler_min_stride"):
                out[name] = None
        return out
