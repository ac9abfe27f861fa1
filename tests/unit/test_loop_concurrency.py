"""The concurrent mode of the consume loop: what runs at once, and what gets committed when.

Fast tests with the in-memory consumer and transactional producer of tests/fakes.py (the
ordering and commit decisions, rebalances and failed transactions at exact
moments); the real-stack behaviour is covered by tests/e2e/test_callback_retry*.py.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest
from cassandra.cluster import NoHostAvailable

from consumers.concurrent import InOrderCommits, Slot
from consumers.loop import StageRunner
from consumers.stage import Output, Stage
from kafscribe.settings import Settings
from schemas.events import CallbackAttempt, decode_event
from tests.fakes import FakeConsumer, FakeMessage, FakeProducer

TOPIC = "t.in"


def event(job_id: str) -> CallbackAttempt:
    return CallbackAttempt(job_id=job_id, event_id=f"ev-{job_id}", url="http://x/", event_type="job.completed",
                           body="{}", delivery_attempt=1, not_before=0)


class GateStage(Stage):
    """Each job waits for its gate (opened by the test) unless listed as free; records what ran when."""

    name = "fake"
    group = "fake"
    input_topic = "in"

    def __init__(self, concurrency: int = 4, free: tuple[str, ...] = (), work_s: float = 0.0) -> None:
        self.concurrency = concurrency
        self.gates: dict[str, threading.Event] = defaultdict(threading.Event)
        for job in free:
            self.gates[job].set()
        self.work_s = work_s
        self.handled: list[str] = []
        self.finished: list[str] = []
        self.running = 0
        self.max_running = 0
        self.lock = threading.Lock()
        self.holds: dict[str, float] = {}
        self.crash: set[str] = set()
        self.outages: dict[str, int] = {}  # job -> how many more calls find Cassandra down
        self.started_at: dict[str, list[float]] = {}

    def handle(self, ev, message) -> list[Output]:
        with self.lock:
            self.handled.append(ev.job_id)
            self.started_at.setdefault(ev.job_id, []).append(time.monotonic())
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            time.sleep(self.work_s)
            assert self.gates[ev.job_id].wait(20), f"gate of {ev.job_id} never opened"
            if ev.job_id in self.crash:
                raise RuntimeError("a bug")
            if self.outages.get(ev.job_id):
                self.outages[ev.job_id] -= 1
                raise NoHostAvailable("Cassandra is down", {})
            return [Output("t.out", ev)]
        finally:
            with self.lock:
                self.running -= 1
                self.finished.append(ev.job_id)

    def failure_outputs(self, ev, reason: str) -> list[Output]:
        return [Output("t.dlq", CallbackAttempt(**{**ev.__dict__, "job_id": f"failed-{ev.job_id}"}))]

    def hold_until(self, ev, message) -> float | None:
        return self.holds.get(ev.job_id)


@pytest.fixture
def fakes() -> tuple[FakeConsumer, FakeProducer]:
    consumer = FakeConsumer(TOPIC)
    return consumer, FakeProducer(consumer)


def start(fakes, stage: GateStage, grace_s: float = 10.0) -> tuple[StageRunner, threading.Thread]:
    consumer, producer = fakes
    runner = StageRunner(Settings(topic_prefix="t."), stage, worker_id="w1", consumer=consumer,
                         producer_factory=lambda: producer)
    runner.shutdown_grace_s = grace_s
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    return runner, thread


def stop(runner: StageRunner, thread: threading.Thread) -> None:
    runner.stop()
    thread.join(15)
    assert not thread.is_alive(), "the loop did not stop"


def until(predicate, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.01)
    raise AssertionError(f"{what} not met in {timeout_s}s")


def test_in_order_commits_hands_out_only_finished_prefixes():
    work = InOrderCommits()
    slots = {o: Slot(FakeMessage(TOPIC, 0, o, b""), 0.0) for o in range(4)}
    for slot in slots.values():
        work.add((TOPIC, 0), slot)
    slots[1].outputs = slots[2].outputs = []
    assert work.pop_ready() == {}
    slots[0].outputs = []
    assert [s.offset for s in work.pop_ready()[(TOPIC, 0)]] == [0, 1, 2]
    assert work.pending() == 1 and work.last_offset((TOPIC, 0)) == 3
    assert [s.offset for s in work.truncate((TOPIC, 0), 3)] == [3]
    assert work.pending() == 0 and work.last_offset((TOPIC, 0)) is None


def test_a_later_message_that_finishes_first_waits_for_the_earlier_one(fakes):
    consumer, producer = fakes
    stage = GateStage(free=("b", "c"))
    for job in "abc":
        consumer.append(0, event(job).encode())
    runner, thread = start(fakes, stage)
    try:
        until(lambda: {"b", "c"} <= set(stage.finished), what="b and c done")
        time.sleep(0.2)
        assert producer.transactions == [], "committed past a message still running"
        stage.gates["a"].set()
        until(lambda: consumer.offsets.get((TOPIC, 0)) == 3, what="commit of offset 3")
        assert producer.outputs() == ["a", "b", "c"]  # in offset order, once each
    finally:
        stop(runner, thread)


def test_one_slow_message_holds_back_neither_its_partition_nor_others(fakes):
    consumer, producer = fakes
    stage = GateStage(free=("b", "c", "d"))
    consumer.append(0, event("a").encode())
    consumer.append(0, event("b").encode())
    consumer.append(1, event("c").encode())
    consumer.append(1, event("d").encode())
    runner, thread = start(fakes, stage)
    try:
        until(lambda: consumer.offsets.get((TOPIC, 1)) == 2, what="partition 1 committed")
        assert "b" in stage.finished and (TOPIC, 0) not in consumer.offsets
        until(lambda: runner.in_flight_count == 2, what="a running, b done but waiting for a")
        stage.gates["a"].set()
        until(lambda: consumer.offsets.get((TOPIC, 0)) == 2, what="partition 0 committed")
        assert sorted(producer.outputs()) == ["a", "b", "c", "d"]
    finally:
        stop(runner, thread)


def test_never_more_than_the_bound_at_once(fakes):
    consumer, producer = fakes
    jobs = [f"j{i}" for i in range(12)]
    stage = GateStage(concurrency=3, free=tuple(jobs), work_s=0.05)
    for i, job in enumerate(jobs):
        consumer.append(i % 2, event(job).encode())
    runner, thread = start(fakes, stage)
    try:
        until(lambda: consumer.offsets == {(TOPIC, 0): 6, (TOPIC, 1): 6}, what="all committed")
        assert stage.max_running == 3
        assert sorted(stage.handled) == sorted(jobs)  # each once: paused fetches are read again, not lost
        assert sorted(producer.outputs()) == sorted(jobs)
    finally:
        stop(runner, thread)


def test_a_revoked_partitions_results_are_left_to_the_next_owner(fakes):
    consumer, producer = fakes
    stage = GateStage()
    consumer.append(0, event("a").encode())
    runner, thread = start(fakes, stage)
    try:
        until(lambda: "a" in stage.handled, what="a started")
        assert runner.assignment() == [0, 1]  # what the status reports show
        consumer.to_revoke = [(TOPIC, 0)]
        until(lambda: (TOPIC, 0) not in consumer.assigned, what="revocation")
        assert runner.assignment() == [1]
        stage.gates["a"].set()
        until(lambda: "a" in stage.finished, what="a finished")
        time.sleep(0.2)
        assert producer.transactions == [], "committed a revoked partition's result"
        consumer.to_assign = [(TOPIC, 0)]  # back again: read from the committed offset
        until(lambda: consumer.offsets.get((TOPIC, 0)) == 1, what="redone and committed")
        assert stage.handled == ["a", "a"] and producer.outputs() == ["a"]
    finally:
        stop(runner, thread)


def test_a_failed_transaction_redoes_from_the_first_uncommitted_offset(fakes):
    consumer, producer = fakes
    producer.fail_next_commit = True
    stage = GateStage(free=("a", "b"))
    consumer.append(0, event("a").encode())
    consumer.append(0, event("b").encode())
    runner, thread = start(fakes, stage)
    try:
        until(lambda: consumer.offsets.get((TOPIC, 0)) == 2, what="commit after the failed one")
        assert stage.handled.count("a") == 2  # redone once
        assert producer.outputs() == ["a", "b"]  # the aborted transaction's outputs never count
    finally:
        stop(runner, thread)


def test_a_held_message_pauses_only_its_partition_until_due(fakes):
    consumer, producer = fakes
    stage = GateStage(free=("later", "after", "other"))
    due = time.time() + 0.8
    stage.holds["later"] = due
    consumer.append(0, event("later").encode())
    consumer.append(0, event("after").encode())
    consumer.append(1, event("other").encode())
    runner, thread = start(fakes, stage)
    try:
        until(lambda: consumer.offsets.get((TOPIC, 1)) == 1, what="other partition")
        assert stage.handled == ["other"]  # nothing behind the held head was skipped ahead
        until(lambda: consumer.offsets.get((TOPIC, 0)) == 2, what="held partition")
        assert time.time() >= due
        assert stage.handled == ["other", "later", "after"]
    finally:
        stop(runner, thread)


def test_crashes_and_undecodable_bytes_end_with_outputs_and_move_on(fakes):
    consumer, producer = fakes
    stage = GateStage(free=("bug", "fine"))
    stage.crash.add("bug")
    consumer.append(0, event("bug").encode())
    consumer.append(0, b"not an event")
    consumer.append(0, event("fine").encode())
    runner, thread = start(fakes, stage)
    try:
        until(lambda: consumer.offsets.get((TOPIC, 0)) == 3, what="all three committed")
        produced = [(t, decode_event(v)) for txn, _ in producer.transactions for t, v in txn]
        assert sorted((t, e.job_id) for t, e in produced) == [("t.dlq", "failed-bug"), ("t.dlq", "k"), ("t.out", "fine")]
        (letter,) = [e for _, e in produced if e.job_id == "k"]
        assert letter.source_offset == 1 and letter.payload == b"not an event"
    finally:
        stop(runner, thread)


def test_stop_lets_in_flight_messages_finish_and_commit(fakes):
    consumer, producer = fakes
    stage = GateStage()
    consumer.append(0, event("a").encode())
    runner, thread = start(fakes, stage)
    until(lambda: "a" in stage.handled, what="a started")
    runner.stop()
    consumer.append(0, event("b").encode())  # arrives after stop: not started
    time.sleep(0.2)
    assert thread.is_alive()
    stage.gates["a"].set()
    thread.join(10)
    assert not thread.is_alive()
    assert consumer.offsets == {(TOPIC, 0): 1} and stage.handled == ["a"]


def test_stop_abandons_what_outlives_the_grace_period(fakes):
    consumer, producer = fakes
    stage = GateStage()
    consumer.append(0, event("a").encode())
    runner, thread = start(fakes, stage, grace_s=0.3)
    until(lambda: "a" in stage.handled, what="a started")
    runner.stop()
    thread.join(10)
    assert not thread.is_alive() and producer.transactions == []
    stage.gates["a"].set()


def test_a_hold_outlasts_the_producer_recovery_after_a_failed_transaction(fakes):
    consumer, producer = fakes
    producer.fail_next_commit = True
    stage = GateStage(free=("later", "other"))
    due = time.time() + 1.0
    stage.holds["later"] = due
    consumer.append(0, event("later").encode())
    consumer.append(1, event("other").encode())
    runner, thread = start(fakes, stage)
    try:
        until(lambda: consumer.offsets.get((TOPIC, 1)) == 1, what="other committed after a failed transaction")
        assert stage.handled == ["other", "other"]  # redone from the committed offset once
        until(lambda: consumer.offsets.get((TOPIC, 0)) == 1, what="held partition")
        assert time.time() >= due and stage.handled == ["other", "other", "later"]
    finally:
        stop(runner, thread)


def test_a_store_outage_redoes_its_message_and_the_rest_of_its_partition_after_a_backoff(fakes):
    consumer, producer = fakes
    stage = GateStage(free=("down", "behind", "elsewhere"))
    stage.outages["down"] = 1
    consumer.append(0, event("down").encode())
    consumer.append(0, event("behind").encode())
    consumer.append(1, event("elsewhere").encode())
    runner, thread = start(fakes, stage)
    try:
        until(lambda: consumer.offsets.get((TOPIC, 1)) == 1, what="the other partition")
        until(lambda: consumer.offsets.get((TOPIC, 0)) == 2, what="redone after the outage")
        first, again = stage.started_at["down"]
        assert again - first >= 0.9  # backed off first (1 s after one outage)
        assert stage.handled.count("down") == 2 and producer.outputs().count("behind") == 1
        assert sorted(producer.outputs()) == ["behind", "down", "elsewhere"]
    finally:
        stop(runner, thread)
