"""The log directory: its layout, owner-only files and folders, atomic writes, and reuse rules."""

import json
import logging
import math
import os
import shutil
import stat
import threading

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from opacus_dmaudit import DMAuditor
from opacus_dmaudit.errors import LogDirInUse
from opacus_dmaudit.sinks.logdir import LogDir, load_images, private_mkdir, write_private
from tests.helpers import audited_run


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_layout_names_every_part_inside_the_folder(tmp_path):
    log = LogDir(tmp_path / "run")
    assert log.audit_log == tmp_path / "run" / "audit.jsonl"
    assert log.run_file == tmp_path / "run" / "run.json"
    assert log.report_json == tmp_path / "run" / "report.json"
    assert log.report_html == tmp_path / "run" / "report.html"
    assert log.images_dir == tmp_path / "run" / "images"
    assert log.image_file(50) == tmp_path / "run" / "images" / "step_00000050.npz"
    log.prepare()
    for name in ("events.out.tfevents.2.host", "events.out.tfevents.1.host", "notes.txt"):
        (log.path / name).write_text("x")
    assert [p.name for p in log.event_files()] == [
        "events.out.tfevents.1.host",
        "events.out.tfevents.2.host",
    ]


def test_prepare_creates_missing_folders_owner_only(tmp_path):
    log = LogDir(tmp_path / "a" / "b" / "run").prepare()
    for folder in (tmp_path / "a", tmp_path / "a" / "b", log.path):
        assert folder.is_dir() and _mode(folder) == 0o700, folder
    assert not log.holds_audit() and list(log.path.iterdir()) == []


def test_an_existing_open_folder_keeps_its_mode_and_is_warned_about(tmp_path, caplog):
    os.chmod(tmp_path, 0o755)
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit.sinks.logdir"):
        LogDir(tmp_path).prepare()
    assert _mode(tmp_path) == 0o755
    assert "accessible to other users" in caplog.text


def test_a_file_in_place_of_the_folder_is_a_clear_error(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="give a folder for log_dir"):
        private_mkdir(tmp_path / "run")


def test_json_is_written_owner_only_with_infinity(tmp_path):
    log = LogDir(tmp_path / "run").prepare()
    log.write_json(log.run_file, {"epsilon": math.inf, "steps": [1, 2]})
    assert _mode(log.run_file) == 0o600
    assert json.loads(log.run_file.read_text()) == {"epsilon": math.inf, "steps": [1, 2]}
    assert sorted(p.name for p in log.path.iterdir()) == ["run.json"]  # no temporary file


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "report.json"
    write_private(path, b'{"old": true}')
    with pytest.raises(TypeError):
        write_private(path, "text, not bytes")  # fails after the temporary file was made
    assert path.read_bytes() == b'{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    write_private(path, b'{"new": true}')  # replaced in one rename
    assert path.read_bytes() == b'{"new": true}' and _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_images_are_stored_as_owner_only_uint8_and_read_back(tmp_path):
    log = LogDir(tmp_path / "run").prepare()
    truth = torch.rand(3, 1, 28, 28)
    raw = truth * 2 - 0.5  # readouts leave [0, 1]
    raw[0, 0, 0, 0] = float("nan")
    path = log.save_images(7, truth=truth, raw=raw, dm=None)
    assert path == log.image_file(7)
    assert _mode(path) == 0o600 and _mode(log.images_dir) == 0o700
    images = log.load_images(7)
    assert set(images) == {"truth", "raw"}  # None is not stored
    assert images["truth"].dtype == np.uint8 and images["truth"].shape == (3, 1, 28, 28)
    expected = np.floor(truth.numpy() * 255 + 0.5)
    assert np.array_equal(images["truth"], expected.astype(np.uint8))
    assert images["raw"][0, 0, 0, 0] == 0  # NaN shown black
    assert images["raw"].min() == 0 and images["raw"].max() == 255  # clipped to [0, 1]
    assert sorted(p.name for p in log.images_dir.iterdir()) == ["step_00000007.npz"]


def test_missing_or_torn_image_files_read_as_none(tmp_path, caplog):
    log = LogDir(tmp_path / "run").prepare()
    assert log.load_images(3) is None
    log.save_images(3, truth=torch.rand(2, 1, 8, 8))
    torn = log.image_file(3)
    torn.write_bytes(torn.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit.sinks.logdir"):
        assert log.load_images(3) is None
    assert "skipping unreadable image file" in caplog.text
    np.savez(tmp_path / "code.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):  # object arrays need pickle: refused
        load_images(tmp_path / "code.npz")


def _earlier_audit(log: LogDir) -> None:
    log.prepare()
    log.audit_log.write_text('{"step": 1}\n')
    log.run_file.write_text("{}")
    log.report_html.write_text("<html></html>")
    log.save_images(1, truth=torch.rand(1, 1, 8, 8))
    (log.path / "events.out.tfevents.1.host").write_text("events")
    (log.path / "notes.txt").write_text("the user's own file")


def test_a_folder_holding_an_audit_is_refused_unless_resumed(tmp_path):
    log = LogDir(tmp_path / "run")
    log.prepare()
    log.audit_log.write_text("")
    assert not log.holds_audit()  # an empty log is no audit
    log.prepare()
    _earlier_audit(log)
    assert log.holds_audit()
    with pytest.raises(LogDirInUse, match="already holds an audit.*existing='overwrite'"):
        LogDir(log.path).prepare()
    assert issubclass(LogDirInUse, FileExistsError)
    LogDir(log.path).prepare(resume=True)  # the same run, continued
    assert log.audit_log.read_text() == '{"step": 1}\n'


def test_overwrite_removes_the_auditors_files_and_nothing_else(tmp_path):
    log = LogDir(tmp_path / "run")
    _earlier_audit(log)
    own = log.path / "events.out.tfevents.2.host.dmaudit"
    log.own(own)  # the auditor's own writer's file is on its list
    own.write_text("the audit's events")
    LogDir(log.path).prepare(existing="overwrite")
    # the unlisted event file may be the user's own TensorBoard run: it stays
    assert sorted(p.name for p in log.path.iterdir()) == ["events.out.tfevents.1.host", "notes.txt"]
    assert not log.holds_audit()


def test_prepare_makes_readable_audit_files_owner_only(tmp_path):
    log = LogDir(tmp_path / "run")
    _earlier_audit(log)
    os.chmod(log.audit_log, 0o644)
    os.chmod(log.report_html, 0o644)
    os.chmod(log.path / "notes.txt", 0o644)
    LogDir(log.path).prepare(resume=True)
    assert _mode(log.audit_log) == 0o600 and _mode(log.report_html) == 0o600
    assert _mode(log.path / "notes.txt") == 0o644  # not the auditor's file


@pytest.mark.parametrize("log_dir", ["", "  ", None, 3])
def test_a_log_dir_that_names_no_folder_is_refused(log_dir):
    """``log_dir=""`` would put private images in the current folder; ``None`` or a number are
    no folder either: one clear error each."""
    with pytest.raises(ValueError, match="log_dir must name a folder"):
        LogDir(log_dir)


def test_a_privacy_engine_that_is_not_one_is_refused(tmp_path):
    with pytest.raises(TypeError, match="privacy_engine must be the opacus.PrivacyEngine"):
        DMAuditor(log_dir=tmp_path, privacy_engine="engine")


def _run_removing(mnist5k, log_dir, *, at_step: int, **kwargs):
    """Four audited steps (σ = 0.01, MSE) with the log dir removed after step ``at_step``."""
    auditor, _ = audited_run(
        mnist5k,
        log_dir,
        sigma=0.01,
        steps=4,
        metrics=("mse",),
        after_step=lambda step: shutil.rmtree(log_dir) if step == at_step else None,
        prior_fit_public=0,
        **kwargs,
    )
    return auditor


def test_a_log_dir_removed_mid_run_is_said_and_training_goes_on(mnist5k, tmp_path, caplog):
    """Someone removes the log dir mid-run: training goes on, every audit stays in memory and
    ``close()`` names what was not written. No audit line goes unseen into the removed file,
    TensorBoard's writer thread never fails on its own, and the folder is not recreated."""
    errors = []
    hook, threading.excepthook = threading.excepthook, errors.append
    log_dir = tmp_path / "audit"
    try:
        auditor = _run_removing(mnist5k, log_dir, at_step=2)
        with caplog.at_level(logging.WARNING):
            summary = auditor.close()
    finally:
        threading.excepthook = hook
    assert summary.audits == 4 and [r.step for r in auditor.history] == [1, 2, 3, 4]
    lost = " ".join(auditor.unwritten)
    assert "audit log" in lost and "3, 4" in lost and "TensorBoard" in lost
    assert "removed during the run" in caplog.text
    assert errors == [] and not log_dir.exists()


def test_a_log_dir_removed_before_the_first_image_grid_is_not_made_again(mnist5k, tmp_path, caplog):
    """With ``writer=`` the auditor's private event file is made at the first image grid: a log
    dir removed before it is not created again (with private images in it); the scalars still go
    to the user's run, and ``close()`` names the grids and the report it could not write."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir, user_run = tmp_path / "audit", tmp_path / "user_run"
    writer = SummaryWriter(log_dir=str(user_run))
    try:
        auditor = _run_removing(mnist5k, log_dir, at_step=1, every=2, writer=writer)
        with caplog.at_level(logging.WARNING):
            auditor.close()
    finally:
        writer.close()
    assert not log_dir.exists()
    assert "report: not written" in caplog.text
    lost = " ".join(auditor.unwritten)
    assert "TensorBoard" in lost and "image grids" in lost
    acc = EventAccumulator(str(user_run))
    acc.Reload()
    assert [e.step for e in acc.Scalars("privacy/epsilon")] == [2, 4]


def test_a_log_dir_under_home_written_with_a_tilde_goes_there(tmp_path, monkeypatch):
    """``log_dir="~/runs/audit"`` is the folder under the user's home, as in a shell, not a
    folder named ``~`` in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    auditor = DMAuditor(log_dir="~/runs/audit")
    assert auditor.log_dir == tmp_path / "home" / "runs" / "audit"
    auditor.logdir.prepare()
    assert (tmp_path / "home" / "runs" / "audit").is_dir() and not (tmp_path / "~").exists()
