"""The log directory: the one owner of what an audit writes, where, and with which permissions.

Layout of a ``log_dir`` (everything the auditor writes is inside it)::

    audit.jsonl                one JSON record per audit (appended, fsynced)
    run.json                   configuration and package versions, written at attach
    images/step_00000050.npz   truth, raw readout and DM reconstruction of an audit (uint8)
    events.out.tfevents.*      TensorBoard events, when the auditor owns the writer
    report.json, report.html   the audit report

Permissions: these files hold private training images. Every file is created owner-only (0600)
and every folder the auditor creates is 0700; a folder that already exists keeps its mode (a
shared or read-only folder is never chmod-ed); when it is readable by others the auditor warns,
since the names of the files are then visible even though their contents are not. Files are
written atomically (a temporary file renamed into place), so a crash leaves the old file or the
new one, never a torn one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LogDirInUse

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


def private_mkdir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) owner-only; an existing folder keeps its mode.

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


def secure_file(path: str | os.PathLike) -> None:
    """Make an existing file owner-only (a file holding images that another writer created)."""
    path = Path(path)
    try:
        if path.is_file() and stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o600)
    except OSError as err:  # not ours to change: say so, never fail the run for it
        logger.warning("could not make %s owner-only: %s", path, err)


def write_private(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and owner-only (temporary file, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp creates the file 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
        path: the folder (created owner-only by :meth:`prepare` if missing).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

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

    def holds_audit(self) -> bool:
        """Whether an earlier run recorded audits here."""
        log = self.audit_log
        return log.is_file() and log.stat().st_size > 0

    # -- preparing -------------------------------------------------------------------------------
    def prepare(self, *, existing: str = "error", resume: bool = False) -> LogDir:
        """Create the folder, or check that an existing one may be used for this run.

        Args:
            existing: ``"error"``: refuse a folder that holds another run's audit;
                ``"overwrite"``: delete the auditor's own files there first (nothing else).
            resume: this run continues the audit already in the folder (``load_state_dict``).

        Raises:
            LogDirInUse: the folder holds an audit, this is no resume, and ``existing="error"``.
        """
        folder = self.path
        if folder.is_dir() and stat.S_IMODE(folder.stat().st_mode) & 0o077:
            logger.warning(
                "%s is accessible to other users: the audit files inside are owner-only (0600), "
                "but their names are visible. Prefer a log_dir only you can open.",
                folder,
            )
        private_mkdir(folder)
        if self.holds_audit() and not resume:
            if existing == "overwrite":
                self.remove_audit_files()
            else:
                raise LogDirInUse(
                    f"{folder} already holds an audit ({AUDIT_LOG}); a new run would mix with "
                    "it. Choose a new log_dir, resume that run with auditor.load_state_dict(...) "
                    "from its checkpoint, or pass existing='overwrite' to replace it."
                )
        for path in (self.audit_log, self.run_file, self.report_json, self.report_html):
            secure_file(path)  # files an older version or another tool left readable
        return self

    def remove_audit_files(self) -> None:
        """Delete what the auditor writes (log, run file, report, images, its event files)."""
        for path in (self.audit_log, self.run_file, self.report_json, self.report_html):
            path.unlink(missing_ok=True)
        for path in self.event_files():
            path.unlink(missing_ok=True)
        if self.images_dir.is_dir():
            shutil.rmtree(self.images_dir)
        logger.info("removed the previous audit in %s", self.path)

    # -- writing ---------------------------------------------------------------------------------
    def write_json(self, path: Path, obj: Any) -> Path:
        """``obj`` as JSON (``inf`` as ``Infinity``), atomically and owner-only."""
        return write_private(path, json.dumps(obj, indent=1, allow_nan=True, default=str).encode())

    def save_images(self, step: int, **images) -> Path:
        """Store an audit's images (``(N, C, H, W)`` in [0, 1]) as uint8, atomically.

        Written before the audit's log line, so a record never points at a missing or torn file.
        """
        private_mkdir(self.images_dir)
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
        if not path.is_file():
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
