"""Broker look-ups that are not the job's own work, off the consume loop's thread, with cached results.

How far behind each owned partition is (high watermark minus read position)
feeds two readers: the worker status's ``backlog`` and ``work_s`` (the ingress
routes by them; a transcriber hands a job on to an idle peer when more wait
behind it) and the idle worker's check for partitions with lag it does not
read. Asking the broker costs round trips -- seconds when a broker is slow --
and a job that reaches an idle worker must start at once, not wait behind
them. So a ``LagProbe`` thread asks every ``interval_s`` and keeps the answer;
the loop and the status reporter read the cache (``behind``: the sampled high
watermarks against the read positions as they are now, so a message the loop
has just read never counts as waiting). The idle check runs in the probe's
thread too (``judge_idle``, every ``IDLE_CHECK_S`` while the loop is idle).

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

from kafscribe import metrics

log = logging.getLogger("kafscribe.loop")

PartitionKey = tuple[str, int]
IDLE_CHECK_S = 10.0  # how often an idle worker looks for lag on partitions it owns


@dataclass(frozen=True)
class LagSample:
    """Lags of the partitions owned when it was taken, and when (monotonic; 0: never)."""

    lags: dict[PartitionKey, int] = field(default_factory=dict)
    taken_at: float = 0.0
    highs: dict[PartitionKey, int] = field(default_factory=dict)  # high watermarks, as sampled


def lags(client, positions: dict[PartitionKey, int], timeout_s: float = 5.0,
         highs: dict[PartitionKey, int] | None = None) -> dict[PartitionKey, int]:
    """High watermark minus read position (the committed offset where nothing was read yet); ``highs``, if
    given, gets the high watermarks."""
    unread = [TopicPartition(t, p) for (t, p), offset in positions.items() if offset < 0]
    committed = {(tp.topic, tp.partition): tp.offset
                 for tp in (client.committed(unread, timeout=timeout_s) if unread else [])}
    found = {}
    for key, offset in positions.items():
        low, high = client.get_watermark_offsets(TopicPartition(*key), timeout=timeout_s)
        start = offset if offset >= 0 else committed.get(key, -1)
        found[key] = max(0, high - (start if start >= 0 else low))
        if highs is not None:
            highs[key] = high
    return found


class LagProbe:
    """A daemon thread that samples the lags of the ``owned()`` partitions every ``interval_s``; ``sample`` is
    the latest. ``client`` makes the probe's own Kafka client (a consumer in the loop's group)."""

    def __init__(self, client: Callable[[], object], owned: Callable[[], set[PartitionKey]], interval_s: float, *,
                 name: str, timeout_s: float = 2.0, close_client: bool = True,
                 idle: Callable[[], bool] = lambda: False) -> None:
        """``timeout_s``: the longest it waits for one broker answer; ``close_client``: the client is its own;
        ``idle``: whether the loop has nothing to do (the idle check runs only then)."""
        self.idle = idle
        self._judged_at = time.monotonic()  # the last idle check (the first one comes a whole check later)
        self._judged_sample_at = 0.0
        self._lagging: dict[PartitionKey, int] = {}
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
        highs: dict[PartitionKey, int] = {}
        self.sample = LagSample(lags(self._client, positions, self.timeout_s, highs), time.monotonic(), highs)
        return self.sample

    def behind(self, keys: list[PartitionKey]) -> int:
        """Messages waiting in partitions ``keys`` now: each sampled high watermark minus where the loop reads
        now (a partition not read since the sample: its sampled lag). Never asks the broker."""
        sample = self.sample
        total = 0
        with self._lock:
            for key in keys:
                position, high = self._positions.get(key), sample.highs.get(key)
                total += max(0, high - position) if position is not None and high is not None \
                    else sample.lags.get(key, 0)
        return total

    def judge_idle(self, owned: set[PartitionKey]) -> None:
        """The idle check: report owned partitions with lag (the same lag a whole check apart, in two fresh
        samples) that this idle worker does not read."""
        sample = self.sample
        if sample.taken_at <= self._judged_sample_at:
            return  # no fresh look at the broker since the last check
        self._judged_sample_at = sample.taken_at
        previous, self._lagging = self._lagging, {}
        for key, lag in sample.lags.items():
            if key not in owned:
                continue
            stuck = lag > 0 and previous.get(key) == lag
            metrics.IDLE_PARTITION_LAG.labels(self.name, str(key[1])).set(lag if stuck else 0)
            if lag > 0:
                self._lagging[key] = lag
            if stuck:
                log.warning("partition %d owned by an idle worker, with lag %d", key[1], lag,
                            extra={"stage": self.name})

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.refresh()
                    if time.monotonic() - self._judged_at >= IDLE_CHECK_S and self.idle():
                        self._judged_at = time.monotonic()
                        self.judge_idle(self.owned())
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
