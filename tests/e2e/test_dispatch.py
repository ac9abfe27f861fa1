"""Dispatch by expected work, and nobody idle while work waits, on the real stack (two transcribers).

Each upload goes to the transcriber expected to finish it first (the work each holds, in engine-seconds,
not a count of jobs); a transcriber about to start a job while more wait behind it hands that job on to an
idle peer, in the transaction that commits its offset: nothing lost, nothing doubled.
"""

from __future__ import annotations

import time

import pytest

from bench.harness import wait_until
from kafscribe.store import session as cassandra_session
from producers.publisher import Publisher
from producers.submission import Submitter
from schemas.events import JobOptions, Result
from tests import audio_clips
from tests.conftest import fresh_settings, make_pipeline
from tests.e2e.test_failover_e2e import settled, worker
from tests.kafka_read import read_topic

pytestmark = [pytest.mark.stack, pytest.mark.slow]
NAMES = ["a", "b"]


@pytest.fixture(scope="module")
def pipe(stack_settings, tmp_path_factory):
    settings = fresh_settings(stack_settings, engine="faster-whisper", model="tiny.en", status_interval_s=1.0,
                              session_timeout_ms=6000, chunk_s=0.0)
    p = make_pipeline(settings, tmp_path_factory, "dispatch")
    for stage in ("ingress", "translator", "sink"):
        p.start(stage)
    for name in NAMES:
        p.start("transcriber", name=name)
    wait_until(lambda: settled(p, NAMES), timeout_s=120, what="two transcribers settled")
    yield p
    p.stop()


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """About 80 s of speech: one job that keeps a tiny.en transcriber busy for seconds."""
    return audio_clips.speak(" ".join([audio_clips.LONG_ENGLISH] * 4), tmp_path_factory.mktemp("dispatch") / "l.wav")


def idle(pipe) -> bool:
    return all((w := worker(pipe, n)) and w["in_flight"] == 0 for n in NAMES)


def results_once(settings, job_ids: list[str]) -> None:
    time.sleep(1)
    results = [e for e in read_topic(settings, "results") if isinstance(e, Result)]
    for job_id in job_ids:
        assert len([r for r in results if r.job_id == job_id]) == 1, job_id


def test_with_one_worker_holding_a_long_job_new_short_jobs_go_to_the_other(pipe, clips, long_clip):
    """Both transcribers hold one job after the first short one: by count it is a tie (and the old rule
    sent every other short job behind the long one); by expected work every short job goes to the
    worker that is not holding 80 s of audio."""
    wait_until(lambda: idle(pipe), what="both transcribers idle")
    long_id = pipe.http.submit(long_clip)["job_id"]
    started = wait_until(lambda: (j := pipe.http.job(long_id))["status"] == "transcribing" and j, timeout_s=60,
                         what="the long job started")
    holder = started["worker_id"]
    other = next(pipe.worker_ids[n] for n in NAMES if pipe.worker_ids[n] != holder)
    shorts = [pipe.http.submit(clips["en"])["job_id"] for _ in range(3)]
    assert pipe.http.job(long_id)["status"] == "transcribing", "the long job ended before the short ones came"
    done = {j: pipe.wait_job(j, timeout_s=120) for j in shorts}
    assert [d["status"] for d in done.values()] == ["completed"] * 3, done
    assert {d["worker_id"] for d in done.values()} == {other}
    long_done = pipe.wait_job(long_id, timeout_s=180)
    assert long_done["status"] == "completed" and long_done["worker_id"] == holder
    results_once(pipe.settings, [long_id, *shorts])


def test_an_idle_worker_takes_a_job_queued_behind_a_busy_one_and_every_job_ends_once(pipe, clips, long_clip):
    """Three jobs produced straight onto one worker's partition (as a stale routing view could) while the
    other is idle: the busy one hands a queued job on; every job completes once, on its first attempt."""
    wait_until(lambda: idle(pipe), timeout_s=120, what="both transcribers idle")
    target = worker(pipe, "a")
    settings = pipe.settings
    session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
    publisher = Publisher(settings)
    try:
        forced = Submitter(settings, session, publisher)
        forced.choose_partition = lambda upload: target["partitions"][0]
        job_ids = [forced.submit(clip, JobOptions()).job_id for clip in (long_clip, clips["en"], clips["en"])]
    finally:
        publisher.close()
        session.cluster.shutdown()
    done = {j: pipe.wait_job(j, timeout_s=180) for j in job_ids}
    assert [d["status"] for d in done.values()] == ["completed"] * 3, done
    assert [d["attempts"] for d in done.values()] == [1, 1, 1]
    ran_on = [d["worker_id"] for d in done.values()]
    assert set(ran_on) == {target["worker_id"], pipe.worker_ids["b"]}, f"no job moved to the idle worker: {ran_on}"
    results_once(settings, job_ids)
