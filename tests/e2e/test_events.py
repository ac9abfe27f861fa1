"""Progress, live segments, server-sent events, the OpenAI stream and cancellation, on the real stack."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from aiohttp import web

from bench.harness import wait_until
from kafscribe.settings import Settings
from kafscribe.speech.engines import Cancelled, load_engine
from kafscribe.store.jobs import JobStore
from kafscribe.store.progress import ProgressReporter
from producers.ingress.routes.events import progress_fraction
from schemas.events import Segment, Transcript, Word
from tests.audio_clips import ENGLISH, LONG_ENGLISH, speak
from tests.conftest import fresh_settings, make_pipeline
from tests.kafka_read import read_topic

# --- the store: progress per attempt, live segments --------------------------------------------


@pytest.mark.stack
def test_progress_never_goes_back_across_attempts_and_live_segments_page_by_index(session):
    jobs = JobStore(session)
    job_id = f"progress-{uuid.uuid4().hex[:10]}"
    assert jobs.progress(job_id) is None
    first = ProgressReporter(jobs, job_id, attempt=1, min_interval_s=0.0)
    first.fraction(0.6)
    first.fraction(0.2)  # an engine's report that goes back is held at the highest
    for i in range(3):
        first.segment(Segment(id=i, start=i, end=i + 1.0, text=f" s{i}", words=[Word(f" s{i}", i, i + 1.0, 0.9)]),
                      0.6)
    first.close()
    assert jobs.progress(job_id) == 0.6
    redo = ProgressReporter(jobs, job_id, attempt=2, min_interval_s=0.0)  # a crash: the job starts again
    redo.fraction(0.1)
    redo.segment(Segment(id=0, start=0.0, end=1.0, text=" s0"), 0.3)
    redo.close()
    assert jobs.progress(job_id) == 0.6  # the redo is behind: the reader still sees the highest
    live = jobs.live_segments(job_id)
    assert [s["id"] for s in live] == [0, 1, 2]  # the redo rewrote index 0, it added none
    assert live[1]["words"] == [{"word": " s1", "start": 1.0, "end": 2.0, "probability": 0.9}]
    assert [s["id"] for s in jobs.live_segments(job_id, after=1)] == [2]
    assert jobs.get_result(job_id) is None  # live rows are not a result
    jobs.forget_progress(job_id)
    assert jobs.progress(job_id) is None


def test_progress_a_client_sees():
    job = {"status": "transcribing"}
    assert progress_fraction(job, None) == 0.0
    assert progress_fraction(job, 0.42424242) == 0.4242
    assert progress_fraction(job, 1.7) == 1.0
    assert progress_fraction({"status": "translating"}, 0.3) == 1.0
    assert progress_fraction({"status": "completed"}, None) == 1.0


# --- the engines' hooks -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    """About 70 s of speech: three of Whisper's 30 s windows, so a job has a middle to stop in."""
    d = tmp_path_factory.mktemp("events-clips")
    one = speak(LONG_ENGLISH, d / "one.wav")
    out = d / "long.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(one), "-i", str(one), "-i", str(one),
                    "-filter_complex", "[0:a][1:a][2:a]concat=n=3:v=0:a=1", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory) -> Path:
    return speak(ENGLISH, tmp_path_factory.mktemp("events-short") / "en.wav")


@pytest.mark.slow
@pytest.mark.parametrize("engine_name", ["faster-whisper", "openai-whisper"])
def test_engines_report_each_segment_as_decoded_and_stop_when_told(engine_name, long_clip, short_clip):
    from kafscribe.speech import audio

    engine = load_engine(Settings(model="tiny.en", device="cpu", cpu_threads=2), engine=engine_name)
    samples = audio.decode(short_clip.read_bytes())
    seen: list[tuple[Segment | None, float]] = []
    out = engine.transcribe(samples, on_segment=lambda s, f: seen.append((s, f)))
    assert [s for s, _ in seen if s is not None] == out.segments  # every segment, once, in order
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and 0.0 <= fractions[0] and fractions[-1] <= 1.0
    assert fractions[-1] >= 0.8  # the last segment ends near the end of the clip
    with pytest.raises(Cancelled):  # cancelled before it starts: nothing is decoded
        engine.transcribe(samples, should_continue=lambda: False)
    if engine_name == "faster-whisper":  # (openai-whisper checks per 30 s window: the same path, slower)
        asked = []
        got: list[Segment] = []

        def go_on() -> bool:
            asked.append(1)
            return not got  # stop once the first segment is in

        with pytest.raises(Cancelled):
            engine.transcribe(audio.decode(long_clip.read_bytes()),
                              on_segment=lambda s, f: got.append(s), should_continue=go_on)
        assert len(got) == 1 and len(asked) >= 2


# --- through the pipeline: SSE, the job view, the OpenAI stream, cancellation ------------------


def read_sse(url: str, api_key: str, timeout_s: float = 240) -> list[tuple[str | None, dict]]:
    """Every event of a text/event-stream until the server ends it: ``(event name or None, data)``."""
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"})
    events: list[tuple[str | None, dict]] = []
    name, data = None, []
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for raw in response:
            line = raw.decode().rstrip("\n")
            if not line:
                if data:
                    events.append((name, json.loads("\n".join(data))))
                name, data = None, []
            elif line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
    return events


@pytest.fixture(scope="module")
def pipe(stack_settings, tmp_path_factory):
    settings = fresh_settings(stack_settings, engine="faster-whisper", model="tiny.en", transient_retries=1,
                              cancel_check_s=0.0, progress_interval_s=0.0, events_poll_s=0.2)
    pipeline = make_pipeline(settings, tmp_path_factory, "events")
    pipeline.start("ingress")
    for stage in ("translator", "sink", "notifier"):
        pipeline.start(stage)
    yield pipeline
    pipeline.stop()


@pytest.mark.stack
@pytest.mark.slow
def test_cancelled_jobs_stop_and_events_stream_every_segment_once(pipe, long_clip, short_clip, session):
    http = pipe.http
    settings = pipe.settings
    # 1. Cancelled while queued: the transcriber (not started yet) must skip it, not park it.
    queued = http.submit(short_clip)["job_id"]
    session.execute("UPDATE jobs SET status = 'cancelled' WHERE job_id = %s", (queued,))
    long_job = http.submit(long_clip, word_timestamps="true")["job_id"]
    # 2. A client follows the long job from before it starts.
    followed: list = []
    follower = threading.Thread(target=lambda: followed.extend(
        read_sse(f"{pipe.url}/v1/jobs/{long_job}/events", pipe.api_key)))
    follower.start()
    pipe.start("transcriber")
    # 3. Cancel the long job as soon as its first segment is live: it must stop before its end.
    jobs = JobStore(session)
    wait_until(lambda: jobs.live_segments(long_job), timeout_s=240, what="a first live segment")
    view = http.job(long_job)
    assert view["status"] == "transcribing" and 0.0 < view["progress"]["fraction"] < 1.0, view
    session.execute("UPDATE jobs SET status = 'cancelled' WHERE job_id = %s", (long_job,))
    follower.join(60)
    assert not follower.is_alive(), "the event stream did not end with the job"
    names = [n for n, _ in followed]
    assert names[0] == "status" and followed[0][1]["status"] in ("queued", "transcribing")
    assert followed[-1] == ("status", followed[-1][1]) and followed[-1][1]["status"] == "cancelled"
    seg_ids = [d["id"] for n, d in followed if n == "segment"]
    assert seg_ids == list(range(len(seg_ids))) and seg_ids, followed  # each once, in order
    fractions = [d["fraction"] for n, d in followed if n == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] < 1.0
    # 4. The worker stops promptly and lives on: the next job completes with events from the start.
    wait_until(lambda: "job cancelled; stopped" in pipe.log_tail("transcriber", 200), timeout_s=60,
               what="the transcriber to stop the cancelled job")
    # The job cancelled while queued is skipped whenever the worker reaches it: before the long job or
    # after it, as the partitions' order falls (asserting at once raced the worker's next poll).
    wait_until(lambda: "job cancelled before it started; skipped" in pipe.log_tail("transcriber", 200),
               timeout_s=60, what="the transcriber to skip the job cancelled while queued")
    done = http.submit(short_clip, word_timestamps="true")["job_id"]
    job = pipe.wait_job(done)
    assert job["status"] == "completed" and job["progress"] == {"fraction": 1.0}
    late = read_sse(f"{pipe.url}/v1/jobs/{done}/events", pipe.api_key)  # after the end: all of it
    segments = [d for n, d in late if n == "segment"]
    assert [(s["id"], s["text"], s["words"]) for s in segments] == [
        (s["id"], s["text"], s["words"]) for s in job["result"]["segments"]]
    assert late[-1][1]["status"] == "completed" and late[-1][1]["text"] == job["result"]["text"]
    assert [d["fraction"] for n, d in late if n == "progress"] == [1.0]
    # Nothing of the cancelled jobs went on down the pipeline, nor to the DLQ.
    events = read_topic(settings, "transcripts") + read_topic(settings, "dlq")
    assert {e.job_id for e in events} & {queued, long_job} == set()
    assert any(isinstance(e, Transcript) and e.job_id == done for e in events)
    for job_id in (queued, long_job):
        assert http.job(job_id)["status"] == "cancelled"


@pytest.mark.stack
@pytest.mark.slow
def test_openai_stream_through_the_openai_package(pipe, short_clip):
    """``stream=true`` on the OpenAI-compatible route: segments as they are decoded, read by the ``openai`` client."""
    import openai

    if not any(name.startswith("transcriber") and pipe.alive(name) for name in pipe.procs):
        pipe.start("transcriber")
    client = openai.OpenAI(api_key=pipe.api_key, base_url=f"{pipe.url}/v1", timeout=240, max_retries=0)
    with open(short_clip, "rb") as f:
        stream = client.audio.transcriptions.create(file=f, model="whisper-1", stream=True)
        received = list(stream)
    types = [e.type for e in received]
    assert types[-1] == "transcript.text.done" and set(types[:-1]) == {"transcript.text.delta"}
    deltas = "".join(e.delta for e in received[:-1])
    assert deltas.strip() == received[-1].text.strip()
    assert "fox" in received[-1].text.lower()


def _serve_in_thread(app: web.Application) -> int:
    """Run ``app`` on a free port in a daemon thread with its own event loop; returns the port."""
    from bench.harness import free_port

    port = free_port()
    ready = threading.Event()

    def run() -> None:
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    assert ready.wait(30)
    return port


@pytest.mark.stack
@pytest.mark.slow
def test_a_redone_job_shows_no_duplicate_segments_and_no_backward_progress(pipe, long_clip, session):
    """A transcriber killed mid-job: the redo (attempt 2) starts from 0, the client sees neither."""
    running = [name for name in pipe.procs if name.startswith("transcriber") and pipe.alive(name)]
    if not running:
        pipe.start("transcriber")
        running = ["transcriber"]
    job_id = pipe.http.submit(long_clip)["job_id"]
    followed: list = []
    follower = threading.Thread(target=lambda: followed.extend(
        read_sse(f"{pipe.url}/v1/jobs/{job_id}/events", pipe.api_key, timeout_s=600)))
    follower.start()
    jobs = JobStore(session)
    wait_until(lambda: jobs.live_segments(job_id), timeout_s=240, what="a first live segment")
    before = pipe.http.job(job_id)["progress"]["fraction"]
    for name in running:
        pipe.kill(name, signal.SIGKILL)
    pipe.start("transcriber", name="transcriber-redo")
    seen = [before]
    while (job := pipe.http.job(job_id))["status"] not in ("completed", "failed"):
        seen.append(job["progress"]["fraction"])
        time.sleep(0.3)
    assert job["status"] == "completed" and job["attempts"] == 2, job
    assert seen == sorted(seen), seen  # the job view never went back while attempt 2 caught up
    follower.join(60)
    assert not follower.is_alive()
    seg_ids = [d["id"] for n, d in followed if n == "segment"]
    assert seg_ids == list(range(len(job["result"]["segments"]))), seg_ids  # each once, all of them
    fractions = [d["fraction"] for n, d in followed if n == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert followed[-1][1]["status"] == "completed"


@pytest.mark.stack
def test_events_route_in_process_tenants_and_a_finished_job(isolated, session):
    """The route on the real store without a pipeline: 401/404 at the door, a finished job replayed whole."""
    from aiohttp.test_utils import TestClient, TestServer

    from kafscribe.store.apikeys import KeyStore
    from producers.ingress import build_app
    from schemas.events import Result, Upload

    keys = KeyStore(session)
    mine, other = keys.create("events-a", label="tests")[0], keys.create("events-b", label="tests")[0]
    jobs = JobStore(session)
    job_id = f"ev-{uuid.uuid4().hex[:12]}"
    jobs.create(Upload(job_id=job_id, tenant="events-a", blob_ref="file:x", audio_sha256="0", audio_bytes=1,
                       audio_duration=2.0))
    segs = [Segment(id=i, start=i, end=i + 1.0, text=f" part {i}", words=[Word(f" part{i}", i, i + 1.0, 0.5)])
            for i in range(3)]
    jobs.save_result(Result(job_id=job_id, tenant="events-a", status="completed", language="en", duration=3.0,
                            text="part 0 part 1 part 2", segments=segs))
    queued = f"ev-{uuid.uuid4().hex[:12]}"
    jobs.create(Upload(job_id=queued, tenant="events-a", blob_ref="file:y", audio_sha256="0", audio_bytes=1,
                       audio_duration=2.0))

    async def run():
        async with TestClient(TestServer(build_app(isolated.with_(events_poll_s=0.05)))) as client:
            url = f"/v1/jobs/{job_id}/events"
            assert (await client.get(url)).status == 401
            assert (await client.get(url, headers={"Authorization": f"Bearer {other}"})).status == 404
            assert (await client.get("/v1/jobs/nope/events", headers={"Authorization": f"Bearer {mine}"})).status == 404
            # A client that goes away from a job that never ends: the server lets it go.
            resp = await client.get(f"/v1/jobs/{queued}/events", headers={"Authorization": f"Bearer {mine}"})
            first = await resp.content.readuntil(b"\n\n")
            assert b"event: status" in first and b'"queued"' in first
            resp.close()
            resp = await client.get(url, headers={"Authorization": f"Bearer {mine}"})
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            return (await resp.read()).decode()

    body = asyncio.run(run())
    events = [(b.split("\n")[0][7:], json.loads(b.split("\n")[1][6:])) for b in body.strip().split("\n\n")]
    assert [n for n, _ in events] == ["progress", "segment", "segment", "segment", "status"]
    assert events[0][1] == {"fraction": 1.0}
    assert [d["text"] for n, d in events if n == "segment"] == [" part 0", " part 1", " part 2"]
    assert events[1][1]["words"] == [{"word": " part0", "start": 0.0, "end": 1.0, "probability": 0.5}]
    assert events[-1][1]["status"] == "completed" and events[-1][1]["text"] == "part 0 part 1 part 2"


def test_event_ids_are_cursors_that_read_back():
    from producers.ingress.routes.events import Cursor

    for cursor in (Cursor(), Cursor(3, "transcribing", 0.4242), Cursor(12, "completed", 1.0)):
        assert Cursor.decode(cursor.encode()) == cursor
    assert Cursor().encode() == "-1/-/-1"
    for bad in ("", "7", "x/transcribing/0.5", "3/dancing/0.5", "3/queued/2", "-5/queued/0", "1/queued/0.1/9"):
        with pytest.raises(ValueError):
            Cursor.decode(bad)


@pytest.mark.stack
def test_events_resume_after_last_event_id_with_only_newer_events(isolated, session):
    """A client that reconnects with the id of the last event it got: later segments, no repeated status or
    progress; after the final status 204; an id this server never wrote 422."""
    from aiohttp.test_utils import TestClient, TestServer

    from kafscribe.store.apikeys import KeyStore
    from producers.ingress import build_app
    from schemas.events import Result, Upload

    key = KeyStore(session).create("events-resume", label="tests")[0]
    auth = {"Authorization": f"Bearer {key}"}
    jobs = JobStore(session)
    job_id = f"ev-{uuid.uuid4().hex[:12]}"
    jobs.create(Upload(job_id=job_id, tenant="events-resume", blob_ref="file:x", audio_sha256="0", audio_bytes=1,
                       audio_duration=5.0))
    jobs.start_attempt(job_id, "transcribing", "w1")
    segs = [Segment(id=i, start=i, end=i + 1.0, text=f" part {i}") for i in range(5)]
    for s in segs[:3]:
        jobs.record_live_segment(job_id, s).result()
    jobs.record_progress(job_id, 1, 0.6).result()

    def parse(block: bytes) -> dict[str, str]:
        fields = dict(line.split(": ", 1) for line in block.decode().strip().split("\n"))
        return {**fields, "data": json.loads(fields["data"])}

    async def read_events(client, headers, count=None) -> list[dict]:
        resp = await client.get(f"/v1/jobs/{job_id}/events", headers=headers)
        assert resp.status == 200, await resp.text()
        out = []
        while count is None or len(out) < count:
            block = await resp.content.readuntil(b"\n\n") if count else None
            if block is None:
                out += [parse(b) for b in (await resp.read()).split(b"\n\n") if b.strip() and not b.startswith(b":")]
                break
            if not block.startswith(b":"):
                out.append(parse(block))
        resp.close()
        return out

    async def run():
        async with TestClient(TestServer(build_app(isolated.with_(events_poll_s=0.05)))) as client:
            first = await read_events(client, auth, count=4)  # status, progress, segments 0 and 1
            assert [(e["event"], e["data"].get("id")) for e in first] == [
                ("status", None), ("progress", None), ("segment", 0), ("segment", 1)]
            assert all("id" in e for e in first)
            resume = {**auth, "Last-Event-ID": first[-1]["id"]}
            again = await read_events(client, resume, count=1)
            assert (again[0]["event"], again[0]["data"]["id"]) == ("segment", 2)  # no status, progress, 0 or 1
            jobs.record_live_segment(job_id, segs[3]).result()
            jobs.record_progress(job_id, 1, 0.8).result()
            later = await read_events(client, {**auth, "Last-Event-ID": again[0]["id"]}, count=2)
            assert [(e["event"], e["data"].get("id"), e["data"].get("fraction")) for e in later] == [
                ("progress", None, 0.8), ("segment", 3, None)]
            jobs.save_result(Result(job_id=job_id, tenant="events-resume", status="completed", language="en",
                                    duration=5.0, text="part 0 part 1 part 2 part 3 part 4", segments=segs))
            rest = await read_events(client, {**auth, "Last-Event-ID": later[-1]["id"]})
            assert [(e["event"], e["data"].get("id")) for e in rest] == [
                ("progress", None), ("segment", 4), ("status", None)]
            assert rest[-1]["data"]["status"] == "completed" and rest[-1]["data"]["text"].endswith("part 4")
            done = await client.get(f"/v1/jobs/{job_id}/events", headers={**auth, "Last-Event-ID": rest[-1]["id"]})
            assert done.status == 204
            whole = await read_events(client, auth)  # without the header: the whole job again
            assert [e["data"]["id"] for e in whole if e["event"] == "segment"] == [0, 1, 2, 3, 4]
            bad = await client.get(f"/v1/jobs/{job_id}/events", headers={**auth, "Last-Event-ID": "nonsense"})
            assert bad.status == 422

    asyncio.run(run())
