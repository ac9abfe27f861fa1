"""Job store and retention on the real Cassandra: listing, cancel, delete, TTLs, the audio sweep."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from kafscribe.statuses import CANCELLED, COMPLETED, FAILED, QUEUED, TRANSCRIBING
from kafscribe.store import blobs as blobstore
from kafscribe.store.jobs import JobStore
from kafscribe.store.retention import AudioSweeper, delete_job
from schemas.events import Result, Segment, Upload

pytestmark = pytest.mark.stack


def listed(jobs: JobStore, tenant: str, **kwargs):
    """A page of the tenant's listing, as the ingress reads it."""
    return asyncio.run(jobs.list_jobs_async(tenant, **kwargs))


def _job(jobs: JobStore, tenant: str, blob_ref: str = "file:none") -> str:
    job_id = uuid.uuid4().hex
    jobs.create(Upload(job_id=job_id, tenant=tenant, blob_ref=blob_ref, audio_sha256="a", audio_bytes=1,
                       audio_duration=1.0))
    return job_id


def test_list_is_the_tenants_newest_first_with_cursor_and_status_filter(session):
    jobs = JobStore(session)
    tenant, other = f"list-{uuid.uuid4().hex[:8]}", f"list-{uuid.uuid4().hex[:8]}"
    ids = [_job(jobs, tenant) for _ in range(7)]
    _job(jobs, other)
    jobs.transition(ids[1], FAILED, error="x")
    jobs.transition(ids[4], FAILED, error="y")

    page, cursor = listed(jobs, tenant, limit=3)
    seen = [j["job_id"] for j in page]
    while cursor is not None:
        page, cursor = listed(jobs, tenant, limit=3, before=cursor)
        seen += [j["job_id"] for j in page]
    assert seen == list(reversed(ids))  # every job once, newest first, none of the other tenant's

    failed, end = listed(jobs, tenant, limit=10, status=FAILED)
    assert [j["job_id"] for j in failed] == [ids[4], ids[1]] and end is None
    assert listed(jobs, f"none-{uuid.uuid4().hex[:8]}", limit=5) == ([], None)


def test_cancel_sticks_against_late_worker_writes_and_refuses_finished_jobs(session):
    jobs = JobStore(session)
    job_id = _job(jobs, "cancels")
    row_before = jobs.session.execute(jobs._status, (job_id,)).one()  # a worker read the job as queued ...
    assert jobs.cancel(job_id) is True
    assert jobs.is_cancelled(job_id) and jobs.get(job_id)["status"] == CANCELLED
    # ... and its status write lands after the cancel (the race a read-then-write cannot close): the mark wins
    jobs._move(job_id, row_before, TRANSCRIBING, "late-worker", 1, None)
    assert jobs.get(job_id)["status"] == CANCELLED
    # later writes read the mark and are refused
    assert jobs.transition(job_id, TRANSCRIBING, worker_id="w") is False
    assert jobs.finished_status(job_id) == CANCELLED
    assert jobs.start_attempt(job_id, TRANSCRIBING, "w2") >= 1 and jobs.get(job_id)["status"] == CANCELLED
    assert jobs.save_result(Result(job_id=job_id, status=COMPLETED, text="late")) is False
    assert jobs.get_result(job_id) is None
    assert jobs.cancel(job_id) is False  # once

    done = _job(jobs, "cancels")
    jobs.transition(done, FAILED, error="bad audio")
    assert jobs.cancel(done) is False and jobs.get(done)["status"] == FAILED
    assert jobs.is_cancelled(uuid.uuid4().hex) is False


def test_finished_rows_carry_the_result_ttl(session):
    jobs = JobStore(session)
    ttl = jobs.result_ttl_s()
    assert ttl > 0  # the bootstrap set results' default TTL from KAFSCRIBE_RESULT_TTL_S
    job_id = _job(jobs, "ttl")
    assert session.execute("SELECT TTL(status) AS t FROM jobs WHERE job_id=%s", (job_id,)).one().t is None
    jobs.save_result(Result(job_id=job_id, status=COMPLETED, text="hi", duration=1.0,
                            segments=[Segment(id=0, start=0, end=1, text="hi")]))
    for table, column in (("jobs", "tenant"), ("jobs", "status"), ("results", "text"), ("segments", "text")):
        got = session.execute(f"SELECT TTL({column}) AS t FROM {table} WHERE job_id=%s", (job_id,)).one().t
        assert got is not None and ttl - 120 < got <= ttl, (table, got)


@pytest.mark.parametrize("scheme", ["cassandra", "file"])
def test_delete_removes_audio_result_and_rows(stack_settings, session, tmp_path, scheme):
    settings = stack_settings.with_(blob_dir=tmp_path)
    jobs = JobStore(session)
    blob_id = uuid.uuid4().hex
    ref = blobstore.open_store(settings, session, scheme=scheme).put(blob_id, b"RIFF....")
    tenant = f"del-{uuid.uuid4().hex[:8]}"
    job_id = _job(jobs, tenant, blob_ref=ref)
    jobs.save_result(Result(job_id=job_id, status=COMPLETED, text="hi", segments=[Segment(id=0, start=0, end=1, text="hi")]))
    delete_job(settings, session, jobs, jobs.get(job_id))
    assert jobs.get(job_id) is None and jobs.get_result(job_id) is None
    assert list(session.execute("SELECT idx FROM segments WHERE job_id=%s", (job_id,))) == []
    with pytest.raises(blobstore.BlobError):
        blobstore.open_store(settings, session, scheme=scheme).get(ref)
    assert listed(jobs, tenant) == ([], None)


def test_sweep_removes_audio_past_the_retention_only(stack_settings, session):
    settings = stack_settings.with_(audio_retention_s=3600)
    store = blobstore.open_store(settings, session, scheme="cassandra")
    jobs = JobStore(session)
    finished, running = uuid.uuid4().hex, uuid.uuid4().hex
    refs = {j: store.put(j, b"audio") for j in (finished, running)}
    for j in refs:
        jobs.create(Upload(job_id=j, tenant="sweep", blob_ref=refs[j], audio_sha256="a", audio_bytes=5,
                           audio_duration=1.0))
    jobs.transition(finished, FAILED, error="done")
    sweeper = AudioSweeper(settings, session)
    sweeper.sweep()  # nothing of this job is due yet
    assert store.get(refs[finished]) == b"audio"
    sweeper.sweep(now=datetime.now(UTC) + timedelta(seconds=3700))
    with pytest.raises(blobstore.BlobError):
        store.get(refs[finished])
    assert store.get(refs[running]) == b"audio"  # an unfinished job's audio stays
    assert jobs.get(finished)["status"] == FAILED  # the job itself stays until its TTL
    assert jobs.get(running)["status"] == QUEUED


def test_the_sink_announces_only_the_outcome_the_api_shows(session, stack_settings):
    """A replayed Result is announced again (exactly-once redo); a late one for a cancelled job is not."""
    from consumers.sink import Sink

    sink = Sink(stack_settings, session, "sink-test")
    jobs = sink.jobs
    done = _job(jobs, "sink-outcomes")
    result = Result(job_id=done, status=COMPLETED, text="hi", tenant="sink-outcomes")
    first, replay = sink.handle(result, None), sink.handle(result, None)
    assert [o.event for o in first] == [result] and [o.event for o in replay] == [result]
    assert first[0].topic == stack_settings.topic("finished")

    cancelled = _job(jobs, "sink-outcomes")
    assert jobs.cancel(cancelled)
    assert sink.handle(Result(job_id=cancelled, status=COMPLETED, text="late", tenant="sink-outcomes"), None) == []
    assert jobs.get(cancelled)["status"] == CANCELLED and jobs.get_result(cancelled) is None
