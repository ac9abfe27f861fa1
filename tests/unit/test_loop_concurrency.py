"""The concurrent mode of the consume loop: what runs at once, and what gets committed when.

Fast tests with an in-memory consumer and transactional producer (the
ordering and commit decisions, rebalances and failed transactions at exact
moments); the real-stack behaviour is covered by tests/test_callback_retry*.py.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest
from cassandra.cluster import NoHostAvailable
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from consumers.loop import InOrderCommits, Output, StageRunner, _Slot
from kafscribe.settings import Settings
from schemas.events import CallbackAttempt, decode_event

TOPIC = "t.in"


def event(job_id: str) -> CallbackAttempt:
    return CallbackAttempt(job_id=job_id, event_id=f"ev-{job_id}", url="http://x/", event_type="job.completed",
                           body="{}", delivery_attempt=1, not_before=0)


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes) -> None:
        self._t, self._p, self._o, self._v = topic, partition, offset, value

    def topic(self): return self._t
    def partition(self): return self._p
    def offset(self): return self._o
    def value(self): return self._v
    def key(self): return b"k"
    def error(self): return None
    def timestamp(self): return (1, int(time.time() * 1000))


class FakeConsumer:
    """A consumer group of one over an in-memory log; the test can revoke and re-assign partitions."""

    def __init__(self, partitions: int = 2) -> None:
        self.log: dict[tuple[str, int], list[bytes]] = {(TOPIC, p): [] for p in range(partitions)}
        self.offsets: dict[tuple[str, int], int] = {}
        self.assigned: set[tuple[str, int]] = set()
        self.paused: set[tuple[str, int]] = set()
        self.position: dict[tuple[str, int], int] = {}
        self.lock = threading.Lock()
        self.to_revoke: list[tuple[str, int]] = []
        self.to_assign: list[tuple[str, int]] = []
        self.callbacks = None

    def append(self, partition: int, value: bytes) -> None:
        with self.lock:
            self.log[(TOPIC, partition)].append(value)

    def subscribe(self, topics, on_assign, on_revoke, on_lost) -> None:
        self.callbacks = (on_assign, on_revoke, on_lost)
        self.to_assign = list(self.log)

    def incremental_assign(self, tps) -> None:
        for tp in tps:
            key = (tp.topic, tp.partition)
            self.assigned.add(key)
            self.position[key] = self.offsets.get(key, 0)

    def assignment(self):
        return [TopicPartition(*k) for k in sorted(self.assigned)]

    def pause(self, tps) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in tps}

    def resume(self, tps) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in tps}

    def seek(self, tp) -> None:
        self.position[(tp.topic, tp.partition)] = max(0, tp.offset)  # OFFSET_BEGINNING (-2): the start

    def committed(self, tps, timeout=None):
        return [TopicPartition(tp.topic, tp.partition, self.offsets.get((tp.topic, tp.partition), -1001))
                for tp in tps]

    def poll(self, timeout: float):
        if self.to_revoke:
            keys, self.to_revoke = self.to_revoke, []
            self.callbacks[1](self, [TopicPartition(*k) for k in keys])
            self.assigned -= set(keys)
            self.paused -= set(keys)
        if self.to_assign:
            keys, self.to_assign = self.to_assign, []
            tps = [TopicPartition(*k) for k in keys]
            self.callbacks[0](self, tps)
            if not set(keys) <= self.assigned:  # the callback did not assign: the client does (confluent-kafka)
                self.incremental_assign(tps)
        with self.lock:
            for key in sorted(self.assigned - self.paused):
                pos = self.position.get(key, 0)
                if pos < len(self.log[key]):
                    self.position[key] = pos + 1
                    return FakeMessage(key[0], key[1], pos, self.log[key][pos])
        time.sleep(min(timeout, 0.005))
        return None

    def consumer_group_metadata(self):
        return "group-metadata"

    def get_watermark_offsets(self, tp, cached=False, timeout=None):
        return 0, len(self.log[(tp.topic, tp.partition)])

    def close(self) -> None:
        pass

    def unsubscribe(self) -> None:
        pass


class FakeProducer:
    """A transactional producer whose committed transactions the test reads; can fail the next commit."""

    def __init__(self, consumer: FakeConsumer) -> None:
        self.consumer = consumer
        self.transactions: list[tuple[list[tuple[str, bytes]], dict]] = []
        self.fail_next_commit = False
        self._open: list | None = None
        self._offsets: dict = {}

    def init_transactions(self, *a) -> None: pass
    def flush(self, *a) -> int: return 0
    def poll(self, *a) -> int: return 0
    def purge(self, *a) -> None: pass

    def begin_transaction(self, *a) -> None:
        self._open, self._offsets = [], {}

    def produce(self, topic, key=None, value=None, **kw) -> None:
        self._open.append((topic, value))

    def send_offsets_to_transaction(self, offsets, metadata, *a) -> None:
        self._offsets = {(tp.topic, tp.partition): tp.offset for tp in offsets}

    def commit_transaction(self, *a) -> None:
        if self.fail_next_commit:
            self.fail_next_commit = False
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "scripted commit failure"))
        self.transactions.append((self._open, self._offsets))
        self.consumer.offsets.update(self._offsets)
        self._open = None

    def abort_transaction(self, *a) -> None:
        self._open = None

    def outputs(self) -> list[str]:
        """Job ids of every committed output, in commit order."""
        return [decode_event(v).job_id for txn, _ in self.transactions for _, v in txn]


class GateStage:
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
    consumer = FakeConsumer()
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
    slots = {o: _Slot(FakeMessage(TOPIC, 0, o, b""), 0.0) for o in range(4)}
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
