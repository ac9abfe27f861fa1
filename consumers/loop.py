"""The consume loop every stage shares: consume, work, then produce + commit in one transaction.

Read it top to bottom: ``run`` turns ``_poll_iteration`` until stopped; each
iteration recovers Kafka if it must, takes the next message, and
``_process``-es it: decode and validate (``decode``), run the stage's
``handle`` in a thread while this thread keeps polling (``_run_job``), then
commit its outputs and offset in one transaction (``commit``, through
``consumers.transactions``). What a failure means is decided by its type
(``consumers.retry.classify``), in one place (``failed``) for both modes.

1. Bytes that are not a kafscribe event go to the DLQ with the reason, and an
   event that fails validation ends through ``Stage.failure_outputs``; either
   way the offset is committed: a bad message never blocks a partition.
2. While the handler runs, this thread keeps calling ``poll()``: the worker
   stays in the group however long the job takes. Meanwhile one more message
   is fetched and kept (then the partitions are paused); it is handled as soon
   as this one is committed -- never rewound and fetched again -- and a stage
   that overrides ``Stage.prefetch`` prepares it meanwhile. Kept messages and
   their prefetch are dropped whenever their partition is revoked, lost or
   rewound.
3. If the partition was revoked or lost meanwhile, nothing is committed: the
   new owner redoes the job (the stores are idempotent upserts).
4. A store outage is not the job's fault: nothing is committed, the worker
   backs off (still polling) and redoes the event. ``LeaveGroup`` hands the
   partitions to other workers until ``Stage.can_resume``.
5. A failed transaction leaves the partitions to be rewound to the offsets the
   group really committed, after the producer is recovered (``recover``);
   until then every partition is held paused and the loop keeps polling.

Pauses are recorded per reason (``consumers.pauses``); ``concurrency > 1``
runs the concurrent mode (``consumers.concurrent``) on this runner's parts;
broker look-ups that are not the job's work (backlog, idle lag) run in a
background thread (``consumers.probes``), and so does the worker status
(``consumers.status``): nothing but the job's own work runs on this thread, so
a job that reaches an idle worker starts at once.

SIGTERM stops the loop after the current job (``stop()``); a job that
outlives the grace period is abandoned uncommitted and redone elsewhere.
``last_beat`` marks every completed poll-loop iteration for the watchdog.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from kafscribe import metrics, validation
from kafscribe.kafka import clients as kafka_clients
from kafscribe.settings import Settings
from schemas.codec import DecodeError
from schemas.events import Event, decode_event

from . import deadline
from .concurrent import ConcurrentRunner
from .kept import Kept
from .pauses import STOPPING, PartitionKey, Pauses
from .probes import IDLE_CHECK_S, LagProbe
from .retry import Failure, Verdict, classify, recover_delay_s, redo_delay_s
from .stage import Abandoned, Output, Stage, park
from .transactions import Transactions, rewind_to_committed

log = logging.getLogger("kafscribe.loop")

PROBE_INTERVAL_S = 1.0  # how often the background probe asks the broker for the owned partitions' lag

# Why partitions are paused (consumers.pauses); the concurrent mode adds its own.
RECOVERING = "recovering the producer"
REDO_BACKOFF = "backing off before a redo"
KEPT = "next message kept"
JOINED_MID_JOB = "assigned while a job runs"


@dataclass
class Decoded:
    """A message decoded and validated: its event, or (``outputs`` set) what to commit instead."""

    event: Event | None
    outputs: list[Output] | None = None  # undecodable (DLQ) or invalid (failure outputs): nothing to handle
    outcome: str = "ok"


class StageRunner:
    """One stage's consume loop on one consumer and one transactional producer."""

    def __init__(self, settings: Settings, stage: Stage, worker_id: str | None = None, *,
                 consumer=None, producer_factory: Callable[[], object] | None = None) -> None:
        """``consumer`` and ``producer_factory`` default to real Kafka clients (tests pass doubles)."""
        self.settings = settings
        self.stage = stage
        self.worker_id = worker_id or settings.effective_worker_id(stage.name)
        self.topic = settings.topic(stage.input_topic)
        self.log_extra = {"stage": stage.name, "worker_id": self.worker_id}
        group = settings.topic_prefix + stage.group
        self.consumer = consumer or kafka_clients.consumer(settings, group)
        self.transactional_id = f"{settings.topic_prefix}{stage.name}.{self.worker_id}"
        self.transactions = Transactions(producer_factory or (lambda: kafka_clients.producer(
            settings, transactional_id=self.transactional_id, error_cb=self.transactions.on_producer_error,
        )), settings.kafka_call_timeout_s, self.log_extra)
        self.call_timeout_s = settings.kafka_call_timeout_s
        self.shutdown_grace_s = settings.max_poll_interval_ms / 1000 / 2
        self.concurrent = ConcurrentRunner(self) if stage.concurrency > 1 else None
        self.pauses = Pauses(self.consumer, on_resume=self.concurrent.resumed if self.concurrent else None)
        own_client = consumer is None  # else a test's double, which the probe shares
        self.probe = LagProbe((lambda: kafka_clients.consumer(settings, group)) if own_client else (lambda: consumer),
                              lambda: self._owned, PROBE_INTERVAL_S, name=stage.name, close_client=own_client,
                              idle=lambda: self._in_flight is None and not self.in_flight_count
                              and not self.pauses.has(RECOVERING))
        self._stop = threading.Event()
        self._owned: set[PartitionKey] = set()  # kept by the rebalance callbacks; rebound, read by other threads
        self.resync: set[PartitionKey] = set()  # partitions to rewind to their committed offset
        self._in_flight: PartitionKey | None = None
        self._lost_in_flight = False
        self.kept = Kept(stage, self._parse, self._stop.is_set)  # fetched while a job ran: handled next
        self._recover_failures = 0
        self._outages = 0  # store outages in a row (the redo backoff grows with them)
        self._idle_checked = time.monotonic()
        self.in_flight_count = 0
        self.stopped = False
        self.last_beat = time.monotonic()  # last completed poll-loop iteration (the watchdog reads it)
        self.on_idle: list[Callable[[], None]] = []  # called from the poll thread (status reports)
        self.on_close: list[Callable[[], None]] = []

    # --- lifecycle ---------------------------------------------------------------------------
    def run(self) -> None:
        self._subscribe()
        self.probe.start()
        try:
            if self.concurrent is not None:
                self.concurrent.run()
                return
            log.info("stage started", extra=self.log_extra)
            while not self._stop.is_set():
                self._poll_iteration()
        finally:
            self.kept.close()
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def _subscribe(self) -> None:
        self.consumer.subscribe([self.settings.topic(t) for t in self.stage.topics()], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        self.probe.stop()
        with contextlib.suppress(KafkaException, RuntimeError, deadline.Overrun):  # leaves the group at once
            deadline.call(self.consumer.close, self.call_timeout_s, "consumer.close")
        self.transactions.close()
        self.stopped = True
        for fn in self.on_close:
            fn()
        log.info("stage stopped", extra=self.log_extra)

    def assignment(self) -> list[int]:
        """Partitions of the stage's main input topic owned now, as the rebalance callbacks told us (safe
        from any thread: librdkafka's own ``assignment()`` was seen to block for minutes while the consumer
        sat out of its group). A stage reading several topics (the callback retry tiers) reports its first
        topic's: WorkerStatus.partitions names partitions of one topic."""
        return sorted(p for t, p in self._owned if t == self.topic)

    def backlog(self) -> int:
        """Messages waiting in the owned partitions of the main topic: kept (fetched, not started) plus not
        yet fetched, from the broker's high watermarks as the background probe last saw them (so paused
        partitions count too). The ingress routes by it. Never asks the broker."""
        return self.probe.behind([key for key in self._owned if key[0] == self.topic]) + self.kept.count(self.topic)

    # --- one iteration, one message ---------------------------------------------------------
    def _poll_iteration(self) -> None:
        if self.needs_recovery:
            self.recover()
            return
        msg = self._next_message()
        if msg is None:
            self.check_idle()
        elif msg.error():
            self.consumer_error(msg.error())
        else:
            self._process(msg)

    def _next_message(self) -> Message | None:
        """The oldest message kept from the last job's run, else a fresh ``poll()``."""
        if self.kept:
            self.tick()
            return self.kept.pop()
        self.pauses.discard(KEPT)
        msg = self.poll(0.5)
        self.tick()
        if msg is not None and not msg.error() and not self.kept.take(msg):
            return None
        return msg

    def _process(self, msg: Message) -> None:
        started = time.monotonic()
        decoded = self.decode(msg)
        outputs, outcome = decoded.outputs, decoded.outcome
        prefetched = self.kept.take_prefetch(msg)
        if outputs is None:
            try:
                outputs = self._run_job(msg, decoded.event, prefetched)
            except Exception as exc:  # noqa: BLE001 - classified: a bug in a handler must not stop the partition
                verdict = self.failed(exc, msg, decoded.event, can_leave=True)
                if verdict.failure is Failure.LEAVE_GROUP:
                    self._sit_out()
                if verdict.failure is Failure.REDO_LATER:
                    self._redo_later(msg, verdict.delay_s)
                if verdict.failure is not Failure.CRASH:
                    return
                outputs, outcome = verdict.outputs, verdict.failure.value
        committing = time.monotonic()
        offsets = [TopicPartition(msg.topic(), msg.partition(), msg.offset() + 1)]
        if not self.commit(offsets, outputs, self.msg_extra(msg)):
            self._rewind(msg)
            return
        done = time.monotonic()
        metrics.JOBS.labels(self.stage.name, outcome).inc()
        metrics.STAGE_SECONDS.labels(self.stage.name).observe(done - started)
        metrics.JOB_PHASE_SECONDS.labels(self.stage.name, "commit").observe(done - committing)
        self.record_lag(msg)
        log.info("committed", extra={**self.msg_extra(msg, decoded.event), "phases": {
            "handler": round(committing - started, 4), "commit": round(done - committing, 4)}})

    def _run_job(self, msg: Message, event: Event, prefetched: Future | None) -> list[Output]:
        """Run the handler in a thread; keep polling so we stay in the group.

        While the job runs, the partitions are paused once one message is kept for after it
        (depth 1; more may arrive before the pause takes effect, and are kept too): that
        message is handled as soon as this one is committed, and the stage may prepare it
        meanwhile (``Stage.prefetch``). Kept messages are never fetched twice.
        """
        self._in_flight = (msg.topic(), msg.partition())
        self._lost_in_flight = False
        self.in_flight_count = 1
        self.pauses.set(KEPT, bool(self.kept))
        self.kept.start_prefetch()
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
                thread.join(0.1)  # wakes the moment the job ends: its commit waits for no poll timeout
                fetched = self.poll(0)
                if fetched is not None and not fetched.error():
                    self.kept.keep(fetched, self._owned)
                self.pauses.discard(JOINED_MID_JOB)
                self.pauses.set(KEPT, bool(self.kept))
                if self._stop.is_set():
                    self.pauses.add(STOPPING)
                    stop_seen_at = stop_seen_at or time.monotonic()
                    if time.monotonic() - stop_seen_at > self.shutdown_grace_s:
                        raise Abandoned("shutdown grace period over")
                self.kept.start_prefetch()
                self.tick()
            if "error" in box:
                raise box["error"]  # type: ignore[misc]
            if self._lost_in_flight:
                raise Abandoned("partition moved to another worker while the job ran")
            return box["outputs"]  # type: ignore[return-value]
        finally:
            self._in_flight = None
            self.in_flight_count = 0
            self.pauses.discard(JOINED_MID_JOB)
            self.pauses.set(KEPT, bool(self.kept))

    # --- shared by both modes: decode, failures, commit ------------------------------------
    def _parse(self, msg: Message) -> tuple[Event | None, str | None]:
        """The message's event and why it cannot be handled (None: it can). No side effects."""
        try:
            event = decode_event(msg.value())
        except DecodeError as exc:
            return None, str(exc)
        return event, validation.check_event(self.settings, self.stage.input_topic, event)

    def decode(self, msg: Message) -> Decoded:
        """Decode and validate: undecodable bytes go to the DLQ, an invalid event ends with its reason."""
        event, reason = self._parse(msg)
        if event is None:
            metrics.DEAD_LETTERS.labels(self.stage.name).inc()
            log.error("undecodable message to DLQ: %s", reason, extra=self.msg_extra(msg))
            return Decoded(None, [park(self.settings, self.stage.name, None, reason or "", message=msg)], "dlq")
        if reason is not None:
            log.warning("invalid event refused: %s", reason, extra=self.msg_extra(msg, event))
            return Decoded(event, self.stage.failure_outputs(event, reason), "invalid")
        return Decoded(event)

    def failed(self, exc: BaseException, msg: Message, event: Event | None, *, can_leave: bool) -> Verdict:
        """Log and count what the handler raised; say what to do (``can_leave``: the mode can sit out)."""
        failure = classify(exc)
        extra = self.msg_extra(msg, event)
        if failure is Failure.LEAVE_GROUP and not can_leave:
            failure = Failure.REDO_LATER
        if failure is Failure.ABANDON:
            log.warning("job abandoned: %s", exc, extra=extra)
            metrics.JOBS.labels(self.stage.name, "abandoned").inc()
            return Verdict(failure)
        if failure is Failure.LEAVE_GROUP:
            log.warning("leaving the group: %s", exc, extra=extra)
            return Verdict(failure)
        if failure is Failure.REDO_LATER:
            self._outages += 1
            delay = redo_delay_s(self._outages)
            log.warning("store unavailable, redoing in %.1fs: %s", delay, exc, extra=extra)
            metrics.JOBS.labels(self.stage.name, "deferred").inc()
            return Verdict(failure, delay_s=delay)
        log.error("handler crashed", exc_info=exc, extra=extra)
        return Verdict(failure, self.stage.failure_outputs(event, f"internal error in {self.stage.name}: {exc!r}"))

    def commit(self, offsets: list[TopicPartition], outputs: list[Output], extra: dict) -> bool:
        """Produce ``outputs`` and commit ``offsets`` in one transaction; False: the partitions are
        rewound to their committed offsets (``recover``) before they are read again."""
        if self.transactions.commit(offsets, outputs, self.consumer, extra):
            self._outages = 0
            return True
        self.resync.update((tp.topic, tp.partition) for tp in offsets)
        return False

    def record_lag(self, msg: Message) -> None:
        """The partition's lag after ``msg``, from librdkafka's cached watermarks (no broker call)."""
        with contextlib.suppress(KafkaException):
            _, high = self.consumer.get_watermark_offsets(TopicPartition(msg.topic(), msg.partition()), cached=True)
            metrics.CONSUMER_LAG.labels(self.stage.name, str(msg.partition())).set(max(0, high - msg.offset() - 1))

    def msg_extra(self, msg: Message, event: Event | None = None) -> dict:
        extra = {"stage": self.stage.name, "topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()}
        if event is not None:
            extra.update(job_id=event.job_id, trace_id=event.trace_id)
        return extra

    def poll(self, timeout: float) -> Message | None:
        """``consumer.poll``; the read position is noted for the lag probe (no librdkafka call for it)."""
        msg = self.consumer.poll(timeout)
        if msg is not None and not msg.error():
            self.probe.read(msg)
        return msg

    def seek(self, tp: TopicPartition) -> None:
        self.consumer.seek(tp)
        self.probe.seeked(tp)

    def tick(self) -> None:
        self.last_beat = time.monotonic()
        self.transactions.poll()  # serves its error callback (brokers down)
        for fn in self.on_idle:
            fn()

    def consumer_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.code() == KafkaError._MAX_POLL_EXCEEDED:
            # librdkafka rejoins the group on the next poll(); nothing was in flight here.
            metrics.GROUP_EVICTIONS.labels(self.stage.name).inc()
            log.warning("evicted from the group (max.poll.interval.ms); rejoining", extra=self.log_extra)
            return
        if err.fatal():
            raise KafkaException(err)  # the process exits non-zero and its supervisor restarts it
        log.warning("consumer error: %s", err, extra=self.log_extra)

    # --- recovery, redo, sitting out ----------------------------------------------------------
    @property
    def needs_recovery(self) -> bool:
        return not self.transactions.ready or bool(self.resync)

    def recover(self) -> None:
        """One attempt to make the producer usable and rewind uncommitted partitions; backs off on failure."""
        self.pauses.add(RECOVERING)
        try:
            self.transactions.ensure()
            if self.resync:
                self.kept.drop(set(self.resync))  # read again from the committed offset
                rewind_to_committed(self.consumer, self.resync & self._owned, self.seek, self.call_timeout_s, self.log_extra)
                self.resync.clear()
        except (KafkaException, deadline.Overrun) as exc:
            self._recover_failures += 1
            delay = recover_delay_s(self._recover_failures)
            log.warning("kafka not usable yet (%s); retrying in %.1fs", exc, delay, extra=self.log_extra)
            self._wait_polling(delay)
            return
        if self._recover_failures:
            log.info("kafka usable again", extra=self.log_extra)
        self._recover_failures = 0
        self.pauses.discard(RECOVERING)

    def _rewind(self, msg: Message) -> None:
        """Read ``msg`` again (its offset was not committed), if this worker still owns its partition."""
        self.kept.drop({(msg.topic(), msg.partition())})
        if (msg.topic(), msg.partition()) in self._owned:
            self.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))

    def _redo_later(self, msg: Message, delay_s: float) -> None:
        """Leave the offset uncommitted, wait (polling, partitions paused), then redo the event."""
        self.kept.drop({(msg.topic(), msg.partition())})
        self.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))
        self.pauses.add(REDO_BACKOFF)
        self._wait_polling(delay_s)
        self.pauses.discard(REDO_BACKOFF)

    def _wait_polling(self, seconds: float) -> None:
        """Wait, still polling (rebalances, heartbeat of the loop); fetched strays are read again later."""
        until = time.monotonic() + seconds
        while time.monotonic() < until and not self._stop.is_set():
            stray = self.poll(0.2)
            if stray is not None and not stray.error():
                self.resync.add((stray.topic(), stray.partition()))
            self.tick()

    def _sit_out(self) -> None:
        """Unsubscribe (partitions move to others) until the stage can take work again."""
        self.consumer.unsubscribe()
        self.pauses.revoked(set(self._owned))
        self._owned = set()
        self.kept.drop(None)
        while not self._stop.is_set() and not self.stage.can_resume():
            self.poll(1.0)  # serves the revocation; nothing else arrives
            self.tick()
        if not self._stop.is_set():
            log.info("rejoining the group", extra=self.log_extra)
            self._subscribe()

    def check_idle(self) -> None:
        """Idle: nothing owned stays paused without a reason (flags in librdkafka, no broker round trip). The
        check for partitions with lag this worker does not read runs in the probe's thread."""
        now = time.monotonic()
        if now - self._idle_checked < IDLE_CHECK_S or self._in_flight is not None or self.pauses.has(RECOVERING):
            return
        self._idle_checked = now
        self.pauses.reapply()

    # --- rebalance callbacks (called inside poll), one set for both modes ------------------------
    def _on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        metrics.REBALANCES.labels(self.stage.name, "assign").inc()
        log.info("assigned %s", [(p.topic, p.partition) for p in partitions], extra={"stage": self.stage.name})
        keys = {(p.topic, p.partition) for p in partitions}
        self.kept.drop(keys)  # nothing kept from an earlier ownership: it is read from the committed offset
        if self.concurrent is not None:
            self.concurrent.forget(keys)
        consumer.incremental_assign(partitions)
        self.probe.forget(keys)
        self._owned = self._owned | keys
        if self._in_flight is not None:
            self.pauses.add(JOINED_MID_JOB, keys)
        if self._stop.is_set():
            self.pauses.add(STOPPING)
        self.pauses.assigned(keys)

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
        self.pauses.revoked(keys)
        self.probe.forget(keys)
        if self._in_flight in keys:
            self._lost_in_flight = True
        dropped = self.kept.drop(keys)
        if self.concurrent is not None and (given_up := self.concurrent.forget(keys)):
            metrics.JOBS.labels(self.stage.name, "abandoned").inc(given_up)
            dropped += given_up
        log.info("%s %s (%d uncommitted messages left to the next owner)", why, sorted(keys), dropped,
                 extra={"stage": self.stage.name})
