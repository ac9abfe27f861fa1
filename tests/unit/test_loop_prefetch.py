"""No gap between jobs: the one-at-a-time loop keeps what it fetched while a job ran, and
lets the stage prepare the next job meanwhile. Fake consumer and producer (no broker); the real-broker
exactly-once tests (test_redo, test_failover_e2e, test_broker_crash_e2e, test_outages_e2e) run the same
code with Kafka.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from consumers.loop import StageRunner
from kafscribe.settings import Settings
from tests.fakes import FakeConsumer, FakeMessage, FakeProducer
from tests.unit.test_loop_concurrency import TOPIC, GateStage, event, stop, until


class CountingConsumer(FakeConsumer):
    """Counts every delivery of an offset; ``leaky`` delivers this many messages of a
    partition after it was paused (librdkafka's local queue, before the pause took effect)."""

    def __init__(self, partitions: int = 2, leaky: int = 0) -> None:
        super().__init__(TOPIC, partitions)
        self.deliveries: Counter = Counter()
        self.leaky = leaky
        self._leaks_left: dict = {}

    def pause(self, tps) -> None:
        for tp in tps:
            key = (tp.topic, tp.partition)
            if key not in self.paused:
                self._leaks_left[key] = self.leaky
        super().pause(tps)

    def poll(self, timeout: float):
        with self.lock:
            for key in sorted(self.assigned & self.paused):
                pos = self.positions.get(key, 0)
                if self._leaks_left.get(key) and pos < len(self.log[key]):
                    self._leaks_left[key] -= 1
                    self.positions[key] = pos + 1
                    self.deliveries[(key[1], pos)] += 1
                    return FakeMessage(key[0], key[1], pos, self.log[key][pos])
        msg = super().poll(timeout)
        if msg is not None:
            self.deliveries[(msg.partition(), msg.offset())] += 1
        return msg


class PrefetchStage(GateStage):
    """One at a time; ``prefetch`` records what it prepared, ``handle`` what it was handed."""

    def __init__(self, free: tuple[str, ...] = ()) -> None:
        super().__init__(concurrency=1, free=free)
        self.prefetched: list[str] = []
        self.handed: dict[str, object] = {}
        self.prefetch_gate = threading.Event()
        self.prefetch_gate.set()

    def prefetch(self, ev, message):
        self.prefetch_gate.wait(10)
        self.prefetched.append(ev.job_id)
        return f"audio of {ev.job_id}"

    def handle(self, ev, message, prefetched=None):
        self.handed[ev.job_id] = prefetched.result(5) if prefetched is not None else None
        return super().handle(ev, message)


def run(consumer, stage) -> tuple[StageRunner, threading.Thread, FakeProducer]:
    producer = FakeProducer(consumer)
    runner = StageRunner(Settings(topic_prefix="t."), stage, worker_id="w1", consumer=consumer,
                         producer_factory=lambda: producer)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    return runner, thread, producer


def test_messages_fetched_while_a_job_runs_are_kept_not_fetched_again():
    consumer = CountingConsumer(leaky=2)  # every pause lets two more messages through
    for job in "abcdef":
        consumer.append(0, event(job).encode())
    stage = GateStage(concurrency=1, free=tuple("abcdef"))
    stage.work_s = 0.05
    runner, thread, producer = run(consumer, stage)
    try:
        until(lambda: len(producer.transactions) == 6, what="six commits")
    finally:
        stop(runner, thread)
    assert stage.handled == list("abcdef"), "each job once, in offset order"
    assert producer.outputs() == list("abcdef")
    assert [off for _, off in producer.transactions] == [{(TOPIC, 0): n} for n in range(1, 7)]
    assert set(consumer.deliveries.values()) == {1}, f"an offset was fetched twice: {consumer.deliveries}"
    assert not consumer.seeks(), "nothing rewound"


def test_the_next_job_is_prefetched_while_one_runs_and_handed_to_it():
    consumer = CountingConsumer()
    for job in "abc":
        consumer.append(0, event(job).encode())
    stage = PrefetchStage(free=("c",))
    runner, thread, producer = run(consumer, stage)
    try:
        until(lambda: stage.prefetched == ["b"], what="b prepared while a runs")
        assert stage.finished == [], "a is still running"
        stage.gates["a"].set()
        until(lambda: stage.prefetched == ["b", "c"], what="c prepared while b runs")
        stage.gates["b"].set()
        until(lambda: len(producer.transactions) == 3, what="three commits")
    finally:
        stop(runner, thread)
    assert stage.handed == {"a": None, "b": "audio of b", "c": "audio of c"}
    assert producer.outputs() == list("abc")


def test_a_revoked_partitions_kept_message_and_its_prefetch_are_dropped_and_redone_by_the_owner():
    consumer = CountingConsumer(partitions=1)
    for job in "ab":
        consumer.append(0, event(job).encode())
    stage = PrefetchStage(free=("b",))
    runner, thread, producer = run(consumer, stage)
    try:
        until(lambda: stage.prefetched == ["b"] and runner.kept.prefetch is not None, what="b prepared")
        old = runner.kept.prefetch.future
        consumer.to_revoke = [(TOPIC, 0)]
        until(lambda: not runner.kept and runner.kept.prefetch is None, what="kept b dropped")
        assert old.cancelled() or old.done()
        stage.gates["a"].set()
        until(lambda: "a" in stage.finished, what="a finished")
        time.sleep(0.3)
        assert producer.transactions == [], "the moved partition's job is not committed here"
        stage.gates["a"] = threading.Event()  # a's redo waits until b is kept and prepared again meanwhile
        consumer.to_assign = [(TOPIC, 0)]  # back again: read from the committed offset (none: the start)
        until(lambda: stage.prefetched.count("b") == 2, what="b prepared again during a's redo")
        stage.gates["a"].set()
        until(lambda: len(producer.transactions) == 2, what="a and b committed after the re-assignment")
    finally:
        stop(runner, thread)
    assert producer.outputs() == ["a", "b"]
    assert stage.handled.count("b") == 1 and stage.handed["b"] == "audio of b"
    assert stage.prefetched.count("b") == 2, "the dropped prefetch was not reused for the redelivered message"


def test_a_failed_commit_drops_kept_messages_of_its_partition_and_reads_them_again():
    consumer = CountingConsumer(leaky=3)
    for job in "abc":
        consumer.append(0, event(job).encode())
    consumer.append(1, event("x").encode())
    stage = GateStage(concurrency=1, free=tuple("bcx"))
    runner, thread, producer = run(consumer, stage)
    try:
        until(lambda: len(runner.kept.messages) >= 1 and "a" in stage.handled, what="a running, next kept")
        producer.fail_next_commit = True
        stage.gates["a"].set()
        until(lambda: set(producer.outputs()) == {"a", "b", "c", "x"}, what="everything committed")
    finally:
        stop(runner, thread)
    outputs = producer.outputs()
    assert sorted(outputs) == ["a", "b", "c", "x"], f"each exactly once: {outputs}"
    assert [j for j in outputs if j != "x"] == ["a", "b", "c"]
    assert consumer.offsets == {(TOPIC, 0): 3, (TOPIC, 1): 1}


def test_messages_of_a_partition_assigned_during_a_job_are_taken_after_it():
    consumer = CountingConsumer(partitions=2)
    consumer.append(0, event("a").encode())
    stage = PrefetchStage(free=("z",))
    runner, thread, producer = run(consumer, stage)
    try:
        until(lambda: "a" in stage.handled, what="a running")
        consumer.log[(TOPIC, 2)] = [event("z").encode()]
        consumer.to_assign = [(TOPIC, 2)]
        until(lambda: [m.partition() for m in runner.kept.messages] == [2], what="z kept while a runs")
        stage.gates["a"].set()
        until(lambda: len(producer.transactions) == 2, what="both committed")
    finally:
        stop(runner, thread)
    assert producer.outputs() == ["a", "z"] and stage.handed["z"] == "audio of z"
    assert runner._owned == {(TOPIC, 0), (TOPIC, 1), (TOPIC, 2)}


def test_a_message_delivered_again_without_a_rewind_is_not_handled_twice():
    consumer = CountingConsumer(partitions=1)
    for job in "ab":
        consumer.append(0, event(job).encode())
    stage = GateStage(concurrency=1, free=("a", "b"))
    runner, thread, producer = run(consumer, stage)
    try:
        until(lambda: len(producer.transactions) == 2, what="a and b committed")
        with consumer.lock:
            consumer.positions[(TOPIC, 0)] = 0  # the client hands out offsets 0 and 1 again, unasked
        until(lambda: consumer.deliveries[(0, 1)] == 2, what="both delivered again")
        time.sleep(0.3)
    finally:
        stop(runner, thread)
    assert stage.handled == ["a", "b"] and producer.outputs() == ["a", "b"]
