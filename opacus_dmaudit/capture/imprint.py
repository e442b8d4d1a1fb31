"""The imprint layer: a module whose weight gradient contains individual training images.

An ``ImprintBlock`` flattens its input ``x`` and applies one ``nn.Linear(d, K)`` whose rows all share
a measurement direction ``h``; row ``i`` is *active* for a sample when ``h·x`` lies in the row's bin.
For an active row the per-sample gradient is ``g·x`` for the weight and ``g`` for the bias, so a bin
holding exactly one sample yields that sample as ``∇W_i / ∇b_i`` (Fowl et al., 2022). Flat clipping
multiplies both by the same factor and cancels in the ratio; DP noise does not.

Two structures:

* ``"sparse"`` (default): each sample activates exactly one row (a window per bin). A readout is
  ``∇W_i / ∇b_i`` with one noise draw in numerator and denominator.
* ``"cumulative"``: row ``i`` fires for every sample with ``h·x`` above the row's edge; a readout is the
  difference of neighbouring rows, which doubles the noise variance.

The connection back to image space decides what the downstream network sees. With
``connection="residual"`` (default) the block's output *value* is exactly its input, so the
downstream network and its utility are unchanged; the imprint branch only carries the downstream
gradient back to the imprint layer (``out = x · (1 + α·(s − stop_grad(s)))`` with ``s`` the summed
activations). With ``connection="none"`` the output is the imprint signal alone, ``α·s·x̄`` where
``x̄`` is a fixed image-space direction: a worst-case audit model that no longer sees the image.

Place the block first in the model, on inputs in ``value_range`` (default [0, 1]); put any input
normalisation after it. Its only trainable parameters are the imprint layer's weight and bias, which
Opacus clips and noises like any other ``nn.Linear``.

**The bins stay where calibration put them.** The block evaluates its bins with fixed copies of the
calibrated weight and bias (buffers) and lets the trainable ``nn.Linear`` carry only the gradient:
``z = z_fixed + (z_trained − stop_grad(z_trained))`` has the value of the calibrated layer and the
gradient of an ``nn.Linear``, whose per-sample gradient does not depend on its weights. Whatever the
optimizer does to the parameters, every sample keeps falling into the bin calibration promised, so
an audit cannot drift into blindness, while the gradient is clipped and noised like any other (and
Opacus sees a plain ``nn.Linear`` in every grad-sample mode).
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ImprintBlock", "ImprintGeometry", "find_imprint_block"]

#: At most this many of the images given to ``calibrate`` are kept for the auditor's prior-fit
#: check and its baseline κ̂ (public images only; never training data).
KEEP_PUBLIC = 512

_STRUCTURES = ("sparse", "cumulative")
_DIRECTIONS = ("brightness", "random", "dct")
_CONNECTIONS = ("residual", "none")

# id(imprint weight) -> block, so an auditor can find the block from an optimizer's parameters
# (identity is re-checked on lookup; entries vanish with their block).
_REGISTRY: weakref.WeakValueDictionary[int, ImprintBlock] = weakref.WeakValueDictionary()


def _normal_quantiles(probs: torch.Tensor) -> torch.Tensor:
    return math.sqrt(2.0) * torch.erfinv(2.0 * probs - 1.0)


def _dct_direction(image_shape: tuple[int, int, int], mode: tuple[int, int]) -> torch.Tensor:
    """A 2-D DCT-II basis image (same in every channel), flattened."""
    c, h, w = image_shape
    u, v = mode
    if not (0 <= u < h and 0 <= v < w):
        raise ValueError(f"dct_mode {mode} is outside the image's {h}x{w} frequency grid")
    rows = torch.cos(math.pi * (torch.arange(h, dtype=torch.float64) + 0.5) * u / h)
    cols = torch.cos(math.pi * (torch.arange(w, dtype=torch.float64) + 0.5) * v / w)
    basis = rows[:, None] * cols[None, :]
    return basis.expand(c, h, w).reshape(-1)


@dataclass(frozen=True)
class ImprintGeometry:
    """What the readout needs to know about an imprint layer (real or simulated).

    Attributes:
        measurement: the measurement direction ``h`` (``(d,)``, float64), or ``None``.
        bin_edges: ``K + 1`` edges in units of ``h·x``: readout bin ``i`` holds the samples with
            ``bin_edges[i] <= h·x < bin_edges[i + 1]``, the outer edges clipped to the values
            ``h·x`` can take for inputs in ``value_range``; ``None`` if unknown. With
            ``measurement`` they let the readout use the projection the bin pins (see
            :func:`~opacus_dmaudit.readout.read_imprint`).
    """

    structure: str
    image_shape: tuple[int, int, int]
    value_range: tuple[float, float]
    num_bins: int
    calibrated: bool
    measurement: torch.Tensor | None = field(default=None, compare=False, repr=False)
    bin_edges: tuple[float, ...] | None = None


#: Most elements of the imprint weight (bins × pixels): 2**28 floats are 1 GiB, and the layer
#: keeps a fixed copy, a gradient and per-sample gradients besides.
MAX_WEIGHT_ELEMENTS = 2**28


def _check_num_bins(num_bins, pixels: int) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, numbers.Integral) or num_bins < 2:
        raise ValueError(f"num_bins must be an integer of at least 2, got {num_bins!r}")
    if num_bins * pixels > MAX_WEIGHT_ELEMENTS:
        raise ValueError(
            f"num_bins={num_bins} with {pixels} pixels per image makes an imprint weight of "
            f"{num_bins * pixels * 4 / 2**30:.1f} GiB (and a fixed copy, its gradient and "
            "per-sample gradients besides): use fewer bins; a few times the batch size is "
            "plenty, since a bin reads an image only when one sample falls in it"
        )


class ImprintBlock(nn.Module):
    """An imprint layer that drops in front of any image model.

    Args:
        image_shape: ``(C, H, W)`` of one input image.
        num_bins: number of bins (rows of the imprint layer), at least 2.
        structure: ``"sparse"`` or ``"cumulative"`` (see module docstring).
        direction: measurement direction ``h``: ``"brightness"`` (mean pixel value), ``"random"``
            (a fixed Gaussian direction from ``seed``) or ``"dct"`` (the DCT basis image ``dct_mode``).
        connection: ``"residual"`` (output value equals the input) or ``"none"``.
        gradient_scale: ``α``, how strongly the downstream gradient reaches the imprint layer. The
            default (100) makes the imprint dominate most samples' gradient norm, the adversary's
            best case and the paper's setting: the readout noise is then about ``σ·‖x‖``. The
            imprint then takes most of each sample's clipping budget, so the rest of the model
            learns more slowly; lower it to trade audit strength for utility.
        value_range: ``(low, high)`` of the input pixels; readouts are scored in this range.
        dct_mode: ``(u, v)`` frequency for ``direction="dct"``.
        seed: seed of the block's own generator (used for ``direction="random"``); the global RNG
            is only used by ``nn.Linear``'s default initialisation, which the block overwrites.
    """

    def __init__(
        self,
        *,
        image_shape: Sequence[int],
        num_bins: int = 128,
        structure: str = "sparse",
        direction: str = "brightness",
        connection: str = "residual",
        gradient_scale: float = 100.0,
        value_range: tuple[float, float] = (0.0, 1.0),
        dct_mode: tuple[int, int] = (0, 1),
        seed: int = 0,
    ) -> None:
        super().__init__()
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(
                f"image_shape must be (C, H, W) with positive sizes, got {image_shape}"
            )
        _check_num_bins(num_bins, math.prod(image_shape))
        if structure not in _STRUCTURES:
            raise ValueError(f"structure must be one of {_STRUCTURES}, got {structure!r}")
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
        if connection not in _CONNECTIONS:
            raise ValueError(f"connection must be one of {_CONNECTIONS}, got {connection!r}")
        if not gradient_scale > 0:
            raise ValueError(f"gradient_scale must be positive, got {gradient_scale}")
        if not value_range[0] < value_range[1]:
            raise ValueError(f"value_range must be (low, high) with low < high, got {value_range}")

        self.image_shape: tuple[int, int, int] = image_shape  # type: ignore[assignment]
        self.num_bins = int(num_bins)
        self.structure = structure
        self.direction = direction
        self.connection = connection
        self.gradient_scale = float(gradient_scale)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.dct_mode = tuple(dct_mode)
        self.seed = int(seed)
        d = math.prod(image_shape)

        gen = torch.Generator().manual_seed(self.seed)
        if direction == "brightness":
            h = torch.full((d,), 1.0 / d, dtype=torch.float64)
        elif direction == "random":
            h = torch.randn(d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        else:
            h = _dct_direction(self.image_shape, self.dct_mode) / d
        self.register_buffer("measurement", h.float())
        # Image-space direction for connection="none": a fixed positive random image, unit norm.
        out_dir = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
        self.register_buffer("output_direction", (out_dir / out_dir.norm()).float())
        self.register_buffer("lower", torch.zeros(num_bins))
        self.register_buffer("upper", torch.zeros(num_bins))
        # Bin edges in units of the projection h·x (for reporting and calibration).
        self.register_buffer("edges", torch.zeros(num_bins + 1, dtype=torch.float64))

        with torch.random.fork_rng(devices=[]):  # weights are overwritten; keep the user's RNG
            self.imprint = nn.Linear(d, num_bins)
        self.register_buffer("fixed_weight", torch.zeros(num_bins, d))
        self.register_buffer("fixed_bias", torch.zeros(num_bins))
        self.calibrated = False
        #: a sample of the public images given to :meth:`calibrate` (for the auditor's checks)
        self.public_sample: torch.Tensor | None = None
        center, scale = self._default_projection_stats()
        self._set_bins(self._edges_from_normal(center, scale), scale)
        _REGISTRY[id(self.imprint.weight)] = self

    # ------------------------------------------------------------------------------------------
    # bins
    def _default_projection_stats(self) -> tuple[float, float]:
        """Assumed mean and std of ``h·x`` before calibration: pixels around the middle of
        ``value_range`` with a spread of a quarter of the range along ``h``. Rough by design:
        ``calibrate`` on public images gives equal-mass bins."""
        lo, hi = self.value_range
        h = self.measurement.double()
        center = float(h.sum()) * (lo + hi) / 2
        scale = 0.25 * (hi - lo) * max(abs(float(h.sum())), float(h.norm()))
        return center, max(scale, 1e-12)

    def _edges_from_normal(self, center: float, scale: float) -> torch.Tensor:
        """Edges at equal-mass quantiles of N(center, scale²)."""
        k = self.num_bins
        if self.structure == "sparse":
            probs = torch.arange(1, k, dtype=torch.float64) / k
        else:
            probs = torch.arange(1, k + 1, dtype=torch.float64) / (k + 1)
        inner = center + scale * _normal_quantiles(probs)
        return self._pad_edges(inner)

    def _pad_edges(self, inner: torch.Tensor) -> torch.Tensor:
        inf = torch.tensor([math.inf], dtype=torch.float64)
        if self.structure == "sparse":  # K-1 interior edges -> K bins covering the real line
            return torch.cat([-inf, inner, inf])
        return torch.cat([inner, inf])  # K lower edges; mass below the first edge is not imprinted

    @torch.no_grad()
    def _set_bins(self, edges: torch.Tensor, scale: float) -> None:
        """Write weights, biases and activation windows for the given edges (in h·x units)."""
        edges = edges.double()
        if not bool(torch.all(edges[1:] > edges[:-1])):
            raise ValueError(
                "bin edges must be strictly increasing; the calibration sample has too few "
                "distinct projections for num_bins bins: use more public images or fewer bins"
            )
        k = self.num_bins
        self.edges.copy_(edges)
        weight = (self.measurement.double() / scale).expand(k, -1)
        inf = math.inf
        if self.structure == "sparse":
            # row 0: h·x < e_1 ; row i >= 1: e_i <= h·x < e_{i+1}
            anchors = torch.cat([edges[1:2], edges[1:k]])
            lower = torch.cat([torch.tensor([-inf]), torch.zeros(k - 1, dtype=torch.float64)])
            upper = torch.cat(
                [torch.zeros(1, dtype=torch.float64), (edges[2:] - edges[1:k]) / scale]
            )
        else:
            anchors = edges[:k]
            lower = torch.zeros(k, dtype=torch.float64)
            upper = torch.full((k,), inf, dtype=torch.float64)
        for target in (self.fixed_weight, self.imprint.weight):
            target.copy_(weight)
        for target in (self.fixed_bias, self.imprint.bias):
            target.copy_(-anchors / scale)
        self.lower.copy_(lower)
        self.upper.copy_(upper)

    @torch.no_grad()
    def calibrate(self, x_public: torch.Tensor) -> ImprintBlock:
        """Set equal-mass bin edges from the projections of a public sample (never training data).

        Up to :data:`KEEP_PUBLIC` of the images are kept as :attr:`public_sample` (a random
        subset drawn with the block's own generator), so an auditor can measure how well its
        prior fits this kind of data and what a guess without the gradient achieves.

        Where some public images project to the same value (duplicates), the edges are the
        quantiles of the distinct values, as long as there are at least ``num_bins`` of them.

        Args:
            x_public: public images of shape ``(N, C, H, W)`` with ``N >= num_bins``, in
                ``value_range``.

        Returns:
            ``self``, so it chains.

        Raises:
            ValueError: wrong shape, too few images (or distinct projections), or non-finite
                pixels.
        """
        x_public = torch.as_tensor(x_public)
        self._check_input(x_public)
        bad = ~torch.isfinite(x_public)
        if bool(bad.any()):
            images = int(bad.flatten(1).any(dim=1).sum())
            raise ValueError(
                f"calibrate() got {int(bad.sum())} non-finite pixel values (NaN or inf) in "
                f"{images} of {x_public.shape[0]} images: remove or repair those images; public "
                "images must be finite pixel values in value_range"
            )
        lo, hi = self.value_range
        tol = 1e-3 * (hi - lo)
        outside = (x_public < lo - tol) | (x_public > hi + tol)
        if bool(outside.any()):
            warnings.warn(
                f"calibrate(): {int(outside.flatten(1).any(dim=1).sum())} of {x_public.shape[0]} "
                f"public images have pixels outside value_range [{lo:g}, {hi:g}] (min "
                f"{float(x_public.min()):.4g}, max {float(x_public.max()):.4g}). Give the block "
                "the pixels your training data has before any normalisation (e.g. [0, 1] "
                "tensors), or construct it with the value_range of your data.",
                UserWarning,
                stacklevel=3,  # the caller of calibrate(), past torch.no_grad's wrapper
            )
        if x_public.shape[0] < self.num_bins:
            raise ValueError(
                f"calibrate needs at least num_bins={self.num_bins} public images, "
                f"got {x_public.shape[0]}"
            )
        proj = self.projections(x_public)
        k = self.num_bins
        if self.structure == "sparse":
            probs = torch.arange(1, k, dtype=torch.float64) / k
        else:
            probs = torch.arange(1, k + 1, dtype=torch.float64) / (k + 1)
        inner = torch.quantile(proj, probs)
        if not bool(torch.all(inner[1:] > inner[:-1])):
            # duplicate images tie: quantiles of the distinct values still give k bins
            inner = torch.quantile(self._distinct_projections(proj), probs)
        scale = float(proj.std()) if proj.numel() > 1 else 1.0
        self._set_bins(self._pad_edges(inner), max(scale, 1e-12))
        self.calibrated = True
        gen = torch.Generator().manual_seed(self.seed)
        keep = torch.randperm(x_public.shape[0], generator=gen)[:KEEP_PUBLIC]
        self.public_sample = x_public[keep].detach().float().cpu().clone()
        return self

    def projections(self, images: torch.Tensor) -> torch.Tensor:
        """Each image's projection ``h·x`` on the measurement direction (float64, ``(N,)``)."""
        return images.reshape(images.shape[0], -1).double() @ self.measurement.double()

    def _distinct_projections(self, proj: torch.Tensor) -> torch.Tensor:
        """The distinct values of ``proj``; too few of them for the bins raise, saying how many
        there are and what would give more."""
        distinct = proj.unique()
        if distinct.numel() >= self.num_bins:
            return distinct
        n, found = proj.numel(), distinct.numel()
        hint = (
            ", or direction='random' (images of equal mean brightness all project to one value "
            "along the default brightness direction)"
            if self.direction == "brightness"
            else ""
        )
        raise ValueError(
            f"calibrate() cannot place {self.num_bins} bins: the {n} public images project to "
            f"only {found} distinct value{'s' if found != 1 else ''} along the block's "
            f"{self.direction} direction ({n - found} repeat another image's value: duplicate "
            "or blank images), and bin edges must be strictly increasing. Give public images "
            f"with at least {self.num_bins} distinct projections"
            + (f", num_bins <= {found}" if found >= 2 else "")
            + hint
        )

    def geometry(self) -> ImprintGeometry:
        """The block's readout geometry (structure, image shape, value range, bins)."""
        h = self.measurement.detach().double().cpu().clone()
        lo, hi = self.value_range
        reach = (
            float(torch.minimum(lo * h, hi * h).sum()),
            float(torch.maximum(lo * h, hi * h).sum()),
        )
        edges = self.edges.detach().double().cpu().clamp(*reach)
        return ImprintGeometry(
            structure=self.structure,
            image_shape=self.image_shape,
            value_range=self.value_range,
            num_bins=self.num_bins,
            calibrated=self.calibrated,
            measurement=h,
            bin_edges=tuple(float(e) for e in edges),
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        """Load checkpoints of releases before the fixed bins (no ``fixed_weight``/``fixed_bias``).

        Such a block evaluated its bins with the imprint layer's own weight and bias, so the
        fixed copies are taken from the saved ones: the loaded block puts every sample into the
        bin the saved block did.
        """
        weight, bias = f"{prefix}imprint.weight", f"{prefix}imprint.bias"
        fixed = {f"{prefix}fixed_weight": weight, f"{prefix}fixed_bias": bias}
        missing = [k for k in fixed if k not in state_dict]
        if missing and all(fixed[k] in state_dict for k in missing):
            for key in missing:
                state_dict[key] = state_dict[fixed[key]].detach().clone()
            warnings.warn(
                "loaded an ImprintBlock saved by an earlier release (no fixed bins): its bins "
                "are fixed at the saved imprint weights; save the model again to keep them",
                stacklevel=2,
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    # ------------------------------------------------------------------------------------------
    # forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not x.is_floating_point():
            lo, hi = self.value_range
            raise TypeError(
                f"ImprintBlock expects floating-point images with pixels in value_range "
                f"({lo:g}, {hi:g}), got {x.dtype}: convert them first (for 8-bit images in "
                "[0, 1]: x.float() / 255)"
            )
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            got = tuple(x.shape[1:]) if x.dim() == 4 else tuple(x.shape)
            raise ValueError(
                f"ImprintBlock expects images of shape (batch, {', '.join(map(str, self.image_shape))})"
                f" but got {got}; construct it with image_shape matching your data"
            )

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Bin activations ``a`` of shape ``(B, K)``; only the active row of a sample has slope 1.

        The bins are those of the calibration, however the parameters have moved."""
        flat = x.reshape(x.shape[0], self.imprint.in_features)
        trained = self.imprint(flat)  # Opacus's hooks see this call: its gradient is the imprint
        fixed = nn.functional.linear(flat, self.fixed_weight, self.fixed_bias)
        z = fixed + (trained - trained.detach())
        return torch.clamp(z, min=self.lower, max=self.upper)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        s = self.activations(x).sum(dim=1)
        shape = (-1,) + (1,) * (x.dim() - 1)
        if self.connection == "residual":
            gate = self.gradient_scale * (s - s.detach())  # exactly 0 in value, slope α
            return x * (1.0 + gate.view(shape))
        return self.gradient_scale * s.view(shape) * self.output_direction.view(self.image_shape)

    @torch.no_grad()
    def membership(self, x: torch.Tensor) -> torch.Tensor:
        """Which samples each readout bin contains (the calibrated bins).

        Returns:
            An integer matrix ``M`` of shape ``(K, B)``: the exact (noise-free) readout of bin ``i``
            is ``Σ_n M[i, n]·w_n·x_n / Σ_n M[i, n]·w_n`` with ``w_n`` the sample's clipped upstream
            gradient. For the sparse structure ``M`` is the 0/1 activity of each row; for the
            cumulative one it is the difference of neighbouring rows' activity.
        """
        self._check_input(x)
        flat = x.reshape(x.shape[0], self.imprint.in_features).to(self.imprint.weight.dtype)
        # functional call on the fixed weights: no module hooks (Opacus's or the auditor's) see it
        z = nn.functional.linear(flat, self.fixed_weight, self.fixed_bias)
        active = ((z >= self.lower) & (z <= self.upper)).to(torch.int64).T  # (K, B)
        if self.structure == "sparse":
            return active
        nxt = torch.cat([active[1:], torch.zeros_like(active[:1])])
        return active - nxt

    def extra_repr(self) -> str:
        return (
            f"image_shape={self.image_shape}, num_bins={self.num_bins}, structure={self.structure!r}, "
            f"direction={self.direction!r}, connection={self.connection!r}, "
            f"gradient_scale={self.gradient_scale}"
        )


def find_imprint_block(params: Sequence[torch.Tensor]) -> ImprintBlock:
    """Find the single ``ImprintBlock`` whose imprint weight is among ``params``.

    Raises:
        ValueError: if none or several blocks are found.
    """
    blocks: dict[int, ImprintBlock] = {}
    for p in params:
        block = _REGISTRY.get(id(p))
        if block is not None and block.imprint.weight is p:
            blocks[id(block)] = block
    if not blocks:
        raise ValueError(
            "no ImprintBlock found among the optimizer's parameters: put "
            "ImprintBlock(image_shape=...) in front of your model before make_private, make sure its "
            "parameters are trainable and passed to the optimizer, or pass block= explicitly"
        )
    if len(blocks) > 1:
        raise ValueError(
            f"found {len(blocks)} ImprintBlocks among the optimizer's parameters; pass block= "
            "to choose the one to audit"
        )
    return next(iter(blocks.values()))
