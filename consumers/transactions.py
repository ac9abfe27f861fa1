"""Where an offset is committed: the worker's transactional producer, and its recovery.

Every stage commits the same way (``Transactions.commit``): in one Kafka
transaction, produce the outputs and commit the input offsets
(``send_offsets_to_transaction`` with the consumer group's metadata, the only
call of it in kafscribe). Downstream stages read ``read_committed``, so they
see the outputs if and only if the input counts as done.

Self-healing: librdkafka's transactional calls take a timeout, yet one was
seen blocked for minutes after a broker crash, so every call here runs under
a deadline that is really enforced (``deadline.call``). When a transaction
overruns it, or the producer reports a fatal state (fenced), or an abort
fails, the producer is dropped and a fresh one with the same
``transactional.id`` is created on the next ``ensure`` (``init_transactions``
fences the old one and resolves its open transaction). An abortable error is
aborted and the producer kept. A producer that saw every broker go away was
seen to hang in its next transaction after they came back: it is replaced
before that one (``suspect``). After a failed commit the caller rewinds the
partitions to the offsets the group really committed, read back from the
broker (``rewind_to_committed``), so a commit that did land is never redone.
The model is confluent-kafka's ``examples/eos_transactions.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from kafscribe import metrics

from . import deadline
from .stage import Output

log = logging.getLogger("kafscribe.loop")


class Transactions:
    """The transactional producer of one consume loop: commit, and replace it when it cannot be trusted."""

    def __init__(self, new_producer: Callable[[], object], call_timeout_s: float, extra: dict) -> None:
        """``new_producer`` makes a transactional producer whose ``error_cb`` is ``on_producer_error``;
        ``extra`` is the log context (stage, worker id)."""
        self._new_producer = new_producer
        self.call_timeout_s = call_timeout_s
        self.extra = extra
        self.producer = None  # created by ensure(), dropped when it cannot be trusted
        self.suspect = False  # it saw every broker go away: replaced before its next transaction

    @property
    def ready(self) -> bool:
        """A producer to commit with, and no reason to replace it first."""
        return self.producer is not None and not self.suspect

    def on_producer_error(self, err: KafkaError) -> None:
        """librdkafka's error callback (served by ``poll``)."""
        if err.code() == KafkaError._ALL_BROKERS_DOWN or err.fatal():
            self.suspect = True

    def poll(self) -> None:
        """Serve the producer's callbacks (its error callback tells when the brokers went away)."""
        if self.producer is not None:
            self.producer.poll(0)

    def ensure(self) -> None:
        """A usable producer (``init_transactions`` done); raises ``KafkaException`` or ``deadline.Overrun``."""
        if self.suspect and self.producer is not None:
            self.drop("brokers were down")
        if self.producer is not None:
            return
        producer = self._new_producer()
        try:
            deadline.call(lambda: producer.init_transactions(self.call_timeout_s),
                          self.call_timeout_s + 1, "init_transactions")
        except (KafkaException, deadline.Overrun):
            _dispose(producer)
            raise
        self.suspect = False
        self.producer = producer

    def commit(self, offsets: list[TopicPartition], outputs: list[Output], consumer, extra: dict) -> bool:
        """Produce ``outputs`` and commit ``offsets`` (next offsets to read) atomically.

        False: nothing was committed; the caller rewinds the partitions to the committed
        offsets before reading them again. ``extra`` is the log context.
        """
        try:
            self.ensure()  # no-op unless the producer is missing or saw the brokers go
        except (KafkaException, deadline.Overrun) as exc:
            log.warning("no usable producer: %s", exc, extra=extra)
            return False
        producer = self.producer
        timeout = self.call_timeout_s

        def transact() -> None:
            producer.begin_transaction()
            for out in outputs:
                kwargs = {} if out.partition is None else {"partition": out.partition}
                producer.produce(out.topic, key=out.key, value=out.event.encode(), **kwargs)
            producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), timeout)
            producer.commit_transaction(timeout)

        try:
            deadline.call(transact, 2 * timeout + 1, "transaction")
            return True
        except deadline.Overrun as exc:
            log.error("transaction stuck: %s", exc, extra=extra)
            self.drop("overrun")
        except (KafkaException, BufferError) as exc:
            err = exc.args[0] if isinstance(exc, KafkaException) else None
            log.warning("transaction failed: %s", err or exc, extra=extra)
            if err is not None and err.fatal():
                self.drop("fatal")  # e.g. fenced: a fresh init_transactions tells
            else:
                try:
                    deadline.call(lambda: producer.abort_transaction(timeout), timeout + 1, "abort_transaction")
                except (KafkaException, deadline.Overrun) as abort_exc:
                    log.warning("abort failed: %s", abort_exc, extra=extra)
                    self.drop("abort failed")
        return False

    def drop(self, reason: str) -> None:
        """Stop using the producer: a fresh one (same transactional id) fences it in ``ensure``."""
        metrics.PRODUCER_RESETS.labels(self.extra.get("stage", ""), reason).inc()
        log.warning("dropping the transactional producer (%s)", reason, extra=self.extra)
        old, self.producer = self.producer, None
        if old is not None:
            _dispose(old)

    def close(self) -> None:
        """Deliver what is still queued (bounded: the broker may be gone)."""
        if self.producer is not None:
            producer = self.producer
            try:
                deadline.call(lambda: producer.flush(5), 10, "producer.flush")
            except deadline.Overrun:
                pass


def rewind_to_committed(consumer, partitions: Iterable[tuple[str, int]], seek: Callable[[TopicPartition], None],
                        timeout_s: float, extra: dict) -> None:
    """``seek`` each partition to the group's committed offset, read back from the broker (bounded)."""
    wanted = [TopicPartition(t, p) for t, p in sorted(partitions)]
    if not wanted:
        return
    committed = deadline.call(lambda: consumer.committed(wanted, timeout=timeout_s), timeout_s + 1, "committed")
    for tp in committed:
        offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING  # never committed: all of it
        seek(TopicPartition(tp.topic, tp.partition, offset))
        log.info("rewound partition %d to committed offset %d", tp.partition, tp.offset, extra=extra)


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
