"""Cassandra stopped for 20 s while jobs are in flight and arriving: nothing lost, nothing twice."""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest

from infra import stack
from infra.process import ServerProcess
from producers.client import HttpError
from schemas.events import Result
from tests.conftest import fresh_settings, make_pipeline
from tests.kafka_read import read_topic

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.side]


def submit_once_accepted(pipe, clip, timeout_s: float) -> str:
    """Submit until the ingress accepts (503 meanwhile, nothing else); the job id."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return pipe.http.submit(clip)["job_id"]
        except HttpError as err:
            assert err.status == 503, err
            assert time.monotonic() < deadline, f"ingress still refusing after {timeout_s}s"
            time.sleep(1)


def assert_each_completed_once(pipe, job_ids: list[str]) -> None:
    """Every job completed, with exactly one committed Result each, and no worker died."""
    done = {j: pipe.wait_job(j, timeout_s=300) for j in job_ids}
    assert [d["status"] for d in done.values()] == ["completed"] * len(job_ids), done
    time.sleep(1)
    results = [e for e in read_topic(pipe.settings, "results") if isinstance(e, Result)]
    for job_id in job_ids:
        assert len([r for r in results if r.job_id == job_id]) == 1, job_id
    assert all(pipe.alive(name) for name in ("transcriber", "translator", "sink", "notifier"))


@contextmanager
def outage_with_jobs_in_flight(stack_settings, tmp_path_factory, clips, server: str):
    """A pipeline with 3 jobs submitted (the first one transcribing), then ``server`` stopped.

    Yields (pipeline, job ids); the server is restarted afterwards if the test has not done so.
    """
    settings = fresh_settings(stack_settings, engine="faster-whisper", model="base", retry_after_s=1)
    pipe = make_pipeline(settings, tmp_path_factory, server).start_all()
    proc = ServerProcess(server, settings.state_dir)
    try:
        before = [pipe.http.submit(clips["long"] if i == 0 else clips["en"])["job_id"] for i in range(3)]
        pipe.wait_job(before[0], statuses=("transcribing", "completed"))
        assert proc.stop(60), f"the test stack's {server} must be ours to stop"
        yield pipe, before
    finally:
        if not proc.alive():
            stack.up(settings, log=lambda line: None)
        pipe.stop()


def test_cassandra_outage_loses_no_job(stack_settings, tmp_path_factory, clips):
    with outage_with_jobs_in_flight(stack_settings, tmp_path_factory, clips, "cassandra") as (pipe, before):
        outage_started = time.monotonic()
        refused = 0
        during: list[str] = []
        while time.monotonic() - outage_started < 20:
            try:
                during.append(pipe.http.submit(clips["en"])["job_id"])
            except HttpError as err:
                assert err.status == 503, err
                refused += 1
            time.sleep(1)
        assert refused > 0, "the ingress must answer 503 while Cassandra is down"
        stack.up(pipe.settings, log=lambda line: None)

        after = submit_once_accepted(pipe, clips["en"], timeout_s=60)  # the ingress reconnects
        assert_each_completed_once(pipe, before + during + [after])


def test_kafka_broker_restart_loses_no_job(stack_settings, tmp_path_factory, clips):
    with outage_with_jobs_in_flight(stack_settings, tmp_path_factory, clips, "kafka") as (pipe, before):
        with pytest.raises(HttpError) as err:  # no broker: nothing is accepted
            pipe.http.submit(clips["en"])
        assert err.value.status == 503
        stack.up(pipe.settings, log=lambda line: None)

        after = submit_once_accepted(pipe, clips["en"], timeout_s=90)
        assert_each_completed_once(pipe, before + [after])
