"""Reading a whole topic as a downstream consumer would (read_committed)."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import TopicPartition

from kafscribe.kafka import clients as kafka_clients
from kafscribe.settings import Settings
from schemas.events import Event, decode_event


def read_topic(settings: Settings, logical: str, timeout_s: float = 5.0) -> list[Event]:
    """Every committed event on the topic, decoded (skips undecodable bytes)."""
    topic = settings.topic(logical)
    consumer = kafka_clients.consumer(settings, f"reader-{uuid.uuid4()}")
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    parts = [TopicPartition(topic, p, 0) for p in meta.partitions]
    ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in parts}
    consumer.assign(parts)
    events: list[Event] = []
    deadline = time.monotonic() + timeout_s
    positions = {p: 0 for p in ends}
    while time.monotonic() < deadline and any(positions[p] < ends[p] for p in ends):
        msg = consumer.poll(0.3)
        if msg is None:
            # Transaction markers occupy offsets too: ask where we are.
            for tp in consumer.position(parts):
                positions[tp.partition] = max(positions[tp.partition], tp.offset)
            continue
        if msg.error():
            continue
        positions[msg.partition()] = msg.offset() + 1
        try:
            events.append(decode_event(msg.value()))
        except ValueError:
            continue
    consumer.close()
    return events
