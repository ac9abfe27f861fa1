"""The consume loop every stage shares: consume, work, then produce + commit in one transaction.

One event at a time per worker process:

1. ``poll()`` an event. Bytes that are not a kafscribe event go to the DLQ
   (with the reason) and their offset is committed: a bad message never
   blocks a partition or kills a worker.
2. Pause every owned partition and run the stage's handler in a thread,
   while this thread keeps calling ``poll()``: the worker stays in the group
   (heartbeats, ``max.poll.interval.ms``) however long the job takes.
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
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from kafscribe import kafka_clients, metrics
from kafscribe.settings import Settings
from schemas.codec import DecodeError
from schemas.events import DeadLetter, Event, decode_event

from . import validation
from .retry import is_infrastructure_outage

log = logging.getLogger("kafscribe.loop")


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


class StageRunner:
    def __init__(self, settings: Settings, stage: Stage, worker_id: str | None = None) -> None:
        self.settings = settings
        self.stage = stage
        self.worker_id = worker_id or settings.effective_worker_id(stage.name)
        self.topic = settings.topic(stage.input_topic)
        self.consumer = kafka_clients.consumer(settings, settings.topic_prefix + stage.group)
        self.producer = kafka_clients.producer(
            settings, transactional_id=f"{settings.topic_prefix}{stage.name}.{self.worker_id}"
        )
        self.shutdown_grace_s = settings.max_poll_interval_ms / 1000 / 2
        self._stop = threading.Event()
        self._in_flight: TopicPartition | None = None
        self._lost_in_flight = False
        self.in_flight_count = 0
        self.stopped = False
        self._outages = 0
        self.on_idle: list[Callable[[], None]] = []  # called from the poll thread (status reports)
        self.on_close: list[Callable[[], None]] = []

    # --- lifecycle ---------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def assignment(self) -> list[int]:
        try:
            return sorted(tp.partition for tp in self.consumer.assignment())
        except (KafkaException, RuntimeError):  # RuntimeError: the consumer is closed
            return []

    def _subscribe(self) -> None:
        self.consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def run(self) -> None:
        self.producer.init_transactions(30)
        self._subscribe()
        log.info("stage started", extra={"stage": self.stage.name, "worker_id": self.worker_id})
        try:
            while not self._stop.is_set():
                msg = self.consumer.poll(0.5)
                self._tick()
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error: %s", msg.error(), extra={"stage": self.stage.name})
                    continue
                self._process(msg)
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.consumer.close()  # leaves the group: partitions move at once
        except (KafkaException, RuntimeError):
            pass
        self.producer.flush(5)
        self.stopped = True
        for fn in self.on_close:
            fn()
        log.info("stage stopped", extra={"stage": self.stage.name, "worker_id": self.worker_id})

    def _tick(self) -> None:
        for fn in self.on_idle:
            fn()

    # --- rebalance callbacks (called inside poll) --------------------------------
    def _on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        metrics.REBALANCES.labels(self.stage.name, "assign").inc()
        log.info("assigned %s", [p.partition for p in partitions], extra={"stage": self.stage.name})
        if self._in_flight is not None:
            consumer.incremental_assign(partitions)
            consumer.pause(partitions)

    def _on_revoke(self, consumer, partitions: list[TopicPartition]) -> None:
        metrics.REBALANCES.labels(self.stage.name, "revoke").inc()
        self._forget(partitions, "revoked")

    def _on_lost(self, consumer, partitions: list[TopicPartition]) -> None:
        metrics.REBALANCES.labels(self.stage.name, "lost").inc()
        self._forget(partitions, "lost")

    def _forget(self, partitions: list[TopicPartition], why: str) -> None:
        log.info("%s %s", why, [p.partition for p in partitions], extra={"stage": self.stage.name})
        cur = self._in_flight
        if cur is not None and any((p.topic, p.partition) == (cur.topic, cur.partition) for p in partitions):
            self._lost_in_flight = True

    # --- one message ------------------------------------------------------------------
    def _process(self, msg: Message) -> None:
        started = time.monotonic()
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
                outputs = (self._run_paused(msg, event) if invalid is None
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
        if self._commit(msg, outputs):
            self._outages = 0
            metrics.JOBS.labels(self.stage.name, outcome).inc()
            metrics.STAGE_SECONDS.labels(self.stage.name).observe(time.monotonic() - started)
            self._record_lag(msg)

    def _redo_later(self, msg: Message, exc: BaseException) -> None:
        """Cassandra is unreachable: leave the offset uncommitted, wait (polling), then redo the event."""
        self._outages += 1
        delay = min(30.0, 0.5 * 2 ** min(self._outages, 6))
        log.warning("store unavailable, redoing in %.1fs: %s", delay, exc, extra=self._extra(msg))
        metrics.JOBS.labels(self.stage.name, "deferred").inc()
        self.consumer.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))
        deadline = time.monotonic() + delay
        owned = self.consumer.assignment()
        self.consumer.pause(owned)
        while time.monotonic() < deadline and not self._stop.is_set():
            self.consumer.poll(0.2)
            self._tick()
        self.consumer.resume(self.consumer.assignment())

    def _sit_out(self) -> None:
        """Unsubscribe (partitions move to others) until the stage can take work again."""
        self.consumer.unsubscribe()
        can_resume = getattr(self.stage, "can_resume", lambda: True)
        while not self._stop.is_set() and not can_resume():
            self.consumer.poll(1.0)  # serves the revocation; nothing else arrives
            self._tick()
        if not self._stop.is_set():
            log.info("rejoining the group", extra={"stage": self.stage.name, "worker_id": self.worker_id})
            self._subscribe()

    def _run_paused(self, msg: Message, event: Event) -> list[Output]:
        """Run the handler in a thread; keep polling (paused) so we stay in the group."""
        owned = self.consumer.assignment()
        self.consumer.pause(owned)
        self._in_flight = TopicPartition(msg.topic(), msg.partition(), msg.offset())
        self._lost_in_flight = False
        self.in_flight_count = 1
        box: dict[str, object] = {}

        def work() -> None:
            try:
                box["outputs"] = self.stage.handle(event, msg)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the poll thread
                box["error"] = exc

        thread = threading.Thread(target=work, name=f"{self.stage.name}-job", daemon=True)
        thread.start()
        rewind: dict[tuple[str, int], int] = {}
        stop_seen_at: float | None = None
        try:
            while thread.is_alive():
                stray = self.consumer.poll(0.2)
                if stray is not None and not stray.error():
                    key = (stray.topic(), stray.partition())
                    rewind[key] = min(rewind.get(key, stray.offset()), stray.offset())
                self.consumer.pause(self.consumer.assignment())
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
            assignment = self.consumer.assignment()
            self.consumer.resume(assignment)
            owned_now = {(tp.topic, tp.partition) for tp in assignment}
            for (topic, partition), offset in rewind.items():
                if (topic, partition) in owned_now:
                    self.consumer.seek(TopicPartition(topic, partition, offset))

    def _commit(self, msg: Message, outputs: list[Output]) -> bool:
        """Produce outputs and commit the input offset atomically. False = will be redone."""
        offsets = [TopicPartition(msg.topic(), msg.partition(), msg.offset() + 1)]
        try:
            self.producer.begin_transaction()
            for out in outputs:
                kwargs = {} if out.partition is None else {"partition": out.partition}
                self.producer.produce(out.topic, key=out.key, value=out.event.encode(), **kwargs)
            self.producer.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), 30)
            self.producer.commit_transaction(60)
            return True
        except KafkaException as exc:
            err = exc.args[0]
            log.warning("transaction failed: %s", err, extra=self._extra(msg))
            if err.fatal():
                raise  # fenced by a newer instance with our transactional id: we are a zombie
            try:
                self.producer.abort_transaction(30)
            except KafkaException:
                pass
            # Redo from the uncommitted offset if we still own the partition.
            if any(tp.partition == msg.partition() for tp in self.consumer.assignment()):
                self.consumer.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))
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
