"""Broker look-ups that are not the job's own work, off the consume loop's thread, with cached results.

How far behind each owned partition is (high watermark minus read position)
feeds two readers: the worker status's ``backlog`` (the ingress routes to the
shortest queue by it) and the idle worker's check for partitions with lag it
does not read. Asking the broker costs round trips -- seconds when a broker is
slow -- and a job that reaches an idle worker must start at once, not wait
behind them. So a ``LagProbe`` thread asks every ``interval_s`` and keeps the
answer; the loop and the status reporter read the cache.

The probe asks through a client of its own (same group, never subscribed):
the loop's consumer was seen to starve a second thread for minutes (its
``position()`` waited while the loop's thread polled), and a consumer must not
be closed under a call running in another thread. The read positions are
local to the loop's consumer, so the loop hands them over (``note_positions``,
a local call on its own thread, no broker round trip).
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


def lags(client, positions: dict[PartitionKey, int], timeout_s: float = 5.0) -> dict[PartitionKey, int]:
    """High watermark minus read position (the committed offset where nothing was read yet)."""
    unread = [TopicPartition(t, p) for (t, p), offset in positions.items() if offset < 0]
    committed = {(tp.topic, tp.partition): tp.offset
                 for tp in (client.committed(unread, timeout=timeout_s) if unread else [])}
    found = {}
    for key, offset in positions.items():
        low, high = client.get_watermark_offsets(TopicPartition(*key), timeout=timeout_s)
        start = offset if offset >= 0 else committed.get(key, -1)
        found[key] = max(0, high - (start if start >= 0 else low))
    return found


class LagProbe:
    """A daemon thread that samples the lags of the noted positions every ``interval_s``; ``sample`` is the
    latest. ``client`` makes the probe's own Kafka client (a consumer in the loop's group)."""

    def __init__(self, client: Callable[[], object], interval_s: float, timeout_s: float, name: str,
                 close_client: bool = True) -> None:
        self._new_client = client
        self._close_client = close_client
        self._client = None
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.name = name
        self.positions: dict[PartitionKey, int] = {}  # rebound by the loop's thread
        self.noted_at = 0.0
        self.sample = LagSample()  # rebound, never mutated: safe to read from any thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def note_positions(self, positions: list[TopicPartition]) -> None:
        """The loop's read positions of the partitions it owns (from its own thread)."""
        self.positions = {(tp.topic, tp.partition): tp.offset for tp in positions}
        self.noted_at = time.monotonic()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-lag-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling; the thread closes its client when the sample under way is done."""
        self._stop.set()

    def refresh(self) -> LagSample:
        """Sample now (in the calling thread)."""
        if self._client is None:
            self._client = self._new_client()
        self.sample = LagSample(lags(self._client, dict(self.positions), self.timeout_s), time.monotonic())
        return self.sample

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.refresh()
                except Exception as exc:  # noqa: BLE001 - a failed sample keeps the last one; the loop goes on
                    log.debug("lag probe failed: %s", exc, extra={"stage": self.name})
                self._stop.wait(self.interval_s)
        finally:
            self.close()

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._close_client:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass
