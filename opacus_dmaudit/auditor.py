"""The auditor: schedules audits on a live DP-SGD run and fans each one out to the sinks.

Per audited step: capture (inside ``optimizer.step``, :mod:`.capture`) -> the audit pipeline
(:mod:`.pipeline`: shadow, checks, scoring, privacy numbers, the record) -> sinks (images via
:mod:`.sinks.logdir`, the audit log, TensorBoard; the report at ``close``). Everything after the
capture runs once the parameter update is done (or in a background worker), with the auditor's
own generator; training is bit-identical with and without it. ``DMAuditor`` itself keeps only
scheduling, lifecycle, resume and the fan-out.

Lifecycle: ``attach`` takes the log dir's lock (one auditor per folder) and ``detach``/``close``
give it back; a later ``attach`` of the same auditor continues its own log. A sink that cannot
write (a full disk) never stops training: the audit stays in ``history`` and ``close()`` says what
was not written. If the interpreter exits without ``close()`` (training raised), an exit hook
finishes the captured audits and closes the auditor, so none is lost and the background worker
never runs into interpreter shutdown.
"""

from __future__ import annotations

import atexit
import copy
import logging
import os
import sys
import weakref
from typing import TYPE_CHECKING, Any

import torch

from . import timing
from ._opacus import (
    accountant_history,
    dataset_size,
    expected_batch_size,
    is_fsdp,
    is_ghost,
    original_optimizer,
    secure_mode,
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
from .sinks.logdir import LogDir, package_versions
from .sinks.outputs import AuditOutputs
from .worker import AuditWorker

if TYPE_CHECKING:
    from .capture.shadow import ShadowAdversary
    from .reconstruct.prior import DiffusionPrior
    from .sinks.summary import RunSummary

__all__ = ["DMAuditor", "AuditResult", "DEFAULT_SUCCESS_THRESHOLDS"]

logger = logging.getLogger(__name__)


#: Above this many bytes of per-sample imprint gradients, ``attach`` suggests ghost clipping.
PER_SAMPLE_WARN_BYTES = 2**30

# auditors attached and not closed: the exit hook closes them (entries vanish with the auditor)
_OPEN: weakref.WeakSet[DMAuditor] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Interpreter exit without ``close()`` (training raised): finish and close every auditor.

    Runs before the interpreter tears down, while the background worker can still finish its
    audits; an error is logged, never raised (the process exits with its own status).
    """
    for auditor in list(_OPEN):
        try:
            logger.warning(
                "the auditor of %s was not closed: closing it at exit (its captured audits are "
                "finished and written; call close() in a finally block)",
                auditor.log_dir,
            )
            auditor._close(in_flight=None, at_exit=True)
        except BaseException:  # never abort the exit
            logger.exception("closing the auditor of %s at exit failed", auditor.log_dir)


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
        writer: your own ``SummaryWriter``, so the audit's scalars land in the run you already
            log to; its image grids go to an owner-only event file the auditor creates in
            ``log_dir`` (your writer's file may be readable by others).
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
        if privacy_engine is not None and not hasattr(privacy_engine, "accountant"):
            raise TypeError(
                "privacy_engine must be the opacus.PrivacyEngine whose make_private made the "
                f"optimizer (its accountant gives ε), or None; got {type(privacy_engine).__name__}"
            )
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
        from .sinks.summary import summarize

        self._out = AuditOutputs(
            log_dir,
            writer=writer,
            tensorboard=config.tensorboard,
            save_images=config.save_images,
            summarize=summarize,  # TensorBoard's verdict of the run so far
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.lpips = None
        if "lpips" in config.metrics:
            from .score.metrics import LPIPS

            self.lpips = LPIPS(net=config.lpips_net)
        self.history: list[AuditRecord] = []
        self.last_result: AuditResult | None = None
        self.mode: str | None = None  # "imprint", "shadow" or "mechanism", decided at attach
        self._resume: dict[str, Any] | None = None
        self._capture: GradientCapture | None = None
        self._defer = False
        self._queued: list[CapturedStep] = []
        self._worker: AuditWorker | None = None  # background scoring (config.background)
        self._last_step = 0  # optimizer steps seen by the last capture, kept after detach
        self._told: set[str] = set()  # failed checks already logged as warnings
        self._summary: RunSummary | None = None  # set by close()
        # where the time went (opacus_dmaudit.timing): per audit, and at attach
        self.stage_times: list[timing.StageTimes] = []
        self.attach_times: timing.StageTimes | None = None
        self._strict_error: BaseException | None = None  # raised at the next step (strict)
        self._step_handle = None  # our post-step hook (fail-fast under strict)
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
    def logdir(self) -> LogDir:
        return self._out.logdir

    @property
    def unwritten(self) -> list[str]:
        """What the sinks could not write so far (one line per sink; empty when all went well)."""
        lost = [f.describe(sink) for sink, f in self._out.guard.failures.items()]
        log = self._out.log
        if log is not None and log.unwritten:
            lost.insert(0, f"audit log: steps {', '.join(map(str, log.unwritten))} wait in memory")
        return lost

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
        if self._summary is not None:
            raise RuntimeError(
                f"this auditor was closed: its run in {self.log_dir} is finished. To audit "
                "another run, make a new DMAuditor (with another log_dir, or existing='resume' "
                "to continue this one); detach() pauses an auditor without closing it"
            )
        _check_noise_multiplier(optimizer)
        _refuse_fsdp(optimizer)
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
        with timing.measure() as self.attach_times:
            self.pipeline.prepare(
                block, mode=mode, expected_batch_size=expected_batch_size(optimizer) or None
            )
        if self.config.background:
            self._worker = AuditWorker()
        self._open_sinks(capture)
        self._resume = None
        self._step_handle = original_optimizer(optimizer).register_step_post_hook(self._after_step)
        _OPEN.add(self)
        return self

    def _find_block(self, optimizer, block, model) -> ImprintBlock | None:
        if block is None:
            try:
                block = find_imprint_block(list(getattr(optimizer, "params", [])))
            except ValueError as err:
                if not self.config.shadow and not self.config.mechanism_checks:
                    raise ValueError(
                        f"{err}; or keep mechanism_checks=True (the default) to check the DP "
                        "mechanism, or shadow=True to simulate the imprint adversary"
                    ) from None
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
            dataset_size=dataset_size(self.privacy_engine),
            search=False,  # _find_block searched: no block means the mechanism checks
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
        """Take the log dir, open the log and TensorBoard, then hook the capture in.

        A failure leaves nothing behind that this attach created.
        """
        logdir = self.logdir
        existed, had_audit = logdir.path.exists(), logdir.holds_audit()
        step = self._resume["step"] if self._resume is not None else None
        try:
            kept = self._out.open(holder=self, existing=self.config.existing, resume_step=step)
            if kept is not None:  # audits recorded after the checkpoint are redone
                self.history = kept
                self._restore_evidence(kept)
            self._capture = capture  # the run file describes the capture
            self._out.write_run(self._run_description())
            capture.attach()
        except BaseException:
            self._undo_attach(existed=existed, had_audit=had_audit)
            raise

    def _restore_evidence(self, records: list[AuditRecord]) -> None:
        """After a resume: what the audits kept contribute to the run's pooled estimates."""
        restore = getattr(self.pipeline, "restore", None)
        if restore is not None:
            restore(records)

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
        self._out.undo(existed=existed, had_audit=had_audit)

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

    def _after_step(self, *_args) -> None:
        """After every optimizer step: under ``strict``, raise a failed check found since."""
        error, self._strict_error = self._strict_error, None
        if error is None and self._worker is not None and self._worker.failed:
            try:
                self._worker.raise_error()
            except BaseException as err:
                error = err
        if error is not None:
            raise error

    def _stop(self) -> None:
        """Score what is queued, unhook the capture, stop the worker (raises a strict error)."""
        try:
            self.flush()
        finally:
            if self._step_handle is not None:
                self._step_handle.remove()
                self._step_handle = None
            if self._capture is not None:
                self._last_step = self._capture.step
                self._capture.detach()
                self._capture = None
            if self._worker is not None:
                worker, self._worker = self._worker, None
                worker.close()

    def detach(self) -> None:
        """Stop auditing (scoring what is queued), restore the optimizer's step hook and give
        the log dir back; a later :meth:`attach` of this auditor continues its log."""
        try:
            self._stop()
        finally:
            self._out.release()

    def close(self) -> RunSummary:
        """Detach, write the hyper-parameters to TensorBoard, close the log, write the report.

        Returns:
            The run's :class:`~opacus_dmaudit.RunSummary` (its ``verdict``, ε, the measured
            numbers), also when no report is written or a sink could not write (a full disk:
            what was not written is logged, see :attr:`unwritten`).

        An error met while draining the audits (e.g. a failed check under ``strict=True`` with
        ``background=True``) is raised after the log, TensorBoard and the report are written,
        unless an exception of yours is already under way (``close()`` in a ``finally`` block or
        ``with`` statement): yours goes on, and the audit's error is logged and added to it as a
        note.
        """
        return self._close(in_flight=sys.exc_info()[1])

    def _close(self, *, in_flight: BaseException | None, at_exit: bool = False) -> RunSummary:
        from .sinks.summary import summarize

        if self._summary is not None:  # closed already
            return self._summary
        error: BaseException | None = None
        try:
            self._stop()
        except Exception as err:  # finish writing what was recorded, then raise
            error = err
        error = error or self._strict_error
        self._strict_error = None
        lost = self._out.close(hparams=self.config.to_dict(), report=self.config.report)
        _OPEN.discard(self)
        self._summary = summarize(self.history)
        if lost:
            logger.warning("%s: not everything was written: %s", self.log_dir, "; ".join(lost))
        if error is not None:
            _raise_unless_busy(error, in_flight=in_flight, at_exit=at_exit)
        return self._summary

    def __enter__(self) -> DMAuditor:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close(in_flight=exc)

    # -- configuration and resume ----------------------------------------------------------------
    def _run_description(self) -> dict[str, Any]:
        """What ``run.json`` holds: the settings, the mode, the mechanism, package versions."""
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
                # the noise's source: Opacus's secure_mode draws it from a cryptographically
                # secure generator; without it, torch's generator (fine for auditing and
                # research, not for a deployment whose noise an attacker could predict)
                "secure_mode": secure_mode(capture.optimizer),
                "dataset_size": capture.dataset_size,
                # an Opacus accountant is falsy before its first step (len(history) == 0)
                "accountant": None if accountant is None else type(accountant).__name__,
            },
            "versions": package_versions(),
        }
        return run

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the audit exactly: step, RNG state, settings.

        Audits captured and not yet scored (``attach(defer=True)`` before :meth:`flush`, a
        background worker) are finished first: they advance the generator and belong to the
        steps the checkpoint covers. Never raises a failed check (``strict=True``): that is
        raised at the next step or at :meth:`close`, so the checkpoint is written."""
        while self._queued:
            self._score_and_log(self._queued.pop(0), keep_error=True)
        if self._worker is not None:
            self._worker.wait()
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

    def _score_and_log(
        self, captured: CapturedStep, accountant=None, *, keep_error: bool = False
    ) -> AuditResult | None:
        with timing.measure() as times:
            try:
                result = self.audit(captured, accountant=accountant)
            except Exception:  # the audit must never take training down
                logger.exception("audit of step %d failed; training continues", captured.step)
                return None
            with timing.stage("sinks"):
                self._emit(result)
        self.stage_times.append(times)
        self._tell_failures(result.record)
        if self.config.strict:
            try:
                raise_on_failure(captured.step, [c.to_json() for c in result.record.checks])
            except Exception as err:
                if not keep_error:
                    raise
                self._strict_error = self._strict_error or err  # raised at the next step
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
        """Keep the audit in memory, then fan it out to the sinks (which never raise)."""
        self.history.append(result.record)
        self.last_result = result
        self._out.emit(result)

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


def _refuse_fsdp(optimizer) -> None:
    """FSDP shards every parameter's clean and noised sums across processes: refused."""
    if is_fsdp(optimizer):
        raise ValueError(
            'FSDP (Opacus\'s FSDPOptimizerFastGradientClipping, grad_sample_mode="ghost_fsdp") '
            "is not supported: the audit reads every parameter's clean and noised sums, which "
            "FSDP shards across processes. Supported: one process (hooks, functorch, ghost "
            "clipping, BatchMemoryManager, per-layer and adaptive clipping, wrap_model=False, "
            "mixed precision) and DDP (DPDDP). Audit an FSDP model on a single process or "
            "under DPDDP"
        )


def _raise_unless_busy(
    error: BaseException, *, in_flight: BaseException | None, at_exit: bool
) -> None:
    """Raise the audit's ``error`` from ``close()``, unless another exception is under way."""
    if at_exit:
        logger.error("the audit met an error: %s", error)
        return
    if in_flight is None or in_flight is error:
        raise error
    logger.error("the audit met an error (your exception goes on): %s", error)
    if hasattr(in_flight, "add_note"):  # Python 3.11+
        in_flight.add_note(f"dmaudit: while this exception was raised, the audit failed: {error}")


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
