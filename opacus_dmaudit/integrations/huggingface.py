"""Hugging Face ``Trainer``: ``DMAuditTrainerCallback`` (imports ``transformers``).

Usage::

    trainer = Trainer(model=dp_model, args=args, optimizers=(dp_optimizer, None), ...)
    trainer.add_callback(DMAuditTrainerCallback(privacy_engine=engine, trainer=trainer))

The callback finds the ``DPOptimizer`` inside Accelerate's ``AcceleratedOptimizer`` at
``on_train_begin``, captures inside ``optimizer.step`` where the noise has been added, scores in
``on_optimizer_step`` and logs through the trainer's ``TensorBoardCallback`` writer when there is
one (pass ``trainer=`` so it can be found; otherwise the auditor writes its own event files).
Its state and the accountant's history (which ``Trainer`` does not checkpoint) go into each
checkpoint folder as ``dmaudit_state.json`` (no pickle) and are read back when training resumes
from that checkpoint, so both the audit and ε continue.

Note: ``Trainer`` clears gradients with ``model.zero_grad()``, which leaves Opacus's per-step state
in place, and Opacus then refuses the next step ("Gradients haven't been cleared since the last
optimizer step"); clear the ``DPOptimizer`` at each step's start, as
``examples/huggingface_mnist.py`` does.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..auditor import DMAuditor
from ..config import AuditConfig, resolve_config
from ..sinks.logdir import write_private
from . import (
    checkpoint_state,
    find_dp_optimizer,
    find_private_model,
    is_distributed,
    restore_state,
)

try:
    from transformers import TrainerCallback
except ImportError as err:
    raise ImportError(
        "DMAuditTrainerCallback needs transformers: pip install transformers accelerate"
    ) from err

__all__ = ["DMAuditTrainerCallback", "STATE_FILE"]

#: Name of the audit state file written into each ``checkpoint-N`` folder.
STATE_FILE = "dmaudit_state.json"

logger = logging.getLogger(__name__)


class DMAuditTrainerCallback(TrainerCallback):
    """Runs a :class:`~opacus_dmaudit.DMAuditor` on a Hugging Face ``Trainer`` DP-SGD run.

    Args:
        privacy_engine: the ``PrivacyEngine`` that made the optimizer private (for ε).
        log_dir: where audit artifacts go (default: ``<args.logging_dir or output_dir>/dmaudit``).
        trainer: the ``Trainer``, so the callback can log through its TensorBoard writer.
        model: the module whose forward receives each batch (default: the ``GradSampleModule``
            in the Trainer's model, else that model).
        every_n_steps, delta, prior, shadow, public, config: as for
            :class:`~opacus_dmaudit.DMAuditor` (``shadow=True`` for a shadow audit of a model
            without an ``ImprintBlock``; without a block and without ``shadow`` the mechanism
            checks run alone).
        **auditor_kwargs: any other :class:`~opacus_dmaudit.AuditConfig` field.

    Only the world's process zero audits and writes; under Opacus's DDP the other processes
    attach a capture that feeds it.
    """

    def __init__(
        self,
        *,
        privacy_engine=None,
        log_dir: str | os.PathLike | None = None,
        trainer=None,
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
            raise TypeError(
                "the callback logs through the trainer's TensorBoard writer; no writer="
            )
        self.privacy_engine = privacy_engine
        self.log_dir = log_dir
        self.trainer = trainer
        self.model = model
        # validated now: a misspelt keyword fails here, not when training starts
        self.config = resolve_config(
            config,
            where="DMAuditTrainerCallback",
            every_n_steps=every_n_steps,
            delta=delta,
            prior=prior,
            shadow=shadow,
            public=public,
            **auditor_kwargs,
        )
        self.auditor: DMAuditor | None = None

    def _writer(self):
        handler = getattr(self.trainer, "callback_handler", None)
        for cb in getattr(handler, "callbacks", ()):
            writer = getattr(cb, "tb_writer", None)
            if type(cb).__name__ == "TensorBoardCallback" and writer is not None:
                return writer
        return None

    @staticmethod
    def _checkpoint_dir(args, state) -> Path:
        return Path(args.output_dir) / f"checkpoint-{state.global_step}"

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        dp_optimizer = find_dp_optimizer(optimizer)
        if not state.is_world_process_zero and not is_distributed(dp_optimizer):
            return
        base = getattr(args, "logging_dir", None) or args.output_dir
        log_dir = self.log_dir or Path(base) / "dmaudit"
        writer = self._writer() if state.is_world_process_zero else None
        self.auditor = DMAuditor(
            privacy_engine=self.privacy_engine, log_dir=log_dir, writer=writer, config=self.config
        )
        saved = self._checkpoint_dir(args, state) / STATE_FILE
        if state.global_step > 0 and saved.is_file():  # resuming from that checkpoint
            restore_state(self.auditor, json.loads(saved.read_text()))
            logger.info("resumed the audit from %s", saved)
        elif state.global_step > 0:
            logger.warning(
                "resuming at step %d without %s: audit restarts", state.global_step, saved
            )
        # the model: its inputs for shadow audits and batch sizes when there is no ImprintBlock
        model = self.model if self.model is not None else find_private_model(model)
        self.auditor.attach(dp_optimizer, model=model, defer=True)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.auditor is not None:
            self.auditor.flush()

    def on_save(self, args, state, control, **kwargs):
        if self.auditor is None or not state.is_world_process_zero:
            return
        folder = self._checkpoint_dir(args, state)
        if folder.is_dir():
            write_private(folder / STATE_FILE, json.dumps(checkpoint_state(self.auditor)).encode())

    def on_train_end(self, args, state, control, **kwargs):
        if self.auditor is not None:
            auditor, self.auditor = self.auditor, None
            auditor.close()
