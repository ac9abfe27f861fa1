"""Transient or permanent? And the in-process retry of transient failures.

Permanent: the input itself is bad (undecodable audio, missing blob, an
unknown model) -- retrying cannot help, the job fails with the reason.
Transient: anything else (Cassandra timeouts, CUDA out-of-memory, a broken
connection) -- retried with exponential backoff, then the job fails with
every attempt's error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from kafscribe import metrics
from kafscribe.speech.audio import AudioError
from kafscribe.speech.engines import EngineError
from kafscribe.store.blobs import BlobError
from kafscribe.store.session import is_outage as is_infrastructure_outage

T = TypeVar("T")
log = logging.getLogger("kafscribe.retry")

PERMANENT = (AudioError, BlobError, EngineError, ValueError)


class PermanentFailure(Exception):
    """The job cannot succeed; ``str()`` is the reason shown to the client."""


def is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, PERMANENT)


def with_retries(fn: Callable[[], T], *, stage: str, attempts: int, base_delay_s: float = 1.0) -> T:
    """Call ``fn``; retry transient errors; raise ``PermanentFailure`` when it cannot succeed."""
    errors: list[str] = []
    for attempt in range(1, attempts + 2):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if is_infrastructure_outage(exc):
                raise  # the consume loop redoes the event once the store is back
            if is_permanent(exc):
                raise PermanentFailure(str(exc)) from exc
            errors.append(f"attempt {attempt}: {type(exc).__name__}: {exc}")
            if attempt > attempts:
                break
            metrics.TRANSIENT_RETRIES.labels(stage).inc()
            delay = base_delay_s * 2 ** (attempt - 1)
            log.warning("transient failure, retrying in %.1fs: %s", delay, exc, extra={"stage": stage})
            time.sleep(delay)
    raise PermanentFailure("gave up after transient failures: " + "; ".join(errors))
