"""Blob store and job store on the real Cassandra."""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest

from kafscribe.statuses import COMPLETED, QUEUED, TRANSCRIBING
from kafscribe.store import blobs as blobstore
from kafscribe.store.jobs import JobStore
from schemas.events import Result, Segment, Translation, Upload

pytestmark = pytest.mark.stack


@pytest.mark.parametrize("scheme", ["cassandra", "file"])
def test_blob_round_trip_in_chunks_with_checksum(stack_settings, session, scheme, tmp_path):
    settings = stack_settings.with_(blob_chunk_bytes=1000, blob_dir=tmp_path)
    store = blobstore.open_store(settings, session, scheme=scheme)
    data = os.urandom(4500)
    blob_id = uuid.uuid4().hex
    ref = store.put(blob_id, data)
    assert ref == f"{scheme}:{blob_id}"
    assert blobstore.read_verified(settings, session, ref, hashlib.sha256(data).hexdigest()) == data
    with pytest.raises(blobstore.BlobError, match="checksum mismatch"):
        blobstore.read_verified(settings, session, ref, hashlib.sha256(b"other").hexdigest())
    with pytest.raises(blobstore.BlobError, match="not found"):
        store.get(f"{scheme}:{uuid.uuid4().hex}")
    if scheme == "cassandra":
        rows = session.execute("SELECT idx FROM audio_chunks WHERE blob_id=%s", (blob_id,))
        assert [r.idx for r in rows] == [0, 1, 2, 3, 4]


def test_blob_ids_cannot_escape_the_directory(stack_settings, tmp_path):
    store = blobstore.FileBlobStore(tmp_path)
    with pytest.raises(blobstore.BlobError):
        store.get("file:../../etc/passwd")


def test_job_lifecycle_and_idempotent_result(session):
    jobs = JobStore(session)
    job_id = uuid.uuid4().hex
    jobs.create(Upload(job_id=job_id, blob_ref="file:x", audio_sha256="a", audio_bytes=1, audio_duration=2.0))
    assert jobs.get(job_id)["status"] == QUEUED
    assert jobs.start_attempt(job_id, TRANSCRIBING, "w1") == 1
    assert jobs.start_attempt(job_id, TRANSCRIBING, "w2") == 2
    seg = Segment(id=0, start=0.0, end=1.0, text="hola")
    result = Result(job_id=job_id, status=COMPLETED, attempt=2, language="es", language_probability=0.9,
                    duration=2.0, text="hola", segments=[seg, Segment(id=1, start=1, end=2, text="amigos")],
                    translation=Translation("es", "en", "llm", "hello", [seg]), worker_id="w2")
    jobs.save_result(result)
    jobs.save_result(result)  # a replay writes the same rows
    out = jobs.get_result(job_id)
    assert [s["text"] for s in out["segments"]] == ["hola", "amigos"]
    assert [s["text"] for s in out["translated_segments"]] == ["hola"]
    assert out["translated_text"] == "hello"
    job = jobs.get(job_id)
    assert (job["status"], job["attempts"], job["worker_id"]) == (COMPLETED, 2, "w2")
    # A late event from a redone stage never moves a finished job back.
    assert jobs.transition(job_id, TRANSCRIBING, worker_id="zombie") is False
    assert jobs.get(job_id)["status"] == COMPLETED
