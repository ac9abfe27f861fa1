"""Callback retries wait in delay tiers (not re-produced every second) and deliveries run concurrently.

Real Kafka + Cassandra; the notifier's stages run in-process (StageRunner in a
thread) against a local webhook receiver (tests/fakes.py).
"""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid

import pytest
from confluent_kafka import TopicPartition

from bench.harness import wait_until
from consumers.callback_tiers import RETRY_TOPIC, retry_tiers
from consumers.loop import StageRunner
from consumers.notifier import CallbackRetrier, Notifier
from kafscribe.kafka import clients as kafka_clients
from kafscribe.settings import Settings
from kafscribe.store import session as cassandra_session
from kafscribe.store.callbacks import CallbackStore
from kafscribe.store.jobs import JobStore
from kafscribe.webhooks import signing as webhooks
from schemas.events import CallbackAttempt, JobOptions, Result, Upload, now_ms
from tests.conftest import fresh_settings

# --- on the real stack ------------------------------------------------------------------------

PENDING = 50


def start(runner: StageRunner) -> threading.Thread:
    thread = threading.Thread(target=runner.run, daemon=True, name=runner.stage.name)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def notifier(stack_settings, receiver):
    """The notifier's two stages in this process, on fresh topics; yields their settings."""
    settings = fresh_settings(stack_settings, callback_allow_networks="127.0.0.0/8", callback_timeout_s=10.0,
                              callback_max_attempts=5, callback_concurrency=8, callback_backoff_base_s=600.0)
    session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
    stop = threading.Event()
    runners = [StageRunner(settings, Notifier(settings, session, "w"), "notifier-test"),
               StageRunner(settings, CallbackRetrier(settings, session, "w", stop), "retrier-test")]
    threads = [start(r) for r in runners]
    yield settings
    stop.set()
    for runner in runners:
        runner.stop()
    for thread in threads:
        thread.join(30)
    session.cluster.shutdown()


def attempt(job_id: str, url: str, due_in_s: float) -> CallbackAttempt:
    return CallbackAttempt(
        job_id=job_id, tenant="default", trace_id="t", event_id=webhooks.event_id(job_id, "job.completed"),
        url=url, event_type="job.completed", delivery_attempt=2, not_before=now_ms() + int(due_in_s * 1000),
        body=json.dumps({"type": "job.completed", "data": {"job_id": job_id}}),
    )


@functools.cache
def producer_for(settings: Settings):
    """One warm producer per settings (a new producer's first flush takes ~0.5 s: it would skew timings)."""
    return kafka_clients.producer(settings)


@functools.cache
def stores_for(settings: Settings) -> tuple[JobStore, CallbackStore]:
    session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
    return JobStore(session), CallbackStore(session)


def register(settings: Settings, event) -> None:
    """What the pipeline would have stored before ``event``: the finished job (its callback URL) and, for a
    retry, the callback event the notifier stored at its first attempt (stages refuse events for no job)."""
    jobs, callbacks = stores_for(settings)
    url = event.url if isinstance(event, CallbackAttempt) else event.options.callback_url
    upload = Upload(job_id=event.job_id, tenant=event.tenant, blob_ref="file:none", audio_sha256="0" * 64,
                    audio_bytes=1, audio_duration=1.0, options=JobOptions(callback_url=url))
    jobs.create(upload)
    jobs.save_result(Result(job_id=event.job_id, tenant=event.tenant, status="completed", options=upload.options))
    if isinstance(event, CallbackAttempt):
        callbacks.save_event(event)


def produce(settings: Settings, topic: str, events, partition: int | None = None) -> None:
    for ev in events:
        register(settings, ev)
    producer = producer_for(settings)
    for ev in events:
        kwargs = {} if partition is None else {"partition": partition}
        producer.produce(settings.topic(topic), key=ev.job_id.encode(), value=ev.encode(), **kwargs)
    assert producer.flush(10) == 0


def retry_topics_size(settings: Settings) -> tuple[int, int]:
    """(messages, bytes) committed on every retry topic so far."""
    consumer = kafka_clients.consumer(settings, f"size-{uuid.uuid4()}")
    parts = []
    for name, _ in retry_tiers():
        topic = settings.topic(name)
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        parts += [TopicPartition(topic, p, 0) for p in meta.partitions]
    ends = {(tp.topic, tp.partition): consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in parts}
    consumer.assign(parts)
    count = size = 0
    done: set = {k for k, end in ends.items() if end == 0}
    deadline = time.monotonic() + 20
    while len(done) < len(ends) and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is None:
            for tp in consumer.position(parts):
                if tp.offset >= ends[(tp.topic, tp.partition)]:
                    done.add((tp.topic, tp.partition))
            continue
        if msg.error():
            continue
        count, size = count + 1, size + len(msg.value())
        if msg.offset() + 1 >= ends[(msg.topic(), msg.partition())]:
            done.add((msg.topic(), msg.partition()))
    consumer.close()
    return count, size


@pytest.fixture(scope="module")
def pending(notifier, receiver):
    """50 retries due 45 s to ~5 min from now, 5 s apart: they wait in every tier while the tests run."""
    events = [attempt(f"pending-{i}-{uuid.uuid4().hex[:6]}", receiver.url + "/pending", 45 + 5 * i)
              for i in range(PENDING)]
    produce(notifier, RETRY_TOPIC, events)
    wait_until(lambda: retry_topics_size(notifier)[0] >= 2 * PENDING, 30, "pending retries forwarded to tiers")
    return events


def lateness(receiver, events) -> dict[str, float]:
    """Seconds between each delivered event's due time and its arrival at the receiver."""
    due = {ev.job_id: ev.not_before / 1000 for ev in events}
    return {job: r["received_at"] - due[job] for job in due for r in receiver.for_job(job)}


def assert_on_time(receiver, events) -> dict[str, float]:
    """Each delivered attempt arrived no earlier than due and within 2 s; none due >3 s ago is missing."""
    late = lateness(receiver, events)
    assert all(-0.05 <= v < 2.0 for v in late.values()), late
    overdue = [ev.job_id for ev in events if ev.not_before / 1000 < time.time() - 3 and ev.job_id not in late]
    assert overdue == []
    return late


@pytest.mark.stack
def test_a_due_retry_goes_out_within_2s_of_its_time_however_many_are_pending(notifier, receiver, pending):
    events = [attempt(f"due-{s}-{uuid.uuid4().hex[:6]}", receiver.url + "/due", s) for s in (0.5, 8, 35)]
    produce(notifier, RETRY_TOPIC, events)
    for ev in events:
        wait_until(lambda ev=ev: receiver.for_job(ev.job_id), 60, f"delivery of {ev.job_id}")
    late = assert_on_time(receiver, events)
    print("lateness of due retries (s):", sorted(round(v, 3) for v in late.values()))
    assert_on_time(receiver, pending)


@pytest.mark.stack
def test_pending_retries_do_not_churn_the_retry_topics(notifier, receiver, pending):
    # 25 s is enough to see churn: the old loop re-produced every pending retry about once a second.
    before = retry_topics_size(notifier)
    time.sleep(25)
    after = retry_topics_size(notifier)
    grown, grown_bytes = after[0] - before[0], after[1] - before[1]
    late = assert_on_time(receiver, pending)
    print(f"{PENDING} pending retries, 25 s: +{grown} messages, +{grown_bytes} bytes on the retry topics;"
          f" {len(late)} delivered so far, lateness max {max(late.values(), default=0):.3f} s")
    # Bounded by the tiers: each retry costs a message per tier it passes (at most 30 over 10 h). The old
    # loop re-produced a not-yet-due retry about once a second per partition, for as long as any was pending.
    assert grown <= 4 * PENDING, grown


def events_for(stage: str, receiver, jobs: dict[str, str]) -> tuple[str, list]:
    """(logical topic, events) that make ``stage`` deliver each job's callback to its path."""
    if stage == "notifier":
        return Notifier.input_topic, [
            Result(job_id=job, tenant="default", trace_id="t", status="completed",
                   options=JobOptions(callback_url=receiver.url + path)) for job, path in jobs.items()]
    return RETRY_TOPIC, [attempt(job, receiver.url + path, 0) for job, path in jobs.items()]


def delivery_s(settings: Settings, receiver, topic: str, event) -> float:
    """Seconds from producing ``event`` (partition 0) until its callback reached the receiver."""
    sent = time.time()
    produce(settings, topic, [event], partition=0)
    (request,) = wait_until(lambda: receiver.for_job(event.job_id), 30, f"delivery of {event.job_id}")
    return request["received_at"] - sent


@pytest.mark.stack
@pytest.mark.parametrize("stage", ["notifier", "callback-retry"])
def test_a_hanging_receiver_delays_no_other_receiver(notifier, receiver, stage):
    receiver.hang["/hang"] = 10.0
    tag = uuid.uuid4().hex[:6]
    topic, (alone, slow, fast) = events_for(
        stage, receiver, {f"alone-{tag}": "/fast", f"slow-{tag}": "/hang", f"fast-{tag}": "/fast"})
    baseline = delivery_s(notifier, receiver, topic, alone)
    produce(notifier, topic, [slow], partition=0)  # same partition: the worst case for in-order commits
    wait_until(lambda: receiver.for_job(slow.job_id), 30, "the hanging delivery started")
    beside = delivery_s(notifier, receiver, topic, fast)
    (hanging,) = receiver.for_job(slow.job_id)
    print(f"{stage}: delivery alone {baseline:.3f} s, beside a receiver hanging 10 s {beside:.3f} s")
    assert beside < 1.0
    assert receiver.for_job(fast.job_id)[0]["received_at"] < hanging["received_at"] + 10.0  # while it hung
