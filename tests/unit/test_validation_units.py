"""The validation rules, the admission capacity and the routing filter, on synthetic events (no servers)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from kafscribe.kafka.routing import choose_partition
from kafscribe.kafka.workers import check_worker_status, classify
from kafscribe.settings import Settings
from kafscribe.speech import memory
from kafscribe.validation import check_event, is_job_id
from producers.submission import SubmissionError, parse_options
from schemas.events import CallbackAttempt, JobOptions, Result, Segment, Upload, WorkerStatus

NOW = 1_800_000_000_000
SETTINGS = Settings(model="tiny.en", max_audio_s=3600.0, max_clock_skew_s=300.0)
GOOD = Upload(job_id="job-1", blob_ref="cassandra:job-1", audio_sha256="a" * 64, audio_bytes=1000,
              audio_duration=12.5, produced_at=NOW)


def test_a_good_upload_passes():
    assert check_event(SETTINGS, "uploads", GOOD, NOW) is None
    assert check_event(SETTINGS, "uploads", replace(GOOD, options=JobOptions(model="base", language="de")), NOW) is None


@pytest.mark.parametrize(("changes", "reason"), [
    ({"audio_duration": math.nan}, "audio_duration nan"),
    ({"audio_duration": -1.0}, "audio_duration -1.0"),
    ({"audio_duration": 0.0}, "audio_duration 0.0"),
    ({"audio_duration": math.inf}, "audio_duration inf"),
    ({"audio_duration": 3601.0}, "KAFSCRIBE_MAX_AUDIO_S"),
    ({"audio_bytes": 0}, "audio_bytes 0"),
    ({"audio_bytes": 10**12}, "audio_bytes"),
    ({"audio_sha256": "A" * 64}, "audio_sha256"),
    ({"blob_ref": ""}, "blob_ref is empty"),
    ({"job_id": ""}, "is not a valid id"),
    ({"job_id": "a/b"}, "is not a valid id"),
    ({"job_id": "x" * 129}, "is not a valid id"),
    ({"tenant": ""}, "tenant"),
    ({"attempt": -1}, "attempt -1"),
    ({"produced_at": NOW + 301_000}, "in the future"),
    ({"produced_at": -5}, "produced_at -5"),
    ({"options": JobOptions(model="large-v3")}, "model='large-v3' is not served here"),
    ({"options": JobOptions(model="/srv/models/evil")}, "is not served here"),
    ({"options": JobOptions(task="dance")}, "task='dance'"),
    ({"options": JobOptions(language="xx")}, "language='xx'"),
    ({"options": JobOptions(translate_to="klingon")}, "translate_to='klingon'"),
])
def test_bad_uploads_are_refused_with_the_reason(changes, reason):
    got = check_event(SETTINGS, "uploads", replace(GOOD, **changes), NOW)
    assert got is not None and reason in got, got


# The same option values as the door receives them (form strings) and as a direct producer's Upload carries them.
SAME_REFUSALS = [
    ({"task": "dance"}, JobOptions(task="dance")),
    ({"language": "xx"}, JobOptions(language="xx")),
    ({"translate_to": "klingon"}, JobOptions(translate_to="klingon")),
    ({"model": "large-v3"}, JobOptions(model="large-v3")),
    ({"model": "/srv/models/evil"}, JobOptions(model="/srv/models/evil")),
    ({"prompt": "x" * 1000}, JobOptions(prompt="x" * 1000)),
    ({"prompt": "a\x1bb"}, JobOptions(prompt="a\x1bb")),
    ({"temperature": "1.5"}, JobOptions(temperature=1.5)),
    ({"temperature": "-0.1"}, JobOptions(temperature=-0.1)),
    ({"temperature": "nan"}, JobOptions(temperature=math.nan)),
]


@pytest.mark.parametrize(("raw", "options"), SAME_REFUSALS, ids=[repr(raw)[:40] for raw, _ in SAME_REFUSALS])
def test_the_door_and_the_workers_refuse_the_same_options_with_the_same_words(raw, options):
    """One rule (``kafscribe.validation.check_options``): a value the door refuses with a 422, a worker
    refuses in a direct producer's Upload (the job fails), and the client reads the same reason."""
    with pytest.raises(SubmissionError) as door:
        parse_options(raw, SETTINGS)
    worker = check_event(SETTINGS, "uploads", replace(GOOD, options=options), NOW)
    assert door.value.status == 422 and door.value.reason == worker, (door.value.reason, worker)


def test_the_door_and_the_workers_accept_the_same_options():
    for raw, options in [({"task": "translate", "language": "de", "translate_to": "en", "model": "base"},
                          JobOptions(task="translate", language="de", translate_to="en", model="base")),
                         ({"prompt": "Kafscribe", "temperature": "0.3"}, JobOptions(prompt="Kafscribe", temperature=0.3))]:
        assert parse_options(raw, SETTINGS) == options
        assert check_event(SETTINGS, "uploads", replace(GOOD, options=options), NOW) is None


def test_clock_skew_within_the_setting_is_accepted():
    assert check_event(SETTINGS, "uploads", replace(GOOD, produced_at=NOW + 299_000), NOW) is None


def test_allowed_models_are_the_operators_list():
    assert Settings(model="base").allowed_model_names() == {"base", "tiny.en"}
    listed = Settings(model="base", allowed_models="tiny.en, /models/mine")
    assert listed.allowed_model_names() == {"base", "tiny.en", "/models/mine"}
    assert check_event(listed, "uploads", replace(GOOD, options=JobOptions(model="/models/mine")), NOW) is None


def test_wrong_event_type_for_the_topic():
    result = Result(job_id="job-1", status="completed", produced_at=NOW)
    assert "expected Upload events on uploads, got Result" in check_event(SETTINGS, "uploads", result, NOW)
    assert check_event(SETTINGS, "results", result, NOW) is None
    assert "status 'done'" in check_event(SETTINGS, "results", replace(result, status="done"), NOW)
    bad_segment = replace(result, segments=[Segment(id=3, start=2.0, end=math.nan, text="x")])
    assert "segment 3" in check_event(SETTINGS, "results", bad_segment, NOW)
    attempt = CallbackAttempt(job_id="job-1", event_id="e", url="http://x", event_type="job.completed", body="{}",
                              delivery_attempt=0, not_before=NOW, produced_at=NOW)
    assert "delivery_attempt 0" in check_event(SETTINGS, "callbacks.retry", attempt, NOW)


def test_a_rule_that_cannot_read_a_value_refuses_instead_of_raising():
    weird = replace(GOOD, options=None)  # not possible from Avro; a bug elsewhere must still not crash the loop
    assert check_event(SETTINGS, "uploads", weird, NOW).startswith("invalid event: AttributeError")


def test_job_ids():
    assert is_job_id("0f3c" * 8) and is_job_id("tenant:job.1")
    assert not is_job_id("") and not is_job_id("a b") and not is_job_id("a\nb") and not is_job_id(None)


def status(worker_id="w", partitions=(0,), age_s=1.0, **changes) -> WorkerStatus:
    s = WorkerStatus(job_id="", worker_id=worker_id, host="h", pid=1, stage="transcriber", state="running",
                     rss_bytes=2**30, host_mem_available=8 * 2**30, host_mem_total=16 * 2**30,
                     partitions=list(partitions), produced_at=NOW - int(age_s * 1000))
    return replace(s, **changes)


@pytest.mark.parametrize(("changes", "reason"), [
    ({"partitions": [999]}, "partitions [999]"),
    ({"partitions": [-1]}, "partitions [-1]"),
    ({"partitions": [1, 1]}, "distinct"),
    ({"produced_at": NOW + 3600_000}, "in the future"),
    ({"state": "zombie"}, "state 'zombie'"),
    ({"rss_bytes": -1}, "rss_bytes -1"),
    ({"in_flight": -3}, "in_flight -3"),
    ({"worker_id": ""}, "worker_id"),
    ({"worker_id": "w" * 129}, "1-128 characters"),
    ({"worker_id": "w\nforged=\"1\""}, "only letters, digits"),
    ({"worker_id": "-w"}, "start with a letter or digit"),
])
def test_bad_worker_statuses_are_ignored_by_the_view(changes, reason):
    assert check_worker_status(SETTINGS, status(), 4, NOW) is None
    got = check_worker_status(SETTINGS, status(**changes), 4, NOW)
    assert got is not None and reason in got, got


def test_worker_ids_of_every_stage_pass_and_odd_ones_are_refused():
    from kafscribe.kafka.workers import check_worker_id

    for good in ("transcriber-host.example.com-4242", "chunks@transcriber-ip-10-0-0-1-17",
                 "notifier-h-1-callback-retry", "t:1", "x" * 128):
        assert check_worker_id(good) is None, good
    for bad in ("", "x" * 129, "a b", "a\tb", "ü", "a/b", "{x}", '"', None, 7):
        assert check_worker_id(bad) is not None, bad


def test_routing_never_picks_a_partition_the_topic_lacks_nor_a_status_from_the_future():
    liar = status("liar", partitions=(999,), host_mem_available=2**45)
    future = status("future", partitions=(3,), age_s=-3600, host_mem_available=2**45)
    honest = status("honest", partitions=(1, 2))
    workers = classify([liar, future, honest], NOW, 30, partition_count=4)
    assert {w.status.worker_id: w.liveness for w in workers}["future"] == "stale"
    assert choose_partition(workers, 2**20)[1] == "honest"
    assert choose_partition(classify([liar], NOW, 30, partition_count=4), 2**20) is None


def test_idle_capacity():
    gib = 2**30
    assert memory.idle_capacity_bytes(4 * gib, 1 * gib, 64 * gib, None) == 3 * gib  # budget: minus own RSS
    assert memory.idle_capacity_bytes(0, 1 * gib, 64 * gib, None) == 63 * gib  # host: all but own RSS
    assert memory.idle_capacity_bytes(0, 1 * gib, 64 * gib, 16 * gib) == 16 * gib  # the whole GPU
    assert memory.idle_capacity_bytes(0, 1 * gib, 64 * gib, 80 * gib) == 63 * gib  # ... or the host, if smaller
    assert memory.idle_capacity_bytes(300 * 2**20, 1 * gib, 64 * gib, None) < 0  # capped below its RSS


def test_job_time_limit_grows_with_duration():
    s = Settings(job_time_limit_min_s=300.0, job_time_limit_factor=10.0)
    assert s.job_time_limit_s(0) == 300.0 and s.job_time_limit_s(60) == 900.0
