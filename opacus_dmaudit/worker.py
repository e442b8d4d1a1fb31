"""Background audits: one worker thread that scores captured steps off the training path.

The capture stays in the optimizer's step hook (it copies what the audit needs); with
``AuditConfig.background=True`` the rest of an audit (readout, prior, metrics, record, sinks)
runs here, in the order the steps were captured, while training goes on. Each audit's log line
is written by the worker when that audit is complete, so a crash loses only audits in progress.

Training is not changed: the worker reads only the capture's private copies and the auditor's
own models and generator, sets no global torch state (thread counts, the global RNG; grad mode
and autocast are per thread) and touches no tensor that training reads. PyTorch releases the
GIL inside its kernels, so the worker's prior and metrics can run beside the training step's
kernels; how much that saves depends on spare cores (or a GPU): on a machine whose cores are
all busy training, the two compete (``benchmarks/overhead.py`` measures both).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["AuditWorker"]

logger = logging.getLogger(__name__)

_STOP = object()


class AuditWorker:
    """A single daemon thread running submitted jobs one at a time, first in, first out.

    Args:
        max_pending: jobs that may wait; :meth:`submit` blocks while this many are waiting
            (training then waits for the audits instead of piling up captured steps in memory).
        name: the thread's name.
    """

    def __init__(self, *, max_pending: int = 2, name: str = "dmaudit-worker") -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._waited = False

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is _STOP:
                    return
                fn, args = job
                fn(*args)
            except BaseException as err:  # kept for the training thread to raise
                with self._lock:
                    if self._error is None:
                        self._error = err
            finally:
                self._jobs.task_done()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; raises the error of an earlier job first, if one failed."""
        self.raise_error()
        if not self.alive:
            raise RuntimeError("the audit worker was closed")
        if self._jobs.full() and not self._waited:
            logger.info(
                "audits take longer than the steps between them: training waits for the "
                "background audit worker (audit less often to avoid this)"
            )
            self._waited = True
        self._jobs.put((fn, args))

    def wait(self) -> None:
        """Wait until every submitted job has finished (an error waits for :meth:`raise_error`)."""
        if self.alive:
            self._jobs.join()

    def drain(self) -> None:
        """Wait until every submitted job has finished; raise the first error of any job."""
        self.wait()
        self.raise_error()

    @property
    def failed(self) -> bool:
        """Whether a job raised an error not raised yet."""
        with self._lock:
            return self._error is not None

    def raise_error(self) -> None:
        """Raise (once) the first exception a job raised."""
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            raise err

    def close(self, *, raise_error: bool = True) -> None:
        """Finish every submitted job, stop the thread, then raise the first job error if any
        (``raise_error=False`` keeps it for :meth:`raise_error`)."""
        if self.alive:
            self._jobs.put(_STOP)
            self._thread.join()
        if raise_error:
            self.raise_error()
