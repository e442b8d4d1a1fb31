"""The background audit worker: one thread, jobs in order, errors reach the caller, bounded queue."""

import logging
import threading
import time

import pytest

from opacus_dmaudit.worker import AuditWorker

WAIT = 10.0  # seconds a test waits for a thread before calling it stuck


def _fail(message="job failed"):
    raise ValueError(message)


def test_jobs_run_one_at_a_time_in_submission_order_on_the_worker_thread():
    worker = AuditWorker(max_pending=3, name="test-worker")
    done, threads, running = [], set(), []

    def job(i):
        running.append(i)
        assert len(running) == 1  # never two at once
        time.sleep(0.002 * (i % 3))  # uneven durations
        threads.add(threading.current_thread().name)
        done.append(i)
        running.remove(i)

    for i in range(20):
        worker.submit(job, i)
    worker.drain()
    assert done == list(range(20))
    assert threads == {"test-worker"}
    worker.close()


def test_drain_waits_for_every_submitted_job():
    worker = AuditWorker()
    done = []
    worker.submit(lambda: (time.sleep(0.2), done.append("slow")))
    worker.submit(done.append, "next")
    worker.drain()
    assert done == ["slow", "next"]
    worker.close()


def test_a_job_error_is_raised_once_in_the_caller_and_later_jobs_still_run():
    worker = AuditWorker()
    done = []
    worker.submit(_fail, "first")
    worker.submit(_fail, "second")
    worker.submit(done.append, 1)
    with pytest.raises(ValueError, match="^first$"):  # the first error, not the second
        worker.drain()
    assert done == [1]
    worker.drain()  # raised once: nothing left to raise
    worker.close()


def test_submit_raises_an_earlier_jobs_error_before_queueing_more():
    worker = AuditWorker()
    finished = threading.Event()
    worker.submit(_fail)
    worker.submit(finished.set)  # runs after the failing job has been recorded
    assert finished.wait(WAIT)
    ran = []
    with pytest.raises(ValueError, match="job failed"):
        worker.submit(ran.append, 1)
    worker.drain()
    assert ran == []  # the job was not queued
    worker.close()


def test_close_finishes_pending_jobs_stops_the_thread_and_raises_their_error():
    worker = AuditWorker(max_pending=4)
    done = []
    for i in range(3):
        worker.submit(lambda i=i: (time.sleep(0.05), done.append(i)))
    worker.submit(_fail, "late")
    with pytest.raises(ValueError, match="late"):
        worker.close()
    assert done == [0, 1, 2] and not worker.alive
    worker.close()  # closing again is harmless
    with pytest.raises(RuntimeError, match="the audit worker was closed"):
        worker.submit(done.append, 3)


def test_max_pending_makes_the_submitter_wait_and_says_so_once(caplog):
    with pytest.raises(ValueError, match="max_pending must be at least 1, got 0"):
        AuditWorker(max_pending=0)
    worker = AuditWorker(max_pending=1)
    started, gate, done = threading.Event(), threading.Event(), []

    def blocked():
        started.set()
        assert gate.wait(WAIT)
        done.append("blocked")

    worker.submit(blocked)
    assert started.wait(WAIT)  # the worker holds this job: the queue is empty
    worker.submit(done.append, "queued")  # fills the one pending slot
    with caplog.at_level(logging.INFO, logger="opacus_dmaudit.worker"):
        submitter = threading.Thread(target=worker.submit, args=(done.append, "third"))
        submitter.start()
        submitter.join(0.3)
        assert submitter.is_alive()  # training waits instead of piling up captured steps
        gate.set()
        submitter.join(WAIT)
        assert not submitter.is_alive()
        worker.drain()
        gate.clear()
        started.clear()
        worker.submit(blocked)  # full again: no second message
        assert started.wait(WAIT)
        worker.submit(done.append, "fifth")
        waiting = threading.Thread(target=worker.submit, args=(done.append, "sixth"))
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive()  # waiting again, silently
        gate.set()
        waiting.join(WAIT)
    worker.close()
    assert done == ["blocked", "queued", "third", "blocked", "fifth", "sixth"]
    messages = [r.getMessage() for r in caplog.records if r.name == "opacus_dmaudit.worker"]
    assert len(messages) == 1 and "training waits for the background audit worker" in messages[0]
