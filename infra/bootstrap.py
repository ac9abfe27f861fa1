"""Create kafscribe's topics and Cassandra tables, idempotently.

The definitions live in files a reader can open: ``infra/topics.toml`` and
``infra/cql/schema.cql``. Running this twice changes nothing; running it
after raising a partition count adds partitions (Kafka never removes them).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewPartitions, NewTopic

from kafscribe import cassandra_session, kafka_clients
from kafscribe.settings import Settings

INFRA_DIR = Path(__file__).resolve().parent
TOPICS_FILE = INFRA_DIR / "topics.toml"
SCHEMA_FILE = INFRA_DIR / "cql" / "schema.cql"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The topics of ``topics.toml`` with prefix and partition settings applied."""
    raw = tomllib.loads(TOPICS_FILE.read_text())
    specs = []
    for logical, spec in raw.items():
        parts = spec["partitions"]
        if isinstance(parts, str):
            parts = getattr(settings, parts)
        specs.append(TopicSpec(settings.topic(logical), int(parts), dict(spec.get("config", {}))))
    return specs


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Create missing topics, grow under-partitioned ones; return what changed."""
    admin = kafka_clients.admin(settings)
    existing = admin.list_topics(timeout=timeout_s).topics
    changes: list[str] = []
    new, grow = [], []
    for spec in topic_specs(settings):
        if spec.name not in existing:
            new.append(NewTopic(spec.name, spec.partitions, 1, config=spec.config))
        elif len(existing[spec.name].partitions) < spec.partitions:
            grow.append(NewPartitions(spec.name, spec.partitions))
    for topic, fut in (admin.create_topics(new, operation_timeout=timeout_s).items() if new else []):
        try:
            fut.result()
            changes.append(f"created topic {topic}")
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    for topic, fut in (admin.create_partitions(grow).items() if grow else []):
        fut.result()
        changes.append(f"grew topic {topic}")
    return changes


def cql_statements(keyspace: str) -> list[str]:
    """The statements of ``schema.cql`` (comments stripped), keyspace filled in."""
    lines = [ln.split("--", 1)[0] for ln in SCHEMA_FILE.read_text().splitlines()]
    text = "\n".join(lines).replace("{keyspace}", keyspace)
    return [s.strip() for s in text.split(";") if s.strip()]


def retention_statements(settings: Settings) -> list[str]:
    """``KAFSCRIBE_RESULT_TTL_S`` as the default TTL of the result tables (written once, when a job ends)."""
    ttl = max(0, int(settings.result_ttl_s))
    return [f"ALTER TABLE {settings.cassandra_keyspace}.{table} WITH default_time_to_live = {ttl}"
            for table in ("results", "segments")]


def ensure_schema(settings: Settings) -> int:
    """Run every schema statement; returns how many ran."""
    session = cassandra_session.connect(settings, timeout_s=30.0)
    try:
        statements = cql_statements(settings.cassandra_keyspace) + retention_statements(settings)
        for stmt in statements:
            session.execute(stmt, timeout=60.0)
        return len(statements)
    finally:
        session.cluster.shutdown()
