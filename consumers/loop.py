"""The consume loop every stage shares: consume, work, then produce + commit in one transaction.

One event at a time per worker process:

1. ``poll()`` an event. Bytes that are not a kafscribe event go to the DLQ
   (with the reason) and their offset is committed: a bad message never
   blocks a partition or kills a worker.
2. Run the stage's handler in a thread, while this thread keeps calling
   ``poll()``: the worker stays in the group (heartbeats,
   ``max.poll.interval.ms``) however long the job takes. Meanwhile one more
   message is fetched and kept (then every owned partition is paused); it is
   handled as soon as this one is committed -- never rewound and fetched
   again -- and a stage with a ``prefetch(event, message)`` method prepares
   it in another thread (the transcriber reads and decodes its audio), handed
   to ``handle`` as ``prefetched`` (a Future). Kept messages and their
   prefetch are dropped whenever their partition is revoked, lost or rewound.
3. In one Kafka transaction: produce the handler's output events and commit
   the input offset (``send_offsets_to_transaction`` with the group
   metadata). Downstream stages read ``read_committed``, so they see the
   output if and only if the input counts as done.
4. If the partition was revoked or lost meanwhile, nothing is committed: the
   new owner redoes the job (the stores are idempotent upserts). A zombie's
   late commit is fenced by the transaction protocol.
5. If Cassandra is unreachable, the event is not the job's fault: nothing is
   committed, the worker backs off (still polling) and redoes it.

SIGTERM stops the loop after the current job (``stop()``); if that job
outlives the grace period it is abandoned uncommitted and redone elsewhere.

Self-healing: every transactional call runs under a deadline that
is really enforced (``deadline.call``). When a transaction overruns it, or
the producer reports a fatal state, or an abort fails, the producer is
dropped and a fresh one with the same ``transactional.id`` is created
(``init_transactions`` fences the old one and resolves its open
transaction). Until that succeeds the worker holds its partitions paused and
keeps polling; then each partition whose commit failed is rewound to the
group's committed offset, read back from the broker (so a commit that did
land is never redone), and the event is redone. ``last_beat`` marks every
completed poll-loop iteration for the process's watchdog.

Rebalances: a partition assigned while no job is in flight is
resumed (librdkafka keeps a partition's pause flag across revoke and
re-assign); one assigned while a job runs is paused. An idle worker checks
every ``IDLE_CHECK_S`` that none of its partitions has lag it is not
reading, and logs + exports (``kafscribe_idle_partition_lag``) any that has.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message, TopicPartition

from kafscribe import metrics, validation
from kafscribe.kafka import clients as kafka_clients
from kafscribe.settings import Settings
from schemas.codec import DecodeError
from schemas.events import DeadLetter, Event, decode_event

from . import deadline
from .retry import is_infrastructure_outage

log = logging.getLogger("kafscribe.loop")

IDLE_CHECK_S = 10.0  # how often an idle worker looks for lag on partitions it owns
BACKLOG_TIMEOUT_S = 2.0  # longest a status tick waits for the broker's watermarks


@dataclass
class Output:
    """An event to produce in the same transaction as the input's offset commit."""

    topic: str
    event: Event
    partition: int | None = None

    @property
    def key(self) -> bytes:
        return self.event.job_id.encode()


def park(settings: Settings, stage: str, event: Event, reason: str, source_topic: str = "") -> Output:
    """A ``DeadLetter`` carrying ``event`` and why no stage could finish it."""
    return Output(settings.topic("dlq"), DeadLetter(
        job_id=event.job_id, tenant=event.tenant, trace_id=event.trace_id, source_topic=source_topic,
        source_partition=-1, source_offset=-1, stage=stage, reason=reason, payload=event.encode(),
    ))


class Stage(Protocol):
    name: str  # "transcriber"
    group: str  # logical consumer group, "transcribers"
    input_topic: str  # logical topic, "uploads"

    def handle(self, event: Event, message: Message) -> list[Output]:
        """Do the work; return outputs. Raise only for bugs: failures are outputs too."""
        ...

    def failure_outputs(self, event: Event, reason: str) -> list[Output]:
        """What to emit when ``handle`` raised (a bug): the job must still end, with a reason."""
        ...


class Abandoned(Exception):
    """The job was given up (shutdown or partition lost); its offset stays uncommitted."""


class LeaveGroup(Exception):
    """The worker cannot take work for a while (short of memory): hand its partitions to others.

    The job's offset stays uncommitted; the worker unsubscribes, keeps reporting
    its status, and subscribes again once ``stage.can_resume()`` says so.
    """


@dataclass
class _Prefetch:
    """The stage's preparation (``stage.prefetch``) of the next kept message; None: nothing to prepare."""

    msg: Message
    future: Future | None


# === concurrent mode (opt-in: ``stage.concurrency = N``) ==========================================
# Kept apart from the one-at-a-time loop (StageRunner below): it shares only ``_commit`` (the one
# transaction path), ``_dead_letter``, ``_tick``, ``_record_lag`` and ``close``.

PartitionKey = tuple[str, int]


@dataclass
class _Slot:
    """One message of a partition in the concurrent mode, from dispatch until its offset is committed."""

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

    partitions: dict[PartitionKey, deque[_Slot]] = field(default_factory=dict)

    def add(self, key: PartitionKey, slot: _Slot) -> None:
        self.partitions.setdefault(key, deque()).append(slot)

    def last_offset(self, key: PartitionKey) -> int | None:
        slots = self.partitions.get(key)
        return slots[-1].offset if slots else None

    def pop_ready(self) -> dict[PartitionKey, list[_Slot]]:
        ready: dict[PartitionKey, list[_Slot]] = {}
        for key, slots in list(self.partitions.items()):
            while slots and slots[0].outputs is not None:
                ready.setdefault(key, []).append(slots.popleft())
            if not slots:
                del self.partitions[key]
        return ready

    def truncate(self, key: PartitionKey, offset: int) -> list[_Slot]:
        """Forget ``offset`` and everything after it in the partition (to be read again); return them."""
        slots = self.partitions.get(key, deque())
        kept = deque(s for s in slots if s.offset < offset)
        dropped = [s for s in slots if s.offset >= offset]
        if kept:
            self.partitions[key] = kept
        else:
            self.partitions.pop(key, None)
        return dropped

    def drop(self, key: PartitionKey) -> list[_Slot]:
        """Forget a partition (revoked or lost): nothing of it will be committed here."""
        return list(self.partitions.pop(key, ()))

    def pending(self) -> int:
        return sum(len(s) for s in self.partitions.values())


class ConcurrentMode:
    """Up to ``stage.concurrency`` messages handled at once in a thread pool while this thread polls.

    For stages whose work is mostly waiting on someone else (a webhook
    receiver), where one slow message must not hold back the others.

    - Every polled message is dispatched to the pool at once (unless the pool
      is full: then every partition is paused, and whatever was fetched
      meanwhile is read again on resume).
    - A finished message's outputs and offset are committed (``_commit``, one
      transaction for everything ready) only once every earlier dispatched
      offset of its partition is done: per-partition in-order commit. So a
      crash or a rebalance redoes at most what was uncommitted; redelivery is
      harmless where the work is idempotent (callbacks: stable ``webhook-id``).
    - A stage may hold a partition: ``stage.hold_until(event, message)``
      returns an epoch time before which the message must not be handled; the
      partition is paused at that message and resumed then (FIFO delay queues:
      nothing after the head is skipped, no thread waits).
    - A stage may read several topics: ``stage.input_topics`` (logical names).
    - Revoked or lost partitions: their in-flight and finished-but-uncommitted
      messages are forgotten (the new owner redoes them), as in the
      one-at-a-time mode. A store outage (or ``LeaveGroup``) redoes that
      message and the rest of its partition after a backoff.
    - ``stop()``: nothing new starts; in-flight messages get the shutdown grace
      period to finish and be committed; the rest is left uncommitted.
    """

    # provided by StageRunner
    settings: Settings
    stage: Stage
    shutdown_grace_s: float
    in_flight_count: int
    _owned: set[tuple[str, int]]
    _stop: threading.Event
    _outages: int

    @property
    def concurrency(self) -> int:
        return max(1, int(getattr(self.stage, "concurrency", 1) or 1))

    def _init_concurrent(self) -> None:
        self._cc_work = InOrderCommits()
        self._cc_running: set[Future] = set()
        self._cc_held: dict[PartitionKey, float] = {}  # partition -> epoch time it may resume
        self._cc_rewind: dict[PartitionKey, int] = {}  # partition -> offset to read again on resume
        self._cc_full = False

    def _run_concurrent(self) -> None:
        topics = [self.settings.topic(t) for t in getattr(self.stage, "input_topics", (self.stage.input_topic,))]
        self.consumer.subscribe(
            topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"{self.stage.name}-job")
        log.info("stage started (%d at once)", self.concurrency,
                 extra={"stage": self.stage.name, "worker_id": self.worker_id})
        stop_seen_at: float | None = None
        try:
            while True:
                if self._stop.is_set():
                    stop_seen_at = stop_seen_at or time.monotonic()
                    if not self._cc_work.pending():
                        break
                    if time.monotonic() - stop_seen_at > self.shutdown_grace_s:
                        log.warning("shutdown grace period over: %d messages left uncommitted",
                                    self._cc_work.pending(), extra={"stage": self.stage.name})
                        break
                if self.producer is None or self._resync or self._producer_suspect:
                    self._cc_recover()
                    continue
                msg = self.consumer.poll(self._cc_poll_timeout())
                self._tick()
                if msg is None:
                    if not (self._cc_work.pending() or self._cc_held or self._cc_full):
                        self._check_idle()
                elif msg.error():
                    self._consumer_error(msg.error())
                else:
                    self._cc_accept(msg, pool)
                self._cc_collect()
                self._cc_commit_ready()
                self._cc_resume()
                self.in_flight_count = self._cc_work.pending()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            self.in_flight_count = 0
            self.close()

    def _cc_recover(self) -> None:
        """The loop's producer recovery (``_recover``: fresh producer, partitions in ``_resync`` rewound to
        their committed offsets), then this mode's pauses again (``_recover`` resumes every partition)."""
        for key in self._resync:  # read again from the committed offset: nothing of ours is pending there
            self._cc_held.pop(key, None)
            self._cc_rewind.pop(key, None)
        self._recover()
        if self._holding:
            return  # not recovered yet: everything stays paused
        if self._cc_full or self._stop.is_set():
            self.consumer.pause(self.consumer.assignment())
        elif self._cc_held:
            self.consumer.pause([TopicPartition(*k) for k in self._cc_held])

    # --- what the concurrent mode forgets of partitions that move (called by the rebalance callbacks) ----
    def _cc_give_up(self, partitions: list[TopicPartition]) -> int:
        """Forget the partitions' pending messages; returns how many were left to the next owner."""
        dropped = sum(len(self._cc_forget((tp.topic, tp.partition))) for tp in partitions)
        if dropped:
            metrics.JOBS.labels(self.stage.name, "abandoned").inc(dropped)
        return dropped

    def _cc_forget(self, key: PartitionKey) -> list[_Slot]:
        self._cc_held.pop(key, None)
        self._cc_rewind.pop(key, None)
        return self._cc_work.drop(key)

    # --- one message in, results out ------------------------------------------------
    def _cc_accept(self, msg: Message, pool: ThreadPoolExecutor) -> None:
        key = (msg.topic(), msg.partition())
        if self._stop.is_set() or self._cc_full or key in self._cc_held:
            self._cc_defer(key, msg.offset())  # fetched before the pause took effect: read it again later
            return
        last = self._cc_work.last_offset(key)
        if last is not None and msg.offset() <= last:
            return  # already dispatched (a stale fetch)
        now = time.monotonic()
        try:
            event = decode_event(msg.value())
        except DecodeError as exc:
            self._cc_work.add(key, _Slot(msg, now, outputs=[self._dead_letter(msg, str(exc))], outcome="dlq"))
            return
        invalid = validation.check_event(self.settings, self.stage.input_topic, event)  # None = valid
        if invalid is not None:
            log.warning("invalid event refused: %s", invalid, extra=self._extra(msg, event))
            self._cc_work.add(key, _Slot(msg, now, event, outputs=self.stage.failure_outputs(event, invalid),
                                         outcome="invalid"))
            return
        hold = self._cc_hold_until(event, msg)
        if hold is not None and hold > time.time():
            self._cc_held[key] = hold
            self._cc_defer(key, msg.offset())
            return
        slot = _Slot(msg, now, event, pool.submit(self.stage.handle, event, msg))
        self._cc_running.add(slot.future)
        self._cc_work.add(key, slot)
        if self._cc_busy() >= self.concurrency:
            self._cc_full = True
            self.consumer.pause(self.consumer.assignment())

    def _cc_hold_until(self, event: Event, msg: Message) -> float | None:
        hold = getattr(self.stage, "hold_until", None)
        if hold is None:
            return None
        try:
            return hold(event, msg)
        except Exception:  # noqa: BLE001 - a bug in the hold rule must not stop the partition
            log.exception("hold_until failed; handling now", extra=self._extra(msg, event))
            return None

    def _cc_defer(self, key: PartitionKey, offset: int) -> None:
        """Pause the partition; on resume, read it again from ``offset``."""
        self._cc_rewind[key] = min(self._cc_rewind.get(key, offset), offset)
        self.consumer.pause([TopicPartition(*key)])

    def _cc_busy(self) -> int:
        """Handler calls still running (those of forgotten partitions included: they hold a thread)."""
        self._cc_running = {f for f in self._cc_running if not f.done()}
        return len(self._cc_running)

    def _cc_collect(self) -> None:
        """Turn finished handler calls into outputs (or redos)."""
        for key, slots in list(self._cc_work.partitions.items()):
            for slot in list(slots):
                if slot.outputs is not None or slot.future is None or not slot.future.done():
                    continue
                event = slot.event
                exc = slot.future.exception()
                if exc is None:
                    slot.outputs, slot.outcome = slot.future.result(), "ok"
                elif isinstance(exc, Abandoned):
                    log.warning("job abandoned: %s", exc, extra=self._extra(slot.msg, event))
                    metrics.JOBS.labels(self.stage.name, "abandoned").inc()
                    self._cc_redo(key, slot.offset, 0.0)
                    break
                elif is_infrastructure_outage(exc) or isinstance(exc, LeaveGroup):
                    self._outages += 1
                    delay = min(30.0, 0.5 * 2 ** min(self._outages, 6))
                    log.warning("store unavailable, redoing in %.1fs: %s", delay, exc, extra=self._extra(slot.msg))
                    metrics.JOBS.labels(self.stage.name, "deferred").inc()
                    self._cc_redo(key, slot.offset, delay)
                    break
                else:
                    log.error("handler crashed", exc_info=exc, extra=self._extra(slot.msg, event))
                    slot.outputs = self.stage.failure_outputs(event, f"internal error in {self.stage.name}: {exc!r}")
                    slot.outcome = "crashed"

    def _cc_redo(self, key: PartitionKey, offset: int, delay_s: float) -> None:
        """Read the partition again from ``offset`` after ``delay_s``; later in-flight results are ignored."""
        self._cc_work.truncate(key, offset)
        self._cc_held[key] = time.time() + delay_s
        self._cc_defer(key, offset)

    def _cc_commit_ready(self) -> None:
        ready = self._cc_work.pop_ready()
        if not ready:
            return
        offsets = [TopicPartition(t, p, slots[-1].offset + 1) for (t, p), slots in ready.items()]
        outputs = [out for slots in ready.values() for slot in slots for out in slot.outputs or []]
        extra = {"stage": self.stage.name, "offsets": {f"{t}[{p}]": s[-1].offset for (t, p), s in ready.items()}}
        if self._commit(offsets, outputs, extra):
            self._outages = 0
            now = time.monotonic()
            for slots in ready.values():
                for slot in slots:
                    metrics.JOBS.labels(self.stage.name, slot.outcome).inc()
                    metrics.STAGE_SECONDS.labels(self.stage.name).observe(now - slot.started)
                self._record_lag(slots[-1].msg)
        else:  # _commit put these partitions in _resync: read again from their committed offsets
            for key in ready:
                self._cc_forget(key)

    def _cc_resume(self) -> None:
        """Resume partitions whose hold is over, and all of them once the pool has room again."""
        now = time.time()
        due = [k for k, until in self._cc_held.items() if until <= now]
        for key in due:
            del self._cc_held[key]
        if self._stop.is_set():
            return
        if self._cc_full:
            if self._cc_busy() >= self.concurrency:
                return
            self._cc_full = False
            due = [(tp.topic, tp.partition) for tp in self.consumer.assignment()]
            due = [k for k in due if k not in self._cc_held]
        if not due:
            return
        owned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        due = [k for k in due if k in owned]
        self.consumer.resume([TopicPartition(*k) for k in due])
        for key in due:
            offset = self._cc_rewind.pop(key, None)
            if offset is not None:
                try:
                    self.consumer.seek(TopicPartition(*key, offset))
                except KafkaException as exc:
                    log.warning("seek %s to %d failed: %s", key, offset, exc, extra={"stage": self.stage.name})

    def _cc_poll_timeout(self) -> float:
        if self._cc_work.pending() or self._cc_full:
            return 0.05
        if self._cc_held:
            return max(0.01, min(0.5, min(self._cc_held.values()) - time.time()))
        return 0.5


class StageRunner(ConcurrentMode):
    def __init__(self, settings: Settings, stage: Stage, worker_id: str | None = None, *,
                 consumer=None, producer_factory: Callable[[], object] | None = None) -> None:
        """``consumer`` and ``producer_factory`` default to real Kafka clients (tests pass doubles)."""
        self.settings = settings
        self.stage = stage
        self.worker_id = worker_id or settings.effective_worker_id(stage.name)
        self.topic = settings.topic(stage.input_topic)
        self.consumer = consumer or kafka_clients.consumer(settings, settings.topic_prefix + stage.group)
        self.transactional_id = f"{settings.topic_prefix}{stage.name}.{self.worker_id}"
        self._new_producer = producer_factory or (lambda: kafka_clients.producer(
            settings, transactional_id=self.transactional_id, error_cb=self._on_producer_error,
        ))
        self.producer = None  # created (init_transactions) by _recover, dropped when it cannot be trusted
        self.call_timeout_s = settings.kafka_call_timeout_s
        self.shutdown_grace_s = settings.max_poll_interval_ms / 1000 / 2
        self._stop = threading.Event()
        self._in_flight: TopicPartition | None = None
        self._lost_in_flight = False
        # Messages fetched while a job ran: handled next, in the order fetched, never fetched again.
        self._kept: deque[Message] = deque()
        # Per partition, the offset after the last message taken (kept or handled): an older one is a
        # repeat (never handled twice). Forgotten wherever the partition is rewound, moved or re-assigned.
        self._taken: dict[tuple[str, int], int] = {}
        self._fetch_paused = False  # the one-at-a-time mode paused its partitions (for a job)
        self._prefetch: _Prefetch | None = None  # the stage's preparation of _kept[0], running meanwhile
        self._prefetch_pool: ThreadPoolExecutor | None = None
        self._init_concurrent()
        self._owned: set[tuple[str, int]] = set()  # kept by the rebalance callbacks
        self._holding = False  # partitions held paused while the producer is recovered
        self._resync: set[tuple[str, int]] = set()  # partitions to rewind to their committed offset
        self._recover_failures = 0
        self._producer_suspect = False  # it saw every broker go away: replaced before its next transaction
        self._idle_checked = time.monotonic()
        self._idle_lagging: dict[tuple[str, int], int] = {}
        self.in_flight_count = 0
        self.stopped = False
        self._outages = 0
        self.last_beat = time.monotonic()  # last completed poll-loop iteration (the watchdog reads it)
        self.on_idle: list[Callable[[], None]] = []  # called from the poll thread (status reports)
        self.on_close: list[Callable[[], None]] = []

    # --- lifecycle ---------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def assignment(self) -> list[int]:
        """Partitions of the stage's main input topic owned now, as the rebalance callbacks told us (safe
        from any thread: librdkafka's own ``assignment()`` was seen to block for minutes while the consumer
        sat out of its group). A stage reading several topics (the callback retry tiers) reports its first
        topic's: WorkerStatus.partitions names partitions of one topic."""
        return sorted(p for t, p in self._owned if t == self.topic)

    def backlog(self) -> int:
        """Messages waiting in the owned partitions of the main topic: kept (fetched, not started) plus not
        yet fetched, from the broker's high watermarks (so paused partitions count too). The ingress routes
        to the shortest queue by it. Bounded by ``BACKLOG_TIMEOUT_S``; 0 when the broker cannot tell."""
        owned = [TopicPartition(t, p) for t, p in sorted(self._owned) if t == self.topic]
        if not owned:
            return 0
        try:
            lags = deadline.call(lambda: self._lags(owned), BACKLOG_TIMEOUT_S, "backlog")
        except (KafkaException, RuntimeError, deadline.Overrun):
            return 0
        return sum(lags.values()) + sum(1 for m in list(self._kept) if m.topic() == self.topic)

    def _subscribe(self) -> None:
        self.consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def run(self) -> None:
        if self.concurrency > 1:
            return self._run_concurrent()
        self._subscribe()
        log.info("stage started", extra={"stage": self.stage.name, "worker_id": self.worker_id})
        try:
            while not self._stop.is_set():
                if self.producer is None or self._resync or self._producer_suspect:
                    self._recover()
                    continue
                msg = self._next_message()
                if msg is None:
                    self._check_idle()
                    continue
                if msg.error():
                    self._consumer_error(msg.error())
                    continue
                self._process(msg)
        finally:
            self._discard_prefetch()
            if self._prefetch_pool is not None:
                self._prefetch_pool.shutdown(wait=False, cancel_futures=True)
            self.close()

    def _next_message(self) -> Message | None:
        """The oldest message kept from the last job's run, else a fresh ``poll()``."""
        if self._kept:
            self._tick()
            return self._kept.popleft()
        if self._fetch_paused and not self._holding:
            self._set_fetching(True)
        msg = self.consumer.poll(0.5)
        self._tick()
        if msg is not None and not msg.error() and not self._take(msg):
            return None
        return msg

    def _take(self, msg: Message) -> bool:
        """Note ``msg`` as taken; False if it is a repeat of one taken already (it is skipped)."""
        key = (msg.topic(), msg.partition())
        if msg.offset() < self._taken.get(key, -1):
            log.warning("skipping offset %d of partition %d: already taken", msg.offset(), msg.partition(),
                        extra={"stage": self.stage.name})
            return False
        self._taken[key] = msg.offset() + 1
        return True

    def close(self) -> None:
        try:  # leaves the group: partitions move at once (bounded: it needs the broker)
            deadline.call(self.consumer.close, self.call_timeout_s, "consumer.close")
        except (KafkaException, RuntimeError, deadline.Overrun):
            pass
        if self.producer is not None:
            try:
                deadline.call(lambda: self.producer.flush(5), 10, "producer.flush")
            except deadline.Overrun:
                pass
        self.stopped = True
        for fn in self.on_close:
            fn()
        log.info("stage stopped", extra={"stage": self.stage.name, "worker_id": self.worker_id})

    def _tick(self) -> None:
        self.last_beat = time.monotonic()
        if self.producer is not None:
            self.producer.poll(0)  # serves its error callback (brokers down)
        for fn in self.on_idle:
            fn()

    def _consumer_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.code() == KafkaError._MAX_POLL_EXCEEDED:
            # librdkafka rejoins the group on the next poll(); nothing was in flight here.
            metrics.GROUP_EVICTIONS.labels(self.stage.name).inc()
            log.warning("evicted from the group (max.poll.interval.ms); rejoining", extra={"stage": self.stage.name})
            return
        if err.fatal():
            raise KafkaException(err)  # the process exits non-zero and its supervisor restarts it
        log.warning("consumer error: %s", err, extra={"stage": self.stage.name})

    # --- producer recovery ---------------------------------------------------------------
    def _on_producer_error(self, err: KafkaError) -> None:
        """librdkafka's error callback (from ``poll``): a producer that saw all brokers go away was
        seen to hang in its next transaction after they came back; it is replaced before that one."""
        if err.code() == KafkaError._ALL_BROKERS_DOWN or err.fatal():
            self._producer_suspect = True

    def _recover(self) -> None:
        """One attempt to make the producer usable and rewind uncommitted partitions; backs off on failure."""
        self._hold(True)
        try:
            self._init_producer()
            if self._resync:
                self._rewind_to_committed()
        except (KafkaException, deadline.Overrun) as exc:
            self._recover_failures += 1
            delay = min(10.0, 0.5 * 2 ** min(self._recover_failures, 5))
            log.warning("kafka not usable yet (%s); retrying in %.1fs", exc, delay,
                        extra={"stage": self.stage.name, "worker_id": self.worker_id})
            self._wait_polling(delay)
            return
        if self._recover_failures:
            log.info("kafka usable again", extra={"stage": self.stage.name, "worker_id": self.worker_id})
        self._recover_failures = 0
        self._hold(False)

    def _init_producer(self) -> None:
        if self._producer_suspect and self.producer is not None:
            self._drop_producer("brokers were down")
        if self.producer is not None:
            return
        producer = self._new_producer()
        try:
            deadline.call(lambda: producer.init_transactions(self.call_timeout_s),
                          self.call_timeout_s + 1, "init_transactions")
        except (KafkaException, deadline.Overrun):
            _dispose(producer)
            raise
        self._producer_suspect = False
        self.producer = producer

    def _drop_producer(self, reason: str) -> None:
        """Stop using the producer: a fresh one (same transactional id) fences it in ``_recover``."""
        metrics.PRODUCER_RESETS.labels(self.stage.name, reason).inc()
        log.warning("dropping the transactional producer (%s)", reason,
                    extra={"stage": self.stage.name, "worker_id": self.worker_id})
        old, self.producer = self.producer, None
        if old is not None:
            _dispose(old)

    def _rewind_to_committed(self) -> None:
        """Seek each partition in ``_resync`` that we still own to the group's committed offset."""
        self._drop_kept(set(self._resync))  # read again from the committed offset
        wanted = [TopicPartition(t, p) for t, p in sorted(self._resync) if (t, p) in self._owned]
        if wanted:
            committed = deadline.call(
                lambda: self.consumer.committed(wanted, timeout=self.call_timeout_s),
                self.call_timeout_s + 1, "committed",
            )
            for tp in committed:
                offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING  # never committed: all of it
                self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
                log.info("rewound partition %d to committed offset %d", tp.partition, tp.offset,
                         extra={"stage": self.stage.name})
        self._resync.clear()

    def _hold(self, on: bool) -> None:
        """Pause (or resume) every owned partition; ``_on_assign`` follows the same state."""
        if on == self._holding:
            return
        self._holding = on
        try:
            (self.consumer.pause if on else self.consumer.resume)(self._owned_partitions())
        except (KafkaException, RuntimeError):
            pass

    def _wait_polling(self, seconds: float) -> None:
        """Wait, still polling (rebalances, heartbeat of the loop); fetched strays are read again later."""
        until = time.monotonic() + seconds
        while time.monotonic() < until and not self._stop.is_set():
            stray = self.consumer.poll(0.2)
            if stray is not None and not stray.error():
                self._resync.add((stray.topic(), stray.partition()))
            self._tick()

    def _check_idle(self) -> None:
        """Idle: nothing owned may stay paused; report partitions with lag this worker does not read."""
        now = time.monotonic()
        if now - self._idle_checked < IDLE_CHECK_S or self._busy():
            return
        self._idle_checked = now
        try:
            owned = self._owned_partitions()
            self.consumer.resume(owned)
            lags = deadline.call(lambda: self._lags(owned), self.call_timeout_s, "lag check")
        except (KafkaException, RuntimeError, deadline.Overrun):
            return
        previous, self._idle_lagging = self._idle_lagging, {}
        for tp, lag in lags.items():
            key = (tp.topic, tp.partition)
            stuck = lag > 0 and previous.get(key) == lag  # same lag a whole check apart, while idle
            metrics.IDLE_PARTITION_LAG.labels(self.stage.name, str(tp.partition)).set(lag if stuck else 0)
            if lag > 0:
                self._idle_lagging[key] = lag
            if stuck:
                log.warning("partition %d owned by an idle worker, with lag %d", tp.partition, lag,
                            extra={"stage": self.stage.name, "worker_id": self.worker_id})

    def _lags(self, owned: list[TopicPartition]) -> dict[TopicPartition, int]:
        """High watermark minus read position (the committed offset where nothing was read yet)."""
        if not owned:
            return {}
        positions = self.consumer.position(owned)
        unread = [tp for tp in positions if tp.offset < 0]
        committed = {(tp.topic, tp.partition): tp.offset
                     for tp in (self.consumer.committed(unread, timeout=5) if unread else [])}
        lags = {}
        for tp in positions:
            low, high = self.consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=5)
            start = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
            lags[tp] = max(0, high - (start if start >= 0 else low))
        return lags

    def _owned_partitions(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in sorted(self._owned)]

    def _busy(self) -> bool:
        return self._in_flight is not None or self._holding

    # --- rebalance callbacks (called inside poll), one set for both modes -------------
    def _on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        metrics.REBALANCES.labels(self.stage.name, "assign").inc()
        log.info("assigned %s", [(p.topic, p.partition) for p in partitions], extra={"stage": self.stage.name})
        keys = {(p.topic, p.partition) for p in partitions}
        self._drop_kept(keys)  # nothing kept from an earlier ownership: it is read from the committed offset
        for key in keys:
            self._cc_forget(key)
        consumer.incremental_assign(partitions)
        self._owned = self._owned | keys  # rebound: read by other threads
        # librdkafka keeps a partition's pause flag across revoke and re-assign: set it explicitly.
        if self._pause_new_partitions():
            consumer.pause(partitions)
        else:
            consumer.resume(partitions)

    def _pause_new_partitions(self) -> bool:
        if self._holding or self._stop.is_set():
            return True
        return self._cc_full if self.concurrency > 1 else self._in_flight is not None

    def _on_revoke(self, consumer, partitions: list[TopicPartition]) -> None:
        metrics.REBALANCES.labels(self.stage.name, "revoke").inc()
        self._forget(partitions, "revoked")

    def _on_lost(self, consumer, partitions: list[TopicPartition]) -> None:
        metrics.REBALANCES.labels(self.stage.name, "lost").inc()
        self._forget(partitions, "lost")

    def _forget(self, partitions: list[TopicPartition], why: str) -> None:
        """Partitions moved away: nothing of theirs is committed here; the next owner reads them again."""
        keys = {(p.topic, p.partition) for p in partitions}
        self._owned = self._owned - keys
        cur = self._in_flight
        if cur is not None and (cur.topic, cur.partition) in keys:
            self._lost_in_flight = True
        dropped = self._drop_kept(keys) + self._cc_give_up(partitions)
        log.info("%s %s (%d uncommitted messages left to the next owner)", why, sorted(keys), dropped,
                 extra={"stage": self.stage.name})

    # --- messages kept between jobs, and the prefetch of the next one --------------------
    def _drop_kept(self, keys: set[tuple[str, int]] | None) -> int:
        """Forget kept messages of partitions ``keys`` (None: all): they will be fetched again from
        wherever the partition is read next. A prefetch of a dropped message is discarded."""
        for key in list(self._taken) if keys is None else keys:
            self._taken.pop(key, None)
        if not self._kept:
            return 0
        kept = [m for m in self._kept if keys is not None and (m.topic(), m.partition()) not in keys]
        dropped = len(self._kept) - len(kept)
        if dropped:
            self._kept = deque(kept)
            if self._prefetch is not None and (not kept or self._prefetch.msg is not kept[0]):
                self._discard_prefetch()
        return dropped

    def _keep(self, msg: Message) -> None:
        """A message fetched while a job runs: handled after it (unless its partition is rewound or moves)."""
        key = (msg.topic(), msg.partition())
        if key not in self._owned:
            return  # its partition moved meanwhile: the next owner reads it
        if self._take(msg):
            self._kept.append(msg)

    def _set_fetching(self, on: bool) -> None:
        """Resume (or pause) every assigned partition for the one-at-a-time mode."""
        try:
            assignment = self.consumer.assignment()
            (self.consumer.resume if on else self.consumer.pause)(assignment)
        except (KafkaException, RuntimeError):
            return
        self._fetch_paused = not on

    def _start_prefetch(self) -> None:
        """Let the stage prepare the next kept message (``stage.prefetch``) while the current job runs.

        Depth 1: only the head of ``_kept``. What it prepares is handed to ``stage.handle`` as
        ``prefetched`` (a Future) and is dropped if the message is dropped (revoke, rewind).
        """
        prepare = getattr(self.stage, "prefetch", None)
        if prepare is None or not self._kept or self._prefetch is not None or self._stop.is_set():
            return
        head = self._kept[0]
        future: Future | None = None
        try:
            event = decode_event(head.value())
        except DecodeError:
            event = None
        if event is not None and validation.check_event(self.settings, self.stage.input_topic, event) is None:
            if self._prefetch_pool is None:
                self._prefetch_pool = ThreadPoolExecutor(1, thread_name_prefix=f"{self.stage.name}-prefetch")
            future = self._prefetch_pool.submit(prepare, event, head)
        self._prefetch = _Prefetch(head, future)

    def _take_prefetch(self, msg: Message) -> Future | None:
        """The prefetch of ``msg`` if there is one (any other one is stale and discarded)."""
        pre, self._prefetch = self._prefetch, None
        if pre is None or pre.future is None:
            return None
        if pre.msg is msg:
            return pre.future
        pre.future.cancel()
        return None

    def _discard_prefetch(self) -> None:
        pre, self._prefetch = self._prefetch, None
        if pre is not None and pre.future is not None:
            pre.future.cancel()  # if it already runs, its result is simply never used
            metrics.PREFETCHES.labels(self.stage.name, "discarded").inc()

    # --- one message ------------------------------------------------------------------
    def _process(self, msg: Message) -> None:
        started = time.monotonic()
        event: Event | None = None
        try:
            event = decode_event(msg.value())
        except DecodeError as exc:
            outputs = [self._dead_letter(msg, str(exc))]
            outcome = "dlq"
        else:
            invalid = validation.check_event(self.settings, self.stage.input_topic, event)  # None = valid
            if invalid is not None:
                log.warning("invalid event refused: %s", invalid, extra=self._extra(msg, event))
            try:
                outputs = (self._run_paused(msg, event, self._take_prefetch(msg)) if invalid is None
                           else self.stage.failure_outputs(event, invalid))
            except Abandoned as exc:
                log.warning("job abandoned: %s", exc, extra=self._extra(msg, event))
                metrics.JOBS.labels(self.stage.name, "abandoned").inc()
                return
            except LeaveGroup as exc:
                log.warning("leaving the group: %s", exc, extra=self._extra(msg, event))
                self._sit_out()
                return
            except Exception as exc:  # noqa: BLE001 - a bug in a handler must not stop the partition
                if is_infrastructure_outage(exc):
                    self._redo_later(msg, exc)
                    return
                log.exception("handler crashed", extra=self._extra(msg, event))
                outputs = self.stage.failure_outputs(event, f"internal error in {self.stage.name}: {exc!r}")
                outcome = "crashed"
            else:
                outcome = "ok" if invalid is None else "invalid"
        offsets = [TopicPartition(msg.topic(), msg.partition(), msg.offset() + 1)]
        committing = time.monotonic()
        if self._commit(offsets, outputs, self._extra(msg)):
            done = time.monotonic()
            self._outages = 0
            metrics.JOBS.labels(self.stage.name, outcome).inc()
            metrics.STAGE_SECONDS.labels(self.stage.name).observe(done - started)
            metrics.JOB_PHASE_SECONDS.labels(self.stage.name, "commit").observe(done - committing)
            self._record_lag(msg)
            log.info("committed", extra={**self._extra(msg, event), "phases": {
                "handler": round(committing - started, 4), "commit": round(done - committing, 4)}})
        else:
            self._rewind(msg)

    def _rewind(self, msg: Message) -> None:
        """Read ``msg`` again (its offset was not committed), if this worker still owns its partition."""
        self._drop_kept({(msg.topic(), msg.partition())})
        if any((tp.topic, tp.partition) == (msg.topic(), msg.partition()) for tp in self.consumer.assignment()):
            self.consumer.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))

    def _redo_later(self, msg: Message, exc: BaseException) -> None:
        """Cassandra is unreachable: leave the offset uncommitted, wait (polling), then redo the event."""
        self._outages += 1
        delay = min(30.0, 0.5 * 2 ** min(self._outages, 6))
        log.warning("store unavailable, redoing in %.1fs: %s", delay, exc, extra=self._extra(msg))
        metrics.JOBS.labels(self.stage.name, "deferred").inc()
        self._drop_kept({(msg.topic(), msg.partition())})
        self.consumer.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))
        self._hold(True)
        self._wait_polling(delay)
        self._hold(False)

    def _sit_out(self) -> None:
        """Unsubscribe (partitions move to others) until the stage can take work again."""
        self.consumer.unsubscribe()
        self._owned = set()
        self._drop_kept(None)
        can_resume = getattr(self.stage, "can_resume", lambda: True)
        while not self._stop.is_set() and not can_resume():
            self.consumer.poll(1.0)  # serves the revocation; nothing else arrives
            self._tick()
        if not self._stop.is_set():
            log.info("rejoining the group", extra={"stage": self.stage.name, "worker_id": self.worker_id})
            self._subscribe()

    def _run_paused(self, msg: Message, event: Event, prefetched: Future | None = None) -> list[Output]:
        """Run the handler in a thread; keep polling so we stay in the group.

        While the job runs, the partitions are paused once one message is kept for after it
        (depth 1; more may arrive before the pause takes effect, and are kept too): that
        message is handled as soon as this one is committed, and the stage may prepare it
        meanwhile (``stage.prefetch``). Kept messages are never fetched twice.
        """
        self._in_flight = TopicPartition(msg.topic(), msg.partition(), msg.offset())
        self._lost_in_flight = False
        self.in_flight_count = 1
        self._set_fetching(not self._kept)
        self._start_prefetch()
        box: dict[str, object] = {}
        kwargs = {} if prefetched is None else {"prefetched": prefetched}

        def work() -> None:
            try:
                box["outputs"] = self.stage.handle(event, msg, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the poll thread
                box["error"] = exc

        thread = threading.Thread(target=work, name=f"{self.stage.name}-job", daemon=True)
        thread.start()
        stop_seen_at: float | None = None
        try:
            while thread.is_alive():
                fetched = self.consumer.poll(0.2)
                if fetched is not None and not fetched.error():
                    self._keep(fetched)
                self._set_fetching(not self._kept and not self._stop.is_set())
                self._start_prefetch()
                self._tick()
                if self._stop.is_set():
                    stop_seen_at = stop_seen_at or time.monotonic()
                    if time.monotonic() - stop_seen_at > self.shutdown_grace_s:
                        raise Abandoned("shutdown grace period over")
                thread.join(0.05)
            if "error" in box:
                raise box["error"]  # type: ignore[misc]
            if self._lost_in_flight:
                raise Abandoned("partition moved to another worker while the job ran")
            return box["outputs"]  # type: ignore[return-value]
        finally:
            self._in_flight = None
            self.in_flight_count = 0
            if not self._kept:
                self._set_fetching(True)

    def _commit(self, offsets: list[TopicPartition], outputs: list[Output], extra: dict) -> bool:
        """Produce ``outputs`` and commit ``offsets`` (next offsets to read) atomically.

        False = nothing was committed and the input will be redone: the caller rewinds.
        ``extra`` is the log context (stage, partition, job ids). Every call is bounded by
        a real deadline; a producer that overran it, went fatal or could not abort is
        dropped, and the partitions are rewound to the committed offset read back from
        the broker before anything else is read (``_recover``).
        """
        try:
            self._init_producer()  # no-op unless the producer is missing or saw the brokers go
        except (KafkaException, deadline.Overrun) as exc:
            log.warning("no usable producer: %s", exc, extra=extra)
            self._resync.update((tp.topic, tp.partition) for tp in offsets)
            return False
        producer = self.producer
        timeout = self.call_timeout_s

        def transact() -> None:
            producer.begin_transaction()
            for out in outputs:
                kwargs = {} if out.partition is None else {"partition": out.partition}
                producer.produce(out.topic, key=out.key, value=out.event.encode(), **kwargs)
            producer.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), timeout)
            producer.commit_transaction(timeout)

        try:
            deadline.call(transact, 2 * timeout + 1, "transaction")
            return True
        except deadline.Overrun as exc:
            log.error("transaction stuck: %s", exc, extra=extra)
            self._drop_producer("overrun")
        except (KafkaException, BufferError) as exc:
            err = exc.args[0] if isinstance(exc, KafkaException) else None
            log.warning("transaction failed: %s", err or exc, extra=extra)
            if err is not None and err.fatal():
                self._drop_producer("fatal")  # e.g. fenced: a fresh init_transactions tells
            else:
                try:
                    deadline.call(lambda: producer.abort_transaction(timeout), timeout + 1, "abort_transaction")
                except (KafkaException, deadline.Overrun) as abort_exc:
                    log.warning("abort failed: %s", abort_exc, extra=extra)
                    self._drop_producer("abort failed")
        self._resync.update((tp.topic, tp.partition) for tp in offsets)
        return False

    def _dead_letter(self, msg: Message, reason: str) -> Output:
        metrics.DEAD_LETTERS.labels(self.stage.name).inc()
        log.error("undecodable message to DLQ: %s", reason, extra=self._extra(msg))
        return Output(
            self.settings.topic("dlq"),
            DeadLetter(
                job_id=(msg.key() or b"").decode(errors="replace"),
                source_topic=msg.topic(),
                source_partition=msg.partition(),
                source_offset=msg.offset(),
                stage=self.stage.name,
                reason=reason,
                payload=msg.value() or b"",
            ),
        )

    def _record_lag(self, msg: Message) -> None:
        try:
            _, high = self.consumer.get_watermark_offsets(
                TopicPartition(msg.topic(), msg.partition()), cached=True
            )
            metrics.CONSUMER_LAG.labels(self.stage.name, str(msg.partition())).set(max(0, high - msg.offset() - 1))
        except KafkaException:
            pass

    def _extra(self, msg: Message, event: Event | None = None) -> dict:
        extra = {"stage": self.stage.name, "topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()}
        if event is not None:
            extra.update(job_id=event.job_id, trace_id=event.trace_id)
        return extra


def _dispose(producer) -> None:
    """Let go of a producer in a thread of its own: its destructor may block on a dead broker."""
    box = [producer]

    def drop() -> None:
        time.sleep(1.0)  # the caller's references are gone by then: the last one is dropped here
        p = box.pop()
        try:
            p.purge()
        except Exception:  # noqa: BLE001 - it is being thrown away
            pass
        del p

    threading.Thread(target=drop, name="dispose-producer", daemon=True).start()
