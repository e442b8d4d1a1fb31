"""Shadow audits: the worst-case imprint adversary, simulated on the real batch of any model.

A live :class:`~opacus_dmaudit.ImprintBlock` makes the trained model an adversarial variant of
itself, and the imprint takes most of each sample's clipping budget (it costs utility, see
``benchmarks/utility.py``). A shadow audit leaves the model untouched and asks instead: *what
would the strongest imprint adversary have seen at this step, with this run's mechanism?*

At each audited step it takes the batch the model really trained on (the inputs of its forward
pass) and gives every image the gradient a worst-case imprint model would give it: a
:class:`~opacus_dmaudit.ImprintBlock` geometry (bins calibrated on public images when given), each
sample's imprint row ``g·(x, 1)`` scaled to the *full* clipping budget (``‖row‖ = C``, the
most one sample can contribute), summed per bin, plus Gaussian noise N(0, σ²C²) per coordinate
drawn from the auditor's own generator. The result is a
:class:`~opacus_dmaudit.capture.CapturedStep` with ``ImprintSums(simulated=True)``, which goes
through the same readout, prior, metrics and report as a live audit, labelled "simulated
adversary (shadow)" everywhere.

What it shows: what this run's σ and C let a worst-case adversary read from one step, on this
run's real images, batch sizes and sampling. What it cannot show: anything about the model's own
gradients (the simulated imprint replaces them), or a broken mechanism (it adds the noise the
accountant assumes; the mechanism checks test the real noise). σ is the accountant's
``noise_multiplier`` (adaptive clipping adds slightly more noise: the simulation is then
slightly in the adversary's favour).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import torch

from .imprint import ImprintBlock
from .step import CapturedStep, ImprintSums

__all__ = ["ShadowAdversary", "as_images"]

logger = logging.getLogger(__name__)


def as_images(inputs: torch.Tensor) -> torch.Tensor:
    """The batch as ``(B, C, H, W)`` float images (``(B, H, W)`` gets one channel).

    Raises:
        ValueError: inputs that are not images.
    """
    x = torch.as_tensor(inputs)
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4:
        raise ValueError(
            f"shadow audits simulate an imprint layer on images, but the model's inputs have "
            f"shape {tuple(inputs.shape)}; they need shape (batch, channels, height, width). "
            "Use the mechanism checks alone (shadow=False) for other inputs."
        )
    return x.float()


class ShadowAdversary:
    """The simulated worst-case imprint adversary of a shadow audit.

    Args:
        num_bins: bins of the simulated imprint layer (as ``ImprintBlock``).
        structure: ``"sparse"`` or ``"cumulative"``.
        direction: measurement direction (as ``ImprintBlock``).
        value_range: the pixel range of the model's inputs (readouts are scored in it).
        public: public images ``(N, C, H, W)`` (never training data) to calibrate the bins on;
            ``None``: the block's default bins (the ``calibration`` check then warns).
        seed: seed of the simulated block's own generator (``direction="random"``).
    """

    def __init__(
        self,
        *,
        num_bins: int = 128,
        structure: str = "sparse",
        direction: str = "brightness",
        value_range: Sequence[float] = (0.0, 1.0),
        public: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        self.num_bins = int(num_bins)
        self.structure = structure
        self.direction = direction
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.public = None if public is None else as_images(public)
        self.seed = int(seed)
        self._blocks: dict[tuple[int, ...], ImprintBlock] = {}
        # validate the geometry now (a misspelt structure fails here, not at the first audit)
        ImprintBlock(
            image_shape=(1, 2, 2),
            num_bins=self.num_bins,
            structure=structure,
            direction=direction,
            value_range=self.value_range,
        )

    def describe(self) -> dict:
        """JSON-safe settings for the run file."""
        return {
            "num_bins": self.num_bins,
            "structure": self.structure,
            "direction": self.direction,
            "value_range": list(self.value_range),
            "calibrated": self.public is not None,
        }

    def block(self, image_shape: Sequence[int]) -> ImprintBlock:
        """The simulated imprint layer for images of ``image_shape`` (built once per shape)."""
        shape = tuple(int(s) for s in image_shape)
        if shape not in self._blocks:
            block = ImprintBlock(
                image_shape=shape,
                num_bins=self.num_bins,
                structure=self.structure,
                direction=self.direction,
                value_range=self.value_range,
                seed=self.seed,
            )
            if self.public is not None:
                if tuple(self.public.shape[1:]) == shape:
                    block.calibrate(self.public)
                else:
                    logger.warning(
                        "shadow: public images of shape %s do not match the batch's %s; using "
                        "the default bins",
                        tuple(self.public.shape[1:]),
                        shape,
                    )
            self._blocks[shape] = block
        return self._blocks[shape]

    @torch.no_grad()
    def simulate(self, captured: CapturedStep, *, generator: torch.Generator) -> CapturedStep:
        """The captured step with the worst-case adversary's imprint sums (no side effects
        besides drawing the noise from ``generator``)."""
        x = as_images(captured.inputs)
        block = self.block(x.shape[1:])
        k, d = block.num_bins, math.prod(block.image_shape)
        membership = block.membership(x)  # (K, B)
        if self.structure == "sparse":
            active = membership
        else:  # the cumulative rows a sample activates: every row at or below its cell
            active = membership.flip(0).cumsum(0).flip(0)
        flat = x.reshape(x.shape[0], d).double()
        rows = active.sum(dim=0).clamp(min=1).double()  # imprinted rows per sample
        clip = float(captured.max_grad_norm)
        # each sample's imprint rows together have norm exactly C: the whole clipping budget
        weight = clip / (torch.sqrt((flat**2).sum(dim=1) + 1.0) * rows.sqrt())
        act = active.double()
        w_clean = act @ (weight[:, None] * flat)
        b_clean = act @ weight
        std = float(captured.noise_std)
        w_noise = torch.randn((k, d), generator=generator, dtype=torch.float64) * std
        b_noise = torch.randn((k,), generator=generator, dtype=torch.float64) * std
        sums = ImprintSums(
            geometry=block.geometry(),
            weight_noised=(w_clean + w_noise).float(),
            bias_noised=(b_clean + b_noise).float(),
            weight_clean=w_clean.float(),
            bias_clean=b_clean.float(),
            membership=membership,
            simulated=True,
        )
        return dataclasses.replace(captured, inputs=x, imprint=sums)
