"""Nothing lost: memory-aware routing, admission, worker liveness, and kill -9 under load."""

from __future__ import annotations

import json
import signal
import time

import pytest

from bench.harness import wait_until
from kafscribe.store import session as cassandra_session
from producers.publisher import Publisher
from producers.submission import Submitter
from schemas.events import JobOptions, Result
from tests.conftest import fresh_settings, make_pipeline
from tests.fakes import WebhookReceiver
from tests.kafka_read import read_topic

pytestmark = [pytest.mark.stack, pytest.mark.slow]
GIB = 1024**3


def workers(pipe) -> list[dict]:
    status, body, _ = pipe.http._request("GET", "/v1/workers")
    assert status == 200, body
    return json.loads(body)["workers"]


def worker(pipe, name: str) -> dict | None:
    """The status of the named worker's current incarnation, or None before it has published one.

    A restarted worker has a new id while the dead incarnation's status stays in the view until it is
    stale: picking by name alone would race the restart the test itself caused.
    """
    current = pipe.worker_ids[name]
    return next((w for w in workers(pipe) if w["worker_id"] == current), None)



def settled(pipe, names: list[str]) -> bool:
    """Every named transcriber is live and owns partitions, and together they own all of them."""
    ws = [worker(pipe, n) for n in names]
    if any(w is None or w["state"] != "live" or not w["partitions"] for w in ws):
        return False
    owned = sorted(p for w in ws for p in w["partitions"])
    return owned == list(range(pipe.settings.uploads_partitions))


@pytest.fixture(scope="module")
def pipe(stack_settings, tmp_path_factory):
    settings = fresh_settings(stack_settings, engine="faster-whisper", model="base", status_interval_s=1.0,
                              worker_stale_s=4.0, throttle_leave_s=2.0, session_timeout_ms=6000)
    p = make_pipeline(settings, tmp_path_factory, "routing")
    for stage in ("ingress", "translator", "sink"):
        p.start(stage)
    p.start("transcriber", name="roomy", KAFSCRIBE_MEMORY_BUDGET_BYTES=str(8 * GIB))
    p.start("transcriber", name="modest", KAFSCRIBE_MEMORY_BUDGET_BYTES=str(3 * GIB))
    wait_until(lambda: settled(p, ["roomy", "modest"]), what="two transcribers settled")
    yield p
    p.stop()


def test_workers_report_memory_partitions_and_model(pipe):
    roomy = worker(pipe, "roomy")
    assert roomy["stage"] == "transcriber" and roomy["model"] == "base"
    assert roomy["memory"]["budget"] == 8 * GIB
    assert 0 < roomy["memory"]["rss"] < roomy["memory"]["budget"]
    assert roomy["memory"]["headroom"] == 8 * GIB - roomy["memory"]["rss"]
    stages = {w["stage"] for w in workers(pipe)}
    assert {"transcriber", "translator", "sink"} <= stages


def test_between_workers_expected_to_finish_together_more_headroom_wins(pipe, clips):
    """Both idle, neither has measured its speed yet: a tie on the expected finish, broken by headroom
    (jobs that follow go to whichever is expected to finish first: tests/e2e/test_dispatch.py)."""
    roomy_id = worker(pipe, "roomy")["worker_id"]
    done = pipe.wait_job(pipe.http.submit(clips["en"])["job_id"])
    assert done["status"] == "completed" and done["worker_id"] == roomy_id


def test_worker_capped_below_the_estimate_takes_no_job(pipe, clips):
    pipe.start("transcriber", name="capped", KAFSCRIBE_MEMORY_BUDGET_BYTES=str(100 * 1024**2))
    wait_until(lambda: settled(pipe, ["roomy", "modest", "capped"]), what="three transcribers settled")
    capped = worker(pipe, "capped")
    assert capped["memory"]["headroom"] < 0

    # Routed through the ingress: never to the capped worker.
    job_ids = [pipe.http.submit(clips["en"])["job_id"] for _ in range(3)]
    # Produced straight onto a partition the capped worker owns: it waits for memory,
    # then leaves the group, and the job completes elsewhere.
    settings = pipe.settings
    session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
    publisher = Publisher(settings)
    forced = Submitter(settings, session, publisher)
    forced.choose_partition = lambda upload: capped["partitions"][0]
    job_ids.append(forced.submit(clips["en"], JobOptions()).job_id)
    publisher.close()
    session.cluster.shutdown()

    done = [pipe.wait_job(j, timeout_s=120) for j in job_ids]
    assert all(j["status"] == "completed" for j in done), done
    assert capped["worker_id"] not in {j["worker_id"] for j in done}
    assert done[-1]["attempts"] == 1
    assert pipe.alive("capped")


def test_sigterm_shows_stopped_and_kill_shows_stale(pipe):
    pipe.kill("capped", signal.SIGTERM)
    assert wait_until(lambda: (w := worker(pipe, "capped")) and w["state"] == "stopped" and w)
    pipe.kill("modest", signal.SIGKILL)
    stale = wait_until(lambda: (w := worker(pipe, "modest")) and w["state"] == "stale" and w, timeout_s=30)
    assert time.time() * 1000 - stale["last_seen"] > pipe.settings.worker_stale_s * 1000


def test_kill_9_under_load_loses_and_duplicates_nothing(stack_settings, tmp_path_factory, clips):
    settings = fresh_settings(stack_settings, engine="faster-whisper", model="base", status_interval_s=1.0,
                              session_timeout_ms=6000, callback_allow_networks="127.0.0.0/8")
    receiver = WebhookReceiver()
    pipe = make_pipeline(settings, tmp_path_factory, "kill9")
    try:
        for stage in ("ingress", "translator", "sink", "notifier"):
            pipe.start(stage)
        names = ["w1", "w2", "w3"]
        for name in names:
            pipe.start("transcriber", name=name)
        wait_until(lambda: settled(pipe, names), what="three transcribers settled")

        job_ids = [
            pipe.http.submit(clips["long" if i % 3 == 0 else "en"], callback_url=receiver.url + "/k")["job_id"]
            for i in range(10)
        ]
        victim_job = wait_until(lambda: next(
            (j for j in map(pipe.http.job, job_ids) if j["status"] == "transcribing"), None))
        victim = next(n for n in names if victim_job["worker_id"].startswith(n + "-"))
        pipe.kill(victim, signal.SIGKILL)

        done = {j: pipe.wait_job(j, timeout_s=300) for j in job_ids}
        assert [d["status"] for d in done.values()] == ["completed"] * 10
        redone = done[victim_job["job_id"]]
        assert redone["attempts"] == 2 and not redone["worker_id"].startswith(victim + "-")

        wait_until(lambda: all(receiver.for_job(j) for j in job_ids), what="callbacks")
        time.sleep(2)
        results = [e for e in read_topic(settings, "results") if isinstance(e, Result)]
        for job_id in job_ids:
            assert len([r for r in results if r.job_id == job_id]) == 1, job_id
            deliveries = receiver.for_job(job_id)
            assert len(deliveries) == 1, job_id
    finally:
        pipe.stop()
        receiver.close()


def test_kill_9_drill_five_victims_every_job_once_no_stranded_partition(stack_settings, tmp_path_factory, clips):
    """3 transcribers; 5 times, a job is forced onto a worker (each in turn) and that worker is
    killed with kill -9 mid-job and started again. Every job completes once; the group ends with no lag
    on any partition (none left under an idle owner)."""
    from tests.e2e.test_loop_rebalance import group_lag

    settings = fresh_settings(stack_settings, engine="faster-whisper", model="tiny.en", status_interval_s=1.0,
                              worker_stale_s=4.0, session_timeout_ms=6000)
    pipe = make_pipeline(settings, tmp_path_factory, "drill")
    session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
    publisher = Publisher(settings)
    try:
        for stage in ("ingress", "translator", "sink"):
            pipe.start(stage)
        names = ["w1", "w2", "w3"]
        for name in names:
            pipe.start("transcriber", name=name)
        job_ids: list[str] = []
        mid_job = 0
        for round_no in range(5):
            victim = names[round_no % 3]
            target = wait_until(lambda v=victim: settled(pipe, names) and worker(pipe, v), timeout_s=120,
                                what=f"round {round_no}: three transcribers settled")
            forced = Submitter(settings, session, publisher)
            forced.choose_partition = lambda upload, p=target["partitions"][0]: p
            victim_job = forced.submit(clips["long"], JobOptions()).job_id
            job_ids += [victim_job, pipe.http.submit(clips["en"])["job_id"]]
            started = wait_until(lambda j=victim_job: (job := pipe.http.job(j))["status"] != "queued" and job,
                                 timeout_s=120, what=f"round {round_no}: the victim's job started")
            pipe.kill(victim, signal.SIGKILL)
            assert started["worker_id"] == target["worker_id"], "the job ran on the victim"
            mid_job += started["status"] == "transcribing"
            pipe.start("transcriber", name=victim)

        done = {j: pipe.wait_job(j, timeout_s=300) for j in job_ids}
        assert [d["status"] for d in done.values()] == ["completed"] * len(job_ids), done
        assert mid_job >= 3, f"only {mid_job} of 5 kills landed mid-job"
        time.sleep(1)
        results = [e for e in read_topic(settings, "results") if isinstance(e, Result)]
        for job_id in job_ids:
            assert len([r for r in results if r.job_id == job_id]) == 1, job_id
        lag = wait_until(lambda: (lag := group_lag(settings)) and not any(lag.values()) and lag, timeout_s=60,
                         what="no uploads partition left with lag")
        assert set(lag) == set(range(settings.uploads_partitions))
    finally:
        publisher.close()
        session.cluster.shutdown()
        pipe.stop()
