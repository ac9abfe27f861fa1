"""The consume loop on a real broker: rebalances while a job runs, and leaving/rejoining the group.

In-process ``StageRunner``s with a stand-in stage (no Whisper: the loop is under
test, not the model), real Kafka topics and consumer groups.
"""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import TopicPartition

from bench.harness import wait_until
from consumers.loop import StageRunner
from consumers.stage import LeaveGroup, Output, Stage
from kafscribe.kafka import clients as kafka_clients
from schemas.events import Result, Upload
from tests.conftest import fresh_settings
from tests.kafka_read import read_topic

pytestmark = [pytest.mark.stack]


class BlockingStage(Stage):
    """Completes each Upload; a job whose id starts with ``slow`` waits for ``release``."""

    name = "transcriber"
    group = "transcribers"
    input_topic = "uploads"

    def __init__(self, settings) -> None:
        self.settings = settings
        self.release = threading.Event()
        self.started: list[str] = []
        self.leave_for: set[str] = set()
        self.resume_ok = threading.Event()
        self.resume_ok.set()

    def handle(self, event, message):
        self.started.append(event.job_id)
        if event.job_id in self.leave_for:
            self.leave_for.discard(event.job_id)
            self.resume_ok.clear()
            raise LeaveGroup("short of memory for a while (test)")
        if event.job_id.startswith("slow"):
            self.release.wait(60)
        return [Output(self.settings.topic("results"), Result(job_id=event.job_id, status="completed"))]

    def failure_outputs(self, event, reason):
        return [Output(self.settings.topic("results"), Result.failed(event, reason, "test"))]

    def can_resume(self) -> bool:
        return self.resume_ok.is_set()


def upload(job_id: str) -> Upload:
    return Upload(job_id=job_id, blob_ref="file:x", audio_sha256="0" * 64, audio_bytes=1,
                  audio_duration=1.0, filename="x.wav")


def produce(settings, job_id: str, partition: int) -> None:
    producer = kafka_clients.producer(settings)
    producer.produce(settings.topic("uploads"), key=job_id.encode(), value=upload(job_id).encode(), partition=partition)
    assert producer.flush(30) == 0


def start(runner: StageRunner) -> threading.Thread:
    thread = threading.Thread(target=runner.run, name=runner.worker_id, daemon=True)
    thread.start()
    return thread


def completed(settings) -> list[str]:
    return [e.job_id for e in read_topic(settings, "results", timeout_s=3) if isinstance(e, Result)]


def group_lag(settings) -> dict[int, int]:
    """Per uploads partition: high watermark minus the group's committed offset."""
    topic = settings.topic("uploads")
    probe = kafka_clients.consumer(settings, settings.topic_prefix + "transcribers")
    parts = [TopicPartition(topic, p) for p in range(settings.uploads_partitions)]
    committed = {tp.partition: tp.offset for tp in probe.committed(parts, timeout=10)}
    lag = {}
    for tp in parts:
        low, high = probe.get_watermark_offsets(tp, timeout=10)
        lag[tp.partition] = high - (committed[tp.partition] if committed[tp.partition] >= 0 else low)
    probe.close()
    return lag


@pytest.fixture
def loop_settings(stack_settings):
    return fresh_settings(stack_settings, session_timeout_ms=6000, kafka_call_timeout_s=10.0)


def test_partitions_revoked_while_paused_are_read_when_they_come_back(loop_settings):
    """A runs a job (all partitions paused); B joins and takes some; the job ends; B leaves;
    A gets them back and must read them (librdkafka kept their pause flag)."""
    settings = loop_settings
    stage_a, stage_b = BlockingStage(settings), BlockingStage(settings)
    stage_b.release.set()
    a = StageRunner(settings, stage_a, "a")
    threads = [start(a)]
    wait_until(lambda: a.assignment() == [0, 1, 2, 3], timeout_s=60, what="A owns every partition")
    produce(settings, "slow-1", 0)
    wait_until(lambda: stage_a.started == ["slow-1"], timeout_s=30, what="A runs the slow job")

    b = StageRunner(settings, stage_b, "b")
    threads.append(start(b))
    wait_until(lambda: b.assignment() and len(a.assignment()) + len(b.assignment()) == 4, timeout_s=60,
               what="B took partitions from A while A's were paused")
    taken = b.assignment()
    stage_a.release.set()  # the job ends (committed by A, or redone by B if B took partition 0)
    wait_until(lambda: "slow-1" in completed(settings), timeout_s=60, what="the slow job completed")

    b.stop()
    wait_until(lambda: a.assignment() == [0, 1, 2, 3], timeout_s=60, what="A got B's partitions back")
    jobs = {f"after-{p}": p for p in range(4)}
    for job_id, partition in jobs.items():
        produce(settings, job_id, partition)
    wait_until(lambda: set(jobs) <= set(completed(settings)), timeout_s=60,
               what=f"a job on every partition completes (B had taken {taken})")
    assert sorted(completed(settings)).count("slow-1") == 1
    wait_until(lambda: not any(group_lag(settings).values()), timeout_s=30, what="no lag left")
    a.stop()
    for thread in threads:
        thread.join(30)


def test_a_worker_that_left_for_a_shortage_rejoins_and_takes_work(loop_settings):
    """Loop side: LeaveGroup hands the partitions back; once ``can_resume`` says so,
    the worker subscribes again, gets partitions and completes jobs."""
    settings = loop_settings
    stage = BlockingStage(settings)
    stage.release.set()
    stage.leave_for = {"squeezed"}
    runner = StageRunner(settings, stage, "solo")
    thread = start(runner)
    try:
        wait_until(lambda: runner.assignment() == [0, 1, 2, 3], timeout_s=60, what="owns every partition")
        produce(settings, "squeezed", 2)
        wait_until(lambda: "squeezed" in stage.started and not runner.assignment(), timeout_s=60,
                   what="left the group (no partitions)")
        time.sleep(2)
        assert not runner.assignment() and completed(settings) == []
        stage.resume_ok.set()  # memory is back
        wait_until(lambda: runner.assignment() == [0, 1, 2, 3], timeout_s=60, what="rejoined the group")
        produce(settings, "later", 1)
        wait_until(lambda: {"squeezed", "later"} <= set(completed(settings)), timeout_s=60,
                   what="the given-back job and a new one complete")
        assert stage.started.count("squeezed") == 2 and completed(settings).count("squeezed") == 1
    finally:
        runner.stop()
        thread.join(30)


def test_a_worker_evicted_by_max_poll_interval_rejoins_and_takes_work(stack_settings):
    """A poll loop blocked past ``max.poll.interval.ms`` is evicted from the group; it must
    rejoin (or exit), never stay alive outside the group."""
    settings = fresh_settings(stack_settings, session_timeout_ms=6000, max_poll_interval_ms=7000,
                              kafka_call_timeout_s=10.0)
    stage = BlockingStage(settings)
    stage.release.set()
    runner = StageRunner(settings, stage, "sleepy")
    block = threading.Event()

    def blocked_call() -> None:  # stands in for a call that blocks the poll thread
        if block.is_set():
            block.clear()
            time.sleep(12)

    runner.on_idle.append(blocked_call)
    thread = start(runner)
    try:
        wait_until(lambda: runner.assignment() == [0, 1, 2, 3], timeout_s=60, what="owns every partition")
        block.set()
        time.sleep(13)
        produce(settings, "after-eviction", 3)
        wait_until(lambda: "after-eviction" in completed(settings), timeout_s=90,
                   what="the evicted worker rejoined and completed a job")
        assert runner.assignment() == [0, 1, 2, 3] and thread.is_alive()
    finally:
        runner.stop()
        thread.join(30)


def test_a_busy_worker_reports_its_backlog_for_routing(loop_settings):
    """WorkerStatus.backlog: what waits in the worker's partitions (kept or not fetched yet) while a job
    runs with them paused; the ingress routes to the shortest queue by it."""
    settings = loop_settings
    stage = BlockingStage(settings)
    runner = StageRunner(settings, stage, "queued")
    thread = start(runner)
    try:
        wait_until(lambda: runner.assignment() == [0, 1, 2, 3], timeout_s=60, what="the runner owns every partition")
        assert runner.backlog() == 0
        produce(settings, "slow-1", 0)
        wait_until(lambda: stage.started == ["slow-1"], timeout_s=30, what="the slow job runs")
        for i, partition in enumerate((0, 0, 1, 2)):
            produce(settings, f"waiting-{i}", partition)
        wait_until(lambda: runner.backlog() == 4, timeout_s=30, what="four jobs waiting behind the running one")
        stage.release.set()
        wait_until(lambda: len(completed(settings)) == 5, timeout_s=60, what="all five completed")
        wait_until(lambda: runner.backlog() == 0, timeout_s=30, what="nothing waiting")
    finally:
        stage.release.set()
        runner.stop()
        thread.join(30)
