"""A full disk never takes training down: on a real small filesystem (a tmpfs, mounted as root).

The log dir lives on a 4 MB tmpfs that a filler file fills up mid-run. Training goes on, every
audit stays in ``auditor.history``, the audit log writes the waiting records once space comes
back, and ``close()`` returns the summary and names what could not be written. Skipped where a
tmpfs cannot be mounted (not root).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opacus_dmaudit import read_audit_log
from opacus_dmaudit.record import AuditRecord
from opacus_dmaudit.sinks.audit_log import AuditLog
from tests.helpers import REPO, audited_run


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs mounted at ``tmp_path / "disk"`` (unmounted afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> None:
    """Take every free byte of ``disk`` (:func:`free` gives them back)."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1):  # big blocks, then the last bytes
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


def free(disk: Path) -> None:
    (disk / "filler").unlink(missing_ok=True)


def _record(step: int) -> AuditRecord:
    return AuditRecord.from_json({"record_version": 2, "step": step, "mode": "mechanism"})


def test_the_audit_log_keeps_records_through_a_full_disk(small_disk, caplog):
    log = AuditLog(small_disk / "audit.jsonl")
    assert log.append(_record(1))
    fill(small_disk)
    step, written = 1, [1]
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit.sinks.audit_log"):
        while step < 1000:  # the file's last page fills first
            step += 1
            if not log.append(_record(step)):  # never raises
                break
            written.append(step)
        assert step < 1000 and not log.append(_record(step + 1))
    assert caplog.text.count("cannot write") == 1  # logged once
    assert log.unwritten == [step, step + 1]
    assert log.path.read_bytes().endswith(b"\n")  # no torn line left behind
    assert [r.step for r in read_audit_log(log.path)] == written
    free(small_disk)
    assert log.append(_record(step + 2))  # the waiting records first, in order
    log.close()
    assert [r.step for r in read_audit_log(log.path)] == list(range(1, step + 3))
    assert not log.unwritten


@pytest.mark.parametrize("background", [False, True])
def test_training_goes_on_when_the_disk_fills_and_the_log_catches_up(
    mnist5k, small_disk, background
):
    log_dir = small_disk / "audit"

    def after(step):
        if step == 2:
            fill(small_disk)
        if step == 5:
            free(small_disk)

    auditor, _ = audited_run(
        mnist5k,
        log_dir,
        sigma=0.01,
        steps=7,
        metrics=("mse",),
        after_step=after,
        background=background,
        prior_fit_public=0,
    )
    summary = auditor.close()
    assert [r.step for r in auditor.history] == list(range(1, 8))
    assert summary.audits == 7 and summary.last_step == 7
    # the records that waited in memory while the disk was full are on disk, in order
    assert [r.step for r in read_audit_log(log_dir / "audit.jsonl")] == list(range(1, 8))
    assert (log_dir / "report.json").is_file()


def test_close_says_what_it_could_not_write_and_still_returns_the_summary(
    mnist5k, small_disk, caplog
):
    log_dir = small_disk / "audit"
    auditor, _ = audited_run(
        mnist5k,
        log_dir,
        sigma=0.01,
        steps=4,
        metrics=("mse",),
        after_step=lambda step: fill(small_disk) if step == 2 else None,
        prior_fit_public=0,
    )
    with caplog.at_level(logging.WARNING):
        summary = auditor.close()
    assert summary.audits == 4 and [r.step for r in auditor.history] == [1, 2, 3, 4]
    lost = " ".join(auditor.unwritten)
    assert "audit log: steps 3, 4" in lost and "report" in lost
    assert "not everything was written" in caplog.text
    assert [r.step for r in read_audit_log(log_dir / "audit.jsonl")] == [1, 2]


def test_dmaudit_report_on_a_full_disk_is_a_one_line_error(mnist5k, small_disk):
    log_dir = small_disk / "audit"
    auditor, _ = audited_run(
        mnist5k, log_dir, sigma=0.01, steps=2, metrics=("mse",), report=False, close=True
    )
    assert auditor.history
    fill(small_disk)
    done = subprocess.run(
        [sys.executable, "-m", "opacus_dmaudit.cli", "report", str(log_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "No space left on device" in done.stderr
    assert not (log_dir / "report.json").exists()
    json.dumps(done.stderr)  # one readable message
