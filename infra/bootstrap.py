"""Create kafscribe's topics and Cassandra tables, idempotently, replicated as configured.

The definitions live in files a reader can open: ``kafscribe/kafka/topics.toml`` and
``infra/cql/schema.cql``. Running this twice changes nothing; running it
after raising a partition count adds partitions (Kafka never removes them).
``kafscribe stack up`` runs it after starting the local servers; ``kafscribe
stack bootstrap`` (``run`` below) runs it alone against servers that run
elsewhere (the compose file's init service, a managed cluster).

Replication is decided here and checked against the cluster: every topic
(DLQ and worker status included) gets ``KAFSCRIBE_TOPIC_REPLICATION_FACTOR``
(default min(3, brokers)) and ``min.insync.replicas`` (default RF - 1); a
factor above the broker count is refused, RF 1 on several brokers is warned
about. The keyspace uses NetworkTopologyStrategy with
``KAFSCRIBE_CASSANDRA_REPLICATION`` (default: the local DC, RF min(3, its
nodes)). Existing topics and keyspaces are never re-replicated (that moves
data and needs a reassignment or a repair): a mismatch is reported instead.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import ConfigResource, NewPartitions, NewTopic

from kafscribe.kafka import clients as kafka_clients
from kafscribe.kafka import topics
from kafscribe.settings import Settings
from kafscribe.store import session as cassandra_session
from kafscribe.store.session import cassandra_reachable

INFRA_DIR = Path(__file__).resolve().parent
SCHEMA_FILE = INFRA_DIR / "cql" / "schema.cql"
NODES_SEEN_WAIT_S = 120.0  # gossip among three fresh nodes on two busy cores
SCHEMA_AGREEMENT_WAIT_S = 180.0  # three nodes on two busy cores took up to 2 min to agree on a DDL change
WARNING = "warning: "  # prefix of the lines of ensure_topics/ensure_schema that need an operator's eye

log = logging.getLogger("kafscribe.bootstrap")


class ReplicationError(ValueError):
    """The configured replication cannot be met by the cluster (e.g. RF above the broker count)."""


def replication(settings: Settings, brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) of every topic on a cluster of ``brokers`` brokers."""
    rf = settings.topic_replication_factor or min(3, brokers)
    min_isr = settings.topic_min_insync_replicas or max(1, rf - 1)
    if rf > brokers:
        raise ReplicationError(
            f"KAFSCRIBE_TOPIC_REPLICATION_FACTOR={rf} but the cluster has {brokers} broker(s):"
            f" lower it to at most {brokers}, or start more brokers (KAFSCRIBE_KAFKA_BROKERS for the local stack)"
        )
    if min_isr > rf:
        raise ReplicationError(
            f"KAFSCRIBE_TOPIC_MIN_INSYNC_REPLICAS={min_isr} is above the replication factor {rf}:"
            " no write could ever be acknowledged"
        )
    return rf, min_isr


def replication_warnings(settings: Settings, brokers: int) -> list[str]:
    rf, min_isr = replication(settings, brokers)
    out = []
    if rf == 1 and brokers > 1:
        out.append(f"topics get replication factor 1 on {brokers} brokers: one broker's disk lost loses its data")
    if min_isr == rf and rf > 1:
        out.append(f"min.insync.replicas = replication factor = {rf}: one broker down stops every write")
    return out


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def topic_specs(settings: Settings, min_isr: int | None = None) -> list[TopicSpec]:
    """The topics of ``topics.toml`` with prefix and partition settings applied (and ``min_isr`` when given)."""
    specs = []
    for logical, spec in topics.definitions().items():
        parts = spec["partitions"]
        if isinstance(parts, str):
            parts = getattr(settings, parts)
        config = dict(spec.get("config", {}))
        if min_isr is not None:
            config["min.insync.replicas"] = str(min_isr)
        specs.append(TopicSpec(settings.topic(logical), int(parts), config))
    return specs


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Create missing topics (replicated), grow under-partitioned ones; return what changed and warnings."""
    admin = kafka_clients.admin(settings)
    metadata = admin.list_topics(timeout=timeout_s)
    existing, brokers = metadata.topics, cluster_size(metadata)
    rf, min_isr = replication(settings, brokers)
    changes: list[str] = [WARNING + w for w in replication_warnings(settings, brokers)]
    new, grow, check = [], [], []
    for spec in topic_specs(settings, min_isr):
        if spec.name not in existing:
            new.append(NewTopic(spec.name, spec.partitions, rf, config=spec.config))
            continue
        if len(existing[spec.name].partitions) < spec.partitions:
            grow.append(NewPartitions(spec.name, spec.partitions))
        replicas = {len(p.replicas) for p in existing[spec.name].partitions.values()}
        if replicas != {rf}:
            changes.append(f"{WARNING}topic {spec.name} has {sorted(replicas)} replicas, configured {rf}"
                           " (kafka-reassign-partitions changes it)")
        check.append(spec.name)
    for topic, fut in (admin.create_topics(new, operation_timeout=timeout_s).items() if new else []):
        try:
            fut.result()
            changes.append(f"created topic {topic} (replication factor {rf}, min.insync.replicas {min_isr})")
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    for topic, fut in (admin.create_partitions(grow).items() if grow else []):
        fut.result()
        changes.append(f"grew topic {topic}")
    changes += _min_isr_mismatches(admin, check, min_isr, timeout_s)
    return changes


def cluster_size(metadata) -> int:
    """Brokers of the cluster: those alive, and those that hold a replica while down (a restart's moment)."""
    ids = set(metadata.brokers)
    for topic in metadata.topics.values():
        for part in topic.partitions.values():
            ids.update(part.replicas)
    return len(ids)


def _min_isr_mismatches(admin, topics: list[str], min_isr: int, timeout_s: float) -> list[str]:
    if not topics:
        return []
    resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics]
    out = []
    for res, fut in admin.describe_configs(resources, request_timeout=timeout_s).items():
        value = fut.result()["min.insync.replicas"].value
        if value != str(min_isr):
            out.append(f"{WARNING}topic {res.name} has min.insync.replicas {value}, configured {min_isr}"
                       f" (kafka-configs --alter --add-config min.insync.replicas={min_isr} changes it)")
    return out


def keyspace_replication(settings: Settings, nodes_per_dc: dict[str, int]) -> dict[str, int]:
    """{data centre: RF} of the keyspace: the setting, else the local DC with min(3, its nodes)."""
    if settings.cassandra_replication.strip():
        out = {}
        for part in settings.cassandra_replication.split(","):
            dc, sep, rf = part.strip().rpartition(":")
            if not sep or not dc or not rf.strip().isdigit() or int(rf) < 1:
                raise ReplicationError(f"KAFSCRIBE_CASSANDRA_REPLICATION: {part.strip()!r} is not DC:RF")
            out[dc.strip()] = int(rf)
    else:
        local = settings.cassandra_local_dc
        if not local:
            if len(nodes_per_dc) > 1:
                raise ReplicationError(
                    f"the cluster has several data centres ({', '.join(sorted(nodes_per_dc))}): set"
                    " KAFSCRIBE_CASSANDRA_REPLICATION (DC:RF,...) or KAFSCRIBE_CASSANDRA_LOCAL_DC"
                )
            local = next(iter(nodes_per_dc), "datacenter1")
        out = {local: min(3, max(1, nodes_per_dc.get(local, 1)))}
    for dc, rf in out.items():
        if nodes_per_dc and rf > nodes_per_dc.get(dc, 0):
            raise ReplicationError(
                f"keyspace replication {dc}:{rf} but the cluster has {nodes_per_dc.get(dc, 0)} node(s) in {dc}"
                f" (data centres seen: {', '.join(f'{d}={n}' for d, n in sorted(nodes_per_dc.items()))})"
            )
    return out


def replication_cql(dcs: dict[str, int]) -> str:
    pairs = ", ".join(f"'{dc}': {rf}" for dc, rf in dcs.items())
    return "{'class': 'NetworkTopologyStrategy', " + pairs + "}"


_KEYSPACE_REPLICATION = re.compile(r"(CREATE KEYSPACE[^;]*?WITH\s+replication\s*=\s*)\{[^}]*\}", re.I)


def cql_statements(keyspace: str, replication_map: str | None = None) -> list[str]:
    """The statements of ``schema.cql`` (comments stripped), keyspace and its replication filled in."""
    lines = [ln.split("--", 1)[0] for ln in SCHEMA_FILE.read_text().splitlines()]
    text = "\n".join(lines).replace("{keyspace}", keyspace)
    if replication_map is not None:
        text, n = _KEYSPACE_REPLICATION.subn(lambda m: m.group(1) + replication_map, text, count=1)
        assert n == 1, "schema.cql lost its CREATE KEYSPACE ... WITH replication = {...}"
    return [s.strip() for s in text.split(";") if s.strip()]


def retention_statements(settings: Settings) -> list[str]:
    """``KAFSCRIBE_RESULT_TTL_S`` as the default TTL of the result tables (written once, when a job ends)."""
    ttl = max(0, int(settings.result_ttl_s))
    return [f"ALTER TABLE {settings.cassandra_keyspace}.{table} WITH default_time_to_live = {ttl}"
            for table in ("results", "segments", "job_chunks")]


def ensure_schema(settings: Settings, warn=log.warning, expect_nodes: int = 0) -> int:
    """Run every schema statement; returns how many ran. A keyspace replicated otherwise is reported.

    ``expect_nodes``: the nodes a local stack started; the keyspace's default RF counts the nodes the
    driver sees, so it waits (up to ``NODES_SEEN_WAIT_S``) until it sees them all.
    """
    session = cassandra_session.connect(settings, timeout_s=30.0)
    try:
        nodes_per_dc = await_nodes_seen(session, expect_nodes, warn)
        wanted = keyspace_replication(settings, nodes_per_dc)
        statements = cql_statements(settings.cassandra_keyspace, replication_cql(wanted))
        statements += retention_statements(settings)
        for stmt in statements:
            result = session.execute(stmt, timeout=60.0)
            if not result.response_future.is_schema_agreed:
                await_schema_agreement(session, stmt, warn)
        have = _replication_of(session, settings.cassandra_keyspace)
        if have != {"class": "org.apache.cassandra.locator.NetworkTopologyStrategy",
                     **{dc: str(rf) for dc, rf in wanted.items()}}:
            warn(f"keyspace {settings.cassandra_keyspace} is replicated as {have}, configured {wanted}:"
                 f" ALTER KEYSPACE {settings.cassandra_keyspace} WITH replication = {replication_cql(wanted)},"
                 " then `nodetool repair -full` on every node")
        return len(statements)
    finally:
        session.cluster.shutdown()


def await_nodes_seen(session, expect: int, warn=log.warning) -> dict[str, int]:
    """{data centre: nodes} as the driver sees them, once it sees ``expect`` nodes (or the wait is over).

    Every node of a fresh local cluster answers before gossip has told the others about it: on two busy
    cores the driver once saw 2 of 3 nodes and the keyspace was made with RF 2.
    """
    deadline = time.monotonic() + NODES_SEEN_WAIT_S
    while True:
        nodes_per_dc: dict[str, int] = {}
        for host in session.cluster.metadata.all_hosts():
            nodes_per_dc[host.datacenter] = nodes_per_dc.get(host.datacenter, 0) + 1
        seen = sum(nodes_per_dc.values())
        if seen >= expect:
            return nodes_per_dc
        if time.monotonic() > deadline:
            warn(f"the driver sees {seen} of the {expect} Cassandra nodes after {NODES_SEEN_WAIT_S:.0f}s")
            return nodes_per_dc
        time.sleep(1.0)
        session.cluster.refresh_nodes(force_token_rebuild=True)


def await_schema_agreement(session, stmt: str, warn=log.warning) -> bool:
    """Wait until every node has the change ``stmt`` made, for up to ``SCHEMA_AGREEMENT_WAIT_S``.

    The driver waits 10 s after a DDL statement and then goes on regardless; on three busy nodes agreement
    has taken minutes, and the next statement, sent to a node still behind, was refused ("Keyspace
    'kafscribe_test' doesn't exist" for a table created right after its keyspace).
    """
    agreed = session.cluster.control_connection.wait_for_schema_agreement(wait_time=SCHEMA_AGREEMENT_WAIT_S)
    if not agreed:
        warn(f"nodes still disagree on the schema {SCHEMA_AGREEMENT_WAIT_S:.0f}s after: {stmt.splitlines()[0]}")
    return agreed


def _replication_of(session, keyspace: str) -> dict[str, str]:
    row = session.execute(
        "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s", (keyspace,)
    ).one()
    return dict(row.replication) if row else {}


class NotReachable(RuntimeError):
    """Kafka or Cassandra did not answer within the wait of ``run``."""


def run(settings: Settings, log: Callable[[str], None] = print, wait_s: float | None = None) -> list[str]:
    """Topics and schema on running servers: wait (up to ``wait_s``, default ``KAFSCRIBE_STACK_TIMEOUT_S``)
    until Kafka and Cassandra answer, then ``ensure_topics`` and ``ensure_schema``. Returns the lines logged."""
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        log(line)

    wait_s = settings.stack_timeout_s if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    for name, reachable, where in (
        ("kafka", kafka_clients.kafka_reachable, settings.kafka_bootstrap),
        ("cassandra", cassandra_reachable, f"{settings.cassandra_hosts}:{settings.cassandra_port}"),
    ):
        while not reachable(settings, 3.0):
            if time.monotonic() > deadline:
                raise NotReachable(f"{name} at {where} did not answer within {wait_s:.0f}s")
            time.sleep(1.0)
    for change in ensure_topics(settings):
        say(f"kafka: {change}")
    say(f"kafka: {len(topic_specs(settings))} topics of topics.toml present (prefix {settings.topic_prefix!r})")
    n = ensure_schema(settings, warn=lambda line: say(f"cassandra: {WARNING}{line}"))
    say(f"cassandra: schema ensured ({n} statements, keyspace {settings.cassandra_keyspace})")
    return lines
