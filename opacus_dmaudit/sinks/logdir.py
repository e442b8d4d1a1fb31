"""The log directory: the one owner of what an audit writes, where, and with which permissions.

Layout of a ``log_dir`` (everything the auditor writes is inside it)::

    audit.jsonl                one JSON record per audit (appended, fsynced)
    run.json                   configuration and package versions, written at attach
    images/step_00000050.npz   truth, raw readout and DM reconstruction of an audit (uint8)
    events.out.tfevents.*.dmaudit   TensorBoard events of the auditor's own writer (its images,
                               and its scalars when no ``writer=`` is given)
    report.json, report.html   the audit report
    .dmaudit-files             the event files the auditor created (see :mod:`.manifest`)
    .dmaudit.lock              while an auditor is attached (see :mod:`.lock`)

Permissions: these files hold private training images. Every file is created owner-only (0600)
from the moment it exists and every folder the auditor creates is 0700 (see :mod:`.files`); a
folder that already exists keeps its mode (a shared or read-only folder is never chmod-ed); when it
is readable by others the auditor warns, since the names of the files are then visible even though
their contents are not. Files are written atomically (a temporary file renamed into place), so a
crash leaves the old file or the new one, never a torn one.

Ownership: the auditor writes, changes and deletes only its own files, never through a symbolic
link: a link at one of the names above raises :class:`~opacus_dmaudit.errors.UnsafeLogDir` at
attach (``log_dir`` itself may be a link). ``existing="overwrite"`` deletes the fixed names
above, ``images/step_*.npz`` and the event files on the auditor's list; a ``SummaryWriter`` of the
user's in the same folder keeps its files.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LogDirInUse
from .files import (
    private_mkdir,
    private_subdir,
    refuse_link,
    secure_file,
    unlink_own,
    write_private,
)
from .lock import LOCK, LogDirLock
from .manifest import MANIFEST, Manifest

__all__ = [
    "LogDir",
    "LogDirInUse",
    "private_mkdir",
    "write_private",
    "secure_file",
    "package_versions",
]

logger = logging.getLogger(__name__)

AUDIT_LOG = "audit.jsonl"
RUN_FILE = "run.json"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
IMAGES = "images"
EVENTS_GLOB = "events.out.tfevents.*"
_IMAGE_NAME = re.compile(r"step_(\d{8,})\.npz")


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide what the audit computed."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("opacus-dmaudit", "opacus", "torch", "diffusers", "lpips", "scikit-image"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


class LogDir:
    """An audit's folder: paths of its parts, private writes, and the rules for reusing it.

    Args:
        path: the folder (created owner-only by :meth:`prepare` if missing); a leading ``~``
            is the user's home, as in a shell (never a folder named ``~``).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
            raise ValueError(
                "log_dir must name a folder for the audit's files (they hold private training "
                f"images), e.g. log_dir='runs/audit'; got {path!r}"
            )
        self.path = Path(path).expanduser()
        self.manifest = Manifest(self.path)
        self.lock = LogDirLock(self.path)

    def __repr__(self) -> str:
        return f"LogDir({str(self.path)!r})"

    # -- layout ----------------------------------------------------------------------------------
    @property
    def audit_log(self) -> Path:
        return self.path / AUDIT_LOG

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def report_json(self) -> Path:
        return self.path / REPORT_JSON

    @property
    def report_html(self) -> Path:
        return self.path / REPORT_HTML

    @property
    def images_dir(self) -> Path:
        return self.path / IMAGES

    def image_file(self, step: int) -> Path:
        return self.images_dir / f"step_{int(step):08d}.npz"

    def event_files(self) -> list[Path]:
        return sorted(self.path.glob(EVENTS_GLOB))

    def _fixed_files(self) -> tuple[Path, ...]:
        return (self.audit_log, self.run_file, self.report_json, self.report_html)

    def holds_audit(self) -> bool:
        """Whether an earlier run recorded audits here."""
        log = self.audit_log
        return not log.is_symlink() and log.is_file() and log.stat().st_size > 0

    def check_links(self) -> None:
        """Refuse a symbolic link at any name the auditor writes (:class:`UnsafeLogDir`)."""
        for path in (*self._fixed_files(), self.images_dir, self.path / MANIFEST, self.path / LOCK):
            refuse_link(path)

    # -- preparing -------------------------------------------------------------------------------
    def prepare(
        self,
        *,
        existing: str = "error",
        resume: bool = False,
        holder: object | None = None,
        continuing: bool = False,
    ) -> LogDir:
        """Create the folder, or check that an existing one may be used for this run.

        Args:
            existing: ``"error"``: refuse a folder that holds another run's audit;
                ``"overwrite"``: delete the auditor's own files there first (nothing else).
            resume: this run continues the audit already in the folder (``load_state_dict``).
            holder: take the folder's lock for this object (an auditor); released by
                :meth:`release`.
            continuing: the holder wrote the audit here itself (attach after detach).

        Raises:
            LogDirInUse: the folder holds an audit, this is no resume, and ``existing="error"``;
                or another auditor holds its lock.
            UnsafeLogDir: one of the auditor's names there is a symbolic link.
        """
        folder = self.path
        if folder.is_dir() and stat.S_IMODE(folder.stat().st_mode) & 0o077:
            logger.warning(
                "%s is accessible to other users: the audit's files inside are created "
                "owner-only (0600), but their names are visible. Prefer a log_dir only you can "
                "open.",
                folder,
            )
        private_mkdir(folder)
        self.check_links()
        if holder is not None:
            self.lock.acquire(holder)
        try:
            self._check_reuse(existing=existing, reuse=resume or continuing)
            for path in self._fixed_files():
                secure_file(path)  # files an older version left readable (plain, this user's)
        except BaseException:
            self.release()
            raise
        return self

    def _check_reuse(self, *, existing: str, reuse: bool) -> None:
        if not self.holds_audit() or reuse:
            return
        if existing == "overwrite":
            self.remove_audit_files()
            return
        raise LogDirInUse(
            f"{self.path} already holds an audit ({AUDIT_LOG}); a new run would mix with "
            "it. Choose a new log_dir, resume that run with auditor.load_state_dict(...) "
            "from its checkpoint, or pass existing='overwrite' to replace it."
        )

    def release(self) -> None:
        """Give the folder's lock back (if :meth:`prepare` took it)."""
        self.lock.release()

    def own(self, *paths: str | os.PathLike) -> None:
        """Put files the auditor is about to create on its list (event files)."""
        self.manifest.add(*paths)

    def remove_audit_files(self) -> None:
        """Delete what the auditor wrote: its fixed files, its images, the event files on its
        list; nothing else (a user's event files in the same folder stay)."""
        for path in self._fixed_files():
            unlink_own(path)
        self.remove_images_after(-1)
        listed = self.manifest.names()
        for name in listed:
            unlink_own(self.manifest.file(name))
        self.manifest.delete()
        if not listed and self.event_files():
            logger.info(
                "%s: left its TensorBoard event files (the earlier audit kept no list of its "
                "own; delete them yourself if they are the audit's)",
                self.path,
            )
        logger.info("removed the previous audit in %s", self.path)

    def remove_images_after(self, step: int) -> list[int]:
        """Delete the image files of audits after ``step`` (audits a resume redoes); their steps."""
        folder = self.images_dir
        if folder.is_symlink() or not folder.is_dir():
            return []
        gone = []
        for path in sorted(folder.iterdir()):
            match = _IMAGE_NAME.fullmatch(path.name)
            if match and int(match.group(1)) > step and unlink_own(path):
                gone.append(int(match.group(1)))
            elif path.name.startswith(".step_") and path.name.endswith(".tmp"):
                unlink_own(path)  # a write cut off by a crash
        if step < 0 and not any(folder.iterdir()):
            folder.rmdir()
        return gone

    # -- writing ---------------------------------------------------------------------------------
    def write_json(self, path: Path, obj: Any) -> Path:
        """``obj`` as JSON (``inf`` as ``Infinity``), atomically and owner-only."""
        return write_private(path, json.dumps(obj, indent=1, allow_nan=True, default=str).encode())

    def save_images(self, step: int, **images) -> Path:
        """Store an audit's images (``(N, C, H, W)`` in [0, 1]) as uint8, atomically.

        Written before the audit's log line, so a record never points at a missing or torn file.
        """
        private_subdir(self.images_dir)
        arrays = {}
        for name, img in images.items():
            if img is None:
                continue
            pixels = np.nan_to_num(img.detach().float().cpu().numpy(), nan=0.0)  # NaN: black
            arr = pixels.clip(0, 1) * 255 + 0.5
            arrays[name] = arr.astype(np.uint8)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return write_private(self.image_file(step), buf.getvalue())

    def load_images(self, step: int) -> dict[str, np.ndarray] | None:
        """An audit's images, or ``None`` (with a warning) if the file is missing or unreadable."""
        path = self.image_file(step)
        if path.is_symlink() or not path.is_file():
            return None
        try:
            return load_images(path)
        except Exception as err:  # a torn or foreign file: the report goes on without it
            logger.warning("skipping unreadable image file %s: %s", path, err)
            return None


def load_images(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an audit's image file (no pickle: object arrays are refused)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
