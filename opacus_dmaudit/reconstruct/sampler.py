"""How the prior samples: one settings value with one set of defaults.

:class:`SamplerSettings` is what :class:`~opacus_dmaudit.config.AuditConfig` holds, what the
auditor, the prior-fit check and :meth:`~opacus_dmaudit.DiffusionPrior.denoise` are given, and
what a record's ``denoiser`` describes. The samplers themselves are described in
:mod:`opacus_dmaudit.reconstruct.prior`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

__all__ = ["SamplerSettings", "SAMPLERS", "sampler_name"]

SAMPLERS = ("ddim", "ddim-every-step", "ancestral", "posterior-mean")

#: The sampler's old name: ``"ddpm"`` was the ancestral sampler.
_RENAMED = {"ddpm": "ancestral"}


def sampler_name(sampler: str, *, stacklevel: int = 4) -> str:
    """The sampler's current name (``"ddpm"`` -> ``"ancestral"``, with a warning).

    The one place that knows the samplers' old names; :class:`SamplerSettings` (and so the
    configuration and :meth:`~opacus_dmaudit.DiffusionPrior.denoise`) asks it.

    Args:
        sampler: a name in :data:`SAMPLERS`, or an old name.
        stacklevel: the frame the ``DeprecationWarning`` points at, as ``warnings.warn`` counts
            from here.

    Raises:
        ValueError: an unknown sampler.
    """
    if sampler in _RENAMED:
        warnings.warn(
            f"sampler={sampler!r} is now called {_RENAMED[sampler]!r} (DDPM ancestral "
            "sampling); the paper's Algorithm 1 is 'ddim-every-step'",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        return _RENAMED[sampler]
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return sampler


@dataclass(frozen=True)
class SamplerSettings:
    """The prior's sampler and its step settings.

    Args:
        name: ``"ddim"`` (DDIM η = 0 on a coarse grid, default), ``"ddim-every-step"`` (the
            paper's Algorithm 1: DDIM η = 0 at every timestep from t*), ``"ancestral"`` (DDPM
            ancestral sampling at every timestep) or ``"posterior-mean"`` (one-shot).
        steps: the most DDIM steps from the matched timestep ``t*`` (``"ddim"`` only).
        min_stride: fewest timesteps one DDIM step spans (``"ddim"`` only): a readout with little
            noise (small ``t*``) takes fewer steps.

    Example:
        >>> from opacus_dmaudit import AuditConfig
        >>> from opacus_dmaudit.reconstruct.sampler import SamplerSettings
        >>> config = AuditConfig(sampler=SamplerSettings("ddim", steps=50))
    """

    name: str = "ddim"
    steps: int = 20
    min_stride: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", sampler_name(self.name))
        for field_name in ("steps", "min_stride"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sampler_{field_name} must be a positive integer, got {value!r}")

    @classmethod
    def of(cls, value: Any) -> SamplerSettings:
        """Settings from a name (``"ddim"``), a ``{"name", "steps", "min_stride"}`` mapping or
        settings."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(name=value)
        if isinstance(value, dict):
            return cls(**value)
        raise ValueError(
            f"sampler must be a name {SAMPLERS} or SamplerSettings(...), got {value!r}"
        )

    def describe(self) -> dict[str, Any]:
        """JSON-safe, for records and reports (steps only where they apply)."""
        ddim = self.name == "ddim"
        return {
            "sampler": self.name,
            "steps": self.steps if ddim else None,
            "min_stride": self.min_stride if ddim else None,
        }
