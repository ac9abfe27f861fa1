"""A thread-safe, blocking ``publish()`` over one idempotent acks=all producer.

``publish`` returns only once the broker has acknowledged the event (so the
ingress can answer 202 truthfully) and raises ``PublishError`` when it was
not acknowledged within the delivery timeout.
"""

from __future__ import annotations

import threading

from confluent_kafka import KafkaError, KafkaException

from kafscribe import kafka_clients
from kafscribe.settings import Settings


class PublishError(RuntimeError):
    """The broker did not acknowledge the event (Kafka down or unreachable)."""


class Publisher:
    def __init__(self, settings: Settings, delivery_timeout_s: float = 10.0) -> None:
        self.timeout_s = delivery_timeout_s
        self._producer = kafka_clients.producer(
            settings, **{"message.timeout.ms": int(delivery_timeout_s * 1000)}
        )
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-delivery", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.1)

    def publish(self, topic: str, key: bytes, value: bytes, partition: int | None = None) -> tuple[int, int]:
        """Produce and wait for the broker's ack; returns (partition, offset)."""
        done = threading.Event()
        box: dict[str, object] = {}

        def on_delivery(err: KafkaError | None, msg) -> None:
            box["err"], box["msg"] = err, msg
            done.set()

        kwargs = {} if partition is None else {"partition": partition}
        try:
            self._producer.produce(topic, key=key, value=value, on_delivery=on_delivery, **kwargs)
        except (KafkaException, BufferError) as exc:
            raise PublishError(f"could not enqueue event: {exc}") from exc
        if not done.wait(self.timeout_s + 5):
            raise PublishError("no delivery report from Kafka")
        if box["err"] is not None:
            raise PublishError(f"Kafka did not acknowledge the event: {box['err']}")
        msg = box["msg"]
        return msg.partition(), msg.offset()  # type: ignore[union-attr]

    def partitions(self, topic: str) -> int:
        meta = self._producer.list_topics(topic, timeout=5)
        return len(meta.topics[topic].partitions)

    def close(self) -> None:
        self._producer.flush(5)
        self._closed.set()
