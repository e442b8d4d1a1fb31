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

With ``mechanism=True`` an audited step also records statistics of the DP mechanism itself over
*all* parameters (:mod:`.mechanism`): the noise (noised − clean sums), whether the clean sum is the
per-sample gradients clipped to C, the batch sizes of every step (counted at every step: one
integer each), and the accountant's history. Under ``BatchMemoryManager`` the clean sums are
copied at each physical batch's forward of an audited step, so that the last physical batch's own
clipped sum is known; under DDP every rank sends its batch sizes and clipping statistics to rank
0 (one small collective each), and rank 0 measures the noise, which only it adds.

Nothing here writes to a tensor that training reads, draws random numbers, or runs the model.
The Opacus internals read here (``summed_grad``, ``_is_last_step_skipped``, the step-hook slot,
...) are listed, with accessors, in :mod:`opacus_dmaudit._opacus`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from opacus.optimizers import DPOptimizer

from .._opacus import (
    accumulated_iterations,
    attach_step_hook,
    attached_capture,
    expected_batch_size,
    grad_sample,
    hooked_module,
    last_step_skipped,
    mark_attached,
    noise_denominator,
    norm_sample,
    original_optimizer,
    process_rank,
    restore_step_hook,
    secure_mode,
    step_hook,
    summed_grad,
    world_size,
)
from ..privacy.accountant import history_from_accountant, steps_from_accountant
from .imprint import ImprintBlock, find_imprint_block
from .mechanism import clean_sums_before, noise_signs, snapshot_clipping, snapshot_noise
from .step import CapturedStep, ImprintSums

__all__ = ["GradientCapture", "clipping_mode"]

logger = logging.getLogger(__name__)


def clipping_mode(optimizer: DPOptimizer) -> str:
    """``"flat"``, ``"per_layer"`` or ``"adaptive"`` for an Opacus optimizer."""
    from opacus.optimizers import AdaClipDPOptimizer, DPPerLayerOptimizer

    names = {type(c).__name__ for c in type(optimizer).__mro__}
    if isinstance(optimizer, DPPerLayerOptimizer) or "DistributedPerLayerOptimizer" in names:
        return "per_layer"
    if isinstance(optimizer, AdaClipDPOptimizer):
        return "adaptive"
    return "flat"


#: Keyword names under which models take their batch (the first found is the batch).
_INPUT_NAMES = ("pixel_values", "input", "inputs", "x", "images", "input_ids")


def batch_tensor(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, str]:
    """The batch among a forward call's arguments, and what the batch was.

    The first positional tensor; in a dict (a Hugging Face-style batch) or a keyword, the
    tensor under one of :data:`_INPUT_NAMES`, else the first tensor; in a tuple or list, its
    first tensor. Returns ``(tensor or None, kind)`` with kind ``"tensor"``, ``"dict"``,
    ``"sequence"``, ``"keyword"`` or ``"none"``.
    """
    first = args[0] if args else None
    if isinstance(first, torch.Tensor):
        return first, "tensor"
    if isinstance(first, dict):
        return _named_tensor(first), "dict"
    if isinstance(first, tuple | list):
        found = next((v for v in first if isinstance(v, torch.Tensor)), None)
        return found, "sequence"
    found = _named_tensor(kwargs)
    return found, "keyword" if found is not None else "none"


def _named_tensor(values: dict) -> torch.Tensor | None:
    named = [values.get(k) for k in _INPUT_NAMES]
    tensors = [v for v in named + list(values.values()) if isinstance(v, torch.Tensor)]
    return tensors[0] if tensors else None


def _count_from_gradients(optimizer: DPOptimizer) -> int:
    """This step's batch size from the per-sample gradients, ``-1`` when they cannot tell."""
    if last_step_skipped(optimizer):
        return -1  # several physical batches; the earlier ones' gradients are gone
    for p in optimizer.params:
        samples = grad_sample(p)
        if isinstance(samples, list):
            return sum(len(s) for s in samples)
        if samples is not None:
            return len(samples)
        norms = norm_sample(p)
        if norms is not None:
            return len(norms)
    return -1


def _combine_clipping(stats: list) -> dict | None:
    """One clipping record from every rank's (largest ratios, summed sample counts)."""
    stats = [s for s in stats if s]
    if not stats:
        return None
    out = dict(stats[0])
    out["samples"] = sum(s.get("samples", 0) for s in stats)
    out["partial"] = any(s.get("partial") for s in stats)
    for key in ("residual", "max_clipped", "max_norm", "unclipped_residual", "effective_max"):
        values = [s[key] for s in stats if s.get(key) is not None]
        out[key] = max(values) if values else None
    return {k: v for k, v in out.items() if v is not None}


class GradientCapture:
    """Chains onto a ``DPOptimizer``'s step hook and snapshots the imprint gradients.

    Args:
        optimizer: the optimizer returned by ``PrivacyEngine.make_private``.
        block: the ``ImprintBlock`` to read; found through the optimizer's parameters if ``None``
            and ``model`` is not given.
        model: without an ``ImprintBlock``: the module whose forward inputs are the batch (the
            model ``make_private`` returned, or with ``wrap_model=False`` the model it hooked);
            the capture then records no imprint sums.
        should_capture: called with the 1-based index of the upcoming step; ``True`` to capture it.
        on_capture: receives each :class:`CapturedStep` right after the parameter update.
        start_step: steps already taken (so step numbers continue across resumes).
        mechanism: also record the DP mechanism's statistics on captured steps (see
            :mod:`.mechanism`).
        accountant: the privacy accountant, whose history the mechanism statistics record.
        dataset_size: N, the population the sampling rate applies to (``None``: unknown; the
            sampling check then brackets it from the expected batch size).
        search: look for an ``ImprintBlock`` among the optimizer's parameters when neither
            ``block`` nor ``model`` is given (``False``: mechanism statistics only).
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
        mechanism: bool = False,
        accountant=None,
        dataset_size: int | None = None,
        search: bool = True,
    ) -> None:
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError(
                f"expected an Opacus DPOptimizer, got {type(optimizer).__name__}: attach the "
                "auditor to the optimizer returned by PrivacyEngine.make_private(...)"
            )
        if attached_capture(optimizer) is not None:
            raise RuntimeError("another auditor is attached to this optimizer; detach it first")
        params = list(optimizer.params)
        if block is None and model is None and search:
            block = find_imprint_block(params)
        if model is not None:
            model = hooked_module(model)
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
        self.mechanism = bool(mechanism)
        self.accountant = accountant
        self._counted_seen = False  # the forward hook saw this step's inputs
        self._before: list | None = None  # clean sums before the last physical batch (BMM)
        self._size_counts: dict[int, int] = {}  # batch size -> steps, since attach
        self._start = (0, 0)  # (steps taken, steps the accountant counted) at attach
        self.dataset_size = dataset_size
        self._previous_signs = None  # noise signs of the step before an audited one
        self.input_kind = None  # what the model's forward got as its batch, when not a tensor
        names = {}
        if model is not None:
            names = {id(p): name for name, p in model.named_parameters()}
        elif block is not None:
            names = {id(p): f"imprint.{name}" for name, p in block.imprint.named_parameters()}
        self._names = names

    # -- attach / detach -------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        """Whether the optimizer is Opacus's ``DistributedDPOptimizer`` in a multi-process run."""
        return world_size(self.optimizer) > 1

    @property
    def rank(self) -> int:
        return process_rank(self.optimizer)

    def attach(self) -> None:
        if self._attached:
            raise RuntimeError("this capture is already attached")
        if attached_capture(self.optimizer) is not None:
            raise RuntimeError("another auditor is attached to this optimizer; detach it first")
        self._previous_hook = step_hook(self.optimizer)
        attach_step_hook(self.optimizer, self._step_hook)
        wrapped = original_optimizer(self.optimizer)
        self._handles = [wrapped.register_step_post_hook(self._post_step_hook)]
        if self.block is not None:
            self._handles.append(self.block.register_forward_hook(self._forward_hook))
        elif self.model is not None:  # models called with keyword inputs (pixel_values=...) too
            self._handles.append(
                self.model.register_forward_hook(self._model_forward_hook, with_kwargs=True)
            )
        if self.distributed and self.rank == 0:
            self._handles.append(wrapped.register_step_pre_hook(self._reduced_hook))
        mark_attached(self.optimizer, self)
        self._start = (self.step, steps_from_accountant(self.accountant))
        self._attached = True

    def detach(self) -> None:
        """Remove our hooks; restore the previous step hook if ours is still the installed one."""
        if not self._attached:
            return
        if step_hook(self.optimizer) == self._step_hook:
            restore_step_hook(self.optimizer, self._previous_hook)
        else:
            logger.warning("the optimizer's step hook was replaced after attach; leaving it")
        for handle in self._handles:
            handle.remove()
        self._handles = []
        mark_attached(self.optimizer, None)
        self._inputs = []
        self._batch_sizes = []
        self._before = None
        self._pending = None
        self._attached = False

    @property
    def attached(self) -> bool:
        return self._attached

    # -- hooks -----------------------------------------------------------------------------------
    def _model_forward_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output):
        x, kind = batch_tensor(args, kwargs)
        if kind not in ("tensor", "keyword"):
            self.input_kind = kind
        if x is not None:
            self._forward_hook(module, (x,), output)

    def _forward_hook(self, module: torch.nn.Module, args: tuple, output) -> None:
        if not (module.training and torch.is_grad_enabled()) or not args:
            return
        x = args[0]
        if not isinstance(x, torch.Tensor):
            return
        self._seen += int(x.shape[0]) if x.dim() else 1
        self._counted_seen = True
        if self._should_capture(self.step + 1):
            self._inputs.append(x.detach().to("cpu", copy=True))
            if self.mechanism and last_step_skipped(self.optimizer):
                # BatchMemoryManager: what the earlier physical batches summed to so far
                self._before = clean_sums_before(self.optimizer)

    def _step_hook(self, optimizer: DPOptimizer) -> None:
        if self._previous_hook is not None:
            self._previous_hook(optimizer)  # the accountant first: never break ε
        self.step += 1
        seen = self._seen if self._counted_seen else _count_from_gradients(optimizer)
        self._batch_sizes.append(seen)
        self._seen = 0
        self._counted_seen = False
        if self._should_capture(self.step):
            if self.distributed:
                self._pending = self._snapshot_distributed(optimizer)
            else:
                self._pending = self._snapshot(optimizer)
                if self.mechanism:
                    clean = [summed_grad(p) for p in optimizer.params]
                    self._pending.mechanism = self._mechanism_snapshot(optimizer, clean)
            if self._pending is not None:
                self._pending.batch_sizes = self._batch_sizes
                self._pending.input_kind = self.input_kind
                if self.mechanism:
                    self._record_sampling(optimizer, self._pending)
            self._batch_sizes = []
            self._before = None
            self._previous_signs = None
        elif self.mechanism and self._should_capture(self.step + 1):
            self._keep_signs(optimizer)
        self._inputs = []

    def _keep_signs(self, optimizer: DPOptimizer) -> None:
        """The step before an audited one: keep its noise signs at the fixed positions, so the
        audit can tell whether the noise was drawn afresh (cheap: a thousand coordinates)."""
        if self.distributed and self.rank != 0:
            return
        try:
            self._previous_signs = noise_signs(optimizer, denominator=noise_denominator(optimizer))
        except Exception:  # never take training down for a cross-check
            logger.exception("reading the noise signs of step %d failed", self.step)
            self._previous_signs = None

    def _mechanism_snapshot(self, optimizer: DPOptimizer, clean: list) -> dict:
        """Noise and clipping statistics of this process (see :mod:`.mechanism`)."""
        skipped = last_step_skipped(optimizer)
        out = {
            "clipping": snapshot_clipping(
                optimizer,
                clean=clean,
                before=self._before if skipped else None,
                partial=skipped and self._before is None,
                module=self.model,
            )
        }
        if not self.distributed or self.rank == 0:  # only rank 0 adds noise under DDP
            out["noise"] = snapshot_noise(
                optimizer, denominator=noise_denominator(optimizer), names=self._names
            )
            if out["noise"] is not None:
                out["noise"]["previous_signs"] = self._previous_signs
        out["secure_mode"] = secure_mode(optimizer)
        return out

    def _record_sampling(self, optimizer: DPOptimizer, captured: CapturedStep) -> None:
        """Add the run's batch sizes so far and the accountant's view to the mechanism record."""
        for size in captured.batch_sizes:
            size = -1 if size < 0 else int(size)
            self._size_counts[size] = self._size_counts.get(size, 0) + 1
        history = history_from_accountant(self.accountant)
        try:
            accumulated = accumulated_iterations(optimizer)
        except Exception:  # per-sample gradients already gone: the common case is one
            accumulated = 1
        expected = expected_batch_size(optimizer)
        world = world_size(optimizer)
        mech = captured.mechanism if captured.mechanism is not None else {}
        mech["sampling"] = {
            "counts": dict(self._size_counts),
            "sample_rate": history[-1][1] if history else None,
            "expected_batch_size": float(expected) * world * accumulated if expected else None,
            "slack": float(accumulated),
            "dataset_size": self.dataset_size,
            "accumulated": accumulated,
            "loss_reduction": getattr(optimizer, "loss_reduction", None),
        }
        mech["accountant"] = (
            None
            if self.accountant is None
            else {
                "history": history[-1:],
                "counted": steps_from_accountant(self.accountant) - self._start[1],
                "taken": self.step - self._start[0],
                # the whole run: a resumed accountant must hold every step taken (opacus#834)
                "total_counted": steps_from_accountant(self.accountant),
                "total_taken": self.step,
            }
        )
        captured.mechanism = mech

    def _gather_mechanism(self, optimizer: DPOptimizer, clean: list) -> dict | None:
        """Collectives on every rank: global batch sizes and every rank's clipping statistics."""
        import torch.distributed as dist

        sizes = torch.tensor(
            [s if s >= 0 else -(10**9) for s in self._batch_sizes], dtype=torch.long
        )
        dist.all_reduce(sizes, op=dist.ReduceOp.SUM)
        self._batch_sizes = [int(s) if s >= 0 else -1 for s in sizes.tolist()]
        local = self._mechanism_snapshot(optimizer, clean)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local["clipping"])
        if self.rank != 0:
            return None
        local["clipping"] = _combine_clipping(gathered)
        return local

    def _reduced_hook(self, *_args) -> None:
        """Rank 0 under DDP: the global privatised sum, after ``reduce_gradients``."""
        if self._pending is None:
            return
        opt = self.optimizer
        world = world_size(opt) if opt.loss_reduction == "mean" else 1
        factor = noise_denominator(opt) * world
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

        denom = noise_denominator(optimizer)
        clean = None
        with torch.no_grad():
            if self.block is not None:
                weight, bias = self.block.imprint.weight, self.block.imprint.bias
                # rank 0 keeps its clean sum in summed_grad; Opacus makes the other ranks' p.grad
                # a view of summed_grad and scales it in place, so their clean sum is p.grad·denom
                if self.rank == 0:
                    local = [summed_grad(weight), summed_grad(bias)]
                else:
                    local = [weight.grad * denom, bias.grad * denom]
                flat = torch.cat([t.detach().reshape(-1).double() for t in local])  # a copy
                dist.reduce(flat, dst=0, op=dist.ReduceOp.SUM)
                w_clean = flat[: weight.numel()].float().cpu().reshape(weight.shape)
                clean = (w_clean, flat[weight.numel() :].float().cpu())
            inputs = self._gather_inputs()
            mechanism = None
            if self.mechanism:  # this rank's clean sums: see the comment above
                sums = [
                    summed_grad(p) if self.rank == 0 or p.grad is None else p.grad * denom
                    for p in optimizer.params
                ]
                mechanism = self._gather_mechanism(optimizer, sums)
        if self.rank != 0:
            return None
        noised = None
        if clean is not None:  # the noised sums are filled after the all-reduce
            noised = (torch.zeros_like(clean[0]), torch.zeros_like(clean[1]))
        captured = self._captured(optimizer, noised, clean, inputs, denom)
        captured.mechanism = mechanism
        return captured

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
        denom = noise_denominator(optimizer)
        noised = clean = None
        with torch.no_grad():
            if self.block is not None:
                weight, bias = self.block.imprint.weight, self.block.imprint.bias
                w_noised = (weight.grad.detach().double() * denom).float().cpu()
                b_noised = (bias.grad.detach().double() * denom).float().cpu()
                w_clean = summed_grad(weight).detach().to("cpu", copy=True)
                b_clean = summed_grad(bias).detach().to("cpu", copy=True)
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
