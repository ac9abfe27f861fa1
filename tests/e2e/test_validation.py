"""Bad events from direct producers, on the real stack: each gets its answer, nothing crashes or is overwritten.

One pipeline (ingress, transcriber, translator, sink; faster-whisper tiny.en). The
ingress runs with ``KAFSCRIBE_MAX_AUDIO_S=60``; the workers with a limit far above the
host's memory, so that one row can claim a duration no worker could ever hold.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
import pytest

from bench.harness import wait_until
from kafscribe.kafka import clients as kafka_clients
from kafscribe.speech import audio, memory
from kafscribe.store import blobs as blobstore
from kafscribe.store import session as cassandra_session
from kafscribe.store.jobs import JobStore
from producers.client import HttpError
from schemas.events import (
    DeadLetter,
    Event,
    JobOptions,
    Result,
    Segment,
    Transcript,
    Upload,
    WorkerStatus,
    now_ms,
)
from tests import audio_clips as ac
from tests.conftest import fresh_settings, make_pipeline
from tests.kafka_read import read_topic

pytestmark = [pytest.mark.stack, pytest.mark.slow]

DOOR_MAX_S = 60
# A duration whose memory estimate exceeds this host's RAM twice over: no worker here could ever hold it.
NEVER_FITS_S = math.ceil(2 * psutil.virtual_memory().total / memory.AUDIO_BYTES_PER_SECOND)
WORKER_MAX_S = 4 * NEVER_FITS_S


@pytest.fixture(scope="module")
def pipe(stack_settings, tmp_path_factory):
    # chunk_s=0: whole jobs, so a claimed duration no worker could hold is refused by admission (a split
    # recording needs only a chunk's memory; tests/e2e/test_chunks_e2e.py covers chunk events' validation).
    settings = fresh_settings(stack_settings, engine="faster-whisper", model="tiny.en", transient_retries=1,
                              max_audio_s=float(WORKER_MAX_S), chunk_s=0.0)
    p = make_pipeline(settings, tmp_path_factory, "validation")
    p.start("ingress", KAFSCRIBE_MAX_AUDIO_S=str(DOOR_MAX_S))
    for stage in ("transcriber", "translator", "sink"):
        p.start(stage)
    p.session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
    p.jobs = JobStore(p.session)
    yield p
    p.session.cluster.shutdown()
    p.stop()


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("validation-audio")


def test_the_door_trusts_decoded_durations_only(pipe, clips, audio_dir):
    # The lying FLAC (STREAMINFO: 2^36-1 samples) is measured by decoding: 2 s, not 8.6 M s.
    lying = ac.lying_flac(audio_dir / "lying.flac", seconds=2.0)
    accepted = pipe.http.submit(lying)
    assert pipe.jobs.get(accepted["job_id"])["audio_duration"] == pytest.approx(2.0, abs=0.05)
    # Over the limit (decoded, not claimed): 413 with the reason.
    long = ac.silence_flac(audio_dir / "long.flac", seconds=DOOR_MAX_S + 30)
    with pytest.raises(HttpError) as err:
        pipe.http.submit(long)
    assert err.value.status == 413 and "KAFSCRIBE_MAX_AUDIO_S" in err.value.body
    # A playlist pointing at a local file is not followed: 415 with the reason.
    segment = ac.to_format(clips["en"], audio_dir / "local.ts")
    with pytest.raises(HttpError) as err:
        pipe.http.submit(ac.hls_playlist(audio_dir / "playlist.m3u8", segment))
    assert err.value.status == 415 and "'hls' is not an accepted audio format" in err.value.body
    # The job the lying file became completes, and so does a normal one after it.
    assert pipe.wait_job(accepted["job_id"])["status"] == "completed"
    normal = pipe.http.submit(clips["en"])["job_id"]
    assert pipe.wait_job(normal)["status"] == "completed"


@dataclass
class Row:
    """One bad event and the answer it must get."""

    name: str
    event: Event
    topic: str = "uploads"
    expect: str = "failed"  # failed (job failed with reason) | dlq (DeadLetter with reason) | ignored
    reason: str = ""  # must appear in the job's error or the DeadLetter's reason
    key: str = field(default="")


def _store(pipe, job_id: str, data: bytes, duration: float, **changes) -> Upload:
    """Store audio the way a direct producer would, and describe it in an Upload."""
    ref = blobstore.open_store(pipe.settings, pipe.session).put(job_id, data)
    upload = Upload(job_id=job_id, blob_ref=ref, audio_sha256=hashlib.sha256(data).hexdigest(),
                    audio_bytes=len(data), audio_duration=duration, filename="direct.bin")
    upload = replace(upload, **changes)
    pipe.jobs.create(upload)  # and the job row, as a direct producer does (an event for no job leaves none)
    return upload


def _transcript(upload: Upload, **changes) -> Transcript:
    t = Transcript(
        job_id=upload.job_id, blob_ref=upload.blob_ref, audio_sha256=upload.audio_sha256,
        audio_bytes=upload.audio_bytes, audio_duration=upload.audio_duration, options=JobOptions(),
        language="en", language_probability=0.9, duration=upload.audio_duration, text="hello",
        segments=[Segment(id=0, start=0.0, end=1.0, text="hello")], engine="faster-whisper", model="tiny.en",
        worker_id="direct", processing_seconds=1.0,
    )
    return replace(t, **changes)


def _rows(pipe, clips, audio_dir, finished_job: str) -> list[Row]:
    en = clips["en"].read_bytes()
    lying = ac.lying_flac(audio_dir / "lying-direct.flac", seconds=2.0).read_bytes()
    local_model = audio_dir / "my-model"
    local_model.mkdir(exist_ok=True)
    (local_model / "model.bin").write_bytes(b"not a model")

    def up(name: str, data: bytes = en, duration: float = 5.0, **changes) -> Upload:
        return _store(pipe, f"v-{name}-{uuid.uuid4().hex[:8]}", data, duration, **changes)

    far_future = now_ms() + 10 * 365 * 86400 * 1000
    return [
        Row("nan duration", up("nan", duration=float("nan")), reason="audio_duration nan"),
        Row("negative duration", up("neg", duration=-5.0), reason="audio_duration -5.0"),
        Row("infinite duration", up("inf", duration=float("inf")), reason="audio_duration inf"),
        Row("duration over the limit", up("huge", duration=10.0 * WORKER_MAX_S), reason="KAFSCRIBE_MAX_AUDIO_S"),
        Row("lying FLAC with its header's duration", up("lying", lying, duration=2**36 / 8000),
            reason="KAFSCRIBE_MAX_AUDIO_S"),
        Row("a duration no worker could ever hold", up("never-fits", duration=float(NEVER_FITS_S)),
            reason="can never offer"),
        Row("audio longer than its claim", up("short-claim", duration=1.0), reason="decodes to more than"),
        Row("undecodable audio", up("garbage", b"not audio at all " * 100, duration=3.0),
            reason="could not be decoded"),
        Row("model not allowed (a download)", up("model", options=JobOptions(model="large-v3")),
            reason="model='large-v3' is not served here"),
        Row("model as a local path", up("path", options=JobOptions(model=str(local_model))),
            reason="is not served here"),
        Row("unknown task", up("task", options=JobOptions(task="dance")), reason="task='dance'"),
        Row("unknown language", up("lang", options=JobOptions(language="klingon")), reason="language='klingon'"),
        Row("bad sha256", up("sha", audio_sha256="xyz"), reason="audio_sha256"),
        Row("produced far in the future", up("future", produced_at=far_future), reason="in the future"),
        Row("a finished job's id reused", replace(up("reuse", clips["es"].read_bytes()), job_id=finished_job),
            expect="dlq", reason="already finished"),
        Row("invalid and reusing a finished job's id",
            replace(up("reuse-nan", duration=float("nan")), job_id=finished_job), expect="dlq",
            reason="audio_duration nan"),
        Row("an id that cannot name a job", replace(up("badid"), job_id="../" + "x" * 300), expect="dlq",
            reason="is not a valid id"),
        Row("a WorkerStatus on the uploads topic",
            WorkerStatus(job_id="v-status-" + uuid.uuid4().hex[:8], worker_id="w", host="h", pid=1,
                         stage="transcriber", state="running", rss_bytes=1, host_mem_available=1,
                         host_mem_total=1), expect="dlq", reason="expected Upload events on uploads"),
        Row("Transcript with a NaN duration", _transcript(up("tnan"), duration=float("nan")), topic="transcripts",
            reason="duration nan"),
        Row("Transcript with an unknown target language",
            _transcript(up("tlang"), options=JobOptions(translate_to="xx")), topic="transcripts",
            reason="translate_to='xx'"),
        Row("Result with a made-up status", Result(job_id="v-result-" + uuid.uuid4().hex[:8], status="bogus"),
            topic="results", expect="dlq", reason="status 'bogus'"),
        Row("Result with segments beyond the audio",
            Result(job_id="v-seg-" + uuid.uuid4().hex[:8], status="completed",
                   segments=[Segment(id=0, start=5.0, end=float("inf"), text="x")]),
            topic="results", expect="dlq", reason="segment 0"),
        Row("WorkerStatus with partition 999 from the future",
            WorkerStatus(job_id="", worker_id="liar-" + uuid.uuid4().hex[:6], host="h", pid=1, stage="transcriber",
                         state="running", rss_bytes=1, host_mem_available=64 * 2**40, host_mem_total=64 * 2**40,
                         partitions=[999], produced_at=far_future),
            topic="worker-status", expect="ignored"),
    ]


def test_bad_direct_events_get_their_answers_and_the_pipeline_goes_on(pipe, clips, audio_dir):
    settings = pipe.settings
    finished = pipe.http.submit(clips["en"])["job_id"]
    before = pipe.wait_job(finished)
    assert before["status"] == "completed"

    rows = _rows(pipe, clips, audio_dir, finished)
    producer = kafka_clients.producer(settings)
    for row in rows:
        key = row.event.worker_id if isinstance(row.event, WorkerStatus) else row.event.job_id
        producer.produce(settings.topic(row.topic), key=key.encode(), value=row.event.encode())
    assert producer.flush(30) == 0
    wait_until(lambda: "ignoring status of worker" in pipe.log_tail("ingress", 400), what="the view saw the liar")

    # Every upload after the bad statuses is still routed and answered 202, and completes.
    after = pipe.http.submit(clips["en"])["job_id"]
    assert pipe.wait_job(after)["status"] == "completed"

    def answers() -> dict[str, str] | None:
        letters = [e for e in read_topic(settings, "dlq") if isinstance(e, DeadLetter)]
        got = {}
        for row in rows:
            if row.expect == "failed":
                job = pipe.jobs.get(row.event.job_id)
                if not job or job["status"] != "failed":
                    return None
                got[row.name] = job["error"]
            elif row.expect == "dlq":
                found = [d.reason for d in letters if d.job_id == row.event.job_id and row.reason in d.reason]
                if not found:
                    return None
                got[row.name] = found[0]
        return got

    got = wait_until(answers, timeout_s=180, what="every bad event answered")
    for row in rows:
        if row.expect != "ignored":
            assert row.reason in got[row.name], (row.name, got[row.name])

    # The reused id overwrote nothing: same status, same transcript.
    now = pipe.http.job(finished)
    assert now["status"] == "completed" and now["result"]["text"] == before["result"]["text"]
    assert now["updated_at"] == before["updated_at"]
    # The refused model was never fetched: no such model in our cache, Hugging Face's or Whisper's.
    caches = [settings.cache_dir, Path.home() / ".cache" / "huggingface", Path.home() / ".cache" / "whisper"]
    assert not [p for c in caches if c.exists() for p in c.glob("**/*large-v3*")]
    # The lying status is not in the ingress's view.
    assert all(w["worker_id"] != rows[-1].event.worker_id for w in _workers(pipe))
    # And every stage is still alive.
    for name in ("ingress", "transcriber", "translator", "sink"):
        assert pipe.alive(name), pipe.log_tail(name)


def _workers(pipe) -> list[dict]:
    import json

    status, body, _ = pipe.http._request("GET", "/v1/workers")
    assert status == 200
    data = json.loads(body)
    return data["workers"] if isinstance(data, dict) else data


def test_a_job_over_its_time_limit_fails_with_the_reason(pipe, clips):
    # In-process transcriber on the real stack with a time limit of zero: the job fails, nothing hangs.
    from consumers.transcriber import Transcriber

    settings = pipe.settings.with_(job_time_limit_min_s=0.0, job_time_limit_factor=0.0)
    stage = Transcriber(settings, pipe.session, "time-limit-test")
    stage.view.close()
    data = clips["en"].read_bytes()
    upload = _store(pipe, "v-time-" + uuid.uuid4().hex[:8], data, 6.0)
    started = time.monotonic()
    outputs = stage.handle(upload, message=None)
    assert time.monotonic() - started < 60
    (out,) = outputs
    assert isinstance(out.event, Result) and out.event.status == "failed"
    assert "exceeded its time limit of 0.0 s" in out.event.error


def test_a_job_this_worker_can_never_fit_is_handed_to_one_that_can(pipe, clips):
    """A transcriber capped below its own RSS hands a job forced onto its partition to a worker with room."""
    pipe.start("transcriber", name="capped", KAFSCRIBE_MEMORY_BUDGET_BYTES=str(64 * 2**20))

    def settled():
        ws = [w for w in _workers(pipe) if w["stage"] == "transcriber" and w["state"] == "live"]
        owned = sorted(p for w in ws for p in w["partitions"])
        capped = [w for w in ws if w["worker_id"].startswith("capped-") and w["partitions"]]
        all_owned = owned == list(range(pipe.settings.uploads_partitions))
        return capped[0] if len(ws) == 2 and all_owned and capped else None

    capped = wait_until(settled, timeout_s=120, what="two transcribers sharing the partitions")
    data = clips["en"].read_bytes()
    upload = _store(pipe, "v-handoff-" + uuid.uuid4().hex[:8], data, audio.probe(clips["en"], 60).duration)
    producer = kafka_clients.producer(pipe.settings)
    producer.produce(pipe.settings.topic("uploads"), key=upload.job_id.encode(), value=upload.encode(),
                     partition=capped["partitions"][0])
    assert producer.flush(30) == 0

    job = pipe.wait_job(upload.job_id, timeout_s=180)
    assert job["status"] == "completed", job
    assert not job["worker_id"].startswith("capped-") and job["attempts"] == 1
    assert "handing the job to" in pipe.log_tail("capped", 200)
    assert pipe.alive("capped")
