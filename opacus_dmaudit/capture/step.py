"""The captured step: what one audited optimizer step revealed, as private CPU copies.

:class:`CapturedStep` is the one object that flows from the capture (:mod:`.hooks`, or a shadow
adversary, :mod:`.shadow`) into the rest of the audit: readout, checks, scoring and privacy
numbers all read it and none changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .imprint import ImprintGeometry

__all__ = ["CapturedStep", "ImprintSums"]


@dataclass
class ImprintSums:
    """The imprint layer's gradient sums at one step, and which samples fell into which bin.

    Attributes:
        geometry: the layer's readout geometry.
        weight_noised, bias_noised: the privatised (clipped, noised) sums, ``(K, d)`` and ``(K,)``.
        weight_clean, bias_clean: the clean clipped sums (no noise), same shapes.
        membership: ``(K, B)`` integer matrix of the bins' members among the step's inputs
            (see :meth:`ImprintBlock.membership`).
        simulated: ``True`` when a shadow adversary produced the sums (no imprint in the model).
    """

    geometry: ImprintGeometry
    weight_noised: torch.Tensor
    bias_noised: torch.Tensor
    weight_clean: torch.Tensor
    bias_clean: torch.Tensor
    membership: torch.Tensor
    simulated: bool = False


@dataclass
class CapturedStep:
    """What one audited step revealed (all tensors are private copies on the CPU).

    Attributes:
        step: the optimizer step (1-based).
        noise_multiplier, max_grad_norm: σ and C the optimizer used at this step.
        denominator: the factor between ``p.grad`` and the noised sum.
        clipping: ``"flat"``, ``"per_layer"`` or ``"adaptive"``.
        inputs: the step's real inputs (of the ``ImprintBlock``, or of the hooked model).
        imprint: the imprint layer's sums, or ``None`` without an imprint layer.
        batch_sizes: the number of real samples of every step since the previous capture
            (this one last), for the sampling check; ``-1`` where it is unknown.
        mechanism: statistics of the DP mechanism at this step (``"noise"``, ``"clipping"``,
            ``"sampling"``, ``"accountant"``; see :mod:`.mechanism`), or ``None`` when the
            capture does not record them.
        input_kind: ``None`` when the hooked model got its batch as a tensor; ``"dict"``,
            ``"sequence"`` or ``"none"`` when it got a dict, a tuple/list or no tensor at all
            (a shadow audit then cannot simulate an imprint on it).
    """

    step: int
    noise_multiplier: float
    max_grad_norm: float
    denominator: float
    clipping: str
    inputs: torch.Tensor
    imprint: ImprintSums | None = None
    batch_sizes: list[int] = field(default_factory=list)
    mechanism: dict | None = None
    input_kind: str | None = None

    @property
    def noise_std(self) -> float:
        """Std of the Gaussian noise per coordinate of the gradient sums (``σ·C``)."""
        return self.noise_multiplier * self.max_grad_norm

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])
