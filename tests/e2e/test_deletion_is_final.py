"""Deletion is final: a split job cancelled and deleted at any point of its life never comes back.

The client's two DELETEs (202 cancelled, then 200 deleted) go through the real
ingress; the stages are the real ones, driven in this process on the real
Cassandra, and the deletion is made to land exactly where it hurts: inside the
split (after the chunks' audio is written, before their count is recorded),
inside a chunk's transcription, and inside the merge (after the merge mark,
before the Transcript). Then the work that was in flight, or redone after a
crash, carries on. Afterwards nothing of the job is readable by its owner, an
admin, or in the store, and nothing was produced for it.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from consumers.chunk_transcriber import ChunkTranscriber
from consumers.merger import Merger, assemble
from consumers.sink import Sink
from consumers.transcriber import Transcriber
from consumers.translator import TranslatorStage, result_from_transcript
from kafscribe.speech import audio
from kafscribe.store import blobs as blobstore
from kafscribe.store.chunks import chunk_blob_id
from kafscribe.store.jobs import JOB_TABLES, JobStore
from schemas.events import Chunk, ChunkTranscript, JobOptions, Upload, embedded_upload
from tests import audio_clips as ac
from tests.conftest import fresh_settings, make_pipeline

pytestmark = [pytest.mark.stack, pytest.mark.slow]

CHUNK_S = 8.0  # the ~25 s clip becomes about three chunks


@dataclass
class Position:
    """Where a consume loop read the event (all the merger asks of a Message)."""

    _offset: int

    def topic(self) -> str:
        return "t.chunk-transcripts"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


@pytest.fixture(scope="module")
def pipe(stack_settings, tmp_path_factory):
    settings = fresh_settings(stack_settings, model="tiny.en", chunk_s=CHUNK_S, cpu_threads=1, transient_retries=1)
    p = make_pipeline(settings, tmp_path_factory, "deletion")
    p.start("ingress")
    yield p
    p.stop()


@pytest.fixture(scope="module")
def stages(pipe, session):
    transcriber = Transcriber(pipe.settings, session, "deletion-test")
    transcriber.view.close()
    yield (transcriber, ChunkTranscriber(transcriber), Merger(pipe.settings, session, "deletion-test"),
           TranslatorStage(pipe.settings, session, "deletion-test"), Sink(pipe.settings, session, "deletion-test"))


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    path = ac.speak(ac.LONG_ENGLISH, tmp_path_factory.mktemp("deletion") / "long.wav")
    return path, audio.probe(path, 60).duration


class Job:
    """A tenant's split-sized job, made as a direct producer makes one; its owner deletes it over HTTP."""

    def __init__(self, pipe, session, recording) -> None:
        path, duration = recording
        self.pipe, self.session = pipe, session
        self.tenant = f"deleter-{uuid.uuid4().hex[:8]}"
        self.owner = pipe.client(pipe.key(self.tenant))
        data = path.read_bytes()
        job_id = f"deleted-{uuid.uuid4().hex[:10]}"
        self.store = blobstore.open_store(pipe.settings, session)
        ref = self.store.put(job_id, data)
        self.upload = Upload(job_id=job_id, tenant=self.tenant, blob_ref=ref,
                             audio_sha256=hashlib.sha256(data).hexdigest(), audio_bytes=len(data),
                             audio_duration=duration, filename="long.wav", options=JobOptions(word_timestamps=True))
        JobStore(session).create(self.upload)
        self.deletes: list[dict] = []

    @property
    def job_id(self) -> str:
        return self.upload.job_id

    def cancel_then_delete(self) -> None:
        """What the client does: DELETE (202, cancelled), DELETE again (200, deleted)."""
        self.deletes.append(self.owner.delete(self.job_id))
        self.deletes.append(self.owner.delete(self.job_id))

    def assert_gone(self) -> None:
        assert [d.get("status") or ("deleted" if d.get("deleted") else d) for d in self.deletes] == \
            ["cancelled", "deleted"], self.deletes
        assert self.owner.job(self.job_id) is None  # the owner: 404
        assert self.pipe.http.job(self.job_id) is None  # an admin: 404
        assert self.job_id not in [j["job_id"] for j in self.owner.jobs(limit=100)["jobs"]]
        for table in ("jobs", *JOB_TABLES):
            rows = list(self.session.execute(f"SELECT * FROM {table} WHERE job_id = %s", (self.job_id,)))
            assert rows == [], (table, rows)
        listed = self.session.execute("SELECT job_id FROM jobs_by_tenant WHERE tenant = %s AND day = %s",
                                      (self.tenant, datetime.now(UTC).strftime("%Y%m%d")))
        assert self.job_id not in [r.job_id for r in listed]
        unfinished = self.session.execute("SELECT job_id FROM tenant_unfinished_jobs WHERE tenant = %s",
                                          (self.tenant,))
        assert self.job_id not in [r.job_id for r in unfinished]
        for ref in [self.upload.blob_ref] + [f"{self.pipe.settings.blob_store}:{chunk_blob_id(self.job_id, i)}"
                                             for i in range(12)]:
            with pytest.raises(blobstore.BlobError):
                self.store.get(ref)


def split(transcriber: Transcriber, job: Job) -> list[Chunk]:
    chunks = [o.event for o in transcriber.handle(job.upload, None)]
    assert len(chunks) >= 2 and all(isinstance(c, Chunk) for c in chunks), chunks
    return chunks


def test_deleted_during_the_split_nothing_comes_back(pipe, session, stages, recording, monkeypatch):
    transcriber = stages[0]
    job = Job(pipe, session, recording)
    record_count = transcriber.jobs.set_chunks

    def delete_then_record(job_id: str, count: int) -> None:  # the chunks' audio is written by now
        job.cancel_then_delete()
        record_count(job_id, count)

    monkeypatch.setattr(transcriber.jobs, "set_chunks", delete_then_record)
    assert transcriber.handle(job.upload, None) == []  # no Chunk is produced
    monkeypatch.undo()
    # The Upload redone (the worker died before its commit): still nothing.
    assert transcriber.handle(job.upload, None) == []
    job.assert_gone()


def test_deleted_while_chunks_are_transcribed_nothing_comes_back(pipe, session, stages, recording, monkeypatch):
    transcriber, chunker, merger, _, _ = stages
    job = Job(pipe, session, recording)
    chunks = split(transcriber, job)
    (first,) = chunker.handle(chunks[0], None)
    assert merger.handle(first.event, Position(0)) == []  # stored, progress written
    start_attempt = chunker.chunks.start_attempt

    def start_then_delete(job_id: str, index: int, worker_id: str) -> int:
        attempt = start_attempt(job_id, index, worker_id)
        job.cancel_then_delete()  # while this chunk is being transcribed
        return attempt

    monkeypatch.setattr(chunker.chunks, "start_attempt", start_then_delete)
    assert chunker.handle(chunks[1], None) == []
    monkeypatch.undo()
    # In flight after the delete: the other chunks, and the first chunk's merge redone.
    for chunk in chunks[2:]:
        assert chunker.handle(chunk, None) == []
    assert merger.handle(first.event, Position(0)) == []
    job.assert_gone()


def test_deleted_during_the_merge_nothing_comes_back(pipe, session, stages, recording, monkeypatch):
    transcriber, chunker, merger, translator, sink = stages
    job = Job(pipe, session, recording)
    parts: list[ChunkTranscript] = [chunker.handle(c, None)[0].event for c in split(transcriber, job)]
    for offset, part in enumerate(parts[:-1]):
        assert merger.handle(part, Position(offset)) == []
    mark_merged = merger.chunks.mark_merged

    def mark_then_delete(job_id: str, marker: str) -> None:
        mark_merged(job_id, marker)
        job.cancel_then_delete()  # after the merge mark, before the Transcript

    monkeypatch.setattr(merger.chunks, "mark_merged", mark_then_delete)
    assert merger.handle(parts[-1], Position(len(parts))) == []
    monkeypatch.undo()
    # Downstream work in flight: the Transcript an earlier incarnation of the merge produced, and its Result.
    transcript = assemble(embedded_upload(parts[0]), parts, "late-merger", 1)
    assert translator.handle(transcript, None) == []
    assert sink.handle(result_from_transcript(transcript), None) == []
    assert merger.handle(parts[0], Position(0)) == []  # and a chunk redone
    job.assert_gone()
