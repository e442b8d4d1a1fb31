"""Sink writes that never take training down.

Every write of an audit's output (image file, TensorBoard, run file, report) goes through
:meth:`SinkGuard.write`: an error there (a full disk, a lost permission, a read-only remount, a
bug) is logged once per sink, counted, and training goes on; the audit itself stays in memory
(``auditor.history``). :meth:`SinkGuard.lost` says at ``close()`` what could not be written.
The audit log keeps its unwritten records itself and writes them once the disk takes them again
(:class:`~.audit_log.AuditLog`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SinkGuard", "SinkFailure"]

logger = logging.getLogger(__name__)


@dataclass
class SinkFailure:
    """What one sink could not write: the steps (``None`` for a write of no step) and why."""

    error: str
    steps: list[int | None] = field(default_factory=list)
    failing: bool = True

    def describe(self, sink: str) -> str:
        steps = [s for s in self.steps if s is not None]
        which = (
            f" of step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}" if steps else ""
        )
        return f"{sink}: {len(self.steps)} write(s){which} failed ({self.error})"


class SinkGuard:
    """Runs sink writes; a failure is logged once per sink and never raised."""

    def __init__(self) -> None:
        self.failures: dict[str, SinkFailure] = {}

    def write(self, sink: str, step: int | None, fn: Callable[..., Any], *args, **kwargs) -> bool:
        """``fn(*args, **kwargs)``; whether it succeeded (an exception is logged, not raised)."""
        try:
            fn(*args, **kwargs)
        except Exception as err:  # the audit must never take training down
            self._failed(sink, step, err)
            return False
        failure = self.failures.get(sink)
        if failure is not None and failure.failing:
            failure.failing = False
            logger.warning("%s: writing again (from step %s)", sink, step)
        return True

    def _failed(self, sink: str, step: int | None, err: Exception) -> None:
        failure = self.failures.get(sink)
        if failure is None:
            failure = self.failures[sink] = SinkFailure(error=f"{type(err).__name__}: {err}")
            logger.warning(
                "%s: writing%s failed (%s: %s); training goes on and the audit stays in memory "
                "(auditor.history); logged once for this sink",
                sink,
                f" step {step}" if step is not None else "",
                type(err).__name__,
                err,
                exc_info=not isinstance(err, OSError),  # a bug: show where
            )
        failure.steps.append(step)
        failure.failing = True

    def lost(self) -> list[str]:
        """One line per sink that failed: what it could not write and why."""
        return [f.describe(sink) for sink, f in self.failures.items()]
