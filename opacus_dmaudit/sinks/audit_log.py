"""The append-only audit log: one JSON object per audit in ``<log_dir>/audit.jsonl``.

Each line is written whole, flushed and fsynced, so a crash loses at most the audit in progress.
The log contains metrics only; files that hold images are written by other sinks. The log file is
created owner-only (0600), never through a symbolic link, in a folder :mod:`.logdir` prepares:
audit artifacts describe private training data. The record format is written down in
:mod:`.schema`.

A write that fails (a full disk, a lost permission, a read-only remount) never raises: the line
is cut back to the last complete record, the failure is logged once, and the records wait in
memory; the next append (or :meth:`AuditLog.close`) writes them first, in order, once the disk
takes them again. :attr:`AuditLog.unwritten` names the steps still waiting.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import AuditLogError
from ..record import AuditRecord
from .files import open_private, private_mkdir, secure_file, write_private

__all__ = ["AuditLog", "read_audit_log", "read_json_lines", "AuditLogError"]

logger = logging.getLogger(__name__)


def _line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, allow_nan=True, separators=(",", ":")) + "\n").encode("utf-8")


class AuditLog:
    """Append-only JSON-lines writer that survives a full disk.

    Args:
        path: the ``audit.jsonl`` file; its directory is created owner-only.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        private_mkdir(self.path.parent)
        secure_file(self.path)
        self._fd: int | None = None
        self._pending: list[tuple[int, bytes]] = []  # (step, line) not yet on disk
        self._failing = False
        self.reopen()

    def reopen(self) -> None:
        """Open the file again after :meth:`close` (records waiting in memory are kept)."""
        if self._fd is None:
            self._fd = open_private(self.path, os.O_RDWR | os.O_APPEND)
            self._drop_torn_tail()

    def _drop_torn_tail(self) -> None:
        """A crash mid-write leaves a partial last line: cut it so appends start on a fresh line."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self._fd, "rb", closefd=False) as f:
            data = f.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        os.ftruncate(self._fd, keep)
        logger.warning("%s: dropped a torn last line of %d bytes", self.path, len(data) - keep)

    def keep_through_step(self, step: int) -> list[int]:
        """Drop records of steps after ``step`` (audits redone after a resume); their steps.

        The log is rewritten atomically, so a crash leaves the old or the new log, never a mix.
        """
        records = read_json_lines(self.path)
        keep = [r for r in records if int(r.get("step", 0)) <= step]
        dropped = [int(r["step"]) for r in records if int(r.get("step", 0)) > step]
        if dropped:
            self.close()
            write_private(self.path, b"".join(_line(r) for r in keep))  # old or new, never a mix
            self._fd = open_private(self.path, os.O_RDWR | os.O_APPEND)
        return dropped

    def append(self, record: AuditRecord) -> bool:
        """Write one record as a line (``inf`` as JSON ``Infinity``, NaN as ``null``).

        Returns:
            Whether it (and every record waiting before it) is on disk; ``False`` keeps it
            waiting in memory for the next append or :meth:`close`.
        """
        if self.closed:
            raise ValueError(f"{self.path} is closed")
        self._pending.append((record.step, _line(record.to_json())))
        return self.write_pending()

    def write_pending(self) -> bool:
        """Write the records waiting in memory; whether none is left."""
        if self._fd is None or not self._pending:
            return not self._pending
        st = os.fstat(self._fd)
        if st.st_nlink == 0:  # removed during the run: lines written now would be lost unseen
            self._fail(
                "the file (or its folder) was removed during the run; the audits stay in "
                "memory (auditor.history)"
            )
            return False
        good = st.st_size
        try:
            while self._pending:
                _write_all(self._fd, self._pending[0][1])
                os.fsync(self._fd)
                good += len(self._pending.pop(0)[1])
        except OSError as err:
            self._cut_back(good)
            self._fail(
                f"cannot write ({err}); the audits stay in memory (auditor.history) and "
                "are written when the disk takes them again"
            )
            return False
        if self._failing:
            logger.warning("%s: writing again; every waiting audit is on disk", self.path)
            self._failing = False
        return True

    def _fail(self, why: str) -> None:
        if not self._failing:
            logger.warning("%s: %s (logged once)", self.path, why)
        self._failing = True

    def _cut_back(self, size: int) -> None:
        """Remove a partial line a failed write left, so the next line starts clean."""
        try:
            os.ftruncate(self._fd, size)
        except OSError:  # cut at the next open (a torn last line is dropped there)
            pass

    @property
    def unwritten(self) -> list[int]:
        """Steps of the records that could not be written yet."""
        return [step for step, _ in self._pending]

    def close(self) -> None:
        """Write what waits (if the disk takes it) and close the file."""
        if self._fd is None:
            return
        self.write_pending()
        fd, self._fd = self._fd, None
        os.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd is None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_json_lines(
    path: str | os.PathLike, *, problems: list[str] | None = None
) -> list[dict[str, Any]]:
    """Every complete line of an audit log as a JSON object; a torn last line is skipped.

    Args:
        path: an ``audit.jsonl``.
        problems: when given, a line that is not a record is skipped and named here (the torn
            last line too) instead of raising, as long as some line is a record.

    Raises:
        AuditLogError: a line other than the last is not JSON, or a line is not an object with an
            integer ``step``; the message names the line. With ``problems``: only when no line
            is a record.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError:
        raise AuditLogError(f"{path} is not a text file: is it an audit log?") from None
    records, skipped = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(_record_line(line, i, last=i == len(lines) - 1))
        except _TornLine:
            skipped.append(f"line {i + 1} was cut off while it was written (a crash)")
        except AuditLogError as err:
            if problems is None:
                raise AuditLogError(f"{path}: {err}") from None
            skipped.append(str(err))
    if problems is not None:
        if skipped and not records and any("cut off" not in s for s in skipped):
            raise AuditLogError(f"{path}: {skipped[0]}: not an audit log")
        problems.extend(skipped)
    return records


class _TornLine(Exception):
    """The last line of a log is not JSON: a write cut off by a crash."""


def _record_line(line: str, i: int, *, last: bool) -> dict[str, Any]:
    """One line of the log as a record object (``i``: its index, for the message)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        if last:
            raise _TornLine from None
        raise AuditLogError(f"line {i + 1} is not valid JSON") from None
    except RecursionError:
        raise AuditLogError(f"line {i + 1} is nested too deeply to be a record") from None
    if not isinstance(record, dict):
        raise AuditLogError(f"line {i + 1} is not a JSON object (an audit record)")
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise AuditLogError(f"line {i + 1} has no integer 'step': not an audit record")
    return record


def read_audit_log(
    path: str | os.PathLike, *, problems: list[str] | None = None
) -> list[AuditRecord]:
    """Every complete record of an audit log, typed (any record version).

    Args:
        path: an ``audit.jsonl``.
        problems: when given, a line or a record that cannot be read is skipped and the reason
            appended here (``dmaudit report`` shows them) instead of raising.

    Raises:
        AuditLogError: the file is not an audit log, or (without ``problems``) a record in it is
            malformed; the message names the line and the field.
    """
    out = []
    for i, data in enumerate(read_json_lines(path, problems=problems)):
        try:
            out.append(AuditRecord.from_json(data))
        except AuditLogError as err:
            if problems is None:
                raise type(err)(f"{path}: record {i + 1}: {err}") from None
            problems.append(f"record {i + 1}: {err}")
    return out
