"""Forged events, produced straight onto the real topics as an attacker with write access would.

One row per attack: the event, the topic, the answer it must get (a DeadLetter
with the reason, a failed job, or silently dropped) and what must be left as
it was (the victim job's row, another job's audio, a callback never sent). The
stages are the real services (subprocesses) on the real Kafka and Cassandra;
the victims are made the way a direct producer makes jobs (audio, then the job
row), so no Whisper work is needed until the end, when the victim's own
Upload arrives and its job completes with its own words and its own callback.
What each topic's writers can and cannot do: docs/trust-model.md.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
import standardwebhooks

from bench.harness import wait_until
from kafscribe.kafka import clients as kafka_clients
from kafscribe.statuses import COMPLETED
from kafscribe.store import blobs as blobstore
from kafscribe.store import session as cassandra_session
from kafscribe.store.callbacks import CallbackStore
from kafscribe.store.chunks import ChunkStore, chunk_blob_id
from kafscribe.store.jobs import JOB_TABLES, JobStore
from kafscribe.store.webhook_secrets import WebhookSecrets
from kafscribe.webhooks import signing as webhooks
from schemas.events import (
    CallbackAttempt,
    ChunkTranscript,
    DeadLetter,
    Event,
    JobOptions,
    Result,
    Segment,
    Transcript,
    Upload,
    now_ms,
)
from tests.conftest import fresh_settings, make_pipeline
from tests.kafka_read import read_topic

pytestmark = [pytest.mark.stack, pytest.mark.slow]

A, B = "abuse-victim", "abuse-mallory"
FAR_FUTURE_MS = 10 * 365 * 86400 * 1000


@pytest.fixture(scope="module")
def pipe(stack_settings, tmp_path_factory):
    settings = fresh_settings(stack_settings, model="tiny.en", cpu_threads=1, transient_retries=1,
                              callback_allow_networks="127.0.0.0/8", callback_timeout_s=2.0)
    p = make_pipeline(settings, tmp_path_factory, "abuse").start_all()
    p.start("merger")
    p.session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
    yield p
    p.session.cluster.shutdown()
    p.stop()


@dataclass
class Row:
    """One forged event, the answer it must get, and what must be left untouched."""

    finding: str  # what the attack does, in words
    topic: str
    event: Event
    expect: str  # dlq (a DeadLetter with ``reason``) | failed (the job fails with ``reason``) | dropped
    reason: str = ""
    untouched: list[Callable[[], None]] = field(default_factory=list)


class Victims:
    """Jobs made as a direct producer makes them: the audio stored, the job row written."""

    def __init__(self, pipe, clip: bytes) -> None:
        self.pipe, self.clip = pipe, clip
        self.session = pipe.session
        self.jobs, self.chunks = JobStore(self.session), ChunkStore(self.session)
        self.store = blobstore.open_store(pipe.settings, self.session)
        self.tag = uuid.uuid4().hex[:6]

    def job(self, name: str, tenant: str = A, data: bytes | None = None, blob_ref: str = "", **options) -> Upload:
        job_id = f"abuse-{name}-{self.tag}"
        data = self.clip if data is None else data
        ref = blob_ref or self.store.put(job_id, data)
        upload = Upload(job_id=job_id, tenant=tenant, blob_ref=ref, audio_sha256=hashlib.sha256(data).hexdigest(),
                        audio_bytes=len(data), audio_duration=5.0, filename=f"{name}.wav",
                        options=JobOptions(**options))
        self.jobs.create(upload)
        return upload

    def chunk_ref(self, job_id: str, index: int) -> str:
        return f"{self.pipe.settings.blob_store}:{chunk_blob_id(job_id, index)}"

    def split_job(self, name: str, count: int = 2) -> Upload:
        upload = self.job(name)
        self.jobs.set_chunks(upload.job_id, count)
        return upload

    def row(self, job_id: str) -> dict | None:
        return self.jobs.get(job_id)

    def unchanged(self, before: dict) -> Callable[[], None]:
        def check() -> None:
            now = self.row(before["job_id"])
            assert now is not None and {k: now[k] for k in ("tenant", "status", "updated_at", "attempts", "options",
                                                             "blob_ref", "error")} == \
                {k: before[k] for k in ("tenant", "status", "updated_at", "attempts", "options", "blob_ref",
                                        "error")}, (before, now)
            assert self.jobs.get_result(before["job_id"]) is None
        return check

    def no_row(self, job_id: str) -> Callable[[], None]:
        def check() -> None:
            assert self.row(job_id) is None
            assert self.session.execute("SELECT job_id FROM jobs WHERE job_id = %s", (job_id,)).one() is None
        return check

    def nothing_of(self, upload: Upload, owner_key: str) -> Callable[[], None]:
        job_id = upload.job_id

        def check() -> None:
            with pytest.raises(blobstore.BlobError):
                self.store.get(upload.blob_ref)
            for table in ("jobs", *JOB_TABLES):
                rows = list(self.session.execute(f"SELECT * FROM {table} WHERE job_id = %s", (job_id,)))
                assert rows == [], (table, rows)
            for i in range(2):
                with pytest.raises(blobstore.BlobError):
                    self.store.get(self.chunk_ref(job_id, i))
            assert self.pipe.client(owner_key).job(job_id) is None  # the owner: 404
            assert self.pipe.http.job(job_id) is None  # an admin: 404
        return check

    def blob_intact(self, upload: Upload) -> Callable[[], None]:
        def check() -> None:
            assert hashlib.sha256(self.store.get(upload.blob_ref)).hexdigest() == upload.audio_sha256
        return check


def forged_chunk(v: Victims, upload: Upload, **changes) -> ChunkTranscript:
    event = ChunkTranscript(job_id=upload.job_id, tenant=upload.tenant, index=0, count=1, offset_s=0.0,
                            duration_s=5.0, chunk_blob_ref=v.chunk_ref(upload.job_id, 0),
                            upload=upload.encode(), language="en", language_probability=1.0,
                            text="FORGED TEXT", segments=[Segment(id=0, start=0.0, end=1.0, text="FORGED TEXT")],
                            engine="e", model="m")
    return replace(event, **changes)


def forged_callback(job_id: str, tenant: str, url: str, body: str = '{"data":{"job_id":"x"}}',
                    **changes) -> CallbackAttempt:
    event = CallbackAttempt(job_id=job_id, tenant=tenant, event_id=webhooks.event_id(job_id, "job.completed"),
                            url=url, event_type="job.completed", body=body, delivery_attempt=2, not_before=now_ms())
    return replace(event, **changes)


def rows(pipe, v: Victims, receiver, owner_key: str) -> tuple[list[Row], Upload]:
    settings, forged_url = pipe.settings, receiver.url + "/forged"
    other_audio = v.clip + b"\0" * 64

    # A takes over: tenant A's queued job, reused by another tenant, other audio, other callback URL.
    queued = v.job("queued", callback_url=receiver.url + "/victim")
    mallory_audio = v.job("mallory-audio", tenant=B, data=other_audio)
    takeover = replace(mallory_audio, job_id=queued.job_id, options=JobOptions(callback_url=forged_url))
    same_tenant_other_audio = replace(queued, blob_ref=mallory_audio.blob_ref, audio_sha256=mallory_audio.audio_sha256)
    same_audio_other_url = replace(queued, options=JobOptions(callback_url=forged_url))

    never_split = v.job("never-split")
    unsplit_b = v.job("unsplit-tenant")
    unsplit_big = v.job("unsplit-2000")
    split = v.split_job("split-finished")
    v.jobs.cancel(split.job_id)  # a finished split job
    other = v.job("other-audio-owner")
    split_big = v.split_job("split-2000")

    completed = v.job("called-back", callback_url=receiver.url + "/called-back")
    v.jobs.save_result(Result(job_id=completed.job_id, tenant=A, status=COMPLETED, text="done"))
    stored = forged_callback(completed.job_id, A, receiver.url + "/called-back",
                             body=json.dumps({"type": "job.completed", "data": {"job_id": completed.job_id}}))
    CallbackStore(v.session).save_event(stored)  # what the notifier stored when it first called back

    (settings.blob_dir / f"dir-{v.tag}").mkdir(parents=True, exist_ok=True)
    bad_file_upload = v.job("directory-ref", blob_ref=f"file:dir-{v.tag}")  # a directory inside the spool

    deleted = v.split_job("deleted")
    v.chunks.start_attempt(deleted.job_id, 0, "in-flight")
    v.jobs.record_progress(deleted.job_id, 1, 0.5).result()
    owner = pipe.client(owner_key)
    assert owner.delete(deleted.job_id)["status"] == "cancelled"  # 202
    assert owner.delete(deleted.job_id) == {"job_id": deleted.job_id, "deleted": True}  # 200

    before = {u.job_id: v.row(u.job_id) for u in (queued, never_split, unsplit_b, unsplit_big, split_big)}
    transcript = Transcript(
        job_id=deleted.job_id, tenant=A, blob_ref=deleted.blob_ref, audio_sha256=deleted.audio_sha256,
        audio_bytes=deleted.audio_bytes, audio_duration=5.0, options=deleted.options, language="en",
        language_probability=1.0, duration=5.0, text="back from the dead", segments=[], engine="e", model="m",
        worker_id="late", processing_seconds=1.0)
    unknown = f"abuse-unknown-{v.tag}"
    table = [
        Row("an Upload reusing another tenant's queued job id, with other audio and a callback URL",
            "uploads", takeover, "dlq", "belongs to another tenant", [v.unchanged(before[queued.job_id])]),
        Row("an Upload of the job's own tenant with other audio", "uploads", same_tenant_other_audio, "dlq",
            "was submitted with other audio", [v.unchanged(before[queued.job_id])]),
        Row("an Upload with the job's audio and another callback URL", "uploads", same_audio_other_url, "dlq",
            "was submitted with other options", [v.unchanged(before[queued.job_id])]),
        Row("a ChunkTranscript completing a job never split (count 1, another tenant)", "chunk-transcripts",
            forged_chunk(v, replace(never_split, tenant=B), tenant=B), "dlq", "belongs to another tenant",
            [v.unchanged(before[never_split.job_id])]),
        Row("a ChunkTranscript completing a job never split (count 1, its tenant)", "chunk-transcripts",
            forged_chunk(v, unsplit_b), "dlq", "was never split", [v.unchanged(before[unsplit_b.job_id])]),
        Row("a ChunkTranscript naming another job's audio on a finished split job", "chunk-transcripts",
            forged_chunk(v, split, count=2, chunk_blob_ref=other.blob_ref), "dlq", "is not the audio of this job's",
            [v.blob_intact(other)]),
        Row("a ChunkTranscript with count 2000 for a job never split", "chunk-transcripts",
            forged_chunk(v, unsplit_big, count=2000, index=1999,
                         chunk_blob_ref=v.chunk_ref(unsplit_big.job_id, 1999)),
            "dlq", "was never split", [v.unchanged(before[unsplit_big.job_id]), v.blob_intact(unsplit_big)]),
        Row("a ChunkTranscript with count 2000 for a job split in 2", "chunk-transcripts",
            forged_chunk(v, split_big, count=2000), "dlq", "is not the 2 chunks", [v.unchanged(before[split_big.job_id])]),
        Row("a CallbackAttempt for a job, signed for another tenant, to another URL", "callbacks.retry",
            forged_callback(completed.job_id, B, forged_url), "dlq", "belongs to another tenant"),
        Row("a CallbackAttempt of the job's tenant to another URL", "callbacks.retry",
            replace(stored, url=forged_url, delivery_attempt=2), "dlq", "its url is not"),
        Row("a CallbackAttempt of the job's tenant with a forged body", "callbacks.retry",
            replace(stored, body='{"type":"job.completed","data":{"text":"forged"}}'), "dlq", "its body is not"),
        Row("a CallbackAttempt for a job that never called back", "callbacks.retry",
            forged_callback(never_split.job_id, A, forged_url), "dlq", "no stored callback event"),
        Row("an invalid Upload for an unknown job", "uploads",
            replace(takeover, job_id=unknown + "-nan", tenant=A, audio_duration=float("nan")), "dlq",
            "audio_duration nan", [v.no_row(unknown + "-nan")]),
        Row("an Upload naming file:.. for an unknown job", "uploads",
            replace(takeover, job_id=unknown + "-dotdot", tenant=A, blob_ref="file:.."), "dlq",
            "must be cassandra:<id> or file:<id>", [v.no_row(unknown + "-dotdot")]),
        Row("a failed Result for an unknown job", "results",
            Result(job_id=unknown + "-result", tenant=A, status="failed", error="x"), "dlq", "does not exist",
            [v.no_row(unknown + "-result")]),
        Row("an Upload whose file: ref names a directory in the spool", "uploads", bad_file_upload, "failed",
            "is not a regular file"),
        Row("a deleted job's late Upload", "uploads", deleted, "dropped"),
        Row("a deleted job's late ChunkTranscript", "chunk-transcripts",
            forged_chunk(v, deleted, count=2, text="back"), "dropped"),
        Row("a deleted job's late Transcript", "transcripts", transcript, "dropped"),
        Row("a deleted job's late Result", "results",
            Result(job_id=deleted.job_id, tenant=A, status=COMPLETED, text="back from the dead"), "dropped",
            untouched=[v.nothing_of(deleted, owner_key)]),
    ]
    return table, queued


def test_forged_events_get_their_answers_and_touch_nothing(pipe, clips, receiver):
    settings = pipe.settings
    v = Victims(pipe, clips["en"].read_bytes())
    owner_key = pipe.key(A)
    table, queued = rows(pipe, v, receiver, owner_key)
    producer = kafka_clients.producer(settings)
    for row in table:
        producer.produce(settings.topic(row.topic), key=row.event.job_id.encode(), value=row.event.encode())
        if row.expect == "dropped":  # then an invalid copy on its partition: its letter says the row was handled
            sentinel = replace(row.event, produced_at=now_ms() + FAR_FUTURE_MS)
            producer.produce(settings.topic(row.topic), key=row.event.job_id.encode(), value=sentinel.encode())
    assert producer.flush(30) == 0

    def answers() -> dict[str, str] | None:
        letters = [e for e in read_topic(settings, "dlq") if isinstance(e, DeadLetter)]
        got = {}
        for row in table:
            source = settings.topic(row.topic)
            mine = [d.reason for d in letters if d.job_id == row.event.job_id and d.source_topic == source]
            if row.expect == "dlq":
                found = [r for r in mine if row.reason in r]
            elif row.expect == "dropped":
                found = [r for r in mine if "in the future" in r]
            else:
                job = v.row(row.event.job_id)
                found = [job["error"]] if job and job["status"] == "failed" else []
            if not found:
                return None
            got[row.finding] = found[0]
        return got

    try:
        got = wait_until(answers, timeout_s=120, what="every forged event answered")
    finally:
        (settings.blob_dir / f"dir-{v.tag}").rmdir()  # the test stack's blob directory is shared
    letters = [e for e in read_topic(settings, "dlq") if isinstance(e, DeadLetter)]
    for row in table:
        print(f"{row.finding}: {row.expect}: {got[row.finding][:110]}")
        if row.expect == "failed":
            assert row.reason in got[row.finding], got[row.finding]
            job = v.row(row.event.job_id)
            assert job["attempts"] == 1, job  # a permanent failure: never retried as transient
        if row.expect == "dropped":  # nothing but the sentinel's letter: the event was dropped, not refused
            assert [d.reason for d in letters if d.job_id == row.event.job_id
                    and d.source_topic == settings.topic(row.topic) and "in the future" not in d.reason] == []
        for check in row.untouched:
            check()
    assert [r for r in receiver.requests if r["path"] == "/forged"] == []

    # The victim's own Upload, after all that: its job completes with its own words, and its callback goes
    # to its own URL signed with its own tenant's secret.
    producer.produce(settings.topic("uploads"), key=queued.job_id.encode(), value=queued.encode())
    assert producer.flush(30) == 0
    job = pipe.wait_job(queued.job_id, timeout_s=180)
    assert job["status"] == COMPLETED and job["tenant"] == A, job
    assert "fox" in job["result"]["text"].lower() and "FORGED" not in job["result"]["text"]
    (call,) = wait_until(lambda: receiver.for_job(queued.job_id), timeout_s=60, what="the victim's callback")
    assert call["path"] == "/victim"
    secrets = WebhookSecrets(pipe.session, settings.callback_secret_overlap_s)
    standardwebhooks.Webhook(secrets.current(A).secret).verify(call["body"], call["headers"])  # A's secret
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secrets.current(B).secret).verify(call["body"], call["headers"])
    assert [r for r in receiver.requests if r["path"] == "/forged"] == []
    for name in ("transcriber", "merger", "sink", "notifier", "translator"):
        assert pipe.alive(name), pipe.log_tail(name)
