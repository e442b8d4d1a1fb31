"""The append-only audit log: one JSON object per audit in ``<log_dir>/audit.jsonl``.

Each line is written whole, flushed and fsynced, so a crash loses at most the audit in progress.
The log contains metrics only; files that hold images are written by other sinks. The log file is
owner-only (0600), in a folder :mod:`.logdir` prepares: audit artifacts describe private training
data. The record format is written down in :mod:`.schema`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import AuditLogError
from ..record import AuditRecord
from .logdir import private_mkdir, secure_file, write_private

__all__ = ["AuditLog", "read_audit_log", "read_json_lines", "AuditLogError"]

logger = logging.getLogger(__name__)


class AuditLog:
    """Append-only JSON-lines writer.

    Args:
        path: the ``audit.jsonl`` file; its directory is created owner-only.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        private_mkdir(self.path.parent)
        secure_file(self.path)
        self._drop_torn_tail()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")

    def _drop_torn_tail(self) -> None:
        """A crash mid-write leaves a partial last line: cut it so appends start on a fresh line."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
        logger.warning("%s: dropped a torn last line of %d bytes", self.path, len(data) - keep)

    def keep_through_step(self, step: int) -> int:
        """Drop records of steps after ``step`` (audits redone after a resume); returns how many.

        The log is rewritten atomically, so a crash leaves the old or the new log, never a mix.
        """
        records = read_json_lines(self.path)
        keep = [r for r in records if int(r.get("step", 0)) <= step]
        dropped = len(records) - len(keep)
        if dropped:
            self._file.close()
            lines = "".join(
                json.dumps(r, allow_nan=True, separators=(",", ":")) + "\n" for r in keep
            )
            write_private(self.path, lines.encode("utf-8"))  # old log or new, never a mix
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
            logger.info(
                "%s: dropped %d audits after step %d (resumed run)", self.path, dropped, step
            )
        return dropped

    def append(self, record: AuditRecord) -> None:
        """Write one record as a line (``inf`` as JSON ``Infinity``, NaN as ``null``)."""
        line = json.dumps(record.to_json(), allow_nan=True, separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed


def read_json_lines(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete line of an audit log as a JSON object; a torn last line is skipped.

    Raises:
        AuditLogError: a line other than the last is not JSON, or a line is not an object with an
            integer ``step``; the message names the line.
    """
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError:
        raise AuditLogError(f"{path} is not a text file: is it an audit log?") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the last line, cut off by a crash
                continue
            raise AuditLogError(f"{path}: line {i + 1} is not valid JSON") from None
        except RecursionError:
            raise AuditLogError(
                f"{path}: line {i + 1} is nested too deeply to be a record"
            ) from None
        if not isinstance(record, dict):
            raise AuditLogError(f"{path}: line {i + 1} is not a JSON object (an audit record)")
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise AuditLogError(f"{path}: line {i + 1} has no integer 'step': not an audit record")
        records.append(record)
    return records


def read_audit_log(
    path: str | os.PathLike, *, problems: list[str] | None = None
) -> list[AuditRecord]:
    """Every complete record of an audit log, typed (any record version).

    Args:
        path: an ``audit.jsonl``.
        problems: when given, a record that cannot be read is skipped and the reason appended
            here (``dmaudit report`` shows them) instead of raising.

    Raises:
        AuditLogError: the file is not an audit log, or (without ``problems``) a record in it is
            malformed; the message names the line and the field.
    """
    out = []
    for i, data in enumerate(read_json_lines(path)):
        try:
            out.append(AuditRecord.from_json(data))
        except AuditLogError as err:
            if problems is None:
                raise type(err)(f"{path}: record {i + 1}: {err}") from None
            problems.append(f"record {i + 1}: {err}")
    return out
