"""PyTorch Lightning: ``DMAuditCallback``, the auditor as a ``Callback`` (imports Lightning).

Usage::

    trainer = L.Trainer(callbacks=[DMAuditCallback(every_n_steps=50, prior="embedded:mnist")])

The ``LightningModule`` makes its optimizer private in ``configure_optimizers`` (Opacus's usual
Lightning recipe) and keeps the ``PrivacyEngine`` as ``self.privacy_engine`` (or pass
``privacy_engine=``). The callback finds the ``DPOptimizer`` behind Lightning's wrappers at
``on_train_start``, captures inside ``optimizer.step`` where the noise has been added, scores in
``on_train_batch_end`` and logs through the trainer's ``TensorBoardLogger`` when it has one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..auditor import DMAuditor
from ..config import AuditConfig, resolve_config
from . import (
    checkpoint_state,
    find_dp_optimizer,
    find_private_model,
    is_distributed,
    restore_state,
)

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    try:
        import pytorch_lightning as pl
    except ImportError as err:
        raise ImportError("DMAuditCallback needs PyTorch Lightning: pip install lightning") from err

__all__ = ["DMAuditCallback"]

logger = logging.getLogger(__name__)


class DMAuditCallback(pl.Callback):
    """Runs a :class:`~opacus_dmaudit.DMAuditor` on a Lightning DP-SGD run.

    Args:
        log_dir: where audit artifacts go (default: ``<trainer.log_dir>/dmaudit``).
        privacy_engine: the ``PrivacyEngine`` (default: the module's ``privacy_engine``).
        model: the module whose forward receives each batch (default: the ``GradSampleModule``
            inside the ``LightningModule``, else the ``LightningModule`` itself).
        every_n_steps, delta, prior, shadow, public, config: as for
            :class:`~opacus_dmaudit.DMAuditor` (the essentials, and an
            :class:`~opacus_dmaudit.AuditConfig` for everything else). With an ``ImprintBlock``
            in the model the audit is live; without one, ``shadow=True`` simulates the
            worst-case imprint adversary on the module's real batches, and otherwise the
            mechanism checks run alone.
        **auditor_kwargs: any other :class:`~opacus_dmaudit.AuditConfig` field.

    Only global rank zero audits and writes. Under Opacus's DDP every rank attaches a capture
    that feeds rank zero; otherwise the other ranks do nothing. The audit state (step, generator)
    and the accountant's history are saved in Lightning checkpoints and restored on resume (the
    accountant only if the module has not restored it itself).
    """

    def __init__(
        self,
        *,
        log_dir: str | os.PathLike | None = None,
        privacy_engine=None,
        model: Any = None,
        every_n_steps: int | None = None,
        delta: float | None = None,
        prior: Any = None,
        shadow: Any = None,
        public: Any = None,
        config: AuditConfig | None = None,
        **auditor_kwargs: Any,
    ) -> None:
        if "writer" in auditor_kwargs:
            raise TypeError("the callback logs through the trainer's TensorBoardLogger; no writer=")
        self.log_dir = log_dir
        self.privacy_engine = privacy_engine
        self.model = model
        # validated now: a misspelt keyword fails here, not when training starts
        self.config = resolve_config(
            config,
            where="DMAuditCallback",
            every_n_steps=every_n_steps,
            delta=delta,
            prior=prior,
            shadow=shadow,
            public=public,
            **auditor_kwargs,
        )
        self.auditor: DMAuditor | None = None
        self._restored: dict[str, Any] | None = None
        self._last_state: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "DMAuditCallback"

    def _writer(self, trainer):
        for lg in trainer.loggers:
            if isinstance(lg, pl.loggers.TensorBoardLogger):
                return lg.experiment
        return None

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer = find_dp_optimizer(trainer.optimizers)
        if not trainer.is_global_zero and not is_distributed(optimizer):
            return
        engine = self.privacy_engine or getattr(pl_module, "privacy_engine", None)
        if engine is None:
            logger.warning("no PrivacyEngine given or found as pl_module.privacy_engine: no ε")
        log_dir = self.log_dir or Path(trainer.log_dir or trainer.default_root_dir) / "dmaudit"
        writer = self._writer(trainer) if trainer.is_global_zero else None
        self.auditor = DMAuditor(
            privacy_engine=engine, log_dir=log_dir, writer=writer, config=self.config
        )
        if self._restored:
            restore_state(self.auditor, self._restored)
            self._restored = None
        # the model: its inputs for shadow audits and batch sizes when there is no ImprintBlock
        model = self.model if self.model is not None else find_private_model(pl_module)
        self.auditor.attach(optimizer, model=model, defer=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.auditor is not None:
            self.auditor.flush()

    def _close(self) -> None:
        if self.auditor is not None:
            auditor, self.auditor = self.auditor, None
            self._last_state = checkpoint_state(auditor)
            auditor.close()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()  # what was recorded stays; the report covers it

    def state_dict(self) -> dict[str, Any]:
        if self.auditor is not None:
            return checkpoint_state(self.auditor)
        return dict(self._restored or self._last_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) or None
