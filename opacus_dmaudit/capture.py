"""Capture: snapshots of the imprint layer's privatised gradient from a live ``DPOptimizer``.

Opacus calls ``optimizer.step_hook(optimizer)`` once per logical step, after clipping, noising and
scaling; ``make_private`` has already put the privacy accountant in that single slot. We *chain*:
our hook calls the previous one first, then snapshots. On audit steps only, it copies

* the noised sum ``p.grad · denominator`` (``denominator = expected_batch_size ·
  accumulated_iterations`` for ``loss_reduction="mean"``, 1 for ``"sum"``),
* the clean clipped sum ``p.summed_grad``,
* the inputs that actually went through the ``ImprintBlock`` since the last step (forward hook; this
  includes every physical batch under ``BatchMemoryManager`` and Opacus's fake sample under
  ``rand_on_empty``), with each sample's bin membership under the parameters of that step.

Under DDP (``DPDDP`` + ``DistributedDPOptimizer``) the step hook runs *before* the all-reduce and
only rank 0 adds noise, so the global privatised sum is read on rank 0 in a pre-step hook of the
original optimizer, after ``reduce_gradients``. On audit steps every rank sends its inputs and its
clean clipped sum to rank 0 (two collectives); only rank 0 audits.

Without an ``ImprintBlock`` (mechanism checks, shadow audits) the capture hooks the model's own
forward for its inputs instead, and records no imprint sums.

Nothing here writes to a tensor that training reads, draws random numbers, or runs the model.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from opacus.optimizers import DPOptimizer

from .imprint import ImprintBlock, ImprintGeometry, find_imprint_block

__all__ = ["CapturedStep", "ImprintSums", "GradientCapture", "clipping_mode"]

logger = logging.getLogger(__name__)


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
            (this one last), for the sampling check.
        mechanism: statistics of the noise and clipping over all parameters (see
            :mod:`.mechanism`), or ``None``.
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

    @property
    def noise_std(self) -> float:
        """Std of the Gaussian noise per coordinate of the gradient sums (``σ·C``)."""
        return self.noise_multiplier * self.max_grad_norm

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])


def clipping_mode(optimizer: DPOptimizer) -> str:
    """``"flat"``, ``"per_layer"`` or ``"adaptive"`` for an Opacus optimizer."""
    from opacus.optimizers import AdaClipDPOptimizer, DPPerLayerOptimizer

    names = {type(c).__name__ for c in type(optimizer).__mro__}
    if isinstance(optimizer, DPPerLayerOptimizer) or "DistributedPerLayerOptimizer" in names:
        return "per_layer"
    if isinstance(optimizer, AdaClipDPOptimizer):
        return "adaptive"
    return "flat"


def _denominator(optimizer: DPOptimizer) -> float:
    if optimizer.loss_reduction == "mean":
        return float(optimizer.expected_batch_size * optimizer.accumulated_iterations)
    return 1.0


class GradientCapture:
    """Chains onto a ``DPOptimizer``'s step hook and snapshots the imprint gradients.

    Args:
        optimizer: the optimizer returned by ``PrivacyEngine.make_private``.
        block: the ``ImprintBlock`` to read; found through the optimizer's parameters if ``None``
            and ``model`` is not given.
        model: without an ``ImprintBlock``: the module whose forward inputs are the batch (the
            model ``make_private`` returned); the capture then records no imprint sums.
        should_capture: called with the 1-based index of the upcoming step; ``True`` to capture it.
        on_capture: receives each :class:`CapturedStep` right after the parameter update.
        start_step: steps already taken (so step numbers continue across resumes).
    """

    def __init__(
        self,
        optimizer: DPOptimizer,
        *,
        block: ImprintBlock | None = None,
        model: torch.nn.Module | None = None,
        should_capture: Callable[[int], bool],
        on_capture: Callable[[CapturedStep], None],
        start_step: int = 0,
    ) -> None:
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError(
                f"expected an Opacus DPOptimizer, got {type(optimizer).__name__}: attach the "
                "auditor to the optimizer returned by PrivacyEngine.make_private(...)"
            )
        if getattr(optimizer, "_dmaudit_capture", None) is not None:
            raise RuntimeError("another auditor is attached to this optimizer; detach it first")
        params = list(optimizer.params)
        if block is None and model is None:
            block = find_imprint_block(params)
        if block is not None and (
            not any(p is block.imprint.weight for p in params)
            or not any(p is block.imprint.bias for p in params)
        ):
            raise ValueError(
                "the ImprintBlock's weight and bias must both be trainable parameters of this "
                "optimizer (they are how the audit reads images)"
            )
        self.optimizer = optimizer
        self.block = block
        self.model = model
        self.clipping = clipping_mode(optimizer)
        if self.clipping == "per_layer" and block is not None:
            warnings.warn(
                "per-layer clipping clips the imprint weight and bias by different factors: "
                "images are recovered only up to scale, and their metrics suffer accordingly",
                UserWarning,
                stacklevel=3,
            )
        self._should_capture = should_capture
        self._on_capture = on_capture
        self.step = int(start_step)
        self._inputs: list[torch.Tensor] = []
        self._seen = 0  # real samples through the forward since the last step
        self._batch_sizes: list[int] = []
        self._pending: CapturedStep | None = None
        self._previous_hook = None
        self._handles: list = []
        self._attached = False

    # -- attach / detach -------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        """Whether the optimizer is Opacus's ``DistributedDPOptimizer`` in a multi-process run."""
        return int(getattr(self.optimizer, "world_size", 1) or 1) > 1

    @property
    def rank(self) -> int:
        return int(getattr(self.optimizer, "rank", 0) or 0)

    def attach(self) -> None:
        if self._attached:
            raise RuntimeError("this capture is already attached")
        if getattr(self.optimizer, "_dmaudit_capture", None) is not None:
            raise RuntimeError("another auditor is attached to this optimizer; detach it first")
        self._previous_hook = self.optimizer.step_hook
        self.optimizer.attach_step_hook(self._step_hook)
        watched = self.block if self.block is not None else self.model
        self._handles = [
            self.optimizer.original_optimizer.register_step_post_hook(self._post_step_hook)
        ]
        if watched is not None:
            self._handles.append(watched.register_forward_hook(self._forward_hook))
        if self.distributed and self.rank == 0:
            self._handles.append(
                self.optimizer.original_optimizer.register_step_pre_hook(self._reduced_hook)
            )
        self.optimizer._dmaudit_capture = self
        self._attached = True

    def detach(self) -> None:
        """Remove our hooks; restore the previous step hook if ours is still the installed one."""
        if not self._attached:
            return
        if self.optimizer.step_hook == self._step_hook:
            self.optimizer.step_hook = self._previous_hook
        else:
            logger.warning("the optimizer's step hook was replaced after attach; leaving it")
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.optimizer._dmaudit_capture = None
        self._inputs = []
        self._batch_sizes = []
        self._pending = None
        self._attached = False

    @property
    def attached(self) -> bool:
        return self._attached

    # -- hooks -----------------------------------------------------------------------------------
    def _forward_hook(self, module: torch.nn.Module, args: tuple, output) -> None:
        if not (module.training and torch.is_grad_enabled()) or not args:
            return
        x = args[0]
        if not isinstance(x, torch.Tensor):
            return
        self._seen += int(x.shape[0]) if x.dim() else 1
        if self._should_capture(self.step + 1):
            self._inputs.append(x.detach().to("cpu", copy=True))

    def _step_hook(self, optimizer: DPOptimizer) -> None:
        if self._previous_hook is not None:
            self._previous_hook(optimizer)  # the accountant first: never break ε
        self.step += 1
        self._batch_sizes.append(self._seen)
        self._seen = 0
        if self._should_capture(self.step):
            if self.distributed:
                self._pending = self._snapshot_distributed(optimizer)
            else:
                self._pending = self._snapshot(optimizer)
            if self._pending is not None:
                self._pending.batch_sizes = self._batch_sizes
            self._batch_sizes = []
        self._inputs = []

    def _reduced_hook(self, *_args) -> None:
        """Rank 0 under DDP: the global privatised sum, after ``reduce_gradients``."""
        if self._pending is None:
            return
        opt = self.optimizer
        factor = _denominator(opt) * (opt.world_size if opt.loss_reduction == "mean" else 1)
        self._pending.denominator = factor
        sums = self._pending.imprint
        if sums is None:
            return
        with torch.no_grad():
            for name, p in (
                ("weight", self.block.imprint.weight),
                ("bias", self.block.imprint.bias),
            ):
                noised = (p.grad.detach().double() * factor).float().cpu()
                setattr(sums, f"{name}_noised", noised.reshape(p.shape))

    def _post_step_hook(self, *_args) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and (not self.distributed or self.rank == 0):
            self._on_capture(pending)

    def _snapshot_distributed(self, optimizer: DPOptimizer) -> CapturedStep | None:
        """Collectives on every rank: rank 0 gets all inputs and the global clean clipped sum.

        Returns the partial capture on rank 0 (the noised sums follow in the pre-step hook) and
        ``None`` elsewhere.
        """
        import torch.distributed as dist

        denom = _denominator(optimizer)
        clean = None
        with torch.no_grad():
            if self.block is not None:
                weight, bias = self.block.imprint.weight, self.block.imprint.bias
                # rank 0 keeps its clean sum in summed_grad; Opacus makes the other ranks' p.grad
                # a view of summed_grad and scales it in place, so their clean sum is p.grad·denom
                if self.rank == 0:
                    local = [weight.summed_grad, bias.summed_grad]
                else:
                    local = [weight.grad * denom, bias.grad * denom]
                flat = torch.cat([t.detach().reshape(-1).double() for t in local])  # a copy
                dist.reduce(flat, dst=0, op=dist.ReduceOp.SUM)
                w_clean = flat[: weight.numel()].float().cpu().reshape(weight.shape)
                clean = (w_clean, flat[weight.numel() :].float().cpu())
            inputs = self._gather_inputs()
        if self.rank != 0:
            return None
        noised = None
        if clean is not None:  # the noised sums are filled after the all-reduce
            noised = (torch.zeros_like(clean[0]), torch.zeros_like(clean[1]))
        return self._captured(optimizer, noised, clean, inputs, denom)

    def _input_shape(self) -> tuple[int, ...]:
        if self.block is not None:
            return self.block.image_shape
        return tuple(self._inputs[0].shape[1:]) if self._inputs else ()

    def _gather_inputs(self) -> torch.Tensor:
        """Every rank's captured inputs, concatenated in rank order on rank 0 (empty elsewhere)."""
        import torch.distributed as dist

        mine = torch.cat(self._inputs) if self._inputs else None
        world = dist.get_world_size()
        # every rank learns the shape of one sample from a rank that has one
        dims = torch.zeros(8, dtype=torch.long)
        shape = self._input_shape()
        if mine is not None and len(shape) <= 7:
            dims[0] = len(shape) + 1
            dims[1 : len(shape) + 1] = torch.tensor(shape, dtype=torch.long)
        all_dims = [torch.zeros_like(dims) for _ in range(world)]
        dist.all_gather(all_dims, dims)
        known = next((d for d in all_dims if int(d[0]) > 0), None)
        shape = tuple(int(v) for v in known[1 : int(known[0])]) if known is not None else ()
        if mine is None:
            mine = torch.zeros((0, *shape))
        count = torch.tensor([mine.shape[0]], dtype=torch.long)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        longest = max(int(c) for c in counts)
        padded = torch.zeros((longest, *shape), dtype=torch.float32)
        padded[: mine.shape[0]] = mine.float()
        bucket = [torch.zeros_like(padded) for _ in range(world)] if self.rank == 0 else None
        dist.gather(padded, bucket, dst=0)
        if self.rank != 0:
            return torch.zeros((0, *shape))
        return torch.cat([b[: int(c)] for b, c in zip(bucket, counts)])

    def _snapshot(self, optimizer: DPOptimizer) -> CapturedStep:
        denom = _denominator(optimizer)
        noised = clean = None
        with torch.no_grad():
            if self.block is not None:
                weight, bias = self.block.imprint.weight, self.block.imprint.bias
                w_noised = (weight.grad.detach().double() * denom).float().cpu()
                b_noised = (bias.grad.detach().double() * denom).float().cpu()
                w_clean = weight.summed_grad.detach().to("cpu", copy=True)
                b_clean = bias.summed_grad.detach().to("cpu", copy=True)
                noised = (w_noised, b_noised)
                clean = (w_clean.reshape(w_noised.shape), b_clean.reshape(b_noised.shape))
            if self._inputs:
                inputs = torch.cat(self._inputs)
            else:
                inputs = torch.zeros((0, *self._input_shape()))
        return self._captured(optimizer, noised, clean, inputs, denom)

    def _captured(self, optimizer, noised, clean, inputs, denom) -> CapturedStep:
        imprint = None
        if self.block is not None and noised is not None and clean is not None:
            with torch.no_grad():
                device = self.block.imprint.weight.device
                membership = self.block.membership(inputs.to(device)).cpu()
            imprint = ImprintSums(
                geometry=self.block.geometry(),
                weight_noised=noised[0],
                bias_noised=noised[1],
                weight_clean=clean[0],
                bias_clean=clean[1],
                membership=membership,
            )
        return CapturedStep(
            step=self.step,
            noise_multiplier=float(optimizer.noise_multiplier),
            max_grad_norm=float(optimizer.max_grad_norm),
            denominator=denom,
            clipping=self.clipping,
            inputs=inputs,
            imprint=imprint,
        )
