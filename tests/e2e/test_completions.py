"""The ingress's watch of ``finished`` (producers/completions.py) on the real broker: a waiting request is
woken by its job's outcome event, not by another job's, and leaves nothing registered behind."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.harness import wait_until
from kafscribe.kafka import clients as kafka_clients
from producers.completions import Completions
from schemas.events import Result

pytestmark = [pytest.mark.stack]


def publish_outcome(settings, job_id: str) -> None:
    producer = kafka_clients.producer(settings)
    producer.produce(settings.topic("finished"), key=job_id.encode(),
                     value=Result(job_id=job_id, status="completed").encode())
    assert producer.flush(30) == 0


def test_a_waiter_is_woken_by_its_jobs_outcome_only(isolated):
    watch = Completions(isolated)
    try:
        wait_until(watch.following.is_set, timeout_s=30, what="the watch follows every partition")

        async def scenario() -> tuple[bool, float]:
            with watch.watching("job-a") as seen_a, watch.watching("job-b") as seen_b:
                await asyncio.to_thread(publish_outcome, isolated, "job-b")
                await asyncio.wait_for(seen_b.wait(), 20)
                assert not seen_a.is_set(), "another job's outcome woke this waiter"
                began = time.monotonic()
                await asyncio.to_thread(publish_outcome, isolated, "job-a")
                await asyncio.wait_for(seen_a.wait(), 20)
                return seen_a.is_set(), time.monotonic() - began

        woken, _ = asyncio.run(scenario())
        assert woken
        assert watch.watched() == 0, "a finished wait left its registration behind"
    finally:
        watch.close()


def test_an_outcome_published_before_the_watch_started_is_not_replayed(isolated):
    """The watch reads from the end: a waiter relies on its first read of the job store for the past."""
    publish_outcome(isolated, "job-old")
    watch = Completions(isolated)
    try:
        wait_until(watch.following.is_set, timeout_s=30, what="the watch follows every partition")

        async def scenario() -> bool:
            with watch.watching("job-old") as seen:
                try:
                    await asyncio.wait_for(seen.wait(), 2)
                except TimeoutError:
                    return False
                return True

        assert asyncio.run(scenario()) is False
    finally:
        watch.close()
