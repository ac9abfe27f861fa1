"""The local stack is real: transactions on Kafka, CQL on our own tables."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import TopicPartition

from infra import bootstrap, stack
from kafscribe.kafka import clients as kafka_clients
from kafscribe.store import session as cassandra_session
from tests.conftest import PORT_OFFSET


def _drain(consumer, want: int, timeout_s: float = 20.0) -> list:
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(seen) < want:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            seen.append(msg.value())
    return seen


def test_status_reports_both_servers_ready(stack_settings):
    rows = {row.name: row for row in stack.status(stack_settings)}
    assert set(rows) == {"kafka", "cassandra"}
    assert rows["kafka"].ready and rows["kafka"].port == 19092 + PORT_OFFSET
    assert rows["cassandra"].ready and rows["cassandra"].port == 19042 + PORT_OFFSET


def test_up_is_idempotent(stack_settings):
    lines: list[str] = []
    started = stack.up(stack_settings, log=lines.append)
    assert started == []
    assert any("already running" in line or "did not start" in line for line in lines)


def test_bootstrap_created_every_topic_with_its_settings(isolated):
    admin = kafka_clients.admin(isolated)
    topics = admin.list_topics(timeout=10).topics
    for spec in bootstrap.topic_specs(isolated):
        assert spec.name in topics
        assert len(topics[spec.name].partitions) == spec.partitions
    status_topic = isolated.topic("worker-status")
    from confluent_kafka.admin import ConfigResource

    res = ConfigResource(ConfigResource.Type.TOPIC, status_topic)
    config = admin.describe_configs([res])[res].result()
    assert config["cleanup.policy"].value == "compact"
    # A second run changes nothing.
    assert bootstrap.ensure_topics(isolated) == []


def test_transactional_round_trip_hides_aborted_messages(isolated):
    topic = isolated.topic("transcripts")
    producer = kafka_clients.producer(isolated, transactional_id=f"test-{uuid.uuid4()}")
    producer.init_transactions(10)

    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"aborted-1", partition=0)
    producer.produce(topic, key=b"k", value=b"aborted-2", partition=0)
    producer.flush()
    producer.abort_transaction()

    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"committed", partition=0)
    producer.commit_transaction()

    committed = kafka_clients.consumer(isolated, f"g-{uuid.uuid4()}")
    committed.assign([TopicPartition(topic, 0, 0)])
    assert _drain(committed, want=2, timeout_s=8) == [b"committed"]
    committed.close()

    uncommitted = kafka_clients.consumer(
        isolated, f"g-{uuid.uuid4()}", **{"isolation.level": "read_uncommitted"}
    )
    uncommitted.assign([TopicPartition(topic, 0, 0)])
    assert _drain(uncommitted, want=3) == [b"aborted-1", b"aborted-2", b"committed"]
    uncommitted.close()


def test_cql_round_trip_on_project_tables(stack_settings):
    session = cassandra_session.connect(stack_settings, keyspace=stack_settings.cassandra_keyspace)
    job_id = f"test-{uuid.uuid4()}"
    session.execute(
        "INSERT INTO jobs (job_id, tenant, status, attempts) VALUES (%s, %s, %s, %s)",
        (job_id, "acme", "queued", 0),
    )
    session.execute(
        "INSERT INTO segments (job_id, track, idx, start_s, end_s, text) VALUES (%s, %s, %s, %s, %s, %s)",
        (job_id, "source", 0, 0.0, 1.5, "hello"),
    )
    row = session.execute("SELECT status, tenant FROM jobs WHERE job_id=%s", (job_id,)).one()
    assert (row.status, row.tenant) == ("queued", "acme")
    seg = session.execute("SELECT text, end_s FROM segments WHERE job_id=%s", (job_id,)).one()
    assert (seg.text, seg.end_s) == ("hello", 1.5)
    session.cluster.shutdown()
