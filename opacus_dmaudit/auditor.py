"""The auditor: schedules audits on a live DP-SGD run and fans each one out to the sinks.

Per audited step: capture (inside ``optimizer.step``, :mod:`.capture`) -> the audit pipeline
(:mod:`.pipeline`: shadow, checks, scoring, privacy numbers, the record) -> sinks (images via
:mod:`.sinks.logdir`, the audit log, TensorBoard; the report at ``close``). Everything after the
capture runs once the parameter update is done (or in a background worker), with the auditor's
own generator; training is bit-identical with and without it. ``DMAuditor`` itself keeps only
scheduling, lifecycle, resume and the fan-out.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from ._opacus import (
    accountant_history,
    expected_batch_size,
    is_ghost,
    set_accountant_history,
)
from .capture.hooks import GradientCapture
from .capture.imprint import ImprintBlock, find_imprint_block
from .capture.step import CapturedStep
from .checks.validity import raise_on_failure
from .config import DEFAULT_SUCCESS_THRESHOLDS, AuditConfig, resolve_config
from .pipeline import AuditPipeline, AuditResult
from .privacy.accountant import steps_from_accountant
from .record import AuditRecord
from .sinks.audit_log import AuditLog, read_audit_log
from .sinks.logdir import LogDir, package_versions
from .worker import AuditWorker

if TYPE_CHECKING:
    from .capture.shadow import ShadowAdversary
    from .reconstruct.prior import DiffusionPrior
    from .sinks.summary import RunSummary

__all__ = ["DMAuditor", "AuditResult", "DEFAULT_SUCCESS_THRESHOLDS"]

logger = logging.getLogger(__name__)


#: Above this many bytes of per-sample imprint gradients, ``attach`` suggests ghost clipping.
PER_SAMPLE_WARN_BYTES = 2**30


def _warn_per_sample_memory(block: ImprintBlock, optimizer) -> None:
    """Per-sample gradients of the imprint layer cost batch × K × d floats outside ghost mode."""
    ghost = is_ghost(optimizer)
    batch = int(expected_batch_size(optimizer) or 0)
    need = 4 * batch * block.num_bins * block.imprint.in_features
    if not ghost and need > PER_SAMPLE_WARN_BYTES:
        logger.warning(
            "the imprint layer's per-sample gradients take %.1f GB per step (batch %d x %d bins "
            "x %d pixels, twice that while Opacus makes them); ghost clipping never stores "
            'them: make_private(..., grad_sample_mode="ghost", criterion=criterion)',
            need / 2**30,
            batch,
            block.num_bins,
            block.imprint.in_features,
        )


#: ``attach`` warns when a live block leaves less than this share of the expected batch alone.
LONE_SHARE_WARN = 0.5


def _warn_few_lone(block: ImprintBlock, optimizer) -> None:
    """A live block with too few bins for the batch reads few images: say which K would do."""
    from .reconstruct.bins import bins_for_lone_share, lone_share

    batch = int(expected_batch_size(optimizer) or 0)
    share = lone_share(block.num_bins, batch)
    if batch > 1 and share < LONE_SHARE_WARN:
        logger.warning(
            "the ImprintBlock's %d bins leave %.1f%% of an expected batch of %d alone in a bin, "
            "so the audit can read at most that share of each batch; ImprintBlock(num_bins=%d) "
            "would leave 90%% alone (or audit in shadow mode, which sizes its bins to the batch)",
            block.num_bins,
            100 * share,
            batch,
            bins_for_lone_share(batch, 0.9),
        )


def _frozen(accountant):
    """A copy of an Opacus accountant whose history stops at this step (its only state)."""
    if accountant is None or not hasattr(accountant, "history"):
        return accountant
    frozen = copy.copy(accountant)
    set_accountant_history(frozen, accountant_history(accountant))
    return frozen


class DMAuditor:
    """Audits an Opacus DP-SGD run every ``every_n_steps`` steps.

    Three modes, decided once at :meth:`attach`: with an ``ImprintBlock`` in the model each audit
    reads training images out of the privatised gradient (``"imprint"``); with ``shadow=True`` and
    no block, a simulated worst-case imprint adversary does the same on the real batch
    (``"shadow"``); otherwise the audit checks the DP mechanism (``"mechanism"``). Every mode
    checks the mechanism (noise, clipping, sampling, accountant).

    Args:
        privacy_engine: the ``PrivacyEngine`` whose accountant gives ε (``None``: ε is not logged).
        log_dir: where the audit's files go (see :mod:`.sinks.logdir`); they hold private
            training images and are written owner-only.
        every_n_steps: audit every N-th optimizer step (default 50).
        delta: δ for ε (default 1e-5).
        prior: a :class:`~opacus_dmaudit.DiffusionPrior` or a name for
            :meth:`~opacus_dmaudit.DiffusionPrior.from_pretrained` (``"embedded:mnist"``,
            ``"embedded:natural"``, a local folder, a hub id) to denoise every readout.
        shadow: simulate the worst-case imprint adversary on the real batch when the model has
            no ``ImprintBlock`` (``True``, or a :class:`~opacus_dmaudit.ShadowAdversary`).
        public: public images ``(N, C, H, W)`` (never training data) for the shadow adversary's
            bins, the baseline κ̂ and the prior-fit check.
        writer: your own ``SummaryWriter``, so the audit lands in the run you already log to.
        config: an :class:`~opacus_dmaudit.AuditConfig` with every other setting (the expert
            path); the keywords above, when given, override it.
        **settings: any other :class:`~opacus_dmaudit.AuditConfig` field (``metrics``,
            ``max_images``, ``strict``, ...); a misspelt name raises ``TypeError`` here.

    Example:
        >>> auditor = DMAuditor(privacy_engine=engine, log_dir="runs/audit", shadow=True)  # doctest: +SKIP
        >>> auditor.attach(optimizer, model=model)  # doctest: +SKIP
        >>> ...  # train
        >>> summary = auditor.close()  # doctest: +SKIP
        >>> print(summary.verdict.headline)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        privacy_engine=None,
        log_dir: str | os.PathLike,
        every_n_steps: int | None = None,
        delta: float | None = None,
        prior: DiffusionPrior | str | None = None,
        shadow: bool | ShadowAdversary | None = None,
        public: torch.Tensor | None = None,
        writer=None,
        config: AuditConfig | None = None,
        **settings: Any,
    ) -> None:
        config = resolve_config(
            config,
            every_n_steps=every_n_steps,
            delta=delta,
            prior=prior,
            shadow=shadow,
            public=public,
            **settings,
        )
        self.config = config
        self.prior = self._load_prior(config.prior)
        self.privacy_engine = privacy_engine
        self.logdir = LogDir(log_dir)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.lpips = None
        if "lpips" in config.metrics:
            from .score.metrics import LPIPS

            self.lpips = LPIPS(net=config.lpips_net)
        self.history: list[AuditRecord] = []
        self.last_result: AuditResult | None = None
        self.mode: str | None = None  # "imprint", "shadow" or "mechanism", decided at attach
        self._writer = writer
        self._tb = None
        self._resume: dict[str, Any] | None = None
        self._capture: GradientCapture | None = None
        self._log: AuditLog | None = None
        self._defer = False
        self._queued: list[CapturedStep] = []
        self._worker: AuditWorker | None = None  # background scoring (config.background)
        self._last_step = 0  # optimizer steps seen by the last capture, kept after detach
        self._told: set[str] = set()  # failed checks already logged as warnings
        self._summary: RunSummary | None = None  # set by close()
        # what an audit computes (checks, scoring, privacy numbers, the record)
        self.pipeline = AuditPipeline(
            config=config, prior=self.prior, lpips=self.lpips, generator=self.generator
        )

    @staticmethod
    def _load_prior(prior) -> DiffusionPrior | None:
        from .reconstruct.prior import DiffusionPrior

        if prior is None or isinstance(prior, DiffusionPrior):
            return prior
        return DiffusionPrior.from_pretrained(prior)

    # -- settings as attributes (read-only views of the configuration) ---------------------------
    @property
    def log_dir(self):
        return self.logdir.path

    @property
    def every_n_steps(self) -> int:
        return self.config.every_n_steps

    @property
    def delta(self) -> float:
        return self.config.delta

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.config.metrics

    @property
    def accountant(self):
        return getattr(self.privacy_engine, "accountant", None)

    @property
    def block(self) -> ImprintBlock | None:
        return self._capture.block if self._capture is not None else None

    # -- lifecycle -------------------------------------------------------------------------------
    def attach(
        self,
        optimizer,
        *,
        block: ImprintBlock | None = None,
        model: torch.nn.Module | None = None,
        example_input: torch.Tensor | None = None,
        defer: bool = False,
    ) -> DMAuditor:
        """Start auditing the run that ``optimizer`` (a ``DPOptimizer``) drives.

        Args:
            optimizer: the optimizer returned by ``PrivacyEngine.make_private``.
            block: the ``ImprintBlock`` to read (found through the optimizer if ``None``).
            model: the model ``make_private`` returned; needed without an ``ImprintBlock`` for
                shadow audits (its inputs are the batch).
            example_input: a batch of training inputs; checked against the block's image shape.
            defer: capture inside ``optimizer.step`` as always, but score and log only when
                :meth:`flush` is called (the framework adapters call it from their own
                after-step callback) instead of right after the parameter update.

        Returns:
            ``self``.
        """
        if self._capture is not None:
            raise RuntimeError("the auditor is already attached; call detach() first")
        _check_noise_multiplier(optimizer)
        self._summary = None
        block = self._find_block(optimizer, block, model)
        mode = "imprint" if block is not None else "shadow" if self.config.shadow else "mechanism"
        capture = self._make_capture(optimizer, block, model)
        self._check_block(block, optimizer, example_input)
        if mode == "shadow":
            self._check_shadow_prior(example_input)
        self._defer = defer
        self.mode = mode
        if capture.distributed and capture.rank != 0:
            # DDP: this rank only feeds rank 0's capture (inputs, clean sums); no audit work
            capture.attach()
            self._capture = capture
            return self
        # once, before training goes on: the shadow adversary, the baselines, the prior's fit
        self.pipeline.prepare(
            block, mode=mode, expected_batch_size=expected_batch_size(optimizer) or None
        )
        if self.config.background:
            self._worker = AuditWorker()
        self._open_sinks(capture)
        self._resume = None
        return self

    def _find_block(self, optimizer, block, model) -> ImprintBlock | None:
        if block is None:
            try:
                block = find_imprint_block(list(getattr(optimizer, "params", [])))
            except ValueError:
                if not self.config.shadow and model is None and not self.config.mechanism_checks:
                    raise
                block = None
        if block is None and self.config.shadow and model is None:
            raise ValueError(
                "shadow audits read the model's inputs: pass the model make_private returned, "
                "attach(optimizer, model=model)"
            )
        if block is None:
            logger.info(
                "no ImprintBlock among the optimizer's parameters: %s",
                "shadow audits (a simulated worst-case imprint adversary on the real batch)"
                if self.config.shadow
                else "mechanism checks only",
            )
        return block

    def _make_capture(self, optimizer, block, model) -> GradientCapture:
        start = self._resume["step"] if self._resume else steps_from_accountant(self.accountant)
        return GradientCapture(
            optimizer,
            block=block,
            model=model if block is None else None,
            should_capture=self._is_audit_step,
            on_capture=self._process,
            start_step=start,
            mechanism=self.config.mechanism_checks,
            accountant=self.accountant,
        )

    def _check_block(self, block, optimizer, example_input) -> None:
        if block is None:
            return
        if example_input is not None:
            block._check_input(torch.as_tensor(example_input))
        if self.prior is not None:
            self.prior.check_fits(block.image_shape)
        _warn_per_sample_memory(block, optimizer)
        _warn_few_lone(block, optimizer)

    def _check_shadow_prior(self, example_input) -> None:
        """Shadow mode refuses a prior that does not fit the images, where their shape is known
        at attach (public images or an example batch), as live mode does."""
        if self.prior is None:
            return
        shape = None
        if self.config.public is not None:
            shape = tuple(self.config.public.shape[1:])
        elif example_input is not None:
            from .capture.shadow import as_images

            shape = tuple(as_images(example_input).shape[1:])
        if shape is not None:
            self.prior.check_fits(shape)

    def _open_sinks(self, capture: GradientCapture) -> None:
        """Prepare the log dir, open the log and TensorBoard, then hook the capture in.

        A failure leaves nothing behind that this attach created.
        """
        resume = self._resume is not None
        existed, had_audit = self.logdir.path.exists(), self.logdir.holds_audit()
        try:
            self.logdir.prepare(existing=self.config.existing, resume=resume)
            if self._log is None or self._log.closed:
                self._log = AuditLog(self.logdir.audit_log)
            if resume:
                # audits recorded after the checkpoint will be redone: drop them, keep the rest
                step = self._resume["step"]
                self._log.keep_through_step(step)
                self.history = [r for r in read_audit_log(self._log.path) if r.step <= step]
            self._capture = capture  # the run file describes the capture
            self._write_run_file()
            if (self.config.tensorboard or self._writer is not None) and self._tb is None:
                from .sinks.tensorboard import TensorBoardSink

                self._tb = TensorBoardSink(
                    writer=self._writer,
                    log_dir=self.logdir.path,
                    purge_step=self._resume["step"] + 1 if resume else None,
                )
            capture.attach()
        except BaseException:
            self._undo_attach(existed=existed, had_audit=had_audit)
            raise

    def _undo_attach(self, *, existed: bool, had_audit: bool) -> None:
        """A failed attach leaves nothing behind that it created."""
        self._capture = None
        self.mode = None
        if self._worker is not None:
            worker, self._worker = self._worker, None
            try:
                worker.close()
            except Exception:
                logger.exception("the background audit worker failed")
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if not had_audit and self.logdir.path.is_dir():
            self.logdir.remove_audit_files()
            if not existed and not any(self.logdir.path.iterdir()):
                self.logdir.path.rmdir()

    def flush(self) -> AuditResult | None:
        """Score and log the captures that ``attach(defer=True)`` queued; the last result.

        With ``background=True``: wait until the worker has written every audit captured so far
        (and raise an error it met, e.g. a failed check under ``strict=True``).
        """
        result = None
        while self._queued:
            result = self._score_and_log(self._queued.pop(0)) or result
        if self._worker is not None:
            self._worker.drain()
            result = self.last_result
        return result

    def detach(self) -> None:
        """Stop auditing (scoring what is queued) and restore the optimizer's step hook."""
        try:
            self.flush()
        finally:
            if self._capture is not None:
                self._last_step = self._capture.step
                self._capture.detach()
                self._capture = None
            if self._worker is not None:
                worker, self._worker = self._worker, None
                worker.close()

    def close(self) -> RunSummary:
        """Detach, write the hyper-parameters to TensorBoard, close the log, write the report.

        Returns:
            The run's :class:`~opacus_dmaudit.RunSummary` (its ``verdict``, ε, the measured
            numbers), also when no report is written.

        An error met while draining the audits (e.g. a failed check under ``strict=True`` with
        ``background=True``) is raised after the log, TensorBoard and the report are written.
        """
        from .sinks.summary import summarize

        if self._summary is not None:  # closed already
            return self._summary
        error: BaseException | None = None
        try:
            self.detach()
        except Exception as err:  # finish writing what was recorded, then raise
            error = err
        if self._tb is not None:
            try:
                self._tb.close(hparams=self.config.to_dict())
            finally:
                self._tb = None
        if self._log is not None:
            self._log.close()
            if self.config.report and self._log.path.is_file():
                from .sinks.report import build_report

                try:
                    build_report(self.logdir.path)
                except Exception:
                    logger.exception("writing the report into %s failed", self.logdir.path)
        if error is not None:
            raise error
        self._summary = summarize(self.history)
        return self._summary

    def __enter__(self) -> DMAuditor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- configuration and resume ----------------------------------------------------------------
    def _write_run_file(self) -> None:
        capture = self._capture
        block = capture.block
        shadow = self.pipeline.shadow
        accountant = self.accountant
        run = {
            "config": {
                **self.config.to_dict(),
                "mode": self.mode,
                "prior_details": self.prior.describe() if self.prior is not None else None,
                "shadow": shadow.describe() if shadow is not None else None,
                "imprint_block": None if block is None else _block_description(block),
                "noise_multiplier": capture.optimizer.noise_multiplier,
                "max_grad_norm": float(capture.optimizer.max_grad_norm),
                # an Opacus accountant is falsy before its first step (len(history) == 0)
                "accountant": None if accountant is None else type(accountant).__name__,
            },
            "versions": package_versions(),
        }
        self.logdir.write_json(self.logdir.run_file, run)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the audit exactly: step, RNG state, settings.

        With a background worker, waits for the audits in flight first (they advance the
        generator)."""
        if self._worker is not None:
            self._worker.drain()
        return {
            "version": 1,
            "step": self.step,
            "num_audits": len(self.history),
            "last_audit_step": self.history[-1].step if self.history else None,
            "generator": self.generator.get_state().tolist(),  # JSON-safe
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` before :meth:`attach`; the log continues from there.

        Audits that the log holds for steps after the checkpoint (the crashed run got further
        than its last checkpoint) are dropped from the log and from TensorBoard and redone, so
        no audit is duplicated or missing.
        """
        if self._capture is not None:
            raise RuntimeError("load_state_dict before attach()")
        if not isinstance(state, dict) or state.get("version") != 1:
            version = state.get("version") if isinstance(state, dict) else None
            raise ValueError(
                f"unknown auditor state (version {version!r}); "
                "pass what DMAuditor.state_dict() returned"
            )
        saved_every = (state.get("config") or {}).get("every_n_steps")
        if saved_every != self.every_n_steps:
            logger.warning(
                "resuming with every_n_steps=%d (was %s)", self.every_n_steps, saved_every
            )
        self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8))
        last = state.get("last_audit_step")
        if last is not None and int(state["step"]) < int(last):
            raise ValueError(
                f"this auditor state says step {state['step']} but its last audit was at step "
                f"{last}: it was not taken from a running auditor. Save state_dict() with the "
                "training checkpoint, while the auditor is attached or after close()"
            )
        self._resume = {"step": int(state["step"])}

    @property
    def step(self) -> int:
        """Optimizer steps seen so far (by the last attach, once detached)."""
        return self._capture.step if self._capture is not None else self._last_step

    def _is_audit_step(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    # -- processing ------------------------------------------------------------------------------
    def _process(self, captured: CapturedStep) -> None:
        if self._worker is not None:  # the capture is complete: score it off the training path
            # the accountant as of the captured step (training goes on meanwhile)
            self._worker.submit(self._score_and_log, captured, _frozen(self.accountant))
        elif self._defer:
            self._queued.append(captured)
        else:
            self._score_and_log(captured)

    def _score_and_log(self, captured: CapturedStep, accountant=None) -> AuditResult | None:
        try:
            result = self.audit(captured, accountant=accountant)
        except Exception:  # the audit must never take training down
            logger.exception("audit of step %d failed; training continues", captured.step)
            return None
        self._emit(result)
        self._tell_failures(result.record)
        if self.config.strict:
            raise_on_failure(captured.step, [c.to_json() for c in result.record.checks])
        return result

    def _tell_failures(self, record: AuditRecord) -> None:
        """Log each failed check once while training goes on (the report shows every one)."""
        for c in record.failed_checks:
            if c.name not in self._told:
                self._told.add(c.name)
                logger.warning(
                    "audit of step %d is invalid: %s failed: %s (logged once per check; see the "
                    "report for every audit)",
                    record.step,
                    c.name,
                    c.detail,
                )

    def _emit(self, result: AuditResult) -> None:
        """Fan a finished audit out: images first (atomic), then the log line, then TensorBoard."""
        record = result.record
        step = record.step
        self.history.append(record)
        self.last_result = result
        if self.config.save_images and result.has_images:
            try:
                self.logdir.save_images(
                    step,
                    truth=result.truth,
                    raw=result.raw,
                    dm=result.dm,
                    missed_truth=result.missed_truth,
                    missed_raw=result.missed_raw,
                )
            except Exception:
                logger.exception("saving the images of step %d failed", step)
        if self._log is not None and not self._log.closed:
            self._log.append(record)
        if self._tb is not None:
            try:
                self._tb.log_audit(record, result)
            except Exception:
                logger.exception("TensorBoard logging of step %d failed", step)

    def audit(self, captured: CapturedStep, *, accountant=None) -> AuditResult:
        """Check, score and describe one captured step (see :class:`~.pipeline.AuditPipeline`).

        Its only effects: the auditor's generator (shadow noise, the prior's sampler) advances,
        and the step's membership scores join the run's pooled empirical estimate.
        """
        if self._capture is None:
            raise RuntimeError("attach the auditor before auditing")
        return self.pipeline.run(
            captured,
            accountant=accountant if accountant is not None else self.accountant,
            mode=self.mode,
            expected_batch_size=expected_batch_size(self._capture.optimizer),
        )


def _check_noise_multiplier(optimizer) -> None:
    sigma = getattr(optimizer, "noise_multiplier", None)
    if isinstance(sigma, int | float) and not sigma >= 0:
        raise ValueError(
            f"the optimizer's noise_multiplier is {sigma}: DP-SGD needs σ ≥ 0; fix the "
            "noise_multiplier given to make_private"
        )


def _block_description(block: ImprintBlock) -> dict[str, Any]:
    return {
        "image_shape": list(block.image_shape),
        "num_bins": block.num_bins,
        "structure": block.structure,
        "value_range": list(block.value_range),
        "gradient_scale": block.gradient_scale,
        "calibrated": block.calibrated,
    }
