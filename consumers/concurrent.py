"""The consume loop's concurrent mode (``Stage.concurrency > 1``): several messages at once, committed in order.

For stages whose work is mostly waiting on someone else (a webhook
receiver), where one slow message must not hold back the others. The
``StageRunner`` composes a ``ConcurrentRunner`` and hands it the loop; both
share the runner's decode-and-validate, failure handling, transactions and
pause reasons, so the one-at-a-time and the concurrent mode differ only in
what this module says:

- Every polled message is dispatched to the pool at once (unless the pool
  is full: then every partition is paused, and whatever was fetched
  meanwhile is read again on resume).
- A finished message's outputs and offset are committed (one transaction for
  everything ready) only once every earlier dispatched offset of its
  partition is done: per-partition in-order commit (``InOrderCommits``). So a
  crash or a rebalance redoes at most what was uncommitted; redelivery is
  harmless where the work is idempotent (callbacks: stable ``webhook-id``).
- A stage may hold a partition (``Stage.hold_until``): the partition is
  paused at that message and resumed when it is due (FIFO delay queues:
  nothing after the head is skipped, no thread waits).
- Revoked or lost partitions: their in-flight and finished-but-uncommitted
  messages are forgotten (the new owner redoes them). A store outage (or
  ``LeaveGroup``) redoes that message and the rest of its partition after a
  backoff.
- ``stop()``: nothing new starts; in-flight messages get the shutdown grace
  period to finish and be committed; the rest is left uncommitted.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from confluent_kafka import KafkaException, Message, TopicPartition

from kafscribe import metrics
from schemas.events import Event

from .pauses import STOPPING
from .retry import Failure
from .stage import Output

if TYPE_CHECKING:
    from .loop import StageRunner

log = logging.getLogger("kafscribe.loop")

PartitionKey = tuple[str, int]
FULL = "pool full"
HELD = "held"  # a message not due yet (hold_until), or a redo backing off


@dataclass
class Slot:
    """One message of a partition, from dispatch until its offset is committed."""

    msg: Message
    started: float
    event: Event | None = None
    future: Future | None = None
    outputs: list[Output] | None = None  # set once the handler is done: ready to commit
    outcome: str = ""

    @property
    def offset(self) -> int:
        return self.msg.offset()


@dataclass
class InOrderCommits:
    """Which finished messages may be committed: per partition, only a prefix whose every offset is done.

    Messages of one partition are added in offset order; they may finish in any
    order. ``pop_ready`` hands out, per partition, the leading run of finished
    messages, so a committed offset never passes a message still running.
    """

    partitions: dict[PartitionKey, deque[Slot]] = field(default_factory=dict)

    def add(self, key: PartitionKey, slot: Slot) -> None:
        self.partitions.setdefault(key, deque()).append(slot)

    def last_offset(self, key: PartitionKey) -> int | None:
        slots = self.partitions.get(key)
        return slots[-1].offset if slots else None

    def pop_ready(self) -> dict[PartitionKey, list[Slot]]:
        ready: dict[PartitionKey, list[Slot]] = {}
        for key, slots in list(self.partitions.items()):
            while slots and slots[0].outputs is not None:
                ready.setdefault(key, []).append(slots.popleft())
            if not slots:
                del self.partitions[key]
        return ready

    def truncate(self, key: PartitionKey, offset: int) -> list[Slot]:
        """Forget ``offset`` and everything after it in the partition (to be read again); return them."""
        slots = self.partitions.get(key, deque())
        kept = deque(s for s in slots if s.offset < offset)
        dropped = [s for s in slots if s.offset >= offset]
        if kept:
            self.partitions[key] = kept
        else:
            self.partitions.pop(key, None)
        return dropped

    def drop(self, key: PartitionKey) -> list[Slot]:
        """Forget a partition (revoked or lost): nothing of it will be committed here."""
        return list(self.partitions.pop(key, ()))

    def pending(self) -> int:
        return sum(len(s) for s in self.partitions.values())


class ConcurrentRunner:
    """Up to ``Stage.concurrency`` messages handled at once in a thread pool while the loop's thread polls."""

    def __init__(self, loop: StageRunner) -> None:
        self.loop = loop
        self.size = loop.stage.concurrency
        self.work = InOrderCommits()
        self.running: set[Future] = set()
        self.held: dict[PartitionKey, float] = {}  # partition -> epoch time it may resume
        self.rewind: dict[PartitionKey, int] = {}  # partition -> offset to read again on resume

    @property
    def idle(self) -> bool:
        return not (self.work.pending() or self.held or self.loop.pauses.has(FULL))

    def run(self) -> None:
        loop = self.loop
        pool = ThreadPoolExecutor(self.size, thread_name_prefix=f"{loop.stage.name}-job")
        log.info("stage started (%d at once)", self.size, extra=loop.log_extra)
        stop_seen_at: float | None = None
        try:
            while True:
                if loop.stopping:
                    stop_seen_at = stop_seen_at or time.monotonic()
                    loop.pauses.add(STOPPING)
                    if not self.work.pending():
                        break
                    if time.monotonic() - stop_seen_at > loop.shutdown_grace_s:
                        log.warning("shutdown grace period over: %d messages left uncommitted",
                                    self.work.pending(), extra=loop.log_extra)
                        break
                if loop.needs_recovery:
                    for key in loop.resync:  # read again from the committed offset: nothing of ours is pending
                        self._release_hold(key)
                    loop.recover()
                    continue
                msg = loop.poll(self._poll_timeout())
                loop.tick()
                if msg is None:
                    if self.idle:
                        loop.check_idle()
                elif msg.error():
                    loop.consumer_error(msg.error())
                else:
                    self._accept(msg, pool)
                self._collect()
                self._commit_ready()
                self._release_due()
                loop.in_flight_count = self.work.pending()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            loop.in_flight_count = 0

    # --- partitions that move (called by the loop's rebalance callbacks) -----------------
    def forget(self, keys: set[PartitionKey]) -> int:
        """Forget the partitions' pending messages; returns how many were left to the next owner."""
        dropped = 0
        for key in keys:
            self._release_hold(key)
            dropped += len(self.work.drop(key))
        return dropped

    def resumed(self, keys: list[PartitionKey]) -> None:
        """Partitions just resumed: read each from where a deferred message left it."""
        for key in keys:
            offset = self.rewind.pop(key, None)
            if offset is not None:
                try:
                    self.loop.seek(TopicPartition(*key, offset))
                except KafkaException as exc:
                    log.warning("seek %s to %d failed: %s", key, offset, exc, extra=self.loop.log_extra)

    # --- one message in, results out ------------------------------------------------------
    def _accept(self, msg: Message, pool: ThreadPoolExecutor) -> None:
        key = (msg.topic(), msg.partition())
        if self.loop.stopping or self.loop.pauses.paused(key):
            self._defer(key, msg.offset())  # fetched before the pause took effect: read it again later
            return
        last = self.work.last_offset(key)
        if last is not None and msg.offset() <= last:
            return  # already dispatched (a stale fetch)
        now = time.monotonic()
        decoded = self.loop.decode(msg)
        if decoded.outputs is not None:  # undecodable or invalid: its outputs are ready
            self.work.add(key, Slot(msg, now, decoded.event, outputs=decoded.outputs, outcome=decoded.outcome))
            return
        event = decoded.event
        hold = self._hold_until(event, msg)
        if hold is not None and hold > time.time():
            self._hold(key, hold, msg.offset())
            return
        slot = Slot(msg, now, event, pool.submit(self.loop.stage.handle, event, msg))
        self.running.add(slot.future)
        self.work.add(key, slot)
        if self._busy() >= self.size:
            self.loop.pauses.add(FULL)

    def _hold_until(self, event: Event, msg: Message) -> float | None:
        try:
            return self.loop.stage.hold_until(event, msg)
        except Exception:  # noqa: BLE001 - a bug in the hold rule must not stop the partition
            log.exception("hold_until failed; handling now", extra=self.loop.msg_extra(msg, event))
            return None

    def _defer(self, key: PartitionKey, offset: int) -> None:
        """On resume, read the partition again from ``offset``."""
        self.rewind[key] = min(self.rewind.get(key, offset), offset)

    def _hold(self, key: PartitionKey, until: float, offset: int) -> None:
        """Pause the partition until epoch time ``until``; then read it again from ``offset``."""
        self.held[key] = until
        self._defer(key, offset)
        self.loop.pauses.add(HELD, [key])

    def _release_hold(self, key: PartitionKey) -> None:
        self.held.pop(key, None)
        self.rewind.pop(key, None)
        self.loop.pauses.discard(HELD, [key])

    def _busy(self) -> int:
        """Handler calls still running (those of forgotten partitions included: they hold a thread)."""
        self.running = {f for f in self.running if not f.done()}
        return len(self.running)

    def _collect(self) -> None:
        """Turn finished handler calls into outputs (or redos)."""
        for key, slots in list(self.work.partitions.items()):
            for slot in list(slots):
                if slot.outputs is not None or slot.future is None or not slot.future.done():
                    continue
                exc = slot.future.exception()
                if exc is None:
                    slot.outputs, slot.outcome = slot.future.result(), "ok"
                    continue
                verdict = self.loop.failed(exc, slot.msg, slot.event, can_leave=False)
                if verdict.failure is Failure.CRASH:
                    slot.outputs, slot.outcome = verdict.outputs, verdict.failure.value
                    continue
                # abandoned: redone at once; deferred: after the backoff. The rest of the partition with it.
                self.work.truncate(key, slot.offset)
                self._hold(key, time.time() + verdict.delay_s, slot.offset)
                break

    def _commit_ready(self) -> None:
        ready = self.work.pop_ready()
        if not ready:
            return
        offsets = [TopicPartition(t, p, slots[-1].offset + 1) for (t, p), slots in ready.items()]
        outputs = [out for slots in ready.values() for slot in slots for out in slot.outputs or []]
        extra = {**self.loop.log_extra, "offsets": {f"{t}[{p}]": s[-1].offset for (t, p), s in ready.items()}}
        if self.loop.commit(offsets, outputs, extra):
            now = time.monotonic()
            for slots in ready.values():
                for slot in slots:
                    metrics.JOBS.labels(self.loop.stage.name, slot.outcome).inc()
                    metrics.STAGE_SECONDS.labels(self.loop.stage.name).observe(now - slot.started)
                self.loop.record_lag(slots[-1].msg)
        else:  # these partitions are read again from their committed offsets (loop.resync)
            self.forget(set(ready))

    def _release_due(self) -> None:
        """Resume partitions whose hold is over, and all of them once the pool has room again."""
        now = time.time()
        due = [k for k, until in self.held.items() if until <= now]
        for key in due:
            del self.held[key]
        if due:
            self.loop.pauses.discard(HELD, due)
        if self.loop.pauses.has(FULL) and self._busy() < self.size:
            self.loop.pauses.discard(FULL)

    def _poll_timeout(self) -> float:
        if self.work.pending() or self.loop.pauses.has(FULL):
            return 0.05
        if self.held:
            return max(0.01, min(0.5, min(self.held.values()) - time.time()))
        return 0.5
