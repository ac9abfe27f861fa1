"""The ingress's live view of ``kafscribe.worker-status`` (for routing and GET /v1/workers).

A background thread reads the compacted topic from the beginning (assigned,
not in a consumer group) and keeps the newest valid status of every worker.
A status that names partitions the uploads topic does not have, lies in the
future (``KAFSCRIBE_MAX_CLOCK_SKEW_S``) or carries negative numbers is
ignored with a log line (``kafscribe.validation.check_worker_status``):
routing by it would send uploads nowhere, or to a worker forever "live".
"""

from __future__ import annotations

import logging
import threading
import uuid

from confluent_kafka import KafkaException, TopicPartition

from kafscribe.kafka import clients as kafka_clients
from kafscribe.kafka.routing import WorkerState, classify
from kafscribe.settings import Settings
from kafscribe.validation import check_worker_status
from schemas.codec import DecodeError
from schemas.events import WorkerStatus, decode_event, now_ms

log = logging.getLogger("kafscribe.worker_view")


class WorkerView:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic("worker-status")
        self._latest: dict[str, WorkerStatus] = {}
        self.uploads_partitions = settings.uploads_partitions  # replaced by the topic's real count
        self.reserved: dict[str, int] = {}  # bytes routed to a worker since its last status
        self.routed: dict[str, int] = {}  # jobs routed to a worker since its last status
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
        finally:
            consumer.close()

    def workers(self) -> list[WorkerState]:
        with self._lock:
            statuses = list(self._latest.values())
        return classify(statuses, now_ms(), self.settings.worker_stale_s, self.uploads_partitions)

    def reserve(self, worker_id: str, need_bytes: int) -> None:
        with self._lock:
            self.reserved[worker_id] = self.reserved.get(worker_id, 0) + need_bytes
            self.routed[worker_id] = self.routed.get(worker_id, 0) + 1

    def close(self) -> None:
        self._closed.set()
