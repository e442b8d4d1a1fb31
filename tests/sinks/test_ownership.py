"""The auditor writes, changes and deletes only what it created, and one auditor holds a folder.

Symbolic links at its names are refused (never followed), ``existing="overwrite"`` leaves the
user's TensorBoard run alone, a second auditor on the same folder is refused (a stale lock is
taken over), ``detach`` then ``attach`` continues the auditor's own log, and a resume from an
older checkpoint drops the later audits loudly together with their image files.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from opacus_dmaudit import DMAuditor, LogDirInUse, UnsafeLogDir, read_audit_log
from opacus_dmaudit.sinks.files import secure_file
from opacus_dmaudit.sinks.lock import LOCK
from tests.helpers import audited_run, imprint_model, make_private, train_steps

FAST = {"metrics": ("mse",), "prior_fit_public": 0}


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _private(mnist5k, sigma=0.01):
    model = imprint_model(mnist5k["prior"][0][:512], num_bins=64)
    return make_private(model, *mnist5k["private"], sigma=sigma)


# -- links ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["images", "run.json", "audit.jsonl"])
def test_a_link_at_an_auditor_name_is_refused_and_its_target_untouched(mnist5k, tmp_path, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.chmod(outside, 0o1777)  # a world-writable folder, as /tmp is
    target = outside if name == "images" else outside / "foreign.txt"
    if name != "images":
        target.write_text("someone else's file\n")
        os.chmod(target, 0o644)
        if os.geteuid() == 0:
            os.chown(target, 65534, 65534)  # another user's file (the auditor runs as root)
    log_dir = tmp_path / "audit"
    log_dir.mkdir()
    (log_dir / name).symlink_to(target)
    model, opt, loader, engine = _private(mnist5k)
    auditor = DMAuditor(privacy_engine=engine, log_dir=log_dir, every_n_steps=1, **FAST)
    with pytest.raises(UnsafeLogDir, match=f"{name} is a symbolic link"):
        auditor.attach(opt)
    if name == "images":
        assert list(outside.iterdir()) == []
    else:
        assert target.read_text() == "someone else's file\n" and _mode(target) == 0o644
    assert (log_dir / name).is_symlink()  # refused, not replaced
    train_steps(model, opt, loader, 1)  # the optimizer trains as before


def test_secure_file_changes_only_a_plain_file_of_this_user(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.write_text("x")
    os.chmod(foreign, 0o644)
    link = tmp_path / "link"
    link.symlink_to(foreign)
    secure_file(link)
    assert _mode(foreign) == 0o644  # never through a link
    if os.geteuid() == 0:
        os.chown(foreign, 65534, 65534)
        secure_file(foreign)
        assert _mode(foreign) == 0o644  # root never tightens another user's file
    own = tmp_path / "own"
    own.write_text("x")
    os.chmod(own, 0o644)
    if os.geteuid() == 0:
        os.chown(own, 0, 0)
    secure_file(own)
    assert _mode(own) == 0o600


# -- overwrite -----------------------------------------------------------------------------------
def test_overwrite_keeps_the_users_tensorboard_run(mnist5k, tmp_path):
    run = tmp_path / "run"  # the user's TensorBoard run and the audit in one folder
    writer = SummaryWriter(log_dir=str(run))
    writer.add_scalar("train/loss", 1.0, 0)
    writer.flush()
    users = set(run.glob("events.out.tfevents.*"))
    first, _ = audited_run(mnist5k, run, sigma=0.01, steps=1, writer=writer, **FAST)
    first.close()
    audits = set(run.glob("events.out.tfevents.*")) - users
    assert audits and all(p.name.endswith(".dmaudit") for p in audits)
    again, _ = audited_run(
        mnist5k, run, sigma=0.01, steps=1, writer=writer, existing="overwrite", **FAST
    )
    again.close()
    writer.add_scalar("train/loss", 0.5, 1)  # the user's live file still takes their curves
    writer.close()
    assert users <= set(run.glob("events.out.tfevents.*"))  # the user's run is all there
    assert not audits & set(run.glob("events.out.tfevents.*"))  # the first audit's are gone
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [1.0, 0.5]


# -- one auditor per folder ----------------------------------------------------------------------
def test_a_second_auditor_on_the_same_log_dir_is_refused(mnist5k, tmp_path):
    model_a, opt_a, _, engine_a = _private(mnist5k)
    model_b, opt_b, _, engine_b = _private(mnist5k)  # the models keep their blocks alive
    first = DMAuditor(privacy_engine=engine_a, log_dir=tmp_path, every_n_steps=1, **FAST)
    first.attach(opt_a)
    second = DMAuditor(privacy_engine=engine_b, log_dir=tmp_path, every_n_steps=1, **FAST)
    with pytest.raises(LogDirInUse, match="in use by another auditor of this process"):
        second.attach(opt_b)
    first.close()
    assert not (tmp_path / LOCK).exists()  # given back at close


def _lock(folder, pid: int) -> None:
    data = {"pid": pid, "host": socket.gethostname(), "started": None, "token": "x"}
    (folder / LOCK).write_text(json.dumps(data))


def test_a_lock_left_by_a_dead_process_is_taken_over(mnist5k, tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _lock(tmp_path, gone.pid)
    model, opt, _, engine = _private(mnist5k)
    auditor = DMAuditor(privacy_engine=engine, log_dir=tmp_path, every_n_steps=1, **FAST)
    with caplog.at_level(logging.INFO, logger="opacus_dmaudit.sinks.lock"):
        auditor.attach(opt)
    assert "stale lock" in caplog.text
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    auditor.close()


def test_a_lock_of_a_live_process_is_respected(mnist5k, tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(tmp_path, alive.pid)
        model, opt, _, engine = _private(mnist5k)
        auditor = DMAuditor(privacy_engine=engine, log_dir=tmp_path, every_n_steps=1, **FAST)
        with pytest.raises(LogDirInUse, match=f"process {alive.pid} .*delete .*{LOCK}"):
            auditor.attach(opt)
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == alive.pid  # left alone
    finally:
        alive.kill()
        alive.wait()


def test_detach_then_attach_continues_the_auditors_own_log(mnist5k, tmp_path):
    model, opt, loader, engine = _private(mnist5k)
    auditor = DMAuditor(privacy_engine=engine, log_dir=tmp_path, every_n_steps=1, **FAST)
    auditor.attach(opt)
    train_steps(model, opt, loader, 2)
    auditor.detach()
    train_steps(model, opt, loader, 1)  # not audited
    auditor.attach(opt)
    train_steps(model, opt, loader, 2)
    auditor.close()
    assert [r.step for r in read_audit_log(tmp_path / "audit.jsonl")] == [1, 2, 4, 5]
    assert [r.step for r in auditor.history] == [1, 2, 4, 5]


# -- resume from an older checkpoint -------------------------------------------------------------
def test_resuming_an_older_checkpoint_drops_later_audits_loudly_with_their_images(
    mnist5k, tmp_path, caplog
):
    saved = {}

    def after(step):
        if step == 2:
            saved["state"] = auditor.state_dict()

    model, opt, loader, engine = _private(mnist5k)
    auditor = DMAuditor(privacy_engine=engine, log_dir=tmp_path, every_n_steps=2, **FAST)
    auditor.attach(opt)
    train_steps(model, opt, loader, 6, after_step=after)
    auditor.close()
    images = tmp_path / "images"
    assert sorted(p.name for p in images.iterdir()) == [f"step_{s:08d}.npz" for s in (2, 4, 6)]
    model2, opt2, _, engine2 = _private(mnist5k)
    resumed = DMAuditor(privacy_engine=engine2, log_dir=tmp_path, every_n_steps=2, **FAST)
    resumed.load_state_dict(saved["state"])
    with caplog.at_level(logging.WARNING):
        resumed.attach(opt2)
    assert "dropped the audits of steps 4, 6" in caplog.text
    assert [p.name for p in images.iterdir()] == ["step_00000002.npz"]  # none left behind
    assert [r.step for r in resumed.history] == [2]
    resumed.close()
