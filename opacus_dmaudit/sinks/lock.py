"""One auditor per ``log_dir`` at a time: ``.dmaudit.lock`` names the attached auditor's process.

An auditor takes the lock when it attaches and gives it back when it detaches or closes (and at
interpreter exit). A second auditor on the same folder, in this process or another, is refused
with :class:`~opacus_dmaudit.errors.LogDirInUse`, so two runs never write into one log. A lock
left by a process that is gone (``kill -9``, a crash) on this machine, or by an auditor of this
process that no longer exists, is stale and taken over; a lock from another machine is never
guessed about: the error says which file to delete once that run is over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
import weakref
from pathlib import Path

from ..errors import LogDirInUse
from .files import open_private, unlink_own

__all__ = ["LogDirLock", "LOCK"]

logger = logging.getLogger(__name__)

LOCK = ".dmaudit.lock"

# token -> the object holding a lock in this process (an entry vanishes with its holder)
_HOLDERS: weakref.WeakValueDictionary[str, object] = weakref.WeakValueDictionary()


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class LogDirLock:
    """The lock file of one log dir.

    Args:
        folder: the log dir (must exist).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK
        self._token: str | None = None

    @property
    def held(self) -> bool:
        return self._token is not None

    def acquire(self, holder: object) -> None:
        """Take the lock for ``holder`` (kept while ``holder`` lives).

        Raises:
            LogDirInUse: another live auditor holds it.
        """
        if self.held:
            return
        token = uuid.uuid4().hex
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _process_start(os.getpid()),
            "token": token,
            "time": time.time(),
        }
        for _ in range(3):
            try:
                fd = open_private(self.path, os.O_WRONLY | os.O_EXCL)
            except FileExistsError:
                other = self._read()
                if self._stale(other):
                    logger.info("%s: taking over a stale lock (%s)", self.path, _who(other))
                    unlink_own(self.path)
                    continue
                raise LogDirInUse(self._in_use(other)) from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info))
            self._token = token
            _HOLDERS[token] = holder
            return
        raise LogDirInUse(f"{self.path.parent}: could not take {self.path}; try again")

    def release(self) -> None:
        """Give the lock back (only a lock this object took is removed)."""
        token, self._token = self._token, None
        if token is None:
            return
        _HOLDERS.pop(token, None)
        if self._read().get("token") == token:
            try:
                unlink_own(self.path)
            except OSError as err:  # the folder went away or read-only: nothing to hold
                logger.warning("could not remove %s: %s", self.path, err)

    def _read(self) -> dict:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd) as f:
                data = json.loads(f.read())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _stale(self, info: dict) -> bool:
        pid = info.get("pid")
        if not isinstance(pid, int):  # torn or foreign: stale once it is old
            try:
                return time.time() - os.lstat(self.path).st_mtime > 10
            except OSError:
                return True
        if info.get("host") != socket.gethostname():
            return False
        if pid == os.getpid():
            return info.get("token") not in _HOLDERS
        if not _alive(pid):
            return True
        started = info.get("started")
        return started is not None and started != _process_start(pid)

    def _in_use(self, info: dict) -> str:
        folder = self.path.parent
        if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            return (
                f"{folder} is in use by another auditor of this process: close() or detach() it "
                "first, or give this auditor another log_dir"
            )
        return (
            f"{folder} is in use by the auditor of {_who(info)}: give this auditor another "
            f"log_dir. If that run is over (its machine restarted), delete {self.path}"
        )


def _who(info: dict) -> str:
    return f"process {info.get('pid', '?')} on {info.get('host', '?')}"
