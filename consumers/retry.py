"""What happens after a failure: the one classifier, the in-job retry, and the loop's backoff schedule.

Every decision about a failure is made here, by the failure's type
(``kafscribe.errors``), never by the text of its message:

- ``with_retries`` (inside a job): a ``PermanentError`` (or a ``ValueError``:
  the input is bad) ends the job at once with the reason; any other error is
  transient and retried with exponential backoff, then the job fails with
  every attempt's error (``RetriesExhausted``). A store outage is re-raised:
  it is not the job's fault.
- ``classify`` (in the consume loop, for what a handler raised): a store
  outage is redone later (``REDO_LATER``, nothing committed, after
  ``redo_delay_s``); ``LeaveGroup`` hands the partitions to other workers;
  ``Abandoned`` leaves the offset uncommitted; anything else is a bug in the
  handler (``CRASH``): the job still ends, through ``failure_outputs``.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from kafscribe import metrics
from kafscribe.errors import PermanentError, RetriesExhausted
from kafscribe.store.session import is_outage as is_infrastructure_outage

from .stage import Abandoned, LeaveGroup, Output

T = TypeVar("T")
log = logging.getLogger("kafscribe.retry")

class Failure(enum.Enum):
    """What the consume loop does with a message whose handler raised."""

    ABANDON = "abandoned"  # given up (shutdown, partition moved): uncommitted, the next owner redoes it
    LEAVE_GROUP = "left"  # the worker cannot take work for a while: its partitions move to others
    REDO_LATER = "deferred"  # the job store is unreachable: uncommitted, redone after a backoff
    CRASH = "crashed"  # a bug in the handler: the job ends with ``failure_outputs``


@dataclass
class Verdict:
    """What the loop does with a message whose handler raised (``StageRunner.failed``)."""

    failure: Failure
    outputs: list[Output] = field(default_factory=list)  # CRASH: the job still ends with these
    delay_s: float = 0.0  # REDO_LATER: the backoff before the redo


def classify(exc: BaseException) -> Failure:
    """The loop's decision for an exception raised by ``Stage.handle``."""
    if isinstance(exc, Abandoned):
        return Failure.ABANDON
    if isinstance(exc, LeaveGroup):
        return Failure.LEAVE_GROUP
    if is_infrastructure_outage(exc):
        return Failure.REDO_LATER
    return Failure.CRASH


def is_permanent(exc: BaseException) -> bool:
    """The input is bad: retrying cannot help."""
    return isinstance(exc, PermanentError | ValueError)


def redo_delay_s(outages: int) -> float:
    """How long the loop waits before redoing an event after ``outages`` store outages in a row."""
    return min(30.0, 0.5 * 2 ** min(outages, 6))


def recover_delay_s(failures: int) -> float:
    """How long the loop waits before trying Kafka again after ``failures`` failed recoveries in a row."""
    return min(10.0, 0.5 * 2 ** min(failures, 5))


def with_retries(fn: Callable[[], T], *, stage: str, attempts: int, base_delay_s: float = 1.0) -> T:
    """Call ``fn``; retry transient errors; raise ``PermanentError`` when it cannot succeed.

    The ``PermanentError`` raised for a permanent failure carries the original as its cause
    (``raise ... from``); after the last retry it is a ``RetriesExhausted``.
    """
    errors: list[str] = []
    for attempt in range(1, attempts + 2):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if is_infrastructure_outage(exc):
                raise  # the consume loop redoes the event once the store is back
            if is_permanent(exc):
                raise PermanentError(str(exc)) from exc
            errors.append(f"attempt {attempt}: {type(exc).__name__}: {exc}")
            if attempt > attempts:
                break
            metrics.TRANSIENT_RETRIES.labels(stage).inc()
            delay = base_delay_s * 2 ** (attempt - 1)
            log.warning("transient failure, retrying in %.1fs: %s", delay, exc, extra={"stage": stage})
            time.sleep(delay)
    raise RetriesExhausted("gave up after transient failures: " + "; ".join(errors))
