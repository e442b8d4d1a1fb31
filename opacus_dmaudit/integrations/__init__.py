"""Adapters for training frameworks; each imports its framework only when it is imported itself.

* :mod:`opacus_dmaudit.integrations.lightning`: ``DMAuditCallback`` for PyTorch Lightning.
* :mod:`opacus_dmaudit.integrations.huggingface`: ``DMAuditTrainerCallback`` for HF ``Trainer``.

Both find the ``DPOptimizer`` inside the framework's optimizer wrappers and the model
``make_private`` returned inside the framework's module, attach the same
:class:`~opacus_dmaudit.DMAuditor` (capture inside ``optimizer.step``, where noise has been added)
in any of its three modes (live imprint, shadow, mechanism checks),
score in the framework's after-step callback, act on rank zero only and keep audit state across
resume.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from opacus.optimizers import DPOptimizer

from .._opacus import accountant_history, set_accountant_history, world_size

__all__ = ["find_dp_optimizer", "find_private_model", "checkpoint_state", "restore_state"]

logger = logging.getLogger(__name__)

_WRAPPER_ATTRIBUTES = ("_optimizer", "optimizer", "_opt", "opt")


def find_dp_optimizer(optimizers) -> DPOptimizer:
    """The one Opacus ``DPOptimizer`` in ``optimizers`` (an optimizer, a wrapper or a list of them).

    Wrappers are unwrapped through the attributes frameworks use for the wrapped optimizer
    (Lightning's ``LightningOptimizer._optimizer``, Accelerate's ``AcceleratedOptimizer.optimizer``).

    Raises:
        ValueError: no ``DPOptimizer`` is found, or more than one.
    """
    found: list[DPOptimizer] = []
    seen: set[int] = set()

    def visit(obj, depth: int) -> None:
        if obj is None or id(obj) in seen or depth > 8:
            return
        seen.add(id(obj))
        if isinstance(obj, DPOptimizer):
            # LightningOptimizer subclasses the class of what it wraps: look inside first
            inner = [getattr(obj, name, None) for name in _WRAPPER_ATTRIBUTES]
            inner = [i for i in inner if isinstance(i, DPOptimizer) and i is not obj]
            if inner:
                visit(inner[0], depth + 1)
            else:
                found.append(obj)
            return
        if isinstance(obj, dict):
            obj = list(obj.values())
        if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
            for item in list(obj):
                visit(item, depth + 1)
            return
        for name in _WRAPPER_ATTRIBUTES:
            visit(getattr(obj, name, None), depth + 1)

    visit(optimizers, 0)
    if not found:
        raise ValueError(
            "no Opacus DPOptimizer found among the trainer's optimizers: create it with "
            "PrivacyEngine.make_private(...) and hand that optimizer to the trainer"
        )
    if len(found) > 1:
        raise ValueError(f"found {len(found)} DPOptimizers; the auditor reads exactly one")
    return found[0]


def find_private_model(module):
    """The module ``make_private`` returned (Opacus's ``GradSampleModule``) inside ``module``.

    The auditor hooks its forward for the batch (shadow audits, batch sizes). Falls back to
    ``module`` itself when no ``GradSampleModule`` is found, and to ``None`` without a module.
    """
    if module is None:
        return None
    from opacus.grad_sample import GradSampleModule
    from opacus.grad_sample.gsm_base import AbstractGradSampleModule

    kinds = (GradSampleModule, AbstractGradSampleModule)
    if isinstance(module, kinds):
        return module
    for sub in getattr(module, "modules", lambda: [])():
        if isinstance(sub, kinds):
            return sub
    return module


def is_distributed(optimizer: DPOptimizer) -> bool:
    """Whether ``optimizer`` runs under Opacus's DDP (every rank must then attach a capture)."""
    return world_size(optimizer) > 1


def checkpoint_state(auditor) -> dict:
    """JSON-safe state for a framework checkpoint: the auditor's, and the accountant's history.

    Frameworks do not checkpoint Opacus's accountant; without its history ε would restart from
    zero after a resume, so the adapters carry it along with the audit.
    """
    state: dict = {"auditor": auditor.state_dict()}
    accountant = auditor.accountant
    if accountant is not None and hasattr(accountant, "history"):
        state["accountant"] = {
            "mechanism": accountant.mechanism(),
            "history": [list(entry) for entry in accountant_history(accountant)],
        }
    return state


def restore_state(auditor, state: dict) -> None:
    """Undo :func:`checkpoint_state` before ``attach``; an accountant with history is left alone."""
    auditor.load_state_dict(state["auditor"])
    saved, accountant = state.get("accountant"), auditor.accountant
    if not saved or accountant is None or accountant_history(accountant):
        return  # the user restored the accountant already (or there is none)
    if saved["mechanism"] != accountant.mechanism():
        logger.warning(
            "checkpoint's accountant is %r, this run's is %r: ε restarts from zero",
            saved["mechanism"],
            accountant.mechanism(),
        )
        return
    set_accountant_history(accountant, saved["history"])
