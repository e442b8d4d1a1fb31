"""The auditor's list of its own files in ``log_dir`` (``.dmaudit-files``, owner-only JSON).

A name goes on the list before the file is created, so a crash never leaves an audit file that
the list does not name. ``existing="overwrite"`` and a resume from an older checkpoint delete only
what is on it (and the auditor's fixed names): a TensorBoard event file of the user's own writer in
the same folder is never touched.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePosixPath

from .files import open_private, unlink_own, write_private

__all__ = ["Manifest", "MANIFEST"]

logger = logging.getLogger(__name__)

MANIFEST = ".dmaudit-files"


class Manifest:
    """The set of paths (relative to ``folder``) the auditor created there.

    Args:
        folder: the log dir.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST
        self._names: set[str] | None = None

    def exists(self) -> bool:
        return os.path.lexists(self.path)

    def names(self) -> set[str]:
        """The listed paths (an unreadable list reads as empty, with a warning)."""
        if self._names is None:
            self._names = self._read()
        return set(self._names)

    def _read(self) -> set[str]:
        if not self.exists():
            return set()
        try:
            fd = open_private(self.path, os.O_RDONLY)
            with os.fdopen(fd, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
            files = data["files"]
            if not isinstance(files, list) or not all(isinstance(n, str) for n in files):
                raise ValueError("'files' is not a list of names")
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("%s cannot be read (%s): treated as empty", self.path, err)
            return set()
        return {n for n in files if self._safe(n)}

    @staticmethod
    def _safe(name: str) -> bool:
        """A relative path inside the folder (no ``..``, not absolute)."""
        p = PurePosixPath(name)
        return bool(name) and not p.is_absolute() and ".." not in p.parts

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` as the list names it (relative to the folder, ``/``-separated)."""
        return Path(path).relative_to(self.folder).as_posix()

    def file(self, name: str) -> Path:
        return self.folder / PurePosixPath(name)

    def add(self, *paths: str | os.PathLike) -> None:
        """Put ``paths`` on the list (written at once, atomically).

        Raises:
            OSError: the list cannot be written (the caller then does not create the file).
        """
        names = self.names()
        new = {self.relative(p) for p in paths} - names
        if new:
            self._write(names | new)

    def discard(self, *paths: str | os.PathLike) -> None:
        names = self.names()
        gone = {self.relative(p) for p in paths} & names
        if gone:
            self._write(names - gone)

    def _write(self, names: set[str]) -> None:
        data = json.dumps({"files": sorted(names)}, indent=0).encode("utf-8")
        write_private(self.path, data)
        self._names = set(names)

    def delete(self) -> None:
        """Delete the list itself (after the files it names)."""
        unlink_own(self.path)
        self._names = set()
