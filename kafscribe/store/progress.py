"""Live progress of a running job: the fraction of its audio done, and the segments decoded so far.

A worker reports through a ``ProgressReporter`` (the transcriber once per
decoded segment; a stage that works in chunks can call ``fraction`` per
chunk). The reports are rows in Cassandra (``JobStore.record_progress``,
``JobStore.record_live_segment``) that whichever ingress serves
``GET /v1/jobs/{id}/events`` or ``GET /v1/jobs/{id}`` reads. Why rows and not
a Kafka topic: any number of ingress processes can serve any client, a
client that connects late still gets every segment, and nothing has to tail
a topic from its start per request.

Redone jobs: progress is kept per attempt and read as the highest fraction of
any attempt, so a redo after a crash never shows progress going backwards;
live segments are keyed by their index, so a redo rewrites the same rows and
a stream that already sent a segment never sends it again.

Progress is best effort: a failed write is logged and dropped; it never fails
or slows the job (writes are asynchronous, and at most one per
``KAFSCRIBE_PROGRESS_INTERVAL_S`` besides the segments themselves).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from schemas.events import Segment

log = logging.getLogger("kafscribe.store.progress")


class ProgressReporter:
    """Reports one attempt of one job; call ``close`` when the attempt ends."""

    def __init__(self, jobs: Any, job_id: str, attempt: int, *, min_interval_s: float = 1.0,
                 ttl_s: int = 7 * 86400) -> None:
        self.jobs = jobs  # a kafscribe.store.jobs.JobStore
        self.job_id = job_id
        self.attempt = attempt
        self.min_interval_s = min_interval_s
        self.ttl_s = ttl_s
        self._fraction = 0.0
        self._written_at = float("-inf")
        self._pending: set[Any] = set()  # cassandra ResponseFutures in flight
        self._lock = threading.Lock()
        self._warned = False

    def fraction(self, value: float, *, force: bool = False) -> None:
        """Record that ``value`` (0..1) of the job is done; never lower than what this attempt reported."""
        value = min(max(float(value), self._fraction), 1.0)
        self._fraction = value
        now = time.monotonic()
        if force or now - self._written_at >= self.min_interval_s:
            self._written_at = now
            self._write(lambda: self.jobs.record_progress(self.job_id, self.attempt, value, self.ttl_s))

    def segment(self, segment: Segment, fraction: float) -> None:
        """A segment was decoded: store it for live readers, and the progress it brings."""
        self._write(lambda: self.jobs.record_live_segment(self.job_id, segment, self.ttl_s))
        self.fraction(fraction, force=True)

    def close(self) -> None:
        """Wait for the writes in flight (each bounded by the driver's request timeout), so readers
        see them before the job moves on."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - best effort, see the module doc
                self._warn(exc)

    def _write(self, start) -> None:
        try:
            future = start()
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)
            return
        with self._lock:
            self._pending.add(future)
        future.add_callbacks(lambda _rows: self._done(future), lambda exc: self._done(future, exc))

    def _done(self, future: Any, exc: Exception | None = None) -> None:
        with self._lock:
            self._pending.discard(future)
        if exc is not None:
            self._warn(exc)

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("progress not recorded: %s: %s", type(exc).__name__, exc, extra={"job_id": self.job_id})
