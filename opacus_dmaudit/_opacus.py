"""The private or undocumented Opacus, torch and TensorBoard attributes the package relies on.

The audit reads what Opacus computes inside ``optimizer.step`` (the clean clipped sum, the
per-sample gradients, the noise it added) and the accountant's history. Much of that is not
public API: attributes Opacus sets for itself, private flags, and internals of its PRV
accountant. Every such attribute is listed here, with where the package uses it and why, and
read through a small accessor, so that an Opacus release that renames one breaks one function
and one test (``tests/test_opacus_contract.py``, which checks each against a real
``PrivacyEngine().make_private(...)``), not the audit in ten places.

Per parameter ``p`` of a ``DPOptimizer`` (set by Opacus's grad-sample module and optimizer):

================================  ==============================================================
``p.summed_grad``                 the clean clipped sum (no noise) of the step, until
                                  ``zero_grad``; :func:`summed_grad`. The capture copies it
                                  (``capture/hooks.py``: the imprint's clean sums, the noise =
                                  noised − clean; ``capture/mechanism.py``: noise statistics,
                                  clean sums before the last physical batch).
``p.grad_sample``                 per-sample gradients, a tensor, or a list of them while
                                  physical batches accumulate; :func:`grad_sample`. Clipping
                                  check and batch size (``capture/mechanism.py``,
                                  ``capture/hooks.py``).
``p._norm_sample``                ghost clipping's per-sample gradient norms (private);
                                  :func:`norm_sample`. Clipping check and batch size in ghost
                                  mode (``capture/mechanism.py``, ``capture/hooks.py``).
================================  ==============================================================

On the ``DPOptimizer``:

================================  ==============================================================
``_is_last_step_skipped``         private: ``True`` between the physical batches of one logical
                                  step (``BatchMemoryManager``); :func:`last_step_skipped`
                                  (``capture/hooks.py``: batch sizes, clean sums before the last
                                  physical batch).
``expected_batch_size``,          how ``scale_grad`` divides the noised sum (``"mean"``) or not
``accumulated_iterations``,       (``"sum"``): :func:`noise_denominator` turns ``p.grad`` back
``loss_reduction``                into the noised sum (``capture/hooks.py``); the expected batch
                                  size and accumulation also give the sampling check its N·q
                                  (:func:`expected_batch_size`, :func:`accumulated_iterations`;
                                  ``auditor.py`` warns about per-sample memory with it).
``step_hook``,                    the one per-step callback slot, where ``make_private`` put the
``attach_step_hook``              accountant; the capture chains onto it and restores it
                                  (:func:`step_hook`, :func:`attach_step_hook`,
                                  :func:`restore_step_hook`; ``capture/hooks.py``).
``secure_mode``, ``generator``   whether the noise comes from a cryptographically secure
                                  generator, and the user's noise generator; stated in the run
                                  file (:func:`secure_mode`; ``auditor.py``).
``grad_state``                    FSDP's per-parameter clean sums, kept off the parameter
                                  (:func:`is_fsdp`: FSDP is refused at attach, ``auditor.py``).
``original_optimizer``            the wrapped torch optimizer, whose public
                                  ``register_step_pre_hook`` / ``register_step_post_hook`` fire
                                  around the parameter update (:func:`original_optimizer`;
                                  ``capture/hooks.py``).
``world_size``, ``rank``          set by ``DistributedDPOptimizer`` only (:func:`world_size`,
                                  :func:`process_rank`; ``capture/hooks.py``,
                                  ``integrations/__init__.py``).
``max_grad_norms``                per-layer clipping's bounds (``DPPerLayerOptimizer``);
                                  :func:`per_layer_bounds` (``capture/mechanism.py``).
``_adjusted_noise_multiplier``    private: the σ adaptive ghost clipping
                                  (``PrivacyEngineAdaptiveClipping``) adds noise at, while
                                  ``noise_multiplier`` keeps the accounted σ;
``unclipped_num_std``             ``AdaClipDPOptimizer``'s σ_u, which raises the σ it adds noise
                                  at to ``(σ⁻² − (2σ_u)⁻²)^(−1/2)``. Both through
                                  :func:`effective_noise_multiplier` (``capture/mechanism.py``:
                                  the predicted noise std).
``_dmaudit_capture``              set by this package: the capture attached to the optimizer
                                  (one at a time); :func:`attached_capture`,
                                  :func:`mark_attached` (``capture/hooks.py``).
class names                       ``"FastGradientClipping"`` in the class of a ghost optimizer
                                  (:func:`is_ghost`; ``auditor.py``);
                                  ``"DistributedPerLayerOptimizer"``, DDP per-layer clipping
                                  in older Opacus releases (``capture/hooks.py``:
                                  ``clipping_mode``; Opacus 1.6's
                                  ``SimpleDistributedPerLayerOptimizer`` is a
                                  ``DPPerLayerOptimizer``).
================================  ==============================================================

Elsewhere in Opacus:

================================  ==============================================================
``module.max_grad_norm``          the ghost grad-sample module's own clipping bound
                                  (:func:`module_clipping_bound`; ``capture/mechanism.py``).
``accountant.history``            ``[(σ, q, steps), ...]``, read (:func:`accountant_history`;
                                  ``privacy/accountant.py``) and set
                                  (:func:`set_accountant_history`; ``privacy/bounds.py``,
                                  ``auditor.py``: a frozen copy per audit,
                                  ``integrations/__init__.py``: checkpoints).
``PrivacyEngine.dataset``         the dataset ``make_private`` saw (Opacus keeps it to warn
                                  about a dataset switch): its length N is the population the
                                  sampling rate q applies to (:func:`dataset_size`;
                                  ``auditor.py``: the sampling check and the measured q).
``GradSampleHooks._module``       the model ``make_private(..., wrap_model=False)`` hooks
                                  (:func:`hooked_module`; ``auditor.py``).
``DEFAULT_ALPHAS``                an RDP accountant's orders (:func:`rdp_orders`;
                                  ``privacy/accountant.py``).
``PRVAccountant._get_dprv``       private: the discretised privacy-loss distribution
                                  (``domain.ts``, ``pmf``) whose tail gives the run's privacy
                                  profile (:func:`prv_loss_distribution`; ``privacy/bounds.py``).
``optimizer._generate_noise``     private: the function ``DPOptimizer.add_noise`` looks up in
                                  ``opacus.optimizers.optimizer`` at each step (the ghost, AdaClip
                                  and FSDP optimizers import their own reference); the demo's
                                  deliberately broken mechanism scales it (:func:`scaled_noise`;
                                  ``demo.py``).
``gsm_base.AbstractGradSampleModule``  the base of every grad-sample module, imported from its
                                  module (``integrations/__init__.py``).
================================  ==============================================================

torch and TensorBoard:

================================  ==============================================================
``SummaryWriter._get_file_writer``  private: the ``FileWriter`` (``add_event``, ``add_summary``,
                                  ``get_logdir``) for the session-start event, the hparams
                                  summaries and the event files' permissions
                                  (:func:`file_writer`; ``sinks/tensorboard.py``).
================================  ==============================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "summed_grad",
    "grad_sample",
    "norm_sample",
    "last_step_skipped",
    "noise_denominator",
    "accumulated_iterations",
    "expected_batch_size",
    "step_hook",
    "attach_step_hook",
    "restore_step_hook",
    "original_optimizer",
    "world_size",
    "process_rank",
    "per_layer_bounds",
    "effective_noise_multiplier",
    "attached_capture",
    "mark_attached",
    "is_ghost",
    "is_fsdp",
    "secure_mode",
    "dataset_size",
    "hooked_module",
    "module_clipping_bound",
    "accountant_history",
    "set_accountant_history",
    "rdp_orders",
    "prv_loss_distribution",
    "scaled_noise",
    "file_writer",
]


# -- per parameter ---------------------------------------------------------------------------------
def summed_grad(p: torch.Tensor) -> torch.Tensor | None:
    """The clean clipped sum of the step (``None`` before clipping or after ``zero_grad``)."""
    return getattr(p, "summed_grad", None)


def grad_sample(p: torch.Tensor) -> torch.Tensor | list[torch.Tensor] | None:
    """Per-sample gradients: a tensor, a list while physical batches accumulate, or ``None``."""
    return getattr(p, "grad_sample", None)


def norm_sample(p: torch.Tensor) -> torch.Tensor | None:
    """Ghost clipping's per-sample gradient norms (``None`` outside ghost mode)."""
    return getattr(p, "_norm_sample", None)


# -- the DPOptimizer -------------------------------------------------------------------------------
def last_step_skipped(optimizer) -> bool:
    """Whether the optimizer is between the physical batches of one logical step."""
    return bool(getattr(optimizer, "_is_last_step_skipped", False))


def accumulated_iterations(optimizer) -> int:
    """Physical batches accumulated into this step (raises where per-sample gradients are gone)."""
    return int(optimizer.accumulated_iterations)


def expected_batch_size(optimizer) -> int | None:
    """The expected batch size ``make_private`` derived from the sampling rate (per process)."""
    return getattr(optimizer, "expected_batch_size", None)


def noise_denominator(optimizer) -> float:
    """The factor between ``p.grad`` after ``scale_grad`` and the noised sum.

    ``expected_batch_size · accumulated_iterations`` for ``loss_reduction="mean"``, 1 for
    ``"sum"``.
    """
    if optimizer.loss_reduction == "mean":
        return float(optimizer.expected_batch_size * optimizer.accumulated_iterations)
    return 1.0


def step_hook(optimizer) -> Callable | None:
    """The callback the optimizer runs once per logical step (the accountant's, by default)."""
    return optimizer.step_hook


def attach_step_hook(optimizer, hook: Callable) -> None:
    """Install ``hook`` in the optimizer's single step-hook slot (it must chain the previous)."""
    optimizer.attach_step_hook(hook)


def restore_step_hook(optimizer, hook: Callable | None) -> None:
    """Put back the step hook that was there before :func:`attach_step_hook`."""
    optimizer.step_hook = hook


def original_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer the ``DPOptimizer`` wraps (where torch's step hooks are registered)."""
    return optimizer.original_optimizer


def world_size(optimizer) -> int:
    """Processes of a ``DistributedDPOptimizer`` (1 for every other optimizer)."""
    return int(getattr(optimizer, "world_size", 1) or 1)


def process_rank(optimizer) -> int:
    """This process's rank under a ``DistributedDPOptimizer`` (0 for every other optimizer)."""
    return int(getattr(optimizer, "rank", 0) or 0)


def per_layer_bounds(optimizer) -> Sequence[float] | None:
    """Per-layer clipping's bound of each parameter, or ``None`` for one flat bound."""
    return getattr(optimizer, "max_grad_norms", None)


def effective_noise_multiplier(optimizer) -> float:
    """The σ the optimizer adds noise at (the accountant is told ``noise_multiplier``).

    Adaptive ghost clipping keeps its adjusted σ in ``_adjusted_noise_multiplier``;
    ``AdaClipDPOptimizer`` adds noise at ``(σ⁻² − (2σ_u)⁻²)^(−1/2)``, σ_u its
    ``unclipped_num_std``; every other optimizer at ``noise_multiplier``.
    """
    sigma = float(optimizer.noise_multiplier)
    adjusted = getattr(optimizer, "_adjusted_noise_multiplier", None)
    if adjusted is not None:
        return float(adjusted)
    if hasattr(optimizer, "unclipped_num_std") and sigma > 0:
        return (sigma**-2 - (2 * float(optimizer.unclipped_num_std)) ** -2) ** -0.5
    return sigma


def attached_capture(optimizer) -> Any:
    """The capture this package attached to ``optimizer``, or ``None``."""
    return getattr(optimizer, "_dmaudit_capture", None)


def mark_attached(optimizer, capture: Any) -> None:
    """Record ``capture`` (or ``None`` on detach) as the one attached to ``optimizer``."""
    optimizer._dmaudit_capture = capture


def is_ghost(optimizer) -> bool:
    """Whether ``optimizer`` is one of Opacus's ghost-clipping (fast gradient clipping) kinds."""
    return any("FastGradientClipping" in c.__name__ for c in type(optimizer).__mro__)


def is_fsdp(optimizer) -> bool:
    """Whether ``optimizer`` is Opacus's FSDP optimizer (clean sums kept in ``grad_state``)."""
    return any("FSDP" in c.__name__ for c in type(optimizer).__mro__) or hasattr(
        optimizer, "grad_state"
    )


def secure_mode(optimizer) -> bool | None:
    """Whether the optimizer draws its noise in Opacus's ``secure_mode`` (``None``: unknown)."""
    value = getattr(optimizer, "secure_mode", None)
    return None if value is None else bool(value)


# -- modules and accountants -----------------------------------------------------------------------
def module_clipping_bound(module) -> float | None:
    """The clipping bound a ghost grad-sample module applies itself (``None`` for others)."""
    return getattr(module, "max_grad_norm", None)


def dataset_size(privacy_engine) -> int | None:
    """N, the size of the dataset ``make_private`` saw (``None`` when unknown)."""
    dataset = getattr(privacy_engine, "dataset", None)
    try:
        return int(len(dataset)) if dataset is not None else None
    except TypeError:  # an iterable dataset has no length
        return None


def hooked_module(model):
    """The ``nn.Module`` behind what ``make_private(..., wrap_model=False)`` returned (its
    ``GradSampleHooks``), or ``model`` itself."""
    inner = getattr(model, "_module", None)
    if inner is not None and type(model).__name__.startswith("GradSampleHooks"):
        return inner
    return model


def accountant_history(accountant) -> list:
    """The accountant's ``(noise_multiplier, sample_rate, steps)`` entries as stored, oldest first
    (empty without an accountant or before the first step)."""
    return list(getattr(accountant, "history", None) or [])


def set_accountant_history(accountant, history: Sequence[Sequence]) -> None:
    """Replace the accountant's history (its only state) with ``(σ, q, steps)`` tuples."""
    accountant.history = [tuple(entry) for entry in history]


def rdp_orders(accountant=None) -> tuple[float, ...]:
    """The RDP orders ``accountant`` uses (Opacus's ``RDPAccountant.DEFAULT_ALPHAS`` without)."""
    from opacus.accountants import RDPAccountant

    return tuple(getattr(accountant, "DEFAULT_ALPHAS", None) or RDPAccountant.DEFAULT_ALPHAS)


def prv_loss_distribution(
    history: Sequence[tuple[float, float, int]], *, eps_error: float, delta_error: float
) -> tuple[Any, Any]:
    """``(t, pmf)``: the discretised privacy-loss distribution of ``history`` (Opacus's PRV).

    ``t`` are the privacy-loss values of the grid, ``pmf`` their probabilities (numpy arrays).
    """
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    set_accountant_history(acc, history)
    dprv = acc._get_dprv(eps_error=eps_error, delta_error=delta_error)
    return dprv.domain.ts, dprv.pmf


@contextlib.contextmanager
def scaled_noise(factor: float) -> Iterator[None]:
    """Within the block a ``DPOptimizer`` adds ``factor`` times the noise it reports.

    A deliberately broken mechanism, for demonstrations of the mechanism checks only. It reaches
    the optimizers whose ``add_noise`` is ``DPOptimizer``'s (flat and per-layer clipping, DDP),
    not the ghost, AdaClip or FSDP ones.
    """
    from opacus.optimizers import optimizer as opacus_optimizer

    original = opacus_optimizer._generate_noise

    def scaled(std, reference, generator=None, secure_mode=False):
        return original(std * factor, reference, generator, secure_mode)

    opacus_optimizer._generate_noise = scaled
    try:
        yield
    finally:
        opacus_optimizer._generate_noise = original


# -- torch and TensorBoard -------------------------------------------------------------------------
def file_writer(writer) -> Any:
    """The ``FileWriter`` behind a ``torch.utils.tensorboard.SummaryWriter``."""
    return writer._get_file_writer()
