"""Long recordings on the real stack: split, shared by two transcribers, merged once, kill -9 safe.

One pipeline for the module (ingress, two transcribers, translator, sink,
merger) with ``KAFSCRIBE_CHUNK_S=10`` and tiny.en, on a ~60 s espeak-ng clip.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections import Counter

import pytest
from confluent_kafka import Producer

from bench.harness import wait_until
from consumers.chunk_transcriber import chunk_blob_id
from kafscribe.kafka import clients as kafka_clients
from kafscribe.speech import chunking
from kafscribe.store import blobs as blobstore
from kafscribe.store import session as cassandra_session
from kafscribe.store.jobs import JobStore
from schemas.events import Chunk, ChunkTranscript, JobOptions, Transcript, Upload
from tests import audio_clips as ac
from tests.conftest import fresh_settings, make_pipeline
from tests.kafka_read import read_topic

pytestmark = [pytest.mark.stack, pytest.mark.slow]

SPOKEN = " ".join([
    "Kafka keeps every event of the pipeline in order.",
    "A long recording is cut into pieces at the quiet moments between sentences.",
    "Each piece goes to whichever worker has time for it.",
    "The workers write their transcripts back to the log.",
    "A merge stage puts the pieces together again in the right order.",
    "Nothing is lost when a worker dies, because the offsets are committed with the results.",
    "The client sees the progress rise as the pieces come back.",
    "When the last piece arrives, the whole transcript is produced exactly once.",
    "The timestamps of every segment belong to the whole recording.",
    "Short recordings are never cut, they go through the pipeline in one piece.",
    "This sentence is here to make the recording a little longer than a minute.",
    "And this is the very last sentence of the long recording.",
])
CHUNK_S = 10.0
TRANSCRIBERS = ("t1", "t2")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def recall(reference: str, hypothesis: str) -> float:
    """Share of the reference's words (as a multiset) found in the hypothesis."""
    ref, hyp = Counter(words(reference)), Counter(words(hypothesis))
    return sum(min(n, hyp[w]) for w, n in ref.items()) / max(1, sum(ref.values()))


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("long")
    return ac.to_format(ac.speak(SPOKEN, d / "long.wav"), d / "long.mp3")


@pytest.fixture(scope="module")
def pipe(stack_settings, tmp_path_factory):
    settings = fresh_settings(stack_settings, model="tiny.en", chunk_s=CHUNK_S, transient_retries=1, cpu_threads=1)
    p = make_pipeline(settings, tmp_path_factory, "chunks")
    p.start("ingress")
    for name in TRANSCRIBERS:
        p.start("transcriber", name=name)
    for stage in ("translator", "sink", "merger"):
        p.start(stage)
    wait_until(lambda: group_members(settings, "chunk-transcribers") == len(TRANSCRIBERS), timeout_s=120,
               what="both transcribers own chunk partitions")
    yield p
    p.stop()


@pytest.fixture(scope="module")
def session(stack_settings):
    s = cassandra_session.connect(stack_settings, keyspace=stack_settings.cassandra_keyspace)
    yield s
    s.cluster.shutdown()


def group_members(settings, group: str) -> int:
    """Members of the consumer group that own at least one partition."""
    admin = kafka_clients.admin(settings)
    (desc,) = admin.describe_consumer_groups([settings.topic_prefix + group]).values()
    members = desc.result().members
    return sum(1 for m in members if m.assignment and m.assignment.topic_partitions)


def chunk_rows(session, job_id: str) -> list:
    return list(session.execute("SELECT idx, attempts, worker_id, result FROM job_chunks WHERE job_id = %s",
                                (job_id,)))


def of_job(events: list, job_id: str, kind: type) -> list:
    return [e for e in events if isinstance(e, kind) and e.job_id == job_id]


def test_long_recording_is_split_shared_and_merged_with_the_whole_recordings_times(pipe, long_clip, session):
    job_id = pipe.http.submit(long_clip)["job_id"]
    fractions, partial = [], ""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = pipe.http.job(job_id)
        if job["status"] in ("completed", "failed"):
            break
        fractions.append(job["progress"]["fraction"])
        partial = job.get("partial_text") or partial
        time.sleep(0.2)
    assert job["status"] == "completed", job
    duration = job["audio"]["duration"]
    assert duration > 4 * CHUNK_S
    count = job["chunks"]
    assert count >= 4, job  # ~60 s at 10 s a chunk (a tail under 15 s stays whole)
    assert fractions == sorted(fractions), fractions  # progress never goes back
    assert any(0 < f < 1 for f in fractions), fractions  # ... and rises chunk by chunk
    result = job["result"]
    segs = result["segments"]
    assert [s["id"] for s in segs] == list(range(len(segs)))
    assert all(a["start"] <= b["start"] for a, b in zip(segs, segs[1:], strict=False))
    assert segs[-1]["end"] > duration - CHUNK_S  # times on the recording's clock, not the chunk's
    assert result["language"] == "en"
    # Every chunk transcribed once, by both transcribers between them; one Transcript on the topic.
    pieces = of_job(read_topic(pipe.settings, "chunk-transcripts"), job_id, ChunkTranscript)
    assert sorted(p.index for p in pieces) == list(range(count))
    assert len({p.worker_id for p in pieces}) == 2, [p.worker_id for p in pieces]
    assert len(of_job(read_topic(pipe.settings, "transcripts"), job_id, Transcript)) == 1
    rows = chunk_rows(session, job_id)
    assert [r.attempts for r in rows] == [1] * count
    # The merged text is as good as one pass over the whole recording.
    from kafscribe.speech import audio
    from kafscribe.speech.engines import load_engine

    single = load_engine(pipe.settings).transcribe(audio.decode(long_clip.read_bytes()))
    merged, whole = recall(SPOKEN, result["text"]), recall(SPOKEN, single.text)
    print(f"word recall: merged {merged:.3f}, single pass {whole:.3f}; {count} chunks")
    # 10 s chunks cost tiny.en some context at each cut (measured 0.95 of the single pass here); the
    # issue's 0.95 with 60 s chunks is bench/longfile.py's to show.
    assert merged >= 0.9 * whole, (result["text"], single.text)
    # The chunks' audio is gone once the job is merged.
    store = blobstore.open_store(pipe.settings, session)
    for i in range(count):
        with pytest.raises(blobstore.BlobError):
            store.get(f"{pipe.settings.blob_store}:{chunk_blob_id(job_id, i)}")


def test_short_recording_is_not_split(pipe, clips):
    job_id = pipe.http.submit(clips["en"])["job_id"]
    job = pipe.wait_job(job_id)
    assert job["status"] == "completed", job
    assert "chunks" not in job and "fox" in job["result"]["text"].lower()


def _producer(settings) -> Producer:
    return kafka_clients.producer(settings)


def _job(session, duration: float = 20.0, sha: str = "a" * 64, chunks: int = 1) -> Upload:
    upload = Upload(job_id=f"direct-{uuid.uuid4().hex[:10]}", blob_ref="cassandra:none", audio_sha256=sha,
                    audio_bytes=1000, audio_duration=duration, options=JobOptions())
    JobStore(session).create(upload)
    JobStore(session).set_chunks(upload.job_id, chunks)  # a chunk must match the count its split recorded
    return upload


def _send(settings, chunk: Chunk) -> None:
    p = _producer(settings)
    p.produce(settings.topic("chunks"), key=chunk.job_id.encode(), value=chunk.encode(), partition=0)
    p.flush(10)


def test_malformed_chunks_fail_their_job_with_a_reason_and_the_partition_goes_on(pipe, session, clips):
    settings = pipe.settings
    bad_index, missing_blob, good = _job(session, chunks=2), _job(session), None
    _send(settings, Chunk(job_id=bad_index.job_id, index=5, count=2, offset_s=0.0, duration_s=5.0,
                          blob_ref="cassandra:x", audio_sha256="b" * 64, audio_bytes=10, upload=bad_index.encode()))
    _send(settings, Chunk(job_id=missing_blob.job_id, index=0, count=1, offset_s=0.0, duration_s=5.0,
                          blob_ref=f"{settings.blob_store}:{chunk_blob_id(missing_blob.job_id, 0)}",
                          audio_sha256="b" * 64, audio_bytes=10,
                          upload=missing_blob.encode()))
    # A well-formed one-chunk job after them, on the same partition: the partition was not stopped.
    wav = chunking.wav_bytes(chunking_samples(clips["en"]))
    store = blobstore.open_store(settings, session)
    good = _job(session, duration=len(wav) / 32000)
    ref = store.put(chunk_blob_id(good.job_id, 0), wav)
    _send(settings, Chunk(job_id=good.job_id, index=0, count=1, offset_s=0.0, duration_s=len(wav) / 32000 - 0.01,
                          blob_ref=ref, audio_sha256=hashlib.sha256(wav).hexdigest(), audio_bytes=len(wav),
                          upload=good.encode()))
    job = pipe.wait_job(bad_index.job_id, timeout_s=120)
    assert job["status"] == "failed" and "index 5 must be in [0, 1]" in job["error"], job
    job = pipe.wait_job(missing_blob.job_id, timeout_s=120)
    assert job["status"] == "failed" and "not found" in job["error"] and "chunk 0" in job["error"], job
    job = pipe.wait_job(good.job_id, timeout_s=120)
    assert job["status"] == "completed" and "fox" in job["result"]["text"].lower(), job


def chunking_samples(path):
    """A clip as 16 kHz mono int16 samples (what a chunk blob holds)."""
    import numpy as np

    from kafscribe.speech import audio

    return (audio.decode(path.read_bytes()) * 32767).astype(np.int16)


def test_a_cancelled_long_recording_gets_no_transcript_and_its_chunks_audio_goes(pipe, long_clip, session):
    job_id = pipe.http.submit(long_clip)["job_id"]
    wait_until(lambda: (pipe.http.job(job_id)["progress"]["fraction"] or 0) > 0, timeout_s=120,
               what="a first chunk merged")
    status, body, _ = pipe.http._request("DELETE", f"/v1/jobs/{job_id}")
    assert status in (200, 202), body
    count = pipe.http.job(job_id)["chunks"]
    store = blobstore.open_store(pipe.settings, session)

    def all_chunks_gone() -> bool:
        for i in range(count):
            try:
                store.get(f"{pipe.settings.blob_store}:{chunk_blob_id(job_id, i)}")
                return False
            except blobstore.BlobError:
                pass
        return True

    wait_until(all_chunks_gone, timeout_s=120, what="the cancelled job's chunk audio removed")
    assert pipe.http.job(job_id)["status"] == "cancelled"
    assert of_job(read_topic(pipe.settings, "transcripts"), job_id, Transcript) == []


def test_kill_9_mid_chunk_redoes_that_chunk_only_and_the_job_completes_once(pipe, long_clip, session):
    job_id = pipe.http.submit(long_clip)["job_id"]
    victim, chunk = _chunk_just_started(session, job_id)
    pipe.kill(victim)  # mid-chunk: a 10 s chunk takes tiny.en on one thread far longer than the poll here
    # Not restarted during the job: a rejoining worker takes partitions from the survivor (cooperative
    # rebalance), which would abandon and redo whatever chunk the survivor holds then.
    job = pipe.wait_job(job_id, timeout_s=300)
    assert job["status"] == "completed", job
    rows = chunk_rows(session, job_id)
    attempts = {r.idx: r.attempts for r in rows}
    print(f"killed {victim} on chunk {chunk}; attempts per chunk {attempts}")
    assert attempts[chunk] == 2, (chunk, attempts)
    assert sorted(attempts.values()) == [1] * (len(rows) - 1) + [2], attempts
    assert len(of_job(read_topic(pipe.settings, "transcripts"), job_id, Transcript)) == 1
    pieces = of_job(read_topic(pipe.settings, "chunk-transcripts"), job_id, ChunkTranscript)
    assert sorted(p.index for p in pieces) == list(range(len(rows)))  # every chunk's result committed once
    segs = job["result"]["segments"]
    assert [s["id"] for s in segs] == list(range(len(segs)))


def _chunk_just_started(session, job_id: str, timeout_s: float = 120) -> tuple[str, int]:
    """(transcriber name, chunk index) the moment a chunk of the job is started (its attempt row appears)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for r in chunk_rows(session, job_id):
            if r.attempts == 1 and r.result is None and r.worker_id and r.worker_id.split("-")[0] in TRANSCRIBERS:
                return r.worker_id.split("-")[0], r.idx
        time.sleep(0.02)
    raise AssertionError(f"no chunk of {job_id} started in {timeout_s}s")
