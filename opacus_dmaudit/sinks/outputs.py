"""The auditor's outputs in one log dir: its lock, the audit log, images, TensorBoard, run file,
report; opened at ``attach``, each audit fanned out to them, closed at ``close``.

Nothing here raises into training once the outputs are open: every write goes through a
:class:`~.guard.SinkGuard` (logged once per sink, the audit kept in memory), and the audit log
keeps the records it could not write and writes them when the disk takes them again.
:meth:`AuditOutputs.close` writes what it can and returns what it could not.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from ..record import AuditRecord
from .audit_log import AuditLog, read_audit_log
from .guard import SinkGuard
from .logdir import LogDir

if TYPE_CHECKING:
    from ..pipeline import AuditResult
    from .tensorboard import TensorBoardSink

__all__ = ["AuditOutputs"]

logger = logging.getLogger(__name__)


class AuditOutputs:
    """Where one auditor's audits go.

    Args:
        log_dir: the auditor's folder.
        writer: the user's ``SummaryWriter`` (scalars go there; images to the auditor's own
            private event file), or ``None``.
        tensorboard: write TensorBoard events (always when ``writer`` is given).
        save_images: keep each audit's images.
        summarize: :func:`~.summary.summarize`, for TensorBoard's verdict text (given by the
            auditor, so that the sinks do not import the summary).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        *,
        writer=None,
        tensorboard: bool,
        save_images: bool,
        summarize=None,
    ) -> None:
        self._summarize = summarize
        self.logdir = LogDir(log_dir)
        self.guard = SinkGuard()
        self.log: AuditLog | None = None
        self.tb: TensorBoardSink | None = None
        self._writer = writer
        self._tensorboard = tensorboard or writer is not None
        self._save_images = save_images
        self._stamp: tuple[int, ...] | None = None  # the log as release() left it

    # -- opening ---------------------------------------------------------------------------------
    def open(
        self, *, holder: object, existing: str, resume_step: int | None
    ) -> list[AuditRecord] | None:
        """Take the folder (its lock), open the log and TensorBoard.

        Args:
            holder: the auditor (holds the lock while it lives).
            existing: the ``existing`` policy for a folder holding another audit.
            resume_step: a resume from a checkpoint at this step: later audits are dropped
                (their records and image files) and redone.

        Returns:
            The records kept on a resume, else ``None``.
        """
        continuing = self._stamp is not None and self._stamp == self._log_stamp()
        self._stamp = None
        self.logdir.prepare(
            existing=existing,
            resume=resume_step is not None,
            holder=holder,
            continuing=continuing,
        )
        if self.log is None or not continuing:
            self.log = AuditLog(self.logdir.audit_log)
        else:
            self.log.reopen()
        kept = None if resume_step is None else self._resume(resume_step)
        if self._tensorboard and self.tb is None:
            from .tensorboard import TensorBoardSink

            self.tb = TensorBoardSink(
                writer=self._writer,
                log_dir=self.logdir.path,
                purge_step=resume_step + 1 if resume_step is not None else None,
                own=self.logdir.own,
                summarize=self._summarize,
            )
        return kept

    def _resume(self, step: int) -> list[AuditRecord]:
        """Drop the audits after the checkpoint (records and images); the records kept."""
        dropped = self.log.keep_through_step(step)
        images = self.logdir.remove_images_after(step)
        if dropped or images:
            logger.warning(
                "%s: resuming from the checkpoint of step %d: dropped the audits of steps %s "
                "recorded after it (and %d image files); they are redone",
                self.logdir.path,
                step,
                ", ".join(map(str, dropped)) or "none",
                len(images),
            )
        return [r for r in read_audit_log(self.log.path) if r.step <= step]

    def _log_stamp(self) -> tuple[int, ...] | None:
        try:
            st = os.lstat(self.logdir.audit_log)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def undo(self, *, existed: bool, had_audit: bool) -> None:
        """A failed attach leaves nothing behind that it created."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.logdir.lock.held and not had_audit and self.logdir.path.is_dir():
            self.logdir.remove_audit_files()  # only in a folder this auditor held
        self.logdir.release()
        if not existed and self.logdir.path.is_dir() and not any(self.logdir.path.iterdir()):
            self.logdir.path.rmdir()

    # -- writing ---------------------------------------------------------------------------------
    def write_run(self, run: dict[str, Any]) -> None:
        self.guard.write("run file", None, self.logdir.write_json, self.logdir.run_file, run)

    def emit(self, result: AuditResult) -> None:
        """Fan a finished audit out: images first (atomic), then the log line, then TensorBoard."""
        record = result.record
        step = record.step
        if self._save_images and result.has_images:
            self.guard.write(
                "image files",
                step,
                self.logdir.save_images,
                step,
                truth=result.truth,
                raw=result.raw,
                dm=result.dm,
                missed_truth=result.missed_truth,
                missed_raw=result.missed_raw,
            )
        if self.log is not None and not self.log.closed:
            self.guard.write("audit log", step, self.log.append, record)
        if self.tb is not None:
            self.guard.write("TensorBoard", step, self.tb.log_audit, record, result)

    # -- closing ---------------------------------------------------------------------------------
    def release(self) -> None:
        """Detach: close the log file and give the folder back; :meth:`open` continues it."""
        if self.log is not None and not self.log.closed:
            self.log.close()
            self._stamp = self._log_stamp()
        if self.tb is not None:
            self.guard.write("TensorBoard", None, self.tb.flush)
        self.logdir.release()

    def close(self, *, hparams: dict[str, Any], report: bool) -> list[str]:
        """Write the hyper-parameters, close the log, write the report; what was not written."""
        if self.tb is not None:
            tb, self.tb = self.tb, None
            self.guard.write("TensorBoard", None, tb.close, hparams=hparams)
        self._stamp = None
        log, lost = self.log, []
        if log is not None:
            self.guard.write("audit log", None, log.close)
            if log.unwritten:
                lost.append(
                    f"audit log: the records of steps {', '.join(map(str, log.unwritten))} "
                    f"(kept in auditor.history)"
                )
            if report and log.path.is_file():
                from .report import build_report

                self.guard.write("report", None, build_report, self.logdir.path)
            elif report:
                lost.append(f"report: not written ({log.path} was removed during the run)")
        self.logdir.release()
        return lost + self.guard.lost()
