"""Another local user, watching the log folder while an audit runs, reads nothing of the audit.

The watcher is a forked process that drops to another uid (``nobody``, 65534) and opens every
file that appears (told by inotify the moment a file is created, and listing the folders besides),
keeping each file it managed to open (an open file stays readable after a later ``chmod``); at the
end it reads what it holds. Needs root (to change uid) and Linux; skipped otherwise.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import select
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from tests.helpers import audited_run

OTHER_UID = 65534  # nobody
_IN_CREATE, _IN_MOVED_TO = 0x100, 0x80

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or os.geteuid() != 0,
    reason="watching as another user needs root (to change uid) and fork; not root here",
)


@pytest.fixture
def open_folder():
    """A folder other users may enter and list (0755), outside pytest's private tmp tree."""
    base = Path(tempfile.mkdtemp(prefix="dmaudit-watch-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


class Watcher:
    """A process of another uid that opens every file it sees under ``folders``."""

    def __init__(self, folders: list[Path]) -> None:
        self.folders = [str(f) for f in folders]
        self._out_r, out_w = os.pipe()
        stop_r, self._stop_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the watcher: only os calls, then _exit
            code = 1
            try:
                os.close(self._out_r)
                os.close(self._stop_w)
                os.setgroups([])
                os.setgid(OTHER_UID)
                os.setuid(OTHER_UID)
                held = self._watch(stop_r)
                data = pickle.dumps(self._read(held))
                view = memoryview(data)
                while view:
                    view = view[os.write(out_w, view) :]
                code = 0
            finally:
                os._exit(code)
        os.close(out_w)
        os.close(stop_r)

    def _watch(self, stop_r: int) -> dict[str, int]:
        libc = ctypes.CDLL(None, use_errno=True)
        notify = libc.inotify_init1(os.O_NONBLOCK)
        watched: dict[int, str] = {}
        held: dict[str, int] = {}
        while True:
            for folder in self.folders:
                for sub in (folder, os.path.join(folder, "images")):
                    if sub not in watched.values():
                        wd = libc.inotify_add_watch(notify, sub.encode(), _IN_CREATE | _IN_MOVED_TO)
                        if wd >= 0:
                            watched[wd] = sub
                    try:
                        names = os.listdir(sub)
                    except OSError:
                        continue
                    for name in names:
                        self._open(os.path.join(sub, name), held)
            ready, _, _ = select.select([notify, stop_r], [], [], 0.01)
            if notify in ready:
                for wd, name in _events(os.read(notify, 1 << 16)):
                    if wd in watched:
                        self._open(os.path.join(watched[wd], name), held)
            if stop_r in ready and os.read(stop_r, 1) == b"":
                return held

    @staticmethod
    def _open(path: str, held: dict[str, int]) -> None:
        if path not in held:
            try:
                held[path] = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                pass

    @staticmethod
    def _read(held: dict[str, int]) -> dict[str, bytes]:
        out = {}
        for path, fd in held.items():
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                out[path] = b""
                continue
            out[path] = os.pread(fd, 1 << 28, 0)
        return out

    def stop(self) -> dict[str, bytes]:
        """Stop watching; every file the other user opened, with what it could read."""
        os.close(self._stop_w)
        chunks = []
        while chunk := os.read(self._out_r, 1 << 20):
            chunks.append(chunk)
        os.close(self._out_r)
        _, status = os.waitpid(self.pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the watcher failed"
        return pickle.loads(b"".join(chunks))


def _events(buf: bytes):
    """``(watch descriptor, name)`` of each ``struct inotify_event`` in ``buf``."""
    i = 0
    while i + 16 <= len(buf):
        wd, _mask, _cookie, size = (
            int.from_bytes(buf[i + k : i + k + 4], "little") for k in (0, 4, 8, 12)
        )
        name = buf[i + 16 : i + 16 + size].split(b"\0", 1)[0].decode(errors="replace")
        i += 16 + size
        if name:
            yield wd, name


def _has_images(data: bytes) -> bool:
    return b"reconstructions" in data or b"\x89PNG" in data


def test_another_user_reads_nothing_of_an_audit_in_an_open_folder(mnist5k, open_folder):
    log_dir = open_folder / "audit"
    log_dir.mkdir()
    os.chmod(log_dir, 0o755)  # an existing folder others may list: it keeps its mode
    watcher = Watcher([log_dir])
    try:
        auditor, _ = audited_run(mnist5k, log_dir, sigma=0.01, steps=3, metrics=("mse",))
        auditor.close()
    finally:
        seen = watcher.stop()
    assert (log_dir / "images").is_dir() and list(log_dir.glob("events.out.tfevents.*"))
    assert seen == {}, f"another user opened {sorted(seen)}"


def test_with_the_users_writer_another_user_sees_no_image(mnist5k, open_folder):
    user_run, log_dir = open_folder / "user_run", open_folder / "audit"
    for folder in (user_run, log_dir):
        folder.mkdir()
        os.chmod(folder, 0o755)
    old = os.umask(0o022)  # the common umask: the user's writer creates a readable event file
    try:
        writer = SummaryWriter(log_dir=str(user_run))
    finally:
        os.umask(old)
    watcher = Watcher([user_run, log_dir])
    try:
        auditor, _ = audited_run(
            mnist5k, log_dir, sigma=0.01, steps=3, metrics=("mse",), writer=writer
        )
        auditor.close()
        writer.close()
    finally:
        seen = watcher.stop()
    assert list(log_dir.glob("events.out.tfevents.*")), "the images went to no private file"
    audit_files = [p for p in seen if Path(p).parent != user_run]
    assert audit_files == [], f"another user opened the audit's {audit_files}"
    # the user's own event file is theirs (readable as they made it): it holds no image
    assert seen and all(not _has_images(data) for data in seen.values())
    assert any(b"privacy/epsilon" in data for data in seen.values())  # the scalars are there
