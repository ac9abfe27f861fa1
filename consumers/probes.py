"""Broker look-ups that are not the job's own work, off the consume loop's thread, with cached results.

How far behind each owned partition is (high watermark minus read position)
feeds two readers: the worker status's ``backlog`` (the ingress routes to the
shortest queue by it) and the idle worker's check for partitions with lag it
does not read. Asking the broker costs round trips -- seconds when a broker is
slow -- and a job that reaches an idle worker must start at once, not wait
behind them. So a ``LagProbe`` thread asks every ``interval_s`` and keeps the
answer; the loop and the status reporter read the cache.

librdkafka's handles are thread-safe; ``position`` is local, ``committed`` and
``get_watermark_offsets`` ask the broker under a timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import TopicPartition

log = logging.getLogger("kafscribe.loop")

PartitionKey = tuple[str, int]


@dataclass(frozen=True)
class LagSample:
    """Lags of the partitions owned when it was taken, and when (monotonic; 0: never)."""

    lags: dict[PartitionKey, int] = field(default_factory=dict)
    taken_at: float = 0.0


def lags(consumer, owned: list[TopicPartition], timeout_s: float = 5.0) -> dict[PartitionKey, int]:
    """High watermark minus read position (the committed offset where nothing was read yet)."""
    if not owned:
        return {}
    positions = consumer.position(owned)
    unread = [tp for tp in positions if tp.offset < 0]
    committed = {(tp.topic, tp.partition): tp.offset
                 for tp in (consumer.committed(unread, timeout=timeout_s) if unread else [])}
    found = {}
    for tp in positions:
        low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=timeout_s)
        start = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
        found[(tp.topic, tp.partition)] = max(0, high - (start if start >= 0 else low))
    return found


class LagProbe:
    """A daemon thread that samples the lags of ``owned()`` every ``interval_s``; ``sample`` is the latest."""

    def __init__(self, consumer, owned: Callable[[], set[PartitionKey]], interval_s: float,
                 timeout_s: float, name: str) -> None:
        self.consumer = consumer
        self.owned = owned
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.name = name
        self.sample = LagSample()  # rebound, never mutated: safe to read from any thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-lag-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and wait (bounded) for a sample under way: the consumer is closed next."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.timeout_s * 2 + 1)

    def refresh(self) -> LagSample:
        """Sample now (in the calling thread)."""
        owned = [TopicPartition(t, p) for t, p in sorted(self.owned())]
        self.sample = LagSample(lags(self.consumer, owned, self.timeout_s), time.monotonic())
        return self.sample

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - a failed sample keeps the last one; the loop goes on
                log.debug("lag probe failed: %s", exc, extra={"stage": self.name})
            self._stop.wait(self.interval_s)
