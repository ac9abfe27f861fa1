"""Drills on the local cluster: 3 brokers (RF 3, min ISR 2) and 3 Cassandra nodes (RF 3, QUORUM).

One cluster start serves the whole group (``cluster_settings`` in conftest) and one
pipeline serves both drills. Each drill submits 30 jobs, one a second, as a client
that retries a 503 would, and takes a node away while they flow:

- a broker is killed with SIGKILL: every job completes once on the two brokers left,
  the ingress refuses (503) for at most a few seconds; the broker restarted, every
  partition is fully in sync again with no manual step;
- a Cassandra node is stopped for 30 s: every job completes once at QUORUM; the node
  restarted, it holds every job's final row by itself (hints replayed), no repair run.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from cassandra import ConsistencyLevel
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import WhiteListRoundRobinPolicy
from confluent_kafka.admin import ConfigResource

from bench.harness import wait_until
from infra import bootstrap, stack
from infra.nodes import cassandra_nodes, kafka_nodes
from infra.process import ServerProcess
from kafscribe.kafka import clients as kafka_clients
from kafscribe.store import session as cassandra_session
from producers.client import HttpError
from schemas.events import Result
from tests.conftest import CLUSTER_HOSTS, fresh_settings, make_pipeline
from tests.kafka_read import read_topic

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.cluster, pytest.mark.side]

JOBS = 30
REFUSAL_BOUND_S = 15.0  # "a few seconds" of 503s; measured figures are in docs/deployment.md
HEAL_BOUND_S = 120.0
STAGES = ("transcriber", "translator", "sink", "notifier")


def _replication_of(settings, keyspace: str) -> dict[str, str]:
    session = cassandra_session.connect(settings)
    try:
        row = session.execute(
            "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s", (keyspace,)
        ).one()
        return dict(row.replication)
    finally:
        session.cluster.shutdown()


def test_status_shows_every_node_of_the_cluster(cluster_settings):
    rows = stack.status(cluster_settings)
    assert [(r.name, r.host) for r in rows] == [
        *[(n, h) for n, h in zip(("kafka", "kafka-2", "kafka-3"), CLUSTER_HOSTS, strict=True)],
        *[(n, h) for n, h in zip(("cassandra", "cassandra-2", "cassandra-3"), CLUSTER_HOSTS, strict=True)],
    ]
    assert all(r.ready and r.pid for r in rows), [r.line() for r in rows]
    assert "3/3 brokers registered" in rows[0].note


def test_topics_are_created_rf3_min_isr2_and_the_keyspace_rf3(cluster_settings):
    settings = fresh_settings(cluster_settings)
    admin = kafka_clients.admin(settings)
    metadata = admin.list_topics(timeout=10)
    assert len(metadata.brokers) == 3
    specs = bootstrap.topic_specs(settings)
    assert {s.name for s in specs} >= {settings.topic("dlq"), settings.topic("worker-status")}
    for spec in specs:
        for part in metadata.topics[spec.name].partitions.values():
            assert len(part.replicas) == 3 and len(part.isrs) == 3, (spec.name, part)
    resources = [ConfigResource(ConfigResource.Type.TOPIC, s.name) for s in specs]
    for res, fut in admin.describe_configs(resources).items():
        assert fut.result()["min.insync.replicas"].value == "2", res.name
    broker = ConfigResource(ConfigResource.Type.BROKER, "1")
    config = admin.describe_configs([broker])[broker].result()
    for key, value in (("offsets.topic.replication.factor", "3"), ("transaction.state.log.replication.factor", "3"),
                       ("transaction.state.log.min.isr", "2"), ("min.insync.replicas", "2")):
        assert config[key].value == value, key
    assert _replication_of(settings, settings.cassandra_keyspace) == {
        "class": "org.apache.cassandra.locator.NetworkTopologyStrategy", "datacenter1": "3",
    }


def test_a_replication_factor_above_the_brokers_is_refused(cluster_settings):
    settings = cluster_settings.with_(topic_prefix=f"rf4{time.monotonic_ns()}.", topic_replication_factor=4)
    with pytest.raises(bootstrap.ReplicationError, match="the cluster has 3 broker"):
        bootstrap.ensure_topics(settings)
    topics = kafka_clients.admin(settings).list_topics(timeout=10).topics
    assert not [t for t in topics if t.startswith(settings.topic_prefix)]


class Flow(threading.Thread):
    """Submits ``n`` jobs, one every ``every_s``, retrying a 503 after 0.5 s; records every answer."""

    def __init__(self, pipe, clip, n: int = JOBS, every_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pipe, self.clip, self.n, self.every_s = pipe, clip, n, every_s
        self.answers: list[tuple[float, int, float]] = []  # (sent at, HTTP status, seconds to answer)
        self.job_ids: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for _ in range(self.n):
                while True:
                    sent = time.monotonic()
                    try:
                        self.job_ids.append(self.pipe.http.submit(self.clip)["job_id"])
                        self.answers.append((sent, 202, time.monotonic() - sent))
                        break
                    except HttpError as err:
                        self.answers.append((sent, err.status, time.monotonic() - sent))
                        if err.status != 503:
                            raise
                        time.sleep(0.5)
                time.sleep(self.every_s)
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def finish(self, timeout_s: float = 300.0) -> list[str]:
        self.join(timeout_s)
        assert not self.is_alive(), f"still submitting after {timeout_s}s: {len(self.job_ids)} accepted"
        assert self.error is None, f"submission failed: {self.error!r}"
        assert len(self.job_ids) == self.n
        return self.job_ids

    def refused_s(self) -> float:
        """Longest time the ingress kept refusing: from the first 503 of a run to the answer of its last."""
        longest, first = 0.0, None
        for sent, status, took in self.answers:
            if status != 503:
                first = None
                continue
            first = sent if first is None else first
            longest = max(longest, sent + took - first)
        return longest

    def summary(self) -> str:
        refused = sum(1 for a in self.answers if a[1] == 503)
        slowest = max(a[2] for a in self.answers if a[1] == 202)
        return (f"{len(self.job_ids)} accepted, {refused} answers 503 (longest refusal {self.refused_s():.1f}s),"
                f" slowest 202 {slowest:.1f}s")


@pytest.fixture(scope="module")
def cluster_pipe(cluster_settings, tmp_path_factory):
    settings = fresh_settings(
        cluster_settings, engine="faster-whisper", model="tiny.en", beam_size=1, session_timeout_ms=6000,
        status_interval_s=1.0, retry_after_s=1, kafka_call_timeout_s=10.0, watchdog_s=90.0,
        cassandra_write_consistency="QUORUM", cassandra_read_consistency="QUORUM",
    )
    pipe = make_pipeline(settings, tmp_path_factory, "cluster").start_all()
    try:
        yield pipe
    finally:
        pipe.stop()
        stack.up(cluster_settings, log=lambda line: None, bootstrap_schema=False)  # a node a drill left down


def _assert_each_completed_once(pipe, job_ids: list[str], timeout_s: float = 300.0) -> None:
    done = {j: pipe.wait_job(j, timeout_s=timeout_s) for j in job_ids}
    assert [d["status"] for d in done.values()] == ["completed"] * len(job_ids), done
    results = [e for e in read_topic(pipe.settings, "results", timeout_s=15) if isinstance(e, Result)]
    counts = {j: sum(1 for r in results if r.job_id == j) for j in job_ids}
    assert set(counts.values()) == {1}, counts
    assert all(pipe.alive(s) for s in STAGES), {s: pipe.log_tail(s) for s in STAGES if not pipe.alive(s)}


def _leader_node(settings, logical: str, partition: int = 0):
    topic = settings.topic(logical)
    leader = kafka_clients.admin(settings).list_topics(topic, timeout=10).topics[topic].partitions[partition].leader
    return next(n for n in kafka_nodes(settings) if n.index == leader)


def _under_replicated(settings) -> list[str]:
    """Partitions of our topics and Kafka's internal ones with fewer than 3 in-sync replicas."""
    metadata = kafka_clients.admin(settings).list_topics(timeout=10)
    out = []
    for name, topic in metadata.topics.items():
        if name.startswith(settings.topic_prefix) or name in ("__consumer_offsets", "__transaction_state"):
            out += [f"{name}[{p.id}] isr={p.isrs}" for p in topic.partitions.values() if len(p.isrs) < 3]
    return out


@pytest.mark.timeout(1800)  # 30 jobs on two busy cores: minutes, whatever the drill
def test_broker_sigkill_while_jobs_flow_every_job_completes_once(cluster_pipe, clips):
    pipe, settings = cluster_pipe, cluster_pipe.settings
    flow = Flow(pipe, clips["en"], every_s=0.5)
    flow.start()
    wait_until(lambda: len(flow.job_ids) >= 8 or flow.error, timeout_s=120, what="8 jobs accepted")
    victim = _leader_node(settings, "uploads")
    broker = ServerProcess(victim.name, settings.state_dir)
    os.kill(broker.pid(), signal.SIGKILL)
    killed = time.monotonic()
    job_ids = flow.finish()
    _assert_each_completed_once(pipe, job_ids)  # on the two brokers left
    on_two_s = time.monotonic() - killed
    stack.up(settings, log=lambda line: None, bootstrap_schema=False)
    back = time.monotonic()
    wait_until(lambda: not _under_replicated(settings), timeout_s=HEAL_BOUND_S, what="every partition in sync")
    healed_s = time.monotonic() - back
    after = Flow(pipe, clips["en"], n=3, every_s=0.5)  # the broker back: leaderships move to it again
    after.start()
    _assert_each_completed_once(pipe, after.finish(), timeout_s=120)
    print(f"\n[cluster:broker-kill] {victim.name} killed: {flow.summary()}; all {JOBS} completed"
          f" {on_two_s:.1f}s after the kill; restarted, all partitions in sync after {healed_s:.1f}s;"
          f" then {after.summary()}")
    assert flow.refused_s() <= REFUSAL_BOUND_S, flow.answers
    assert after.refused_s() <= REFUSAL_BOUND_S, after.answers


def _rows_on_node_alone(settings, host: str, job_ids: list[str]) -> dict[str, str | None]:
    """Each job's status as the node at ``host`` alone has it (consistency ONE, no other replica asked)."""
    profile = ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy([host]),
                               consistency_level=ConsistencyLevel.ONE, request_timeout=10)
    cluster = Cluster([host], port=settings.cassandra_port, protocol_version=5,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    try:
        session = cluster.connect(settings.cassandra_keyspace)
        query = session.prepare("SELECT status FROM jobs WHERE job_id = ?")
        query.consistency_level = ConsistencyLevel.ONE
        out = {}
        for job_id in job_ids:
            row = session.execute(query, (job_id,)).one()
            out[job_id] = row.status if row else None
        return out
    finally:
        cluster.shutdown()


@pytest.mark.timeout(1800)
def test_cassandra_node_down_30s_while_jobs_flow_every_job_completes_once(cluster_pipe, clips):
    pipe, settings = cluster_pipe, cluster_pipe.settings
    node = cassandra_nodes(settings)[-1]
    flow = Flow(pipe, clips["en"], every_s=0.5)
    flow.start()
    wait_until(lambda: len(flow.job_ids) >= 5 or flow.error, timeout_s=120, what="5 jobs accepted")
    assert ServerProcess(node.name, settings.state_dir).stop(60), f"{node.name} must be ours to stop"
    stopped = time.monotonic()
    time.sleep(30)
    accepted_while_down = len(flow.job_ids)
    stack.up(settings, log=lambda line: None, bootstrap_schema=False)
    back = time.monotonic()
    job_ids = flow.finish()
    _assert_each_completed_once(pipe, job_ids)
    done = time.monotonic()
    wait_until(lambda: set(_rows_on_node_alone(settings, node.host, job_ids).values()) == {"completed"},
               timeout_s=HEAL_BOUND_S, what=f"{node.name} holds every job's final row by itself")
    print(f"\n[cluster:cassandra-stop] {node.name} stopped, restarted after 30 s, answering again"
          f" {back - stopped:.1f}s after the stop: {flow.summary()} ({accepted_while_down} accepted by then);"
          f" all completed {done - back:.1f}s after it was back, every final row on it alone"
          f" {time.monotonic() - done:.1f}s after that")


def test_reads_writes_and_lwts_go_at_their_configured_levels(cluster_settings):
    settings = cluster_settings.with_(cassandra_read_consistency="ALL", cassandra_write_consistency="QUORUM",
                                      cassandra_serial_consistency="SERIAL")
    session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
    try:
        job_id = f"cl-{time.monotonic_ns()}"
        wrote = session.execute(session.prepare("INSERT INTO jobs (job_id, status) VALUES (?, ?)"), (job_id, "queued"))
        assert wrote.response_future.message.consistency_level == ConsistencyLevel.QUORUM
        prepared = session.execute(session.prepare("SELECT status FROM jobs WHERE job_id = ?"), (job_id,))
        plain = session.execute("SELECT status FROM jobs WHERE job_id = %s", (job_id,))
        for read in (prepared, plain):
            assert read.response_future.message.consistency_level == ConsistencyLevel.ALL
            assert read.one().status == "queued"
        lwt = session.execute("INSERT INTO redeliveries (job_id) VALUES (%s) IF NOT EXISTS", (job_id,))
        assert lwt.response_future.message.serial_consistency_level == ConsistencyLevel.SERIAL
        assert lwt.one().applied
    finally:
        session.cluster.shutdown()
