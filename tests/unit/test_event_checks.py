"""Events checked against the job they name (``kafscribe.validation.*_vs_job``), and blob references.

Pure functions of an event and the stored rows: the stages read the rows and refuse (DLQ) whatever
these say no to; tests/e2e/test_abuse_events.py sends the same forgeries through a real broker.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from kafscribe import validation
from kafscribe.settings import Settings
from kafscribe.store.blobs import BlobError, FileBlobStore, is_blob_ref
from kafscribe.store.chunks import chunk_blob_id
from schemas.events import CallbackAttempt, Chunk, ChunkTranscript, JobOptions, Result, Upload

SHA = "a" * 64


def upload(**changes) -> Upload:
    base = Upload(job_id="job-a", tenant="alice", blob_ref="cassandra:job-a", audio_sha256=SHA, audio_bytes=10,
                  audio_duration=60.0, options=JobOptions(language="en", callback_url="https://a.example/hook"))
    return replace(base, **changes)


def job_row(up: Upload, **changes) -> dict:
    """The job as ``JobStore.get`` reads it (options parsed from the row's JSON)."""
    row = {"job_id": up.job_id, "tenant": up.tenant, "status": "queued", "blob_ref": up.blob_ref,
           "audio_sha256": up.audio_sha256, "options": json.loads(json.dumps(asdict(up.options))), "chunks": None}
    row.update(changes)
    return row


def chunk_transcript(up: Upload, index: int = 0, count: int = 2, **changes) -> ChunkTranscript:
    event = ChunkTranscript(job_id=up.job_id, tenant=up.tenant, index=index, count=count, offset_s=0.0,
                            duration_s=30.0, chunk_blob_ref=f"cassandra:{chunk_blob_id(up.job_id, index)}",
                            upload=up.encode(), text="hi")
    return replace(event, **changes)


def test_an_upload_of_the_job_itself_passes():
    up = upload()
    assert validation.upload_vs_job(up, job_row(up)) is None
    assert validation.upload_vs_job(replace(up, attempt=3, produced_at=1), job_row(up)) is None  # a hand-off


@pytest.mark.parametrize(("change", "words"), [
    ({"tenant": "mallory"}, "another tenant"),
    ({"blob_ref": "cassandra:other"}, "other audio"),
    ({"audio_sha256": "b" * 64}, "other audio"),
    ({"options": JobOptions(language="en", callback_url="https://evil.example/")}, "other options"),
    ({"options": JobOptions(language="en")}, "other options"),
])
def test_an_upload_reusing_another_jobs_id_is_refused_with_the_reason(change, words):
    job = job_row(upload())
    reason = validation.upload_vs_job(upload(**change), job)
    assert reason is not None and words in reason and "may not reuse its id" in reason


def test_options_a_row_lacks_read_as_their_defaults():
    up = upload(options=JobOptions())
    job = job_row(up, options={"task": "transcribe", "language": None})  # an old row, fewer keys
    assert validation.upload_vs_job(up, job) is None


def test_no_event_acts_on_a_job_that_does_not_exist_or_is_another_tenants():
    result = Result(job_id="job-a", tenant="alice", status="completed")
    assert "does not exist" in validation.tenant_vs_job(result, None)
    assert "another tenant" in validation.tenant_vs_job(replace(result, tenant="bob"), job_row(upload()))
    assert "another tenant" in validation.tenant_vs_job(result, job_row(upload(), tenant=None))  # a stray row
    assert validation.tenant_vs_job(result, job_row(upload())) is None


def test_a_chunk_of_a_split_job_passes():
    up = upload()
    job = job_row(up, chunks=2)
    assert validation.chunk_vs_job(chunk_transcript(up, 1), job, "cassandra") is None
    chunk = Chunk(job_id=up.job_id, tenant=up.tenant, index=0, count=2, offset_s=0.0, duration_s=30.0,
                  blob_ref=f"cassandra:{chunk_blob_id(up.job_id, 0)}", audio_sha256=SHA, audio_bytes=5,
                  upload=up.encode())
    assert validation.chunk_vs_job(chunk, job, "cassandra") is None


@pytest.mark.parametrize(("name", "event", "job_changes", "words"), [
    ("never split (count 1, another tenant)", lambda up: chunk_transcript(
        replace(up, tenant="bob"), 0, 1, tenant="bob"), {}, "another tenant"),
    ("never split, same tenant", lambda up: chunk_transcript(up, 0, 1), {}, "never split"),
    ("a count above the recorded one", lambda up: chunk_transcript(up, 0, 2000), {"chunks": 2}, "is not the 2"),
    ("another job's blob", lambda up: chunk_transcript(up, 0, 2, chunk_blob_ref="cassandra:job-b"),
     {"chunks": 2}, "is not the audio of this job's chunk 0"),
    ("another index's blob", lambda up: chunk_transcript(
        up, 0, 2, chunk_blob_ref=f"cassandra:{chunk_blob_id(up.job_id, 1)}"), {"chunks": 2}, "is not the audio"),
    ("the other store's scheme", lambda up: chunk_transcript(
        up, 0, 2, chunk_blob_ref=f"file:{chunk_blob_id(up.job_id, 0)}"), {"chunks": 2}, "is not the audio"),
    ("an embedded Upload with other options", lambda up: chunk_transcript(
        up, 0, 2, upload=replace(up, options=JobOptions()).encode()), {"chunks": 2}, "other options"),
    ("no such job", lambda up: chunk_transcript(up, 0, 2), None, "does not exist"),
])
def test_a_forged_chunk_is_refused_with_the_reason(name, event, job_changes, words):
    up = upload()
    job = None if job_changes is None else job_row(up, **job_changes)
    reason = validation.chunk_vs_job(event(up), job, "cassandra")
    assert reason is not None and words in reason, (name, reason)


def stored_event(job_id: str = "job-a", **changes) -> dict:
    row = {"job_id": job_id, "event_id": "msg_1", "tenant": "alice", "url": "https://a.example/hook",
           "event_type": "job.completed", "body": '{"type":"job.completed"}'}
    row.update(changes)
    return row


def attempt(**changes) -> CallbackAttempt:
    stored = stored_event()
    base = CallbackAttempt(job_id="job-a", tenant="alice", event_id=stored["event_id"], url=stored["url"],
                           event_type=stored["event_type"], body=stored["body"], delivery_attempt=2, not_before=0)
    return replace(base, **changes)


def test_a_retry_or_redelivery_of_the_stored_event_passes():
    assert validation.callback_vs_job(attempt(delivery_attempt=7, last_error="HTTP 500"), job_row(upload()),
                                      stored_event()) is None


@pytest.mark.parametrize(("change", "stored", "words"), [
    ({"tenant": "bob"}, stored_event(), "another tenant"),
    ({"url": "https://evil.example/"}, stored_event(), "its url"),
    ({"body": '{"type":"job.completed","text":"forged"}'}, stored_event(), "its body"),
    ({"event_id": "msg_2"}, stored_event(), "its event_id"),
    ({}, None, "no stored callback event"),
])
def test_a_forged_callback_attempt_is_refused(change, stored, words):
    reason = validation.callback_vs_job(attempt(**change), job_row(upload()), stored)
    assert reason is not None and words in reason, reason
    assert "does not exist" in validation.callback_vs_job(attempt(), None, stored_event())


@pytest.mark.parametrize("ref", ["file:..", "file:.", "file:../etc/passwd", "file:/etc/passwd", "s3:x", "x",
                                 "cassandra:", "file:.hidden", "file:a/b"])
def test_a_blob_ref_that_names_no_blob_is_an_invalid_upload(ref):
    assert not is_blob_ref(ref)
    reason = validation.check_event(Settings(), "uploads", upload(blob_ref=ref))
    assert reason is not None and "blob_ref" in reason


def test_good_blob_refs_pass():
    for ref in ("cassandra:0f3a", "file:abc.wav", f"cassandra:{chunk_blob_id('j:@+=', 3)}"):
        assert is_blob_ref(ref)
    assert validation.check_event(Settings(), "uploads", upload()) is None


def test_the_file_store_reads_regular_files_inside_its_directory_only(tmp_path: Path):
    store = FileBlobStore(tmp_path / "spool")
    store.put("good", b"audio")
    assert store.get("file:good") == b"audio" and b"".join(store.pieces("file:good")) == b"audio"
    (tmp_path / "spool" / "subdir").mkdir()
    (tmp_path / "secret").write_bytes(b"not yours")
    (tmp_path / "spool" / "link").symlink_to(tmp_path / "secret")
    for ref in ("file:..", "file:subdir", "file:link", "file:missing"):
        with pytest.raises(BlobError):  # permanent: the job fails, nothing is retried
            store.get(ref)
        with pytest.raises(BlobError):
            b"".join(store.pieces(ref))
    with pytest.raises(BlobError):  # the retention sweep logs it and goes on; nothing outside is touched
        store.delete("subdir")
    store.delete("link")
    assert (tmp_path / "secret").read_bytes() == b"not yours" and (tmp_path / "spool" / "subdir").is_dir()


class FakeJobs:
    """The deletion mark and purge of a job store, in memory."""

    def __init__(self, mark=None) -> None:
        self.mark, self.purged = mark, []

    def deleted_mark(self, job_id: str):
        return self.mark

    def purge(self, job_id: str) -> None:
        self.purged.append(job_id)


def test_a_stage_that_finds_the_deletion_mark_removes_what_it_wrote(tmp_path: Path):
    from types import SimpleNamespace

    from kafscribe.store import retention

    settings = Settings(blob_store="file", blob_dir=tmp_path)
    store = FileBlobStore(tmp_path)
    for i in range(4):
        store.put(chunk_blob_id("job-d", i), b"chunk")
    store.put("someone-elses", b"audio")
    assert retention.settle_deleted(settings, None, FakeJobs(), "job-d", [0]) is False  # not deleted
    assert (tmp_path / chunk_blob_id("job-d", 0)).exists()
    jobs = FakeJobs(SimpleNamespace(chunks=2))  # deleted after a split into 2; this stage wrote chunk 3
    assert retention.settle_deleted(settings, None, jobs, "job-d", [3]) is True
    assert jobs.purged == ["job-d"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [chunk_blob_id("job-d", 2), "someone-elses"]
