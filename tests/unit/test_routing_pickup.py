"""Instant pickup: nothing but the job's own work on the consume loop's thread (no broker).

The worker status is published from a thread of its own (at once when a job starts or ends, never while
the loop is stuck), and a finished job's commit waits for no poll timeout.
"""

from __future__ import annotations

import threading
import time

from consumers.status import StatusReporter, WorkMeter
from kafscribe.kafka.routing import DEFAULT_SPEED
from kafscribe.settings import Settings
from schemas.events import WorkerStatus, decode_event
from tests.fakes import FakeProducer
from tests.unit.test_loop_logic import TOPIC, FakeStage, make_runner, upload_message


class _Stage:
    name = "transcriber"
    throttled = False


class FakeRunner:
    def __init__(self) -> None:
        self.stage = _Stage()
        self.worker_id = "w1"
        self.stopped = False
        self.in_flight_count = 0
        self.last_beat = time.monotonic()

    def assignment(self) -> list[int]:
        return [0, 1]

    def backlog(self) -> int:
        return 0


class Produced:
    def __init__(self) -> None:
        self.statuses: list[WorkerStatus] = []
        self.threads: set[str] = set()

    def produce(self, topic, key, value) -> None:
        self.statuses.append(decode_event(value))
        self.threads.add(threading.current_thread().name)

    def poll(self, timeout) -> int:
        return 0

    def flush(self, timeout) -> int:
        return 0


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_the_status_is_published_from_its_own_thread_at_once_on_a_change_and_not_while_the_loop_is_stuck():
    settings = Settings(topic_prefix="t.", status_interval_s=30.0)
    runner = FakeRunner()
    reporter = StatusReporter(settings, runner, model="base", meter=WorkMeter("base"))
    reporter.producer = sink = Produced()
    reporter.start()
    try:
        assert wait_for(lambda: len(sink.statuses) == 1), "the first status at once"
        assert sink.threads == {"transcriber-status"}
        first = sink.statuses[0]
        assert (first.in_flight, first.work_s, first.speed) == (0, 0.0, {"base": DEFAULT_SPEED["cpu"]})
        reporter.meter.began("base", 8.0)
        runner.in_flight_count = 1  # a job starts: routing must know now, not in status_interval_s
        assert wait_for(lambda: len(sink.statuses) == 2)
        assert sink.statuses[1].in_flight == 1 and 2.0 < sink.statuses[1].work_s <= 4.0  # 8 s x 0.5, less time run
        runner.last_beat = time.monotonic() - reporter.fresh_s - 1  # the loop stopped turning
        runner.in_flight_count = 0
        time.sleep(0.6)
        assert len(sink.statuses) == 2, "a worker that stops polling stops reporting"
        runner.last_beat = time.monotonic()
        assert wait_for(lambda: len(sink.statuses) == 3)
    finally:
        runner.stopped = True
        reporter.stopped()
    assert sink.statuses[-1].state == "stopped" and sink.statuses[-1].work_s == 0.0
    count = len(sink.statuses)
    time.sleep(0.3)
    assert len(sink.statuses) == count, "nothing after the last word"


def test_while_a_job_runs_the_loop_waits_on_the_job_not_in_a_poll_so_its_commit_follows_at_once():
    """The loop used to wait in ``poll(0.2)`` (plus a join) between checks: a job done just after a poll
    began waited up to a quarter of a second for its commit, and the next job with it. Now it waits on
    the job's thread (woken the moment the job ends) and only asks the consumer what is there already."""
    stage = FakeStage()
    stage.release.clear()
    runner, consumer, made = make_runner([FakeProducer()], stage=stage)
    timeouts: list[float] = []
    real_poll = consumer.poll

    def poll(timeout: float):
        timeouts.append(timeout)
        msg = real_poll(0)
        if msg is None and timeout:
            time.sleep(timeout)  # as librdkafka does when nothing is there
        return msg

    consumer.poll = poll
    worker = threading.Thread(target=runner._process, args=(upload_message(offset=3),))
    worker.start()
    assert wait_for(lambda: stage.handled == ["job-1"])
    time.sleep(0.3)
    stage.release.set()
    worker.join(10)
    assert not worker.is_alive() and made[0].transactions, "committed"
    assert timeouts and set(timeouts) == {0}, "never blocked in poll while the job ran"
    assert made[0].transactions[0][1] == {(TOPIC, 0): 4}
