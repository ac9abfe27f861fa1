"""Waiting for a job to finish without polling Cassandra: the ingress follows ``kafscribe.finished``.

The sink produces every stored outcome (completed or failed) to ``finished``
in the transaction that commits it, so an event there means the job's row
and result are readable. Each ingress process reads that topic from its end
(every partition, no consumer group, ``read_committed``) in one thread and
wakes whoever waits for that job id on this process's event loop.

A waiter still reads the job store first (the job may have finished before
it started waiting) and again after each wake-up or ``fallback_s`` (a
cancelled job produces no event; a broker outage may hide one), so the
watch only makes answers sooner and reads fewer: it is never the only way
a wait ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator

from confluent_kafka import KafkaException, TopicPartition

from kafscribe.kafka import clients as kafka_clients
from kafscribe.settings import Settings

log = logging.getLogger("kafscribe.completions")

KEY_LIMIT = 256  # a key longer than any job id is not one of ours


class Completions:
    """Follows ``finished``; ``watching(job_id)`` gives an event set when that job's outcome arrives."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic("finished")
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = defaultdict(list)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.following = threading.Event()  # set once every partition is assigned (tests wait for it)
        self._thread = threading.Thread(target=self._follow, name="finished-watch", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watching(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event (of the running loop) set when ``job_id``'s outcome is seen; watch before the first
        read of the job store, so an outcome that lands between the read and the wait is not missed."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters[job_id].append(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                waiting = self._waiters.get(job_id)
                if waiting is not None:
                    if entry in waiting:
                        waiting.remove(entry)
                    if not waiting:
                        del self._waiters[job_id]

    def watched(self) -> int:
        """Job ids waited for now (a gauge for tests: nothing may be left behind)."""
        with self._lock:
            return len(self._waiters)

    def _wake(self, job_id: str) -> None:
        with self._lock:
            waiting = list(self._waiters.get(job_id, ()))
        for loop, event in waiting:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass

    def _follow(self) -> None:
        # a group id is required by librdkafka, but nothing is committed: every process reads from the end
        consumer = kafka_clients.consumer(self.settings, f"ingress-finished-{uuid.uuid4().hex}")
        try:
            while not self._closed.is_set():
                if not self.following.is_set():
                    try:
                        meta = consumer.list_topics(self.topic, timeout=5).topics[self.topic]
                        if meta.error is not None or not meta.partitions:
                            raise KeyError(self.topic)
                        # from the end as it is now (asked, not OFFSET_END resolved at some later fetch)
                        consumer.assign([
                            TopicPartition(self.topic, p, consumer.get_watermark_offsets(
                                TopicPartition(self.topic, p), timeout=5)[1])
                            for p in meta.partitions
                        ])
                        self.following.set()
                    except (KafkaException, KeyError):
                        self._closed.wait(2)
                        continue
                msg = consumer.poll(0.5)
                if msg is None or msg.error() or not msg.key() or len(msg.key()) > KEY_LIMIT:
                    continue
                self._wake(msg.key().decode("utf-8", "replace"))
        except Exception as exc:  # noqa: BLE001 - waiters fall back to reading the job store
            log.warning("stopped following %s: %s: %s", self.topic, type(exc).__name__, exc)
        finally:
            consumer.close()

    def close(self) -> None:
        self._closed.set()
