"""Worker status, in one place: what a valid ``WorkerStatus`` is, how old one may be, and the live view.

Every worker publishes its status to ``kafscribe.worker-status`` (compacted,
key = worker_id; ``consumers.status`` builds and publishes it). Everything
that reads those statuses -- the ingress's routing and ``GET /v1/workers``,
a transcriber handing on a job it cannot fit, the chunk splitter, the lag
exporter's worker metrics -- reads them through ``WorkerView`` and judges
them by the rules here, so no two views can disagree about a worker:

* ``check_worker_status``: a status that names partitions the uploads topic
  does not have, lies in the future (``KAFSCRIBE_MAX_CLOCK_SKEW_S``) or
  carries negative numbers is ignored with a log line: routing by it would
  send uploads nowhere, or to a worker forever "live". Its worker id must
  pass ``check_worker_id`` (at most 128 characters of a host name's kind):
  ids become metric labels.
* ``liveness``: a worker whose last status is older than
  ``KAFSCRIBE_WORKER_STALE_S`` (30 s by default) is ``stale`` -- dead in every
  view; one that said ``stopped`` is ``stopped``. Kafka's group membership,
  not this view, moves a dead worker's partitions.
* ``headroom``: the memory a worker can still spend on a job, from its status.

A background thread of ``WorkerView`` reads the compacted topic from the
beginning (assigned, not in a consumer group) and keeps the newest valid
status of every worker.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from dataclasses import dataclass, replace

from confluent_kafka import KafkaException, TopicPartition

from kafscribe.kafka import clients as kafka_clients
from kafscribe.settings import Settings
from kafscribe.speech import memory
from kafscribe.validation import _show, check_produced_at, finite
from schemas.codec import DecodeError
from schemas.events import WorkerStatus, decode_event, now_ms

log = logging.getLogger("kafscribe.worker_view")

# What a worker says it is doing (``WorkerStatus.state``).
RUNNING, THROTTLED, STOPPED = "running", "throttled", "stopped"
WORKER_STATES = (RUNNING, THROTTLED, STOPPED)
# What a view makes of a worker (``WorkerState.liveness``): ``stopped`` as it said, or by the age of its status.
LIVE, STALE = "live", "stale"
FUTURE_TOLERANCE_S = 300.0  # clock skew between hosts; a status further ahead is not live
# A job routed this long before a worker's status was produced is in that status's work (its probe samples its
# partitions every second); one routed later is still counted by the ingress that routed it.
ROUTED_SEEN_MS = 1500
# A worker id becomes a metric label, a log field and a routing key: short, and only characters a host name,
# a pid and our own separators (``chunks@``, ``-callback-retry``) use, so forged statuses cannot fill the lag
# exporter's /metrics with long or odd label values.
MAX_WORKER_ID_CHARS = 128
WORKER_ID_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
_COUNTS = ("rss_bytes", "host_mem_available", "host_mem_total", "gpu_mem_free", "gpu_mem_total", "gpu_mem_used",
           "gpu_device", "memory_budget", "in_flight")


def check_worker_id(worker_id: object) -> str | None:
    """Why ``worker_id`` is not a usable worker id (too long, empty, odd characters), or None."""
    if not isinstance(worker_id, str) or not 0 < len(worker_id) <= MAX_WORKER_ID_CHARS:
        return f"worker_id must be 1-{MAX_WORKER_ID_CHARS} characters"
    if not WORKER_ID_CHARS.fullmatch(worker_id):
        return "worker_id may hold only letters, digits and . _ : @ - (and start with a letter or digit)"
    return None


def check_worker_status(
    settings: Settings, status: WorkerStatus, partition_count: int, now: int | None = None
) -> str | None:
    """Why every view must ignore ``status`` (it would route uploads by it), or None."""
    reason = check_worker_id(status.worker_id)
    if reason:
        return reason
    if status.state not in WORKER_STATES:
        return f"state {_show(status.state)} must be one of {', '.join(WORKER_STATES)}"
    reason = check_produced_at(settings, status.produced_at, now_ms() if now is None else now)
    if reason:
        return reason
    bad = [p for p in status.partitions if not (isinstance(p, int) and 0 <= p < partition_count)]
    if bad or len(set(status.partitions)) != len(status.partitions):
        return f"partitions {status.partitions[:10]} are not distinct partitions of 0-{partition_count - 1}"
    for name in _COUNTS:
        value = getattr(status, name)
        if value is not None and not finite(value, 0):
            return f"{name} {_show(value)} must not be negative"
    return check_work(status)


def check_work(status: WorkerStatus) -> str | None:
    """The work and speeds a worker reports (routing divides and adds them): finite, not negative."""
    if not finite(status.work_s, 0):
        return f"work_s {_show(status.work_s)} must not be negative"
    bad = [m for m, v in (status.speed or {}).items() if not (finite(v, 0) and v > 0)]
    return f"speed of model {_show(bad[0])} must be a positive number" if bad else None


@dataclass
class WorkerState:
    """A worker as the views see it."""

    status: WorkerStatus
    liveness: str  # live | stale | stopped
    headroom: int

    @property
    def live(self) -> bool:
        return self.liveness == LIVE


def status_age_s(status: WorkerStatus, now_ms: int) -> float:
    """Seconds since ``status`` was produced (negative: it claims to come from the future)."""
    return (now_ms - status.produced_at) / 1000


def liveness(status: WorkerStatus, now_ms: int, stale_s: float) -> str:
    """``stopped`` when the worker said so; else ``live`` while its status is at most ``stale_s`` old (and not
    further than ``FUTURE_TOLERANCE_S`` ahead), ``stale`` after: the one staleness rule of every view."""
    if status.state == STOPPED:
        return STOPPED
    return LIVE if -FUTURE_TOLERANCE_S <= status_age_s(status, now_ms) <= stale_s else STALE


def headroom(status: WorkerStatus) -> int:
    """The memory the worker can still spend on a job, by its own report (``memory.headroom_bytes``)."""
    return memory.headroom_bytes(
        status.memory_budget or 0, status.rss_bytes, status.host_mem_available, status.gpu_mem_free
    )


def classify(
    statuses: list[WorkerStatus], now_ms: int, stale_s: float, partition_count: int | None = None
) -> list[WorkerState]:
    """Each status with its liveness and headroom; partitions outside ``partition_count`` are dropped."""
    states = []
    for s in statuses:
        if partition_count is not None:
            s = replace(s, partitions=sorted({p for p in s.partitions if 0 <= p < partition_count}))
        states.append(WorkerState(s, liveness(s, now_ms, stale_s), headroom(s)))
    return states


class WorkerView:
    """The newest valid status of every worker, followed in a background thread; ``workers()`` classifies
    them with ``KAFSCRIBE_WORKER_STALE_S``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic("worker-status")
        self._latest: dict[str, WorkerStatus] = {}
        self.uploads_partitions = settings.uploads_partitions  # replaced by the topic's real count
        self.reserved: dict[str, int] = {}  # bytes routed to a worker since its last status
        self.routed: dict[str, int] = {}  # jobs routed to a worker since its last status
        self._routed_s: dict[str, list[tuple[int, float]]] = {}  # (when, engine-seconds) routed, per worker
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="worker-view", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        consumer = kafka_clients.consumer(self.settings, f"ingress-view-{uuid.uuid4().hex}")
        assigned = False
        try:
            while not self._closed.is_set():
                if not assigned:
                    try:
                        meta = consumer.list_topics(self.topic, timeout=5).topics[self.topic]
                        uploads = self.settings.topic("uploads")
                        counted = consumer.list_topics(uploads, timeout=5).topics[uploads].partitions
                        if counted:
                            self.uploads_partitions = len(counted)
                        consumer.assign([TopicPartition(self.topic, p, 0) for p in meta.partitions])
                        assigned = bool(meta.partitions)
                    except (KafkaException, KeyError):
                        self._closed.wait(2)
                        continue
                msg = consumer.poll(0.5)
                if msg is None or msg.error():
                    continue
                try:
                    status = decode_event(msg.value())
                except DecodeError:
                    continue
                if isinstance(status, WorkerStatus):
                    reason = check_worker_status(self.settings, status, self.uploads_partitions)
                    if reason is not None:
                        log.warning("ignoring status of worker %r: %s", status.worker_id[:80], reason)
                        continue
                    with self._lock:
                        self._latest[status.worker_id] = status
                        self.reserved.pop(status.worker_id, None)
                        self.routed.pop(status.worker_id, None)
                        self._seen(status)
        finally:
            consumer.close()

    def workers(self) -> list[WorkerState]:
        with self._lock:
            statuses = list(self._latest.values())
        return classify(statuses, now_ms(), self.settings.worker_stale_s, self.uploads_partitions)

    def reserve(self, worker_id: str, need_bytes: int, work_s: float = 0.0) -> None:
        """A job was routed to the worker: its memory, and ``work_s`` estimated engine-seconds of work."""
        with self._lock:
            self.reserved[worker_id] = self.reserved.get(worker_id, 0) + need_bytes
            self.routed[worker_id] = self.routed.get(worker_id, 0) + 1
            self._routed_s.setdefault(worker_id, []).append((now_ms(), work_s))

    def routed_s(self) -> dict[str, float]:
        """Engine-seconds routed to each worker that its latest status may not count yet."""
        with self._lock:
            return {w: sum(s for _, s in entries) for w, entries in self._routed_s.items() if entries}

    def _seen(self, status: WorkerStatus) -> None:
        """A new status counts what was routed to its worker well before it was produced (under the lock)."""
        entries = self._routed_s.get(status.worker_id)
        if entries:
            self._routed_s[status.worker_id] = [e for e in entries if e[0] > status.produced_at - ROUTED_SEEN_MS]

    def close(self) -> None:
        self._closed.set()
