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
be closed under a call running in another thread. Nor does the loop ask its
consumer for its read positions: it notes them as it polls and seeks
(``read``, ``seeked``); a partition not read since it was assigned is read
from the group's committed offset.
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
    """A daemon thread that samples the lags of the ``owned()`` partitions every ``interval_s``; ``sample`` is
    the latest. ``client`` makes the probe's own Kafka client (a consumer in the loop's group)."""

    def __init__(self, client: Callable[[], object], owned: Callable[[], set[PartitionKey]], interval_s: float, *,
                 name: str, timeout_s: float = 2.0, close_client: bool = True) -> None:
        """``timeout_s``: the longest it waits for one broker answer; ``close_client``: the client is its own."""
        self._new_client = client
        self._close_client = close_client
        self._client = None
        self.owned = owned
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.name = name
        self._positions: dict[PartitionKey, int] = {}  # next offset the loop reads, per partition
        self._lock = threading.Lock()
        self.sample = LagSample()  # rebound, never mutated: safe to read from any thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self, msg) -> None:
        """The loop's poll returned ``msg``: its partition is read up to there."""
        with self._lock:
            self._positions[(msg.topic(), msg.partition())] = msg.offset() + 1

    def seeked(self, tp: TopicPartition) -> None:
        """The loop moved a partition's read position (a logical offset: not known until read)."""
        with self._lock:
            if tp.offset >= 0:
                self._positions[(tp.topic, tp.partition)] = tp.offset
            else:
                self._positions.pop((tp.topic, tp.partition), None)

    def forget(self, keys: set[PartitionKey]) -> None:
        """Partitions assigned or revoked: read from the committed offset until the loop reads them."""
        with self._lock:
            for key in keys:
                self._positions.pop(key, None)

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
        owned = self.owned()
        with self._lock:
            positions = {key: self._positions.get(key, -1001) for key in owned}
        self.sample = LagSample(lags(self._client, positions, self.timeout_s), time.monotonic())
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
