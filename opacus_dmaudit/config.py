"""The auditor's configuration: one validated object shared by ``DMAuditor`` and the callbacks.

Every setting is checked when the object is built, so a misspelt keyword or a bad value fails at
construction (``DMAuditCallback(every_n_step=5)`` included), never at the first audit.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .reconstruct.sampler import SAMPLERS, SamplerSettings
from .record import SuccessCriterion
from .schema import METRICS, SUCCESS_PREFERENCE

__all__ = [
    "AuditConfig",
    "SamplerSettings",
    "resolve_config",
    "DEFAULT_SUCCESS_THRESHOLDS",
    "SAMPLER_NAMES",
    "EXISTING_POLICIES",
]

#: A reconstruction "succeeds" at LPIPS <= 0.1 (SSIM >= 0.7, PSNR >= 20 dB, MSE <= 0.01) by default.
DEFAULT_SUCCESS_THRESHOLDS = {name: m.default_threshold for name, m in METRICS.items()}

#: The prior's samplers (release 0.1's name of ``reconstruct.sampler.SAMPLERS``).
SAMPLER_NAMES = SAMPLERS

#: What to do when ``log_dir`` already holds an audit and the run is not a resume.
EXISTING_POLICIES = ("error", "overwrite")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _probability(name: str, value: Any, *, what: str = "in (0, 1)") -> float:
    """``value`` as a float strictly between 0 and 1 (a number, never a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """Everything that decides what an audit computes and writes (the expert path).

    ``DMAuditor(config=AuditConfig(...))`` takes it whole; ``DMAuditor``'s own keywords set the
    essentials. Every setting is checked when the object is built.

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
        sampler: the prior's sampler, a
            :class:`~opacus_dmaudit.reconstruct.sampler.SamplerSettings` or a sampler's name
            (``"ddim"``, ``"ddim-every-step"``, ``"ancestral"``, ``"posterior-mean"``).
        success_metric: the metric that decides whether a reconstruction succeeded (default:
            the first of ``schema.SUCCESS_PREFERENCE`` that is computed, LPIPS first).
        success_threshold: the threshold of that metric (default: the metric's
            ``default_threshold`` in ``schema.METRICS``).
        kappa: baseline success rate κ of the ReRo bounds; ``None``: the larger of the measured
            baseline κ̂ (needs ``public``) and ``1/N``.
        public: public images ``(N, C, H, W)`` in the block's value range (never training data):
            the prior-fit check and the measured baseline κ̂ use them. ``None``: the images given
            to ``ImprintBlock.calibrate`` when the block kept them, else none.
        shadow: without an ``ImprintBlock`` in the model, simulate the worst-case imprint
            adversary on the real batch at this run's mechanism (see
            :mod:`~opacus_dmaudit.capture.shadow`): ``True`` or a
            :class:`~opacus_dmaudit.ShadowAdversary` for another geometry.
        mechanism_checks: check the DP mechanism (noise, clipping, sampling, accountant) at every
            audit.
        strict: raise :class:`~opacus_dmaudit.AuditCheckFailed` on a failed check instead of
            only recording it.
        background: score audits in a background worker (off the training path); results are
            written in step order as they complete, and ``DMAuditor.close`` drains them.
        prior_fit_public: public images the prior restores per noise level in the prior-fit
            check at attach (see :mod:`~opacus_dmaudit.checks.prior_fit`; 0 skips it, and the
            fit is then unknown).
        prior_fit_audit: lone images per audit whose clean readouts are re-noised and restored
            by the prior to measure its fit on this data (0 skips it).
        tensorboard: write TensorBoard events (ignored when a ``writer`` is given).
        save_images: keep each audit's truth, raw and DM images (uint8 ``.npz``, owner-only).
        report: write ``report.json`` and ``report.html`` at ``close()``.
        existing: when ``log_dir`` already holds an audit and the run is not a resume:
            ``"error"`` (default; refuse) or ``"overwrite"`` (delete the auditor's own files there).
        seed: seed of the auditor's own generator (never the global RNG).

    Example:
        >>> config = AuditConfig(every_n_steps=20, prior="embedded:mnist", max_images=16)
        >>> config.replace(every_n_steps=50).every_n_steps
        50
    """

    every_n_steps: int = 50
    delta: float = 1e-5
    metrics: tuple[str, ...] = ("mse", "psnr", "ssim", "lpips")
    lpips_net: str = "vgg"
    false_bins_per_audit: float = 0.01
    occupancy_z: float | None = None
    max_images: int | None = None
    prior: Any = None
    sampler: SamplerSettings = SamplerSettings()
    success_metric: str | None = None
    success_threshold: float | None = None
    kappa: float | None = None
    public: Any = field(default=None, repr=False)
    shadow: Any = False
    mechanism_checks: bool = True
    strict: bool = False
    background: bool = False
    prior_fit_public: int = 16
    prior_fit_audit: int = 4
    tensorboard: bool = True
    save_images: bool = True
    report: bool = True
    existing: str = "error"
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int("every_n_steps", self.every_n_steps)
        self._set("delta", _probability("delta", self.delta))
        self._check_metrics()
        self._check_detection()
        if self.max_images is not None:
            _positive_int("max_images", self.max_images)
        self._set("sampler", SamplerSettings.of(self.sampler))
        self._check_success()
        self._check_inputs()
        for name in ("prior_fit_public", "prior_fit_audit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.existing not in EXISTING_POLICIES:
            raise ValueError(f"existing must be one of {EXISTING_POLICIES}, got {self.existing!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for name in (
            "mechanism_checks",
            "strict",
            "background",
            "tensorboard",
            "save_images",
            "report",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # the dataclass is frozen

    def _check_metrics(self) -> None:
        if isinstance(self.metrics, str):
            raise ValueError(
                f"metrics must be a sequence of names, got the string {self.metrics!r}"
            )
        metrics = tuple(self.metrics)
        unknown = set(metrics) - set(METRICS)
        if unknown or not metrics:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {sorted(METRICS)}")
        self._set("metrics", metrics)
        if self.lpips_net not in ("vgg", "alex"):
            raise ValueError(f"lpips_net must be 'vgg' or 'alex', got {self.lpips_net!r}")

    def _check_detection(self) -> None:
        self._set(
            "false_bins_per_audit", _probability("false_bins_per_audit", self.false_bins_per_audit)
        )
        z = self.occupancy_z
        if z is not None and (isinstance(z, bool) or not isinstance(z, int | float) or not z > 0):
            raise ValueError(f"occupancy_z must be positive or None, got {z!r}")

    def _check_success(self) -> None:
        # settings left unset are derived here, and derived again by ``replace``
        self._set(
            "_derived",
            frozenset(
                n for n in ("success_metric", "success_threshold") if getattr(self, n) is None
            ),
        )
        metric = self.success_metric
        if metric is None:
            metric = next(m for m in SUCCESS_PREFERENCE if m in self.metrics)
        if metric not in self.metrics:
            raise ValueError(f"success_metric {metric!r} must be one of the metrics {self.metrics}")
        self._set("success_metric", metric)
        threshold = self.success_threshold
        if threshold is None:
            threshold = METRICS[metric].default_threshold
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not math.isfinite(threshold)
        ):
            raise ValueError(f"success_threshold must be finite, got {threshold!r}")
        self._set("success_threshold", float(threshold))
        if self.kappa is not None:
            _probability("kappa", self.kappa, what="in (0, 1) or None")

    def _check_inputs(self) -> None:
        if not isinstance(self.shadow, bool):
            from .capture.shadow import ShadowAdversary

            if not isinstance(self.shadow, ShadowAdversary):
                raise ValueError(
                    f"shadow must be True, False or a ShadowAdversary, got {self.shadow!r}"
                )
        if self.public is not None:
            shape = getattr(self.public, "shape", None)
            if shape is None or len(shape) != 4 or shape[0] < 1:
                raise ValueError("public must be a (N, C, H, W) tensor of public images")
        if self.prior is not None and isinstance(self.prior, str | os.PathLike):
            from .reconstruct.prior import check_prior_name

            check_prior_name(self.prior)  # a path that looks local and is missing fails here

    # -- release 0.1's sampler knobs -------------------------------------------------------------
    @property
    def sampler_steps(self) -> int:
        return self.sampler.steps

    @property
    def sampler_min_stride(self) -> int:
        return self.sampler.min_stride

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], *, where: str = "DMAuditor") -> AuditConfig:
        """Build from keyword arguments; an unknown name raises ``TypeError`` with a suggestion."""
        kwargs = _legacy_sampler(kwargs)
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
        # a success metric or threshold derived from the old settings is derived again
        values.update(dict.fromkeys(getattr(self, "_derived", ())))
        values.update(changes)
        return type(self).from_kwargs(values)

    # -- description ----------------------------------------------------------------------------
    @property
    def success_criterion(self) -> SuccessCriterion:
        return SuccessCriterion(
            metric=self.success_metric,
            threshold=self.success_threshold,
            higher_is_better=METRICS[self.success_metric].higher_is_better,
        )

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
            elif f.name == "sampler":  # release 0.1's three keys, in its order
                out["sampler"] = value.name
                out["sampler_steps"] = value.steps
                out["sampler_min_stride"] = value.min_stride
                continue
            out[f.name] = value
        if self.prior is None:
            for name in ("sampler", "sampler_steps", "sampler_min_stride"):
                out[name] = None
        return out


def resolve_config(
    config: AuditConfig | None, *, where: str = "DMAuditor", **settings: Any
) -> AuditConfig:
    """``config`` (or the defaults) with ``settings`` on top; settings given as ``None`` are unset.

    The one way ``DMAuditor`` and both callbacks turn their keywords into a configuration: the
    essentials of their signatures and any other :class:`AuditConfig` field, validated here.
    """
    given = {k: v for k, v in settings.items() if v is not None}
    if config is None:
        return AuditConfig.from_kwargs(given, where=where)
    if not isinstance(config, AuditConfig):
        raise TypeError(f"{where}: config must be an AuditConfig, got {type(config).__name__}")
    return config.replace(**given) if given else config


def _legacy_sampler(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Release 0.1's ``sampler``/``sampler_steps``/``sampler_min_stride`` as one settings value."""
    kwargs = dict(kwargs)
    steps, stride = kwargs.pop("sampler_steps", None), kwargs.pop("sampler_min_stride", None)
    if steps is None and stride is None:
        return kwargs
    for name, value in (("sampler_steps", steps), ("sampler_min_stride", stride)):
        if value is not None:
            _positive_int(name, value)  # named as the caller spelt it
    base = SamplerSettings.of(kwargs.get("sampler", SamplerSettings()))
    kwargs["sampler"] = SamplerSettings(
        name=base.name,
        steps=base.steps if steps is None else steps,
        min_stride=base.min_stride if stride is None else stride,
    )
    return kwargs
