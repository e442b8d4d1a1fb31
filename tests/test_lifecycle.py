"""The auditor's lifecycle under failure: strict mode with a background worker, training that
raises without ``close()``, checkpoints between capture and scoring, logs of an earlier release.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from opacus_dmaudit import AuditCheckFailed, DMAuditor, read_audit_log
from opacus_dmaudit.sinks.audit_log import read_json_lines
from tests.helpers import REPO, audited_run, imprint_model, make_private, train_steps

FAST = {"metrics": ("mse",), "tensorboard": False, "report": False, "prior_fit_public": 0}


class UserBug(Exception):
    """An error of the user's own training code."""


def _wait_for_audits(log_dir, n: int, timeout: float = 120.0) -> None:
    """Until the log holds ``n`` audits, then a moment for the worker to finish the job."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        path = log_dir / "audit.jsonl"
        if path.is_file() and len(read_json_lines(path)) >= n:
            time.sleep(1.0)
            return
        time.sleep(0.05)
    raise AssertionError(f"the worker wrote fewer than {n} audits in {timeout} s")


def _broken_inputs(mnist5k):
    """0..255 pixels into a [0, 1] block: every audit fails its value_range check."""
    x, y = mnist5k["private"]
    return x * 255, y


def _strict_auditor(mnist5k, log_dir, *, every: int):
    model = imprint_model(mnist5k["prior"][0][:512], seed=3, num_bins=128)
    model, opt, loader, engine = make_private(model, *_broken_inputs(mnist5k), sigma=0.02)
    auditor = DMAuditor(
        privacy_engine=engine,
        log_dir=log_dir,
        every_n_steps=every,
        background=True,
        strict=True,
        **FAST,
    ).attach(opt)
    return auditor, model, opt, loader


def test_strict_background_fails_at_the_step_after_the_failure_is_known(mnist5k, tmp_path):
    auditor, model, opt, loader = _strict_auditor(mnist5k, tmp_path, every=3)
    done = []

    def after(step):
        done.append(step)
        if step == 3:
            _wait_for_audits(tmp_path, 1)  # the worker has found the failed check

    with pytest.raises(AuditCheckFailed, match="value_range"):
        train_steps(model, opt, loader, 9, after_step=after)
    assert done == [1, 2, 3]  # step 4 raised (not the next audited step, 6)
    auditor.close()


@pytest.mark.parametrize("how", ["finally", "with"])
def test_strict_background_never_replaces_the_users_exception(mnist5k, tmp_path, how):
    auditor, model, opt, loader = _strict_auditor(mnist5k, tmp_path, every=1)

    def after(step):
        _wait_for_audits(tmp_path, 1)
        raise UserBug("the user's own error")

    with pytest.raises(UserBug, match="the user's own error") as info:
        if how == "with":
            with auditor:
                train_steps(model, opt, loader, 3, after_step=after)
        else:
            try:
                train_steps(model, opt, loader, 3, after_step=after)
            finally:
                auditor.close()
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert sys.version_info < (3, 11) or "value_range" in notes
    assert [r.step for r in read_audit_log(tmp_path / "audit.jsonl")] == [1]


def test_state_dict_under_strict_background_does_not_raise(mnist5k, tmp_path):
    auditor, model, opt, loader = _strict_auditor(mnist5k, tmp_path, every=1)
    states = []

    def after(step):
        if step == 1:
            _wait_for_audits(tmp_path, 1)
            states.append(auditor.state_dict())  # the checkpoint is written

    with pytest.raises(AuditCheckFailed):
        train_steps(model, opt, loader, 3, after_step=after)  # raised at step 2
    assert states and states[0]["last_audit_step"] == 1
    auditor.close()


def test_defer_then_state_dict_keeps_the_queued_audit(mnist5k, tmp_path):
    model = imprint_model(mnist5k["prior"][0][:512], num_bins=64)
    model, opt, loader, engine = make_private(model, *mnist5k["private"], sigma=0.01)
    auditor = DMAuditor(privacy_engine=engine, log_dir=tmp_path, every_n_steps=1, **FAST)
    auditor.attach(opt, defer=True)
    train_steps(model, opt, loader, 1)  # captured, queued for flush()
    state = auditor.state_dict()
    assert state["step"] == 1 and state["last_audit_step"] == 1 and state["num_audits"] == 1
    assert auditor.flush() is None  # scored once, not again
    auditor.close()
    assert [r.step for r in read_audit_log(tmp_path / "audit.jsonl")] == [1]


_CRASH = """
import sys
from opacus_dmaudit.assets.data import mnist_5k_split
from tests.helpers import audited_run

def after(step):
    if step == 5:
        raise RuntimeError("the training code failed at step 5")

audited_run(mnist_5k_split(), sys.argv[1], sigma=0.01, steps=6, background=True,
            prior="embedded:mnist", metrics=("mse",), prior_fit_public=0, after_step=after)
"""


def test_background_audits_survive_training_that_raises_without_close(tmp_path):
    log_dir = tmp_path / "audit"
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CRASH), str(log_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert done.returncode == 1, done.stderr[-3000:]  # the user's exception, never an abort
    assert "the training code failed at step 5" in done.stderr
    assert "terminate called" not in done.stderr
    assert "was not closed: closing it at exit" in done.stderr
    # every captured audit was finished and written, and the auditor was closed
    assert [r.step for r in read_audit_log(log_dir / "audit.jsonl")] == [1, 2, 3, 4, 5]
    assert (log_dir / "report.json").is_file() and not (log_dir / ".dmaudit.lock").exists()


def test_a_log_of_the_previous_release_resumes_with_unknown_validity(mnist5k, tmp_path):
    v1 = {"step": 1, "epsilon": 3.0, "delta": 1e-5, "noise_multiplier": 0.01, "images": [],
          "summary": {}, "success": {"raw": 0.0}}  # fmt: skip
    unchecked = {"record_version": 2, "step": 2, "mode": "imprint", "checks": []}
    (tmp_path / "audit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (v1, unchecked)))
    state = {
        "version": 1,
        "step": 2,
        "num_audits": 2,
        "last_audit_step": 2,
        "generator": torch.Generator().manual_seed(0).get_state().tolist(),
        "config": {"every_n_steps": 1},
    }
    model = imprint_model(mnist5k["prior"][0][:512], num_bins=64)
    model, opt, loader, engine = make_private(model, *mnist5k["private"], sigma=0.01)
    # a real resume restores the accountant too (else the accountant check fails, opacus#834)
    engine.accountant.history.append((0.01, 1 / len(loader), 2))
    auditor = DMAuditor(privacy_engine=engine, log_dir=tmp_path, every_n_steps=1, **FAST)
    auditor.load_state_dict(state)
    auditor.attach(opt)
    assert [r.valid for r in auditor.history] == [None, None]  # unknown, never True
    train_steps(model, opt, loader, 2)
    summary = auditor.close()
    assert [r.step for r in auditor.history] == [1, 2, 3, 4]
    assert all(r.valid for r in auditor.history[2:])  # the new audits ran their checks
    assert summary.valid is None  # the run as a whole: unknown


def test_attach_after_close_says_the_auditor_was_closed(mnist5k, tmp_path):
    """A closed auditor's run is finished: attaching it again says so and what to do instead
    (found by a new-user trial: it raised LogDirInUse about resuming, not that it was closed)."""
    auditor, _ = audited_run(mnist5k, tmp_path, sigma=0.05, steps=1, metrics=("mse",))
    optimizer = auditor._capture.optimizer
    auditor.close()
    with pytest.raises(RuntimeError, match="was closed.*new DMAuditor.*detach"):
        auditor.attach(optimizer)
    assert auditor.close().audits == 1  # closing again still returns the summary
