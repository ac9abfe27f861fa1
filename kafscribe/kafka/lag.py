"""The lag exporter (``kafscribe serve lag``): lag from the source of truth, in one process.

Workers only see the partitions they own, and only while they poll them: a
partition with an undelivered upload and no consumer (or an idle owner that
never reads it) showed no lag at all. This process asks the broker instead,
at every scrape (so a scrape is never older than the broker's answer):

* per consumer group and partition: the group's committed offset, the
  partition's high watermark, and the lag between them
  (``kafscribe_group_lag``). A group that never committed is behind from the
  partition's start (``auto.offset.reset=earliest``), so a partition nobody
  ever read shows its whole content as lag;
* whether the partition has an owner in the group (``describe_consumer_groups``)
  and whether that owner is busy (its ``WorkerStatus`` on
  ``kafscribe.worker-status`` reports jobs in flight): lag with no owner or
  an idle owner is a stranded partition (``infra/prometheus/rules.yml``);
* for each partition with lag, the head: the first event the group has not
  committed, read at the committed offset. Its job's ``created_at`` (job row
  in Cassandra; the message's timestamp if the row cannot be read) gives the
  age of the oldest unfinished job at each stage
  (``kafscribe_group_head_age_seconds``, ``kafscribe_oldest_unfinished_job_seconds``).
  Reading the head also tells the truth on topics written in transactions:
  there each event is followed by a commit marker that takes an offset, so a
  consumed partition is one offset "behind" forever; a partition whose head
  read finds no event has lag 0. Lag counts offsets otherwise, so a backlog of
  n transactional events shows as up to 2n;
* every worker's last status (age, state, memory headroom, in-flight jobs),
  so a stale worker and the headroom against job estimates can be graphed.
  The statuses come through ``kafscribe.kafka.workers.WorkerView``: the same
  checks (worker ids of at most 128 plain characters) and the same staleness
  rule as the ingress's routing. Anyone who can write the worker-status topic
  can invent workers, so these series are bounded: only known stages, a
  stopped worker is left out, a stale one shows only its age and only for
  ``STALE_SHOWN_S`` (long enough for ``KafscribeWorkerStale``), and at most
  ``KAFSCRIBE_LAG_MAX_WORKERS`` workers are exported (live ones first); the
  rest are counted in ``kafscribe_workers_not_exported``.

Why one separate process, not the workers, the ingress or the supervisor:
workers cannot see partitions nobody owns (the stranded case) and N of them
would export N copies; the ingress may run as several processes and must
not block its event loop on admin calls; the supervisor is what restarts
things when Kafka misbehaves, so it must never wait on a broker call. The
lag service is supervised like a stage (``kafscribe services``) and is cheap:
a few admin requests and at most one small read per lagging partition per
scrape.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC

from confluent_kafka import (
    OFFSET_INVALID,
    TIMESTAMP_NOT_AVAILABLE,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import OffsetSpec
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kafscribe.kafka import clients as kafka_clients
from kafscribe.kafka.topics import retry_tiers
from kafscribe.kafka.workers import STOPPED, WorkerState, WorkerView, status_age_s
from kafscribe.settings import Settings

log = logging.getLogger("kafscribe.kafka.lag")

# Logical consumer group -> (stage name in WorkerStatus, logical input topics). The stages' own
# ``group``/``input_topic`` attributes are the source; tests/test_lag_units.py checks this copy.
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "transcribers": ("transcriber", ("uploads",)),
    "translators": ("translator", ("transcripts",)),
    "sink": ("sink", ("results",)),
    "notifier": ("notifier", ("finished",)),
    "notifier-retry": ("callback-retry", ()),  # the retry topics, from kafscribe/kafka/topics.toml
    "chunk-transcribers": ("chunk-transcriber", ("chunks",)),
    "mergers": ("merger", ("chunk-transcripts",)),
}
# A job is unfinished while its event waits in one of these groups (the sink's commit finishes it).
JOB_GROUPS = ("transcribers", "translators", "sink", "chunk-transcribers", "mergers")
# A scrape must answer within Prometheus's scrape timeout (0.8 x the interval, 4 s by default): a
# broker that does not answer gives kafscribe_lag_up 0 rather than a failed scrape.
HEAD_READ_S = 2.0  # longest wait for the heads of lagging partitions in one snapshot
ADMIN_TIMEOUT_S = 3.0
LOOKUP_BUDGET_S = 1.0  # job-row reads per snapshot; past it, heads are dated by their message time
STALE_SHOWN_S = 600.0  # a stale worker's age shows this long (the stale alert fires), then it is left out
# Stages whose workers publish a WorkerStatus; a status naming another stage is not exported (a forged label).
WORKER_STAGES = frozenset(stage for stage, _ in GROUPS.values())


def retry_topics() -> tuple[str, ...]:
    return tuple(name for name, _ in retry_tiers())


@dataclass
class PartitionLag:
    group: str  # logical
    topic: str  # logical
    partition: int
    committed: int  # -1: the group never committed here
    low: int
    high: int
    owned: bool = False
    owner_busy: bool = False
    head_created_ms: int | None = None  # the first uncommitted event's job creation (or append) time
    head_checked: bool = False  # the head was read (found an event, or found only markers)

    @property
    def start(self) -> int:
        """Where the group goes on: its committed offset, or the partition's start (never committed, or
        the committed offset fell out of retention)."""
        return max(self.committed, self.low)

    @property
    def lag(self) -> int:
        if self.head_checked and self.head_created_ms is None:
            return 0  # only transaction markers (or nothing readable) past the committed offset
        return max(0, self.high - self.start)


@dataclass
class Snapshot:
    partitions: list[PartitionLag] = field(default_factory=list)
    workers: list[WorkerState] = field(default_factory=list)
    ends: dict[tuple[str, int], int] = field(default_factory=dict)  # (logical topic, partition) -> high watermark
    taken_ms: int = 0
    ok: bool = True
    error: str = ""


class LagReader:
    """Reads committed offsets, watermarks, owners and heads from the broker."""

    def __init__(self, settings: Settings, job_created_ms=None, worker_view: WorkerView | None = None) -> None:
        self.settings = settings
        self.admin = kafka_clients.admin(settings)
        self.heads = kafka_clients.consumer(
            settings, f"{settings.topic_prefix}lag-exporter-{uuid.uuid4().hex[:8]}",
            **{"enable.partition.eof": True, "fetch.wait.max.ms": 100},
        )
        self.job_created_ms = job_created_ms  # callable(job_id) -> ms or None; None = message timestamps only
        self.worker_view = worker_view
        self.groups = {g: (stage, topics or retry_topics()) for g, (stage, topics) in GROUPS.items()}

    def close(self) -> None:
        self.heads.close()
        if self.worker_view is not None:
            self.worker_view.close()

    def snapshot(self, attempts: int = 2) -> Snapshot:
        """One consistent-enough view; a failed one (e.g. leadership still moving) is tried again once."""
        started = time.monotonic()
        for attempt in range(attempts):
            snap = self._snapshot()
            if snap.ok or time.monotonic() - started > 1.0:  # no time for another try within a scrape
                break
            if attempt + 1 < attempts:
                time.sleep(0.3)
        if not snap.ok:
            log.warning("lag snapshot failed: %s", snap.error)
        return snap

    def _snapshot(self) -> Snapshot:
        snap = Snapshot(taken_ms=int(time.time() * 1000))
        workers = self.worker_view.workers() if self.worker_view is not None else []
        snap.workers = workers
        try:
            counts = self._partition_counts()
            marks = self._watermarks(counts)
            prefix = len(self.settings.topic_prefix)
            snap.ends = {(t[prefix:], p): high for (t, p), (_, high) in marks.items()}
            for group, (stage, topics) in self.groups.items():
                full_group = self.settings.topic_prefix + group
                committed = self._committed(full_group, counts, topics)
                owners = self._owned(full_group)
                busy = {p for w in workers if w.live and w.status.stage == stage
                        and w.status.in_flight > 0 for p in w.status.partitions}
                for topic in topics:
                    full = self.settings.topic(topic)
                    for p in range(counts.get(full, 0)):
                        low, high = marks[(full, p)]
                        snap.partitions.append(PartitionLag(
                            group, topic, p, committed.get((full, p), -1), low, high,
                            owned=(full, p) in owners, owner_busy=(full, p) in owners and p in busy,
                        ))
            self._read_heads([pl for pl in snap.partitions if pl.lag > 0])
        except (KafkaException, TimeoutError, KeyError) as exc:
            snap.ok, snap.error = False, f"{type(exc).__name__}: {exc}"
        return snap

    def _partition_counts(self) -> dict[str, int]:
        meta = self.admin.list_topics(timeout=ADMIN_TIMEOUT_S)
        wanted = {self.settings.topic(t) for _, topics in self.groups.values() for t in topics}
        wanted |= {self.settings.topic("dlq")}
        return {name: len(t.partitions) for name, t in meta.topics.items() if name in wanted and t.error is None}

    def _watermarks(self, counts: dict[str, int]) -> dict[tuple[str, int], tuple[int, int]]:
        tps = [TopicPartition(t, p) for t, n in counts.items() for p in range(n)]
        out: dict[tuple[str, int], list[int]] = {(tp.topic, tp.partition): [0, 0] for tp in tps}
        for spec, index in ((OffsetSpec.earliest(), 0), (OffsetSpec.latest(), 1)):
            if not tps:
                break
            futures = self.admin.list_offsets({tp: spec for tp in tps}, request_timeout=ADMIN_TIMEOUT_S)
            for tp, fut in futures.items():
                out[(tp.topic, tp.partition)][index] = fut.result(timeout=ADMIN_TIMEOUT_S).offset
        return {k: (v[0], v[1]) for k, v in out.items()}

    def _committed(self, group: str, counts: dict[str, int], topics: Iterable[str]) -> dict[tuple[str, int], int]:
        tps = [TopicPartition(self.settings.topic(t), p) for t in topics for p in range(counts.get(self.settings.topic(t), 0))]
        if not tps:
            return {}
        fut = self.admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, tps)],
                                                     request_timeout=ADMIN_TIMEOUT_S)[group]
        result = fut.result(timeout=ADMIN_TIMEOUT_S)
        return {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions
                if tp.error is None and tp.offset != OFFSET_INVALID and tp.offset >= 0}

    def _owned(self, group: str) -> set[tuple[str, int]]:
        fut = self.admin.describe_consumer_groups([group], request_timeout=ADMIN_TIMEOUT_S)[group]
        try:
            desc = fut.result(timeout=ADMIN_TIMEOUT_S)
        except KafkaException as exc:
            if exc.args and exc.args[0].code() == KafkaError.GROUP_ID_NOT_FOUND:
                return set()
            raise
        return {(tp.topic, tp.partition) for m in desc.members
                for tp in (m.assignment.topic_partitions if m.assignment else [])}

    def _read_heads(self, lagging: list[PartitionLag]) -> None:
        """Read the first uncommitted event of each lagging partition (bounded by HEAD_READ_S)."""
        if not lagging:
            return
        by_tp = {(self.settings.topic(pl.topic), pl.partition): pl for pl in lagging}
        self.heads.assign([TopicPartition(t, p, by_tp[(t, p)].start) for t, p in by_tp])
        pending = set(by_tp)
        deadline = time.monotonic() + HEAD_READ_S
        lookup_until = time.monotonic() + LOOKUP_BUDGET_S
        try:
            while pending and time.monotonic() < deadline:
                msg = self.heads.poll(0.2)
                if msg is None:
                    continue
                key = (msg.topic(), msg.partition())
                if key not in pending:
                    continue
                pl = by_tp[key]
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        pl.head_checked = True  # nothing but markers between committed and the end
                        pending.discard(key)
                    continue
                pl.head_checked = True
                pending.discard(key)
                kind, stamp = msg.timestamp()
                created = self._created_ms(msg.key()) if time.monotonic() < lookup_until else None
                pl.head_created_ms = created or (stamp if kind != TIMESTAMP_NOT_AVAILABLE else int(time.time() * 1000))
        finally:
            self.heads.unassign()

    def _created_ms(self, key: bytes | None) -> int | None:
        if self.job_created_ms is None or not key:
            return None
        try:
            return self.job_created_ms(key.decode(errors="replace"))
        except Exception as exc:  # noqa: BLE001 - Cassandra down: fall back to the message's time
            log.debug("job row unreadable: %s", exc)
            return None


class LagCollector(Collector):
    """Prometheus collector: one broker snapshot per scrape (at most one per second, shared)."""

    def __init__(self, reader: LagReader, settings: Settings) -> None:
        self.reader = reader
        self.settings = settings
        self._lock = threading.Lock()
        self._last: Snapshot | None = None

    def _snapshot(self) -> Snapshot:
        with self._lock:
            if self._last is None or time.time() * 1000 - self._last.taken_ms > 1000:
                self._last = self.reader.snapshot()
            return self._last

    def collect(self):
        started = time.monotonic()
        snap = self._snapshot()
        yield from families(snap, self.settings)
        took = GaugeMetricFamily("kafscribe_lag_scrape_seconds", "Time the last broker snapshot took")
        took.add_metric([], time.monotonic() - started)
        yield took


def families(snap: Snapshot, settings: Settings) -> list[GaugeMetricFamily]:
    """The exporter's metric families from one snapshot (pure: unit-tested without a broker)."""
    labels = ["group", "topic", "partition"]
    up = GaugeMetricFamily("kafscribe_lag_up", "1 when the last broker snapshot succeeded")
    up.add_metric([], 1.0 if snap.ok else 0.0)
    out = [up]
    lag = GaugeMetricFamily("kafscribe_group_lag", "Offsets between a group's committed offset and the end "
                            "(0 when only transaction markers remain)", labels=labels)
    committed = GaugeMetricFamily("kafscribe_group_committed_offset", "A group's committed offset "
                                  "(the partition's start when it never committed)", labels=labels)
    high = GaugeMetricFamily("kafscribe_topic_high_watermark", "End offset of a partition", labels=["topic", "partition"])
    owned = GaugeMetricFamily("kafscribe_group_partition_owned", "1 when a member of the group owns the partition",
                              labels=labels)
    busy = GaugeMetricFamily("kafscribe_group_partition_owner_busy", "1 when the partition's owner reports jobs "
                             "in flight (WorkerStatus)", labels=labels)
    head_age = GaugeMetricFamily("kafscribe_group_head_age_seconds", "Age of the job of the first event the group "
                                 "has not committed (0 without lag)", labels=labels)
    now_ms = snap.taken_ms
    oldest_ms: int | None = None
    for pl in snap.partitions:
        values = [pl.group, pl.topic, str(pl.partition)]
        lag.add_metric(values, pl.lag)
        committed.add_metric(values, pl.start)
        owned.add_metric(values, 1.0 if pl.owned else 0.0)
        busy.add_metric(values, 1.0 if pl.owner_busy else 0.0)
        age = (now_ms - pl.head_created_ms) / 1000 if pl.lag > 0 and pl.head_created_ms else 0.0
        head_age.add_metric(values, max(0.0, age))
        if pl.group in JOB_GROUPS and pl.lag > 0 and pl.head_created_ms:
            oldest_ms = pl.head_created_ms if oldest_ms is None else min(oldest_ms, pl.head_created_ms)
    for (topic, partition), end in sorted(snap.ends.items()):
        high.add_metric([topic, str(partition)], end)
    oldest = GaugeMetricFamily("kafscribe_oldest_unfinished_job_seconds", "Age of the oldest job still waiting in "
                               "or running at a stage before the sink (0 when none)")
    oldest.add_metric([], max(0.0, (now_ms - oldest_ms) / 1000) if oldest_ms else 0.0)
    out += [lag, committed, high, owned, busy, head_age, oldest]
    out += worker_families(snap, settings)
    return out


def exported_workers(snap: Snapshot, limit: int) -> tuple[list[WorkerState], int]:
    """The workers whose series are exported, and how many others were left out by ``limit``.

    Stopped workers, workers of unknown stages and workers stale for over ``STALE_SHOWN_S`` are never
    exported; of the rest, live workers come first (by id, so the set is stable between scrapes), then
    stale ones, most recently heard from first.
    """
    live, stale = [], []
    for w in snap.workers:
        if w.liveness == STOPPED or w.status.stage not in WORKER_STAGES:
            continue
        if w.live:
            live.append(w)
        elif status_age_s(w.status, snap.taken_ms) <= STALE_SHOWN_S:
            stale.append(w)
    live.sort(key=lambda w: w.status.worker_id)
    stale.sort(key=lambda w: (-w.status.produced_at, w.status.worker_id))
    candidates = live + stale
    limit = max(0, limit)
    return candidates[:limit], max(0, len(candidates) - limit)


def worker_families(snap: Snapshot, settings: Settings) -> list[GaugeMetricFamily]:
    labels = ["worker_id", "stage"]
    age = GaugeMetricFamily("kafscribe_worker_status_age_seconds", "Seconds since a worker's last WorkerStatus "
                            "(workers that stopped cleanly are left out; stale ones for "
                            f"{STALE_SHOWN_S:.0f} s)", labels=labels)
    headroom = GaugeMetricFamily("kafscribe_worker_headroom_bytes", "Memory a live worker can still spend on a job",
                                 labels=labels)
    rss = GaugeMetricFamily("kafscribe_worker_rss_bytes", "A live worker's RSS as it reported it", labels=labels)
    in_flight = GaugeMetricFamily("kafscribe_worker_in_flight_jobs", "Jobs a live worker reports in flight",
                                  labels=labels)
    shown, left_out = exported_workers(snap, settings.lag_max_workers)
    for w in shown:
        status = w.status
        values = [status.worker_id, status.stage]
        age.add_metric(values, max(0.0, status_age_s(status, snap.taken_ms)))
        if w.live:
            headroom.add_metric(values, w.headroom)
            rss.add_metric(values, status.rss_bytes)
            in_flight.add_metric(values, status.in_flight)
    dropped = GaugeMetricFamily("kafscribe_workers_not_exported", "Live or recently stale workers whose series "
                                "were left out (over KAFSCRIBE_LAG_MAX_WORKERS)")
    dropped.add_metric([], left_out)
    return [age, headroom, rss, in_flight, dropped]


class JobCreated:
    """job_id -> created_at in ms from the job row (None when absent or Cassandra is unreachable).

    Connects on first use and again at most every ``RETRY_S`` after a failure, so the exporter
    starts (and reports lag, which needs only Kafka) while Cassandra is still coming up.
    """

    RETRY_S = 30.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.session = None
        self.stmt = None
        self._next_try = 0.0

    def _connect(self) -> bool:
        if self.session is not None:
            return True
        if time.monotonic() < self._next_try:
            return False
        from kafscribe.store import session as cassandra_session

        try:
            session = cassandra_session.connect(self.settings, keyspace=self.settings.cassandra_keyspace)
            self.stmt = session.prepare("SELECT created_at FROM jobs WHERE job_id = ?")
            self.session = session
            return True
        except Exception as exc:  # noqa: BLE001 - any failure: dates from message times meanwhile
            log.warning("Cassandra not reachable (%s); job ages from message times for now", exc)
            self._next_try = time.monotonic() + self.RETRY_S
            return False

    def __call__(self, job_id: str) -> int | None:
        if not self._connect():
            return None
        row = self.session.execute(self.stmt, (job_id,), timeout=0.5).one()
        if row is None or row.created_at is None:
            return None
        at = row.created_at  # the driver hands back naive UTC datetimes
        return int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp() * 1000)

    def close(self) -> None:
        if self.session is not None:
            self.session.cluster.shutdown()


def serve(settings: Settings) -> int:
    """``kafscribe serve lag``: export until SIGTERM/SIGINT."""
    from prometheus_client import REGISTRY, start_http_server

    from kafscribe import logs

    logs.setup(settings.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if settings.lag_metrics_port < 0:
        log.info("lag exporter off (KAFSCRIBE_LAG_METRICS_PORT=-1); idle until stopped")
        stop.wait()
        return 0
    created = JobCreated(settings)
    reader = LagReader(settings, job_created_ms=created, worker_view=WorkerView(settings))
    REGISTRY.register(LagCollector(reader, settings))
    start_http_server(settings.lag_metrics_port, addr=settings.metrics_host)
    log.info("lag exporter on http://%s:%d/metrics", settings.metrics_host, settings.lag_metrics_port)
    stop.wait()
    reader.close()
    created.close()
    return 0
