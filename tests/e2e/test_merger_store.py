"""The merger's exactly-once rules and the streaming blob read, on the real Cassandra.

``Merger.handle`` is driven directly with the positions a consume loop would
hand it (a message double carries only topic, partition and offset), so the
redo cases are exact: the same input redone, a later duplicate, out-of-order
chunks, a failed chunk, a cancelled job.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from dataclasses import dataclass

import pytest

from consumers.merger import Merger
from kafscribe.store import blobs as blobstore
from kafscribe.store.chunks import ChunkStore, chunk_blob_id
from kafscribe.store.jobs import JobStore
from schemas.events import ChunkTranscript, JobOptions, Result, Segment, Transcript, Upload

pytestmark = pytest.mark.stack
SHA = "c" * 64


@dataclass
class Position:
    """Where a consume loop read the event (all the merger asks of a Message)."""

    _offset: int
    _partition: int = 0

    def topic(self) -> str:
        return "t.chunk-transcripts"

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


def _job(session) -> Upload:
    upload = Upload(job_id=f"merge-{uuid.uuid4().hex[:10]}", blob_ref="cassandra:none", audio_sha256=SHA,
                    audio_bytes=10, audio_duration=30.0, options=JobOptions(word_timestamps=True))
    JobStore(session).create(upload)
    JobStore(session).set_chunks(upload.job_id, 3)  # what the split records: chunks must match it
    return upload


def _part(upload: Upload, index: int, error: str | None = None) -> ChunkTranscript:
    seg = Segment(id=0, start=index * 10.0 + 1, end=index * 10.0 + 2, text=f" part{index}")
    return ChunkTranscript(job_id=upload.job_id, index=index, count=3, offset_s=index * 10.0, duration_s=10.0,
                           chunk_blob_ref=f"cassandra:{chunk_blob_id(upload.job_id, index)}", upload=upload.encode(),
                           error=error, language="en", language_probability=0.9, text=f"part{index}",
                           segments=[] if error else [seg], engine="e", model="m")


@pytest.fixture
def merger(stack_settings, session):
    return Merger(stack_settings, session, "merger-test")


def test_chunks_in_any_order_merge_once_with_progress_of_the_done_prefix(merger, session):
    upload, jobs = _job(session), JobStore(session)
    assert merger.handle(_part(upload, 2), Position(10)) == []
    assert jobs.progress(upload.job_id) == pytest.approx(1 / 3)
    assert jobs.live_segments(upload.job_id) == []  # chunk 0 is not in yet: nothing to read in order
    assert merger.handle(_part(upload, 0), Position(11)) == []
    assert [s["text"] for s in jobs.live_segments(upload.job_id)] == [" part0"]
    (out,) = merger.handle(_part(upload, 1), Position(12))
    assert isinstance(out.event, Transcript) and out.topic.endswith("transcripts")
    assert [s.text for s in out.event.segments] == [" part0", " part1", " part2"]
    assert [s.id for s in out.event.segments] == [0, 1, 2] and out.event.duration == 30.0
    assert [s["id"] for s in jobs.live_segments(upload.job_id)] == [0, 1, 2]
    # The completing input redone (the merger died before its commit): the Transcript again, the same.
    (again,) = merger.handle(_part(upload, 1), Position(12))
    assert again.event.segments == out.event.segments and again.event.text == out.event.text
    # Any other input -- a redone chunk, a duplicate -- produces nothing more.
    assert merger.handle(_part(upload, 1), Position(13)) == []
    assert merger.handle(_part(upload, 0), Position(14)) == []
    assert ChunkStore(session).merged_by(upload.job_id) == "t.chunk-transcripts:0:12"


def test_a_failed_chunk_fails_the_job_once(merger, session):
    upload = _job(session)
    assert merger.handle(_part(upload, 0), Position(20)) == []
    (out,) = merger.handle(_part(upload, 1, error="chunk 1: audio could not be decoded"), Position(21))
    assert isinstance(out.event, Result) and out.event.status == "failed"
    assert out.event.error == "chunk 1: audio could not be decoded"
    assert out.event.options.word_timestamps  # the job's options (callback URL) go with the failure
    assert merger.handle(_part(upload, 2, error="chunk 2: another reason"), Position(22)) == []
    assert merger.handle(_part(upload, 2), Position(23)) == []  # and nothing is merged after it


def test_a_cancelled_job_gets_no_transcript(merger, session):
    upload = _job(session)
    assert merger.handle(_part(upload, 0), Position(30)) == []
    assert merger.handle(_part(upload, 1), Position(31)) == []
    JobStore(session).cancel(upload.job_id)
    assert merger.handle(_part(upload, 2), Position(32)) == []
    assert ChunkStore(session).merged_by(upload.job_id) == "ended cancelled"  # its chunks' audio removed once
    assert merger.handle(_part(upload, 2, error="job cancelled"), Position(33)) == []


def test_chunk_attempts_are_counted_per_chunk(session):
    store, job_id = ChunkStore(session), f"attempts-{uuid.uuid4().hex[:8]}"
    assert [store.start_attempt(job_id, 0, "w1"), store.start_attempt(job_id, 1, "w1")] == [1, 1]
    assert store.start_attempt(job_id, 1, "w2") == 2
    assert {r.index: r.attempts for r in store.rows(job_id)} == {0: 1, 1: 2}


@pytest.mark.parametrize("scheme", ["cassandra", "file"])
def test_blobs_stream_into_a_file_with_their_checksum_checked(stack_settings, session, scheme, tmp_path):
    settings = stack_settings.with_(blob_chunk_bytes=1000, blob_dir=tmp_path)
    data = os.urandom(9500)
    ref = blobstore.open_store(settings, session, scheme=scheme).put(uuid.uuid4().hex, data)
    out = io.BytesIO()
    assert blobstore.spool_verified(settings, session, ref, hashlib.sha256(data).hexdigest(), out) == len(data)
    assert out.getvalue() == data
    with pytest.raises(blobstore.BlobError, match="checksum mismatch"):
        blobstore.spool_verified(settings, session, ref, SHA, io.BytesIO())
    with pytest.raises(blobstore.BlobError, match="not found"):
        blobstore.spool_verified(settings, session, f"{scheme}:{uuid.uuid4().hex}", SHA, io.BytesIO())
