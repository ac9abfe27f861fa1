"""One idempotent acks=all producer, awaited (``publish_async``) or blocking (``publish``).

Both return only once the broker has acknowledged the event (so the ingress
can answer 202 truthfully) and raise ``PublishError`` when it was not
acknowledged within the delivery timeout. A thread polls the producer: it
runs the delivery callbacks, which resolve an asyncio future on the
caller's loop (``publish_async``, no thread per request) or wake a blocked
caller (``publish``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException

from kafscribe.kafka import clients as kafka_clients
from kafscribe.settings import Settings

log = logging.getLogger("kafscribe.publisher")


class PublishError(RuntimeError):
    """The broker did not acknowledge the event (Kafka down or unreachable)."""


class Publisher:
    def __init__(self, settings: Settings, delivery_timeout_s: float = 10.0) -> None:
        self.timeout_s = delivery_timeout_s
        self._producer = kafka_clients.producer(
            settings,
            **{"message.timeout.ms": int(delivery_timeout_s * 1000), "linger.ms": settings.ingress_linger_ms},
        )
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-delivery", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._closed.is_set():
            try:
                self._producer.poll(0.1)
            except Exception:  # noqa: BLE001 - a callback's failure must not stop every later delivery
                log.exception("delivery callback failed")

    def _produce(self, topic: str, key: bytes, value: bytes, partition: int | None,
                 on_delivery: Callable[[KafkaError | None, object], None]) -> None:
        kwargs = {} if partition is None else {"partition": partition}
        try:
            self._producer.produce(topic, key=key, value=value, on_delivery=on_delivery, **kwargs)
        except (KafkaException, BufferError) as exc:
            raise PublishError(f"could not enqueue event: {exc}") from exc

    async def publish_async(
        self, topic: str, key: bytes, value: bytes, partition: int | None = None
    ) -> tuple[int, int]:
        """Produce and await the broker's ack on the running loop; returns (partition, offset)."""
        loop = asyncio.get_running_loop()
        acked: asyncio.Future = loop.create_future()

        def settle(err: KafkaError | None, msg) -> None:
            if acked.done():  # timed out or cancelled meanwhile
                return
            if err is not None:
                acked.set_exception(PublishError(f"Kafka did not acknowledge the event: {err}"))
            else:
                acked.set_result((msg.partition(), msg.offset()))

        def on_delivery(err: KafkaError | None, msg) -> None:  # the poll thread
            try:
                loop.call_soon_threadsafe(settle, err, msg)
            except RuntimeError:  # the caller's loop is closed: nobody waits for this answer
                pass

        self._produce(topic, key, value, partition, on_delivery)
        try:
            return await asyncio.wait_for(acked, self.timeout_s + 5)
        except TimeoutError as exc:
            raise PublishError("no delivery report from Kafka") from exc

    def publish(self, topic: str, key: bytes, value: bytes, partition: int | None = None) -> tuple[int, int]:
        """Produce and wait (blocking) for the broker's ack; returns (partition, offset)."""
        done = threading.Event()
        box: dict[str, object] = {}

        def on_delivery(err: KafkaError | None, msg) -> None:
            box["err"], box["msg"] = err, msg
            done.set()

        self._produce(topic, key, value, partition, on_delivery)
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
