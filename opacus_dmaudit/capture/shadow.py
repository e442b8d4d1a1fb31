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

**Sized to the batch.** Only a sample alone in its bin can be read out, and with ``K`` equal-mass
bins a batch of ``B`` leaves a share ``(1 − 1/K)^(B − 1)`` alone: 128 bins leave 61 % of a batch of
64 alone but 1.8 % of a batch of 512. Unless ``num_bins`` is given, the adversary takes the fewest
bins that leave :data:`TARGET_LONE_SHARE` (90 %) of the run's expected batch alone (about
``9.5·B``, at least :data:`MIN_BINS`: small Poisson batches vary), within two limits, both said in
a warning with the share they imply:

* memory: the simulated sums and their readouts hold about :data:`BYTES_PER_BIN_PIXEL` bytes per
  bin and pixel, kept under ``memory_cap`` (default 1 GiB);
* public images: equal-mass bins are calibrated on public images, at least one per bin; with
  fewer public images than bins, ``K`` is the number of public images. Without public images the
  bins are the block's uncalibrated default (the ``calibration`` check warns) and ``K`` is sized
  all the same.

The plan (:class:`ShadowPlan`: bins, the expected lone share, what limited it) is written to the
run file and to every record's ``detection["shadow"]``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..reconstruct.bins import bins_for_lone_share, lone_share
from .imprint import ImprintBlock
from .step import CapturedStep, ImprintSums

__all__ = [
    "ShadowAdversary",
    "ShadowPlan",
    "as_images",
    "plan_bins",
    "TARGET_LONE_SHARE",
    "MEMORY_CAP",
    "MIN_BINS",
    "BYTES_PER_BIN_PIXEL",
]

#: The share of the expected batch the sized adversary leaves alone in a bin.
TARGET_LONE_SHARE = 0.9

#: The fewest bins the sized adversary uses: small expected batches vary (a Poisson batch of
#: expected size 1 often holds 2 or 3 samples), and 2 bins would leave such a batch blind.
MIN_BINS = 128

#: Default memory cap of the simulated imprint layer and its readout (bytes).
MEMORY_CAP = 2**30

#: Bytes per bin and pixel that the simulated sums (noised and clean, float32) and their two
#: readouts (float64 rows and images) hold at once.
BYTES_PER_BIN_PIXEL = 48

#: Rows of the simulated sums made at once (bounds the float64 scratch memory).
_ROW_CHUNK = 512

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


@dataclass(frozen=True)
class ShadowPlan:
    """How many bins the shadow adversary uses, and why.

    Attributes:
        num_bins: the bins used.
        batch_size: the expected batch size it was sized for (``None``: not known).
        lone_share: the expected share of such a batch alone in a bin, ``(1 − 1/K)^(B − 1)``.
        wanted: the bins that would leave :data:`TARGET_LONE_SHARE` of the batch alone.
        limited_by: ``None`` (sized as wanted), ``"given"`` (``num_bins`` given explicitly),
            ``"memory"`` or ``"public images"``.
        note: the warning given, in words (``None`` when sized as wanted).
    """

    num_bins: int
    batch_size: int | None
    lone_share: float | None
    wanted: int | None
    limited_by: str | None = None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan_bins(
    *,
    batch_size: int | None,
    pixels: int,
    public_images: int | None,
    memory_cap: int = MEMORY_CAP,
    share: float = TARGET_LONE_SHARE,
) -> ShadowPlan:
    """The fewest bins leaving ``share`` of an expected batch alone, within memory and public
    images (see the module documentation).

    Args:
        batch_size: the run's expected batch size (``None``: 128 bins, not sized).
        pixels: values per image ``d`` (C·H·W).
        public_images: public images available to calibrate the bins (``None``: none given).
        memory_cap: bytes the simulation may hold (:data:`BYTES_PER_BIN_PIXEL` per bin and pixel).
        share: the lone share to reach.
    """
    if batch_size is None or batch_size < 1:
        return ShadowPlan(num_bins=128, batch_size=None, lone_share=None, wanted=None)
    wanted = max(MIN_BINS, bins_for_lone_share(batch_size, share))
    k, limited, notes = wanted, None, []
    by_memory = max(2, int(memory_cap // (BYTES_PER_BIN_PIXEL * max(pixels, 1))))
    if by_memory < k:
        k, limited = by_memory, "memory"
        notes.append(
            f"the memory cap of {memory_cap / 2**30:.3g} GiB allows {by_memory} bins of "
            f"{pixels} pixels (ShadowAdversary(memory_cap=...) raises it)"
        )
    if public_images is not None and public_images < k:
        k, limited = max(2, public_images), "public images"
        notes.append(
            f"only {public_images} public images calibrate the bins (equal-mass bins need one "
            f"image per bin; {wanted} public images would give {wanted} bins)"
        )
    implied = lone_share(k, batch_size)
    note = None
    if limited is not None:
        note = (
            f"shadow adversary: {k} bins instead of {wanted}, because "
            + "; and ".join(notes)
            + f". At the expected batch of {batch_size} that leaves {implied:.1%} of the batch "
            f"alone in a bin (readable) instead of {share:.0%}: the audit reads fewer images "
            "than the strongest adversary would."
        )
    return ShadowPlan(
        num_bins=k,
        batch_size=int(batch_size),
        lone_share=implied,
        wanted=wanted,
        limited_by=limited,
        note=note,
    )


class ShadowAdversary:
    """The simulated worst-case imprint adversary of a shadow audit.

    Args:
        num_bins: bins of the simulated imprint layer; ``None`` (default) sizes them to the
            run's expected batch (see the module documentation); a number is kept as given.
        structure: ``"sparse"`` or ``"cumulative"``.
        direction: measurement direction (as ``ImprintBlock``).
        value_range: the pixel range of the model's inputs (readouts are scored in it).
        public: public images ``(N, C, H, W)`` (never training data) to calibrate the bins on;
            ``None``: the block's default bins (the ``calibration`` check then warns).
        seed: seed of the simulated block's own generator (``direction="random"``).
        memory_cap: bytes the sized simulation may hold (default 1 GiB).
    """

    def __init__(
        self,
        *,
        num_bins: int | None = None,
        structure: str = "sparse",
        direction: str = "brightness",
        value_range: Sequence[float] = (0.0, 1.0),
        public: torch.Tensor | None = None,
        seed: int = 0,
        memory_cap: int = MEMORY_CAP,
    ) -> None:
        if num_bins is not None and (isinstance(num_bins, bool) or not isinstance(num_bins, int)):
            raise ValueError(f"num_bins must be an integer or None (sized), got {num_bins!r}")
        if isinstance(memory_cap, bool) or not isinstance(memory_cap, int) or memory_cap < 1:
            raise ValueError(f"memory_cap must be a positive number of bytes, got {memory_cap!r}")
        self.given_bins = num_bins
        self.num_bins = int(num_bins) if num_bins is not None else 128
        self.structure = structure
        self.direction = direction
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.public = None if public is None else as_images(public)
        self.seed = int(seed)
        self.memory_cap = int(memory_cap)
        self.plan: ShadowPlan | None = None
        self._blocks: dict[tuple[int, ...], ImprintBlock] = {}
        # validate the geometry now (a misspelt structure fails here, not at the first audit)
        ImprintBlock(
            image_shape=(1, 2, 2),
            num_bins=self.num_bins,
            structure=structure,
            direction=direction,
            value_range=self.value_range,
        )

    def size_for(self, batch_size: int | None, image_shape: Sequence[int]) -> ShadowPlan:
        """Choose the bins for an expected batch of images of ``image_shape`` (once per run;
        a warning says what limited them). ``num_bins`` given explicitly is kept."""
        pixels = math.prod(int(s) for s in image_shape)
        if self.given_bins is not None:
            self.plan = ShadowPlan(
                num_bins=self.num_bins,
                batch_size=batch_size,
                lone_share=lone_share(self.num_bins, batch_size) if batch_size else None,
                wanted=bins_for_lone_share(batch_size) if batch_size else None,
                limited_by="given",
            )
            return self.plan
        plan = plan_bins(
            batch_size=batch_size,
            pixels=pixels,
            public_images=None if self.public is None else int(self.public.shape[0]),
            memory_cap=self.memory_cap,
        )
        if plan.note:
            logger.warning(plan.note)
        if plan.num_bins != self.num_bins:
            self._blocks.clear()
        self.num_bins, self.plan = plan.num_bins, plan
        return plan

    def describe(self) -> dict:
        """JSON-safe settings for the run file."""
        return {
            "num_bins": self.num_bins,
            "structure": self.structure,
            "direction": self.direction,
            "value_range": list(self.value_range),
            "calibrated": self.public is not None,
            "memory_cap": self.memory_cap,
            "plan": None if self.plan is None else self.plan.to_json(),
        }

    def block(self, image_shape: Sequence[int]) -> ImprintBlock:
        """The simulated imprint layer for images of ``image_shape`` (built once per shape)."""
        shape = tuple(int(s) for s in image_shape)
        if shape not in self._blocks:
            block = self._new_block(shape)
            if self.public is not None:
                if tuple(self.public.shape[1:]) == shape:
                    block = self._calibrated(block, shape)
                else:
                    logger.warning(
                        "shadow: public images of shape %s do not match the batch's %s; using "
                        "the default bins",
                        tuple(self.public.shape[1:]),
                        shape,
                    )
            self._blocks[shape] = block
        return self._blocks[shape]

    def _new_block(self, shape: tuple[int, ...]) -> ImprintBlock:
        return ImprintBlock(
            image_shape=shape,
            num_bins=self.num_bins,
            structure=self.structure,
            direction=self.direction,
            value_range=self.value_range,
            seed=self.seed,
        )

    def _calibrated(self, block: ImprintBlock, shape: tuple[int, ...]) -> ImprintBlock:
        """``block`` calibrated on the public images; where their projections have fewer
        distinct values than the sized bins (ties), as many bins as distinct values (at least
        a quarter of :data:`MIN_BINS`, else refused), said once and recorded in the plan. Bins
        given explicitly are never changed."""
        while True:
            try:
                return self._calibrate(block)
            except ValueError as err:
                tied = "strictly increasing" in str(err)
                if not tied or self.given_bins is not None:
                    raise
                error = err
            distinct = int(block.projections(self.public).unique().numel())
            fewer = distinct if distinct < self.num_bins else self.num_bins // 2
            if fewer < MIN_BINS // 4:
                raise ValueError(
                    f"{str(error).rstrip('.')}. Sizing its bins itself, the shadow adversary "
                    f"uses at least {MIN_BINS // 4}; to choose them, pass shadow="
                    "ShadowAdversary(num_bins=..., direction=..., public=...)"
                ) from None
            wanted, self.num_bins = self.num_bins, fewer
            cut = self._cut_note(wanted, distinct)
            logger.warning(cut)
            self._replan(cut)
            block = self._new_block(shape)

    def _calibrate(self, block: ImprintBlock) -> ImprintBlock:
        """``block.calibrate`` on the public images; its value-range warning worded for the
        shadow adversary (the user built no block, and gave its range to the adversary)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            block = block.calibrate(self.public)
        for w in caught:
            text = str(w.message)
            if "outside value_range" in text:
                text = text.split(" Give the block")[0] + (
                    " Give the shadow adversary public images with the pixels your training "
                    "data has before any normalisation, or pass shadow=ShadowAdversary("
                    "value_range=(low, high), public=...) with your data's range."
                )
            warnings.warn(text, w.category, stacklevel=2)
        return block

    def _cut_note(self, wanted: int, distinct: int) -> str:
        """The cut for ties, in words (with the lone share it leaves when the batch is known)."""
        batch = self.plan.batch_size if self.plan is not None else None
        note = (
            f"shadow adversary: {self.num_bins} bins instead of {wanted}: the public images' "
            f"projections have too few distinct values for {wanted} equal-mass bins "
            + (
                f"(only {distinct}: duplicate images)"
                if distinct < wanted
                else "(values too close together)"
            )
        )
        if batch:
            note += (
                f". At the expected batch of {batch} that leaves "
                f"{lone_share(self.num_bins, batch):.1%} of the batch alone in a bin (readable) "
                f"instead of {TARGET_LONE_SHARE:.0%}"
            )
        return note + "."

    def _replan(self, cut: str) -> None:
        """The plan after the bins were cut for ties in the public images (``cut``: why)."""
        if self.plan is None:
            return
        batch = self.plan.batch_size
        self.plan = dataclasses.replace(
            self.plan,
            num_bins=self.num_bins,
            lone_share=lone_share(self.num_bins, batch) if batch else None,
            limited_by="public images",
            note=cut if self.plan.note is None else f"{self.plan.note} {cut}",
        )

    @torch.no_grad()
    def simulate(
        self,
        captured: CapturedStep,
        *,
        generator: torch.Generator,
        expected_batch_size: int | None = None,
    ) -> CapturedStep:
        """The captured step with the worst-case adversary's imprint sums (no side effects
        besides drawing the noise from ``generator``; the first call sizes the bins to
        ``expected_batch_size``, else to this batch, unless :meth:`size_for` did)."""
        x = as_images(captured.inputs)
        if self.plan is None:  # not sized at attach (image shape unknown then): size now
            self.size_for(expected_batch_size or captured.batch_size or x.shape[0], x.shape[1:])
        block = self.block(x.shape[1:])
        membership = block.membership(x)  # (K, B)
        if self.structure == "sparse":
            active = membership
        else:  # the cumulative rows a sample activates: every row at or below its cell
            active = membership.flip(0).cumsum(0).flip(0)
        flat = x.flatten(1).double()  # (B, d); an empty Poisson batch has B = 0
        rows = active.sum(dim=0).clamp(min=1).double()  # imprinted rows per sample
        clip = float(captured.max_grad_norm)
        # each sample's imprint rows together have norm exactly C: the whole clipping budget
        weight = clip / (torch.sqrt((flat**2).sum(dim=1) + 1.0) * rows.sqrt())
        w_clean, w_noised, b_clean, b_noised = _noised_sums(
            active.double(), weight, flat, float(captured.noise_std), generator
        )
        sums = ImprintSums(
            geometry=block.geometry(),
            weight_noised=w_noised,
            bias_noised=b_noised,
            weight_clean=w_clean,
            bias_clean=b_clean,
            membership=membership,
            simulated=True,
        )
        return dataclasses.replace(captured, inputs=x, imprint=sums)


def _noised_sums(
    act: torch.Tensor,
    weight: torch.Tensor,
    flat: torch.Tensor,
    std: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean and noised imprint sums (float32), summed in float64 a block of rows at a time.

    Returns:
        ``(weight clean (K, d), weight noised, bias clean (K,), bias noised)``.
    """
    k, d = act.shape[0], flat.shape[1]
    rows = weight[:, None] * flat  # (B, d): each sample's imprint row
    w_clean = torch.empty((k, d), dtype=torch.float32)
    w_noised = torch.empty((k, d), dtype=torch.float32)
    for start in range(0, k, _ROW_CHUNK):
        part = act[start : start + _ROW_CHUNK] @ rows
        w_clean[start : start + _ROW_CHUNK] = part
        noise = torch.randn(part.shape, generator=generator, dtype=torch.float64)
        w_noised[start : start + _ROW_CHUNK] = part + noise * std
    b_clean = act @ weight
    b_noised = b_clean + torch.randn((k,), generator=generator, dtype=torch.float64) * std
    return w_clean, w_noised, b_clean.float(), b_noised.float()
