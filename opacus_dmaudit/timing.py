"""Where an audit's time goes: seconds per stage, measured while the audit runs.

The auditor opens a :func:`measure` scope around each audit (and around the attach-time work);
the code of each stage marks itself with :func:`stage`. Stage times are *exclusive*: a stage
nested in another (the prior-fit check's restorations inside ``"prior fit"``) counts only
towards the innermost one, so the stages of an audit add up to its wall time. The prior's own
model calls are counted apart, whichever stage made them (:func:`model_call`): they are the part
of an audit no engineering removes at a given sampler. Outside a :func:`measure` scope every
marker costs one context-variable lookup and measures nothing.

Scopes are per thread (a :class:`contextvars.ContextVar`), so audits scored by the background
worker are measured in the worker's own scope.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

__all__ = ["STAGE_ORDER", "StageTimes", "measure", "stage", "model_call", "count", "current"]

#: The stages an audit is broken down into, in the order a report lists them.
STAGE_ORDER = (
    "readout",
    "prior",
    "metrics",
    "prior fit",
    "κ̂",
    "identification",
    "checks",
    "privacy",
    "sinks",
    "other",
)


@dataclass
class StageTimes:
    """Seconds per stage of one measured scope (an audit, or the attach-time work).

    Attributes:
        seconds: exclusive wall seconds per stage name (see :data:`STAGE_ORDER`).
        model_seconds: wall seconds inside the prior's model calls, whatever the stage.
        model_calls: how many model calls (one per batch of images per sampler step).
        counts: work done, whatever the machine's load: ``"prior images"`` (images through the
            prior's model, summed over its calls), ``"lpips images"`` (images through the LPIPS
            backbone).
        total: wall seconds of the whole scope.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    model_seconds: float = 0.0
    model_calls: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    total: float = 0.0
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False)
    _stack: list[list] = field(default_factory=list, repr=False)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def to_json(self) -> dict[str, float]:
        """``{stage: seconds}`` with ``"other"`` (time in no stage), ``"model calls"`` and
        ``"total"``."""
        out = dict(self.seconds)
        out["other"] = max(0.0, self.total - sum(self.seconds.values()))
        out["model calls"] = self.model_seconds
        out["total"] = self.total
        return out


#: The clock of :func:`measure` scopes opened without one (a benchmark may set
#: ``time.thread_time`` to profile work rather than wall time on a busy machine).
CLOCK: Callable[[], float] = time.perf_counter

_current: ContextVar[StageTimes | None] = ContextVar("opacus_dmaudit_stage_times", default=None)


def current() -> StageTimes | None:
    """The scope being measured in this thread, or ``None``."""
    return _current.get()


@contextlib.contextmanager
def measure(clock: Callable[[], float] | None = None) -> Iterator[StageTimes]:
    """Measure everything inside as one scope; yields its :class:`StageTimes` (filled on exit).

    Args:
        clock: :data:`CLOCK` by default (wall time); ``time.thread_time`` measures this
            thread's CPU time instead (with one torch thread: the work done, whatever else the
            machine runs).
    """
    clock = clock or CLOCK
    times = StageTimes(clock=clock)
    token = _current.set(times)
    start = clock()
    try:
        yield times
    finally:
        times.total = clock() - start
        _current.reset(token)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Count the time inside towards ``name`` (exclusive of stages nested in it)."""
    times = _current.get()
    if times is None:
        yield
        return
    now = times.clock()
    if times._stack:  # pause the enclosing stage
        outer = times._stack[-1]
        times.add(outer[0], now - outer[1])
    times._stack.append([name, now])
    try:
        yield
    finally:
        now = times.clock()
        times.add(name, now - times._stack.pop()[1])
        if times._stack:
            times._stack[-1][1] = now  # the enclosing stage resumes


@contextlib.contextmanager
def model_call(images: int) -> Iterator[None]:
    """Count the time inside as one call of the prior's model on ``images`` images (on top of
    the stage that made it)."""
    times = _current.get()
    if times is None:
        yield
        return
    start = times.clock()
    try:
        yield
    finally:
        times.model_seconds += times.clock() - start
        times.model_calls += 1
        count("prior images", images)


def count(name: str, n: int) -> None:
    """Add ``n`` to the measured scope's counter ``name`` (nothing outside a scope)."""
    times = _current.get()
    if times is not None:
        times.counts[name] = times.counts.get(name, 0) + int(n)
