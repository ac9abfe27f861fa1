"""The consume loop's commit / abort / rewind / pause decisions, with tests/fakes.py's consumer and producer (no broker).

The real-broker versions of these paths are tests/e2e/test_broker_crash_e2e.py and
tests/e2e/test_loop_rebalance.py; here each decision is pinned down in milliseconds,
including the ones a broker cannot be made to produce on demand (a call that
never returns, a fatal producer).
"""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from consumers.loop import StageRunner
from consumers.stage import LeaveGroup, Output, Stage
from consumers.watchdog import Watchdog
from consumers.watchdog import serve as serve_http
from kafscribe.settings import Settings
from schemas.events import Result, Upload
from tests.fakes import FakeConsumer, FakeMessage, FakeProducer, kafka_error

TOPIC = "t.uploads"


class FakeStage(Stage):
    name = "transcriber"
    group = "transcribers"
    input_topic = "uploads"

    def __init__(self) -> None:
        self.handled: list[str] = []
        self.leave_first = False
        self.resume_ok = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def handle(self, event, message):
        self.handled.append(event.job_id)
        if self.leave_first and len(self.handled) == 1:
            raise LeaveGroup("short of memory (test)")
        self.release.wait(10)
        return [Output("t.results", Result(job_id=event.job_id, status="completed"))]

    def failure_outputs(self, event, reason):
        return [Output("t.results", Result.failed(event, reason, "w"))]

    def can_resume(self) -> bool:
        return self.resume_ok.is_set()


def upload_message(partition: int = 0, offset: int = 7, job_id: str = "job-1") -> FakeMessage:
    event = Upload(job_id=job_id, blob_ref="file:x", audio_sha256="0" * 64, audio_bytes=1,
                   audio_duration=1.0, filename="x.wav")
    return FakeMessage(TOPIC, partition, offset, event.encode(), key=b"job")


def make_runner(producers: list[FakeProducer], consumer: FakeConsumer | None = None, stage=None,
                timeout_s: float = 0.3) -> tuple[StageRunner, FakeConsumer, list[FakeProducer]]:
    consumer = consumer or FakeConsumer(TOPIC)
    made: list[FakeProducer] = []

    def factory() -> FakeProducer:
        made.append(producers.pop(0) if producers else FakeProducer(consumer))
        return made[-1]

    settings = Settings(topic_prefix="t.", kafka_call_timeout_s=timeout_s, max_poll_interval_ms=10000)
    runner = StageRunner(settings, stage or FakeStage(), "w1", consumer=consumer, producer_factory=factory)
    consumer.callbacks = (runner._on_assign, runner._on_revoke, runner._on_lost)  # as subscribe() would
    runner._on_assign(consumer, [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)])
    runner.recover()
    assert runner.transactions.producer is made[0]
    return runner, consumer, made


OFFSETS = [TopicPartition(TOPIC, 0, 8)]
OUTPUTS = [Output("t.results", Result(job_id="job-1", status="completed"))]


def test_a_transaction_produces_and_commits_the_offsets_it_is_given():
    runner, consumer, made = make_runner([FakeProducer()])
    assert runner.commit(OFFSETS, OUTPUTS, {}) is True
    assert made[0].names() == ["init_transactions", "begin_transaction", "produce",
                               "send_offsets_to_transaction", "commit_transaction"]
    assert ("send_offsets_to_transaction", [(0, 8)]) in made[0].calls
    assert not runner.resync and runner.transactions.producer is made[0]


def test_an_abortable_failure_aborts_keeps_the_producer_and_rewinds_to_the_committed_offset():
    failing = FakeProducer(fail={"send_offsets_to_transaction": kafka_error(KafkaError._TIMED_OUT, abortable=True)})
    runner, consumer, made = make_runner([failing])
    consumer.offsets = {(TOPIC, 0): 5}
    assert runner.commit(OFFSETS, OUTPUTS, {}) is False
    assert "abort_transaction" in made[0].names() and runner.transactions.producer is made[0]
    runner.recover()
    assert consumer.seeks() == [("seek", 0, 5)]  # the broker's committed offset, not a guess
    assert not runner.resync and not consumer.paused


def test_a_transaction_that_never_returns_is_given_up_and_the_producer_replaced():
    stuck = FakeProducer(block={"send_offsets_to_transaction"})
    runner, consumer, made = make_runner([stuck], timeout_s=0.2)
    started = time.monotonic()
    assert runner.commit(OFFSETS, OUTPUTS, {}) is False
    assert time.monotonic() - started < 3.0, "the deadline must hold even though the call does not return"
    assert runner.transactions.producer is None
    assert consumer.offsets.get((TOPIC, 0)) is None
    consumer.offsets = {(TOPIC, 0): 8}  # the stuck commit did land before the new producer fenced it
    runner.recover()
    assert len(made) == 2 and made[1].names() == ["init_transactions"], "a fresh producer, initialised"
    assert runner.transactions.producer is made[1]
    assert consumer.seeks() == [("seek", 0, 8)], "a commit that landed is not redone"
    stuck.released.set()


def test_a_fatal_producer_error_replaces_the_producer():
    fenced = FakeProducer(fail={"commit_transaction": kafka_error(KafkaError._FENCED, fatal=True)})
    runner, consumer, made = make_runner([fenced])
    assert runner.commit(OFFSETS, OUTPUTS, {}) is False
    assert runner.transactions.producer is None and "abort_transaction" not in fenced.names()
    runner.recover()
    assert runner.transactions.producer is made[1]
    assert consumer.seeks() == [("seek", 0, OFFSET_BEGINNING)], "never committed: read from the beginning"


def test_a_producer_that_saw_all_brokers_down_is_replaced_before_its_next_transaction():
    runner, consumer, made = make_runner([FakeProducer(), FakeProducer()])
    runner.transactions.on_producer_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))
    assert runner.commit(OFFSETS, OUTPUTS, {}) is True
    assert "begin_transaction" not in made[0].names(), "the suspect producer is not trusted with it"
    assert made[1].names()[:2] == ["init_transactions", "begin_transaction"] and runner.transactions.producer is made[1]
    assert not consumer.seeks(), "nothing to redo"


def test_a_failing_abort_replaces_the_producer():
    bad = FakeProducer(fail={"commit_transaction": kafka_error(KafkaError._TRANSPORT),
                             "abort_transaction": kafka_error(KafkaError._TRANSPORT)})
    runner, _, made = make_runner([bad])
    assert runner.commit(OFFSETS, OUTPUTS, {}) is False
    assert runner.transactions.producer is None


def test_while_the_broker_is_away_partitions_are_held_and_newly_assigned_ones_paused():
    down = FakeProducer(fail={"init_transactions": kafka_error(KafkaError._TIMED_OUT, abortable=False)})
    consumer = FakeConsumer(TOPIC)
    settings = Settings(topic_prefix="t.", kafka_call_timeout_s=0.2)
    runner = StageRunner(settings, FakeStage(), "w1", consumer=consumer,
                         producer_factory=iter([down, FakeProducer()]).__next__)
    runner._on_assign(consumer, [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)])
    runner._wait_polling = lambda seconds: None  # the backoff itself is not under test
    runner.recover()
    assert runner.transactions.producer is None and consumer.paused == {(TOPIC, 0), (TOPIC, 1)}
    runner._on_assign(consumer, [TopicPartition(TOPIC, 2)])
    assert (TOPIC, 2) in consumer.paused, "no fetching while the producer cannot commit"
    runner.recover()
    assert runner.transactions.producer is not None and consumer.paused == set()


def test_a_partition_assigned_back_while_idle_is_resumed_and_while_busy_paused():
    runner, consumer, _ = make_runner([FakeProducer()])
    consumer.paused = {(TOPIC, 3)}  # librdkafka kept the pause flag from before the revocation
    runner._on_assign(consumer, [TopicPartition(TOPIC, 3)])
    assert (TOPIC, 3) not in consumer.paused
    runner._in_flight = (TOPIC, 0)  # a job runs
    runner._on_assign(consumer, [TopicPartition(TOPIC, 4)])
    assert (TOPIC, 4) in consumer.paused


def test_an_idle_worker_resumes_what_it_owns_and_reports_lag_it_does_not_read(caplog):
    """The loop's idle check resumes what it owns (a flag in librdkafka); the check for lag nobody reads runs
    in the probe's thread, on its samples."""
    from kafscribe import metrics

    runner, consumer, _ = make_runner([FakeProducer()])
    consumer.paused = {(TOPIC, 1)}  # stranded: paused, never fetched since it came back
    runner.probe.read(FakeMessage(TOPIC, 0, 9, b""))  # read up to 10; partition 1 from its committed offset
    consumer.high = {(TOPIC, 0): 10, (TOPIC, 1): 10}
    consumer.offsets = {(TOPIC, 1): 3}
    gauge = metrics.IDLE_PARTITION_LAG.labels("transcriber", "1")
    owned = set(runner._owned)
    runner._idle_checked = 0.0
    runner.check_idle()
    assert consumer.paused == set(), "idle: nothing it owns stays paused"
    runner.probe.refresh()  # what the background probe does every second
    runner.probe.judge_idle(owned)  # and every IDLE_CHECK_S while the loop is idle
    assert gauge._value.get() == 0, "one look is not enough: the lag must persist"
    runner.probe.judge_idle(owned)
    assert gauge._value.get() == 0, "no fresh look at the broker since the last check: no verdict"
    runner.probe.refresh()
    runner.probe.judge_idle(owned)
    assert gauge._value.get() == 7
    assert "partition 1 owned by an idle worker, with lag 7" in caplog.text
    assert metrics.IDLE_PARTITION_LAG.labels("transcriber", "0")._value.get() == 0
    assert runner.probe.idle(), "the probe's thread judges only while the loop is idle"
    runner._in_flight = (TOPIC, 0)
    assert not runner.probe.idle()


def test_backlog_and_idle_checks_never_ask_the_broker_on_the_loops_thread():
    """A job that reaches an idle worker starts at once: the status's backlog and the idle check read
    what the background probe found; only the probe's thread asks the broker."""
    runner, consumer, _ = make_runner([FakeProducer()])
    consumer.high = {(TOPIC, 0): 12, (TOPIC, 1): 10}
    for partition in (0, 1):
        runner.probe.read(FakeMessage(TOPIC, partition, 9, b""))  # what the loop's poll notes
    asked: list[str] = []
    real = consumer.get_watermark_offsets

    def watermarks(tp, timeout=None, cached=False):
        asked.append(threading.current_thread().name)
        return real(tp, timeout, cached)

    consumer.get_watermark_offsets = watermarks
    assert runner.backlog() == 0, "nothing sampled yet"
    runner._idle_checked = 0.0
    runner.check_idle()
    assert asked == [], "neither asked the broker"
    runner.probe.start()
    try:
        deadline = time.monotonic() + 5
        while runner.backlog() != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runner.backlog() == 2
        assert asked and threading.current_thread().name not in asked
    finally:
        runner.probe.stop()


def test_a_job_whose_partition_was_revoked_is_not_committed():
    stage = FakeStage()
    stage.release.clear()
    runner, consumer, made = make_runner([FakeProducer()], stage=stage)
    consumer.queue = [upload_message(offset=8, job_id="job-2")]
    done = threading.Thread(target=runner._process, args=(upload_message(),))
    done.start()
    deadline = time.monotonic() + 30
    while not (stage.handled and runner.kept) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [m.offset() for m in runner.kept.messages] == [8], "the next message is fetched and kept while the job runs"
    assert consumer.paused == {(TOPIC, 0), (TOPIC, 1)}, "then the partitions are paused"
    consumer.to_revoke = [(TOPIC, 0)]  # served by the poll of the job's loop
    while runner.kept and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not runner.kept, "a revoked partition's kept message is left to the next owner"
    stage.release.set()
    done.join(5)
    assert "begin_transaction" not in made[0].names()
    assert consumer.paused == set()


def test_a_processed_message_commits_its_next_offset():
    runner, consumer, made = make_runner([FakeProducer()])
    runner._process(upload_message(partition=1, offset=41))
    assert ("send_offsets_to_transaction", [(1, 42)]) in made[0].calls


def test_leaving_the_group_for_a_shortage_rejoins_and_takes_the_job_again():
    stage = FakeStage()
    stage.leave_first = True
    runner, consumer, made = make_runner([FakeProducer()], stage=stage)
    consumer.queue = [upload_message()]
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while ("unsubscribe",) not in consumer.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ("unsubscribe",) in consumer.calls and not consumer.subscribed
        assert "begin_transaction" not in made[0].names(), "nothing committed for the job it gave back"
        stage.resume_ok.set()
        consumer.queue.append(upload_message())  # the job again, as the new assignment delivers it
        while len(stage.handled) < 2 and time.monotonic() < deadline + 5:
            time.sleep(0.01)
        assert consumer.subscribed and stage.handled == ["job-1", "job-1"]
        while "commit_transaction" not in made[0].names() and time.monotonic() < deadline + 5:
            time.sleep(0.01)
        assert ("send_offsets_to_transaction", [(0, 8)]) in made[0].calls
    finally:
        runner.stop()
        thread.join(5)


def test_eviction_by_max_poll_interval_is_survived():
    runner, consumer, _ = make_runner([FakeProducer()])
    runner.consumer_error(KafkaError(KafkaError._MAX_POLL_EXCEEDED))  # logged, counted; no exception
    with pytest.raises(KafkaException):
        runner.consumer_error(KafkaError(KafkaError._FATAL, fatal=True))


class _Beating:
    def __init__(self, name: str) -> None:
        self.stage = type("S", (), {"name": name})()
        self.worker_id = "w"
        self.stopped = False
        self.last_beat = time.monotonic()


def test_watchdog_fires_for_a_stuck_loop_and_healthz_says_so():
    import json
    import urllib.error
    import urllib.request

    from bench.harness import free_port

    alive, stuck = _Beating("sink"), _Beating("notifier")
    fired: list[str] = []
    dog = Watchdog([alive, stuck], timeout_s=0.5, on_stuck=fired.append)
    port = free_port()
    server = serve_http(port, "127.0.0.1", dog)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200 and json.load(resp)["status"] == "ok"
        dog.start()
        deadline = time.monotonic() + 5
        while not fired and time.monotonic() < deadline:
            alive.last_beat = time.monotonic()
            time.sleep(0.05)
        assert fired and "notifier:w made no progress" in fired[0] and "sink" not in fired[0]
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz")
        assert err.value.code == 503
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
            assert b"kafscribe_producer_resets_total" in resp.read()
    finally:
        dog.stop()
        server.shutdown()


def test_status_partitions_are_the_main_topics_only():
    """A stage reading several topics (the callback retry tiers) owns partition 0 of each: its
    WorkerStatus names its main topic's partitions, each once (the ingress refuses repeats)."""
    runner, consumer, _ = make_runner([])
    before = runner.assignment()
    runner._on_assign(consumer, [TopicPartition(TOPIC, 7), TopicPartition("t.callbacks.retry.5s", 0),
                                 TopicPartition("t.callbacks.retry.5s", 7)])
    assert {("t.callbacks.retry.5s", 0), ("t.callbacks.retry.5s", 7)} <= runner._owned  # owned and handled ...
    assert runner.assignment() == sorted({*before, 7})  # ... but reported: the main topic's, once each


def test_a_partition_is_paused_while_any_reason_names_it_and_resumed_when_the_last_goes():
    from consumers.pauses import Pauses

    consumer = FakeConsumer(TOPIC)
    pauses = Pauses(consumer)
    pauses.assigned({(TOPIC, 0), (TOPIC, 1)})
    pauses.add("held", [(TOPIC, 0)])
    pauses.add("recovering")  # every partition, also those assigned later
    assert consumer.paused == {(TOPIC, 0), (TOPIC, 1)}
    pauses.assigned({(TOPIC, 2)})
    assert (TOPIC, 2) in consumer.paused
    pauses.discard("recovering")
    assert consumer.paused == {(TOPIC, 0)}, "still held"
    pauses.revoked({(TOPIC, 0)})
    pauses.assigned({(TOPIC, 0)})
    assert consumer.paused == set(), "a partition's own reasons go with it"


def test_failures_are_told_apart_by_type_never_by_message():
    from cassandra.cluster import NoHostAvailable

    from consumers.retry import Failure, classify, with_retries
    from consumers.stage import Abandoned
    from kafscribe.errors import PermanentError, RetriesExhausted
    from kafscribe.speech.audio import AudioError

    assert classify(NoHostAvailable("down", {})) is Failure.REDO_LATER
    assert classify(LeaveGroup("short of memory")) is Failure.LEAVE_GROUP
    assert classify(Abandoned("stopping")) is Failure.ABANDON
    assert classify(RuntimeError("gave up after transient failures")) is Failure.CRASH  # the words mean nothing

    def fail(exc: Exception):
        def call():
            raise exc
        return call

    with pytest.raises(PermanentError) as permanent:
        with_retries(fail(AudioError("not audio")), stage="t", attempts=3, base_delay_s=0)
    assert not isinstance(permanent.value, RetriesExhausted) and str(permanent.value) == "not audio"
    with pytest.raises(RetriesExhausted):
        with_retries(fail(RuntimeError("CUDA out of memory")), stage="t", attempts=1, base_delay_s=0)
    with pytest.raises(NoHostAvailable):
        with_retries(fail(NoHostAvailable("down", {})), stage="t", attempts=3, base_delay_s=0)
