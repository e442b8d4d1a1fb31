"""Private file primitives: every file the auditor makes is owner-only from the moment it exists.

Audit files hold private training images, so a file is never created readable and tightened
afterwards (a reader who opens it in between keeps reading): files are created with an explicit
mode (``os.open(..., 0o600)`` or ``mkstemp``), folders with 0700. Nothing here follows a symbolic
link at a name it writes, changes or deletes (a link planted in ``log_dir`` could point anywhere):
such a link raises :class:`~opacus_dmaudit.errors.UnsafeLogDir`.

:func:`owner_only_umask` exists for the one file the auditor cannot open itself, the event file
a ``SummaryWriter`` creates: it sets the umask to 077 only for the moment the writer is built.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import UnsafeLogDir

__all__ = [
    "refuse_link",
    "private_mkdir",
    "private_subdir",
    "write_private",
    "open_private",
    "secure_file",
    "unlink_own",
    "owner_only_umask",
]

logger = logging.getLogger(__name__)

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_UMASK_LOCK = threading.Lock()


def refuse_link(path: str | os.PathLike) -> None:
    """Raise :class:`UnsafeLogDir` when ``path`` is a symbolic link (a missing path is fine)."""
    if os.path.islink(path):
        raise UnsafeLogDir(
            f"{path} is a symbolic link: the auditor never writes, changes or deletes through a "
            "link (it could point outside log_dir). Remove the link or choose another log_dir"
        )


def private_mkdir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) owner-only; an existing folder keeps its mode.

    ``path`` itself may be a link to a folder (the user chose it); see :func:`private_subdir` for
    the folders the auditor makes inside it.

    Raises:
        NotADirectoryError: ``path`` exists and is not a folder.
        PermissionError: the folder exists but cannot be written to.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder; give a folder for log_dir")
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {path}; choose a folder you can write to")
    return path


def private_subdir(path: str | os.PathLike) -> Path:
    """A folder the auditor owns inside ``log_dir`` (``images/``): created 0700, never a link."""
    path = Path(path)
    refuse_link(path)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a folder") from None
    return path


def open_private(path: str | os.PathLike, flags: int) -> int:
    """``os.open`` that creates owner-only (0600) and never follows a link at ``path``."""
    try:
        return os.open(path, flags | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o600)
    except OSError:
        refuse_link(path)  # ELOOP: say why in words
        raise


def write_private(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and owner-only (temporary file, fsync, rename).

    Raises:
        UnsafeLogDir: ``path`` is a symbolic link.
    """
    path = Path(path)
    refuse_link(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp creates the file 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces the name itself, never what a link points to
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def secure_file(path: str | os.PathLike) -> None:
    """Make a file the auditor wrote earlier owner-only: a plain file this user owns, never a
    link (an older release, or a copy, may have left it readable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | _CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as err:  # a link (ELOOP) or unreadable: never ours to change
        logger.warning("left %s as it is (not a plain file of this user): %s", path, err)
        return
    try:
        st = os.fstat(fd)
        mine = stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
        if mine and stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    except OSError as err:  # not ours to change: say so, never fail the run for it
        logger.warning("could not make %s owner-only: %s", path, err)
    finally:
        os.close(fd)


def unlink_own(path: str | os.PathLike) -> bool:
    """Delete ``path`` if it is a plain file (never a link's target, never a folder)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        logger.warning("left %s alone: not a plain file", path)
        return False
    os.unlink(path)
    return True


@contextlib.contextmanager
def owner_only_umask() -> Iterator[None]:
    """Files created inside the block are owner-only (umask 077), for files a library creates.

    The umask is the process's: hold this only around the creation itself. Files other threads
    create meanwhile come out owner-only too (more private, never less).
    """
    with _UMASK_LOCK:
        old = os.umask(0o077)
        try:
            yield
        finally:
            os.umask(old)
