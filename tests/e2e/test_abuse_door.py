"""The HTTP door under abuse, on real ingress processes against the real Kafka and Cassandra.

One table: each hostile request, the answer it must get (status and words) and what must be left behind
(nothing). Then the two drills that need numbers: 20 uploads opened at once against a quota of 3 on two
ingress processes (exactly 3 accepted), and 150 uploads that stall mid-body (all closed within the
documented timeout, the ingress's RSS back near its baseline). No workers run: queued jobs are all the door
needs. Timeouts are set short through settings so the module stays fast.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import time
import uuid
import wave
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest

from bench.harness import free_port, wait_until
from kafscribe.statuses import FAILED
from kafscribe.store.jobs import JobStore
from producers.client import HttpClient
from tests.conftest import fresh_settings, make_pipeline
from tests.unit.test_ingress_door import MULTIPART, body, file_part

pytestmark = pytest.mark.stack

QUOTA = 3
IDLE_S = 2.0  # KAFSCRIBE_INGRESS_BODY_IDLE_S of these ingresses
STREAMS = 4  # KAFSCRIBE_EVENTS_MAX_STREAMS_PER_KEY
IN_FLIGHT_S = 900.0  # KAFSCRIBE_TENANT_MAX_AUDIO_S_IN_FLIGHT
PER_DAY_S = 1500.0  # KAFSCRIBE_TENANT_MAX_AUDIO_S_PER_DAY


def silent_wav(path: Path, seconds: float) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x00" * int(8000 * seconds))
    return path


def silence_flac(path: Path, seconds: float) -> Path:
    """``seconds`` of digital silence as FLAC: 10 minutes in about 110 KB (a silence bomb)."""
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono",
                    "-t", str(seconds), "-c:a", "flac", str(path)], check=True)
    return path


def wait_listening(port: int, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the ingress exited"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def door(stack_settings, tmp_path_factory):
    """Two ingress processes of one pipeline (same Cassandra, same topics), each with its own TMPDIR."""
    settings = fresh_settings(
        stack_settings, tenant_max_unfinished=QUOTA, quota_retry_after_s=11, ingress_body_idle_s=IDLE_S,
        ingress_body_grace_s=2.0, ingress_body_min_rate=1000, events_max_streams_per_key=STREAMS,
        events_poll_s=0.2, tenant_max_audio_s_in_flight=IN_FLIGHT_S, tenant_max_audio_s_per_day=PER_DAY_S,
        max_upload_bytes=8 << 20, auth_cache_s=30.0, ingress_max_uploads_per_key=50,
    )
    pipe = make_pipeline(settings, tmp_path_factory, "abuse-door")
    pipe.tmpdir = tmp_path_factory.mktemp("door-tmp")
    pipe.tmpdir2 = tmp_path_factory.mktemp("door-tmp-2")
    pipe.start("ingress", TMPDIR=str(pipe.tmpdir))
    pipe.port2 = free_port()
    second = pipe.start("ingress", name="ingress-2", TMPDIR=str(pipe.tmpdir2), KAFSCRIBE_HTTP_PORT=str(pipe.port2))
    wait_listening(pipe.port2, second)
    pipe.clips = tmp_path_factory.mktemp("door-clips")
    yield pipe
    pipe.stop()


def tenant_key(pipe) -> tuple[str, str]:
    tenant = f"abuse-{uuid.uuid4().hex[:8]}"
    return tenant, pipe.key(tenant)


def multipart_of(path: Path) -> bytes:
    return body(file_part(path.name.encode(), path.read_bytes()))


def head(method: str, target: str, key: str, length: int | None = None, extra: bytes = b"") -> bytes:
    lines = f"{method} {target} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n".encode() + extra
    if length is not None:
        lines += b"Content-Type: " + MULTIPART + b"\r\nContent-Length: %d\r\n" % length
    return lines + b"\r\n"


async def exchange(port: int, data: bytes, timeout_s: float = 30) -> tuple[int, dict, bytes]:
    """Send ``data`` on a fresh connection (closing after it); the status, JSON body and raw answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data.replace(b"Host: t\r\n", b"Host: t\r\nConnection: close\r\n", 1))
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), timeout_s)
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n\r\n")
    try:
        data_out = json.loads(rest) if rest else {}
    except ValueError:
        data_out = {"raw": rest.decode(errors="replace")}
    return int(status_line.split(b" ", 2)[1]), data_out, raw


def cql_count(session, query: str, *params) -> int:
    return session.execute(query, params).one()[0]


def slots_of(session, tenant: str) -> int:
    return cql_count(session, "SELECT count(*) FROM quota_slots WHERE tenant = %s AND slot IN (0, 1, 2) ",
                     tenant)


def listed_jobs(session, tenant: str) -> int:
    day = datetime.now(UTC).strftime("%Y%m%d")
    return cql_count(session, "SELECT count(*) FROM jobs_by_tenant WHERE tenant = %s AND day = %s", tenant, day)


# --- the table ---------------------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    words: str  # in the error (or, for aiohttp's own 400, in the status line)


def far_future_cursor(pipe, session) -> Answer:
    _, key = tenant_key(pipe)
    answers = []
    for when in (datetime(9999, 12, 31, tzinfo=UTC), datetime.now(UTC) + timedelta(days=30),
                 datetime.now(UTC) - timedelta(days=400)):
        cursor = base64.urlsafe_b64encode(f"{int(when.timestamp() * 1000)}:zzzz".encode()).decode().rstrip("=")
        started = time.monotonic()
        status, data, _ = asyncio.run(exchange(pipe.settings.http_port, head("GET", f"/v1/jobs?cursor={cursor}", key)))
        assert time.monotonic() - started < 5, "a refused cursor costs no walk"
        answers.append((status, data.get("error", "")))
    assert len({a for a in answers}) == 1, answers  # every cursor outside the window: the same answer
    # nothing left behind: the ingress answers another tenant at once
    started = time.monotonic()
    assert asyncio.run(exchange(pipe.settings.http_port, head("GET", "/v1/jobs", key)))[0] == 200
    assert time.monotonic() - started < 5
    return Answer(*answers[0])


def concurrent_uploads_past_the_quota(pipe, session) -> Answer:
    tenant, key = tenant_key(pipe)
    payload = multipart_of(silent_wav(pipe.clips / "one-second.wav", 1.0))
    ports = [pipe.settings.http_port, pipe.port2]

    async def twenty():
        conns = []
        for i in range(20):  # headers + 1 KB on every connection first, alternating between the two ingresses
            reader, writer = await asyncio.open_connection("127.0.0.1", ports[i % 2])
            writer.write(head("POST", "/v1/jobs", key, len(payload), b"Connection: close\r\n") + payload[:1024])
            conns.append((reader, writer))
        await asyncio.gather(*(w.drain() for _, w in conns))
        await asyncio.sleep(0.5)
        for _, writer in conns:  # then the rest of each
            try:
                writer.write(payload[1024:])
            except ConnectionError:
                pass  # refused before its body: the ingress may have stopped reading
        answers = []
        for reader, writer in conns:
            raw = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            status_line, _, rest = raw.partition(b"\r\n\r\n")
            answers.append((int(status_line.split(b" ", 2)[1]), json.loads(rest)))
        return answers

    answers = asyncio.run(twenty())
    statuses = sorted(s for s, _ in answers)
    assert statuses == [202] * QUOTA + [429] * (20 - QUOTA), statuses
    refusals = {d["error"] for s, d in answers if s == 429}
    assert len(refusals) == 1, refusals
    # nothing left by the 17 refusals: three job rows, three slots, no temp file on either ingress
    assert listed_jobs(session, tenant) == QUOTA
    assert slots_of(session, tenant) == QUOTA
    assert os.listdir(pipe.tmpdir) == [] and os.listdir(pipe.tmpdir2) == []
    return Answer(429, refusals.pop())


def stalled_upload(pipe, session) -> Answer:
    tenant, key = tenant_key(pipe)
    payload = multipart_of(silent_wav(pipe.clips / "two-seconds.wav", 2.0))

    async def stall():
        reader, writer = await asyncio.open_connection("127.0.0.1", pipe.settings.http_port)
        writer.write(head("POST", "/v1/jobs", key, len(payload)) + payload[:20_000])
        await writer.drain()
        started = time.monotonic()
        raw = await asyncio.wait_for(reader.read(), 30)  # to the end: the ingress closes the connection
        took = time.monotonic() - started
        writer.close()
        return raw, took

    raw, took = asyncio.run(stall())
    assert took < IDLE_S + 3, f"closed after {took:.1f} s"
    status_line, _, rest = raw.partition(b"\r\n\r\n")
    assert slots_of(session, tenant) == 0 and listed_jobs(session, tenant) == 0  # its quota slot is back
    assert os.listdir(pipe.tmpdir) == []
    return Answer(int(status_line.split(b" ", 2)[1]), json.loads(rest)["error"])


def event_streams_past_the_cap(pipe, session) -> Answer:
    tenant, key = tenant_key(pipe)
    job_id = pipe.client(key).submit(silent_wav(pipe.clips / "stream.wav", 1.0))["job_id"]
    target = f"/v1/jobs/{job_id}/events"

    async def streams():
        held = []
        for _ in range(STREAMS):
            reader, writer = await asyncio.open_connection("127.0.0.1", pipe.settings.http_port)
            writer.write(head("GET", target, key))
            await asyncio.wait_for(reader.readuntil(b"event: status"), 15)
            held.append(writer)
        refused = await exchange(pipe.settings.http_port, head("GET", target, key))
        for writer in held:
            writer.transport.abort()
        await asyncio.sleep(0.5)
        reader, writer = await asyncio.open_connection("127.0.0.1", pipe.settings.http_port)  # the places are free
        writer.write(head("GET", target, key))
        again = await asyncio.wait_for(reader.readuntil(b"event: status"), 15)
        writer.transport.abort()
        return refused, again

    (status, data, _), again = asyncio.run(streams())
    assert again.startswith(b"HTTP/1.1 200")
    JobStore(session).transition(job_id, FAILED, error="finished by the test")
    return Answer(status, data["error"])


def nul_after_the_key(pipe, session) -> Answer:
    _, key = tenant_key(pipe)
    secret = key.rsplit("_", 1)[1]
    raw_request = f"GET /v1/jobs HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}".encode() + b"\x00\r\n\r\n"
    with socket.create_connection(("127.0.0.1", pipe.settings.http_port)) as sock:
        sock.sendall(raw_request)
        sock.settimeout(10)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    log_path = pipe.log_dir / "ingress.log"
    wait_until(lambda: "Error handling request" in log_path.read_text(errors="replace"), 10, "aiohttp's error log")
    log_text = log_path.read_text(errors="replace")
    assert secret not in log_text and key not in log_text, "the API key reached the ingress log"
    assert "[redacted]" in log_text
    assert secret.encode() not in raw  # nor aiohttp's answer
    status_line = raw.split(b"\r\n", 1)[0].decode()
    return Answer(int(status_line.split(" ", 2)[1]), status_line)


def cassandra_outage(pipe, session) -> Answer:
    """An ingress whose Cassandra does not answer (nothing listens on its port): what a stranger is told."""
    port, dead = free_port(), free_port()
    proc = pipe.start("ingress", name="ingress-outage", KAFSCRIBE_HTTP_PORT=str(port),
                      KAFSCRIBE_CASSANDRA_PORT=str(dead), KAFSCRIBE_CASSANDRA_HOSTS="127.0.0.50")
    try:
        wait_listening(port, proc)
        stranger = f"ksk_{'a' * 12}_{'s' * 43}"  # well formed: it costs a lookup
        status, data, raw = asyncio.run(exchange(port, head("GET", "/v1/jobs/x", stranger)))
        text = raw.decode(errors="replace")
        assert "127.0.0.50" not in text and str(dead) not in text and "errors" not in text, text
        wait_until(lambda: "127.0.0.50" in (pipe.log_dir / "ingress-outage.log").read_text(errors="replace"), 10,
                   "the cause in the log")
        return Answer(status, data["error"])
    finally:
        proc.terminate()
        proc.wait(30)


def silence_bombs(pipe, session) -> Answer:
    """600 s of silence in a few KB: the first is accepted, the second passes the audio in flight (429); once
    the first finished, the next one is accepted, and a third passes the day's audio (429)."""
    tenant, key = tenant_key(pipe)
    bomb = silence_flac(pipe.clips / "bomb.flac", 600)
    assert bomb.stat().st_size < 256 << 10  # about 110 KB
    client = pipe.client(key)
    jobs = JobStore(session)

    def post() -> tuple[int, dict]:
        status, data, _ = asyncio.run(exchange(pipe.settings.http_port,
                                               head("POST", "/v1/jobs", key, len(multipart_of(bomb)))
                                               + multipart_of(bomb)))
        return status, data

    first = client.submit(bomb)["job_id"]
    in_flight = post()
    assert in_flight[0] == 429 and "audio in flight" in in_flight[1]["error"], in_flight
    jobs.transition(first, FAILED, error="finished by the test")  # as the sink would
    second = client.submit(bomb)["job_id"]
    jobs.transition(second, FAILED, error="finished by the test")
    status, data = post()
    assert listed_jobs(session, tenant) == 2  # the refusals left no job
    per_day = cql_count(session, "SELECT audio_ms FROM tenant_audio_daily WHERE tenant = %s AND day = %s",
                        tenant, datetime.now(UTC).strftime("%Y%m%d"))
    assert per_day == 2 * 600_000, per_day  # only what was accepted is charged
    return Answer(status, data["error"])


ROWS = [
    ("list-cursor-far-in-the-future", far_future_cursor, Answer(422, "outside the listing window")),
    ("twenty-uploads-at-once-against-a-quota-of-three", concurrent_uploads_past_the_quota,
     Answer(429, f"{QUOTA} unfinished jobs, its quota")),
    ("upload-stalled-mid-body", stalled_upload, Answer(408, f"sent nothing for {IDLE_S:g} s")),
    ("event-streams-past-the-key-s-cap", event_streams_past_the_cap, Answer(429, "event streams open")),
    ("nul-byte-after-the-api-key", nul_after_the_key, Answer(400, "Bad Request")),
    ("cassandra-down-answers-without-addresses", cassandra_outage,
     Answer(503, "Cassandra unavailable: the job store cannot be reached")),
    ("ten-minute-silence-bombs", silence_bombs, Answer(429, "per day")),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_abuse_at_the_door_gets_its_answer_and_leaves_nothing(row, door, session):
    _, attack, expected = row
    got = attack(door, session)
    assert got.status == expected.status and expected.words in got.words, (got, expected)
    assert door.alive("ingress") and door.alive("ingress-2")


# --- 150 stalled uploads -----------------------------------------------------------------------------------
def test_stalled_uploads_are_all_closed_in_time_and_memory_comes_back(door, tmp_path):
    """150 uploads send ~1 MiB of their file and stall: each is closed within KAFSCRIBE_INGRESS_BODY_IDLE_S
    (+ margin), and the ingress's RSS returns to within 20 MB of what it was before them."""
    port = free_port()
    proc = door.start("ingress", name="ingress-memory", TMPDIR=str(tmp_path), KAFSCRIBE_HTTP_PORT=str(port),
                      KAFSCRIBE_TENANT_MAX_UNFINISHED="0", KAFSCRIBE_INGRESS_MAX_UPLOADS="200",
                      KAFSCRIBE_INGRESS_MAX_UPLOADS_PER_KEY="200", KAFSCRIBE_INGRESS_BODY_MIN_RATE="0")
    try:
        wait_listening(port, proc)
        _, key = tenant_key(door)
        warm = HttpClient(f"http://127.0.0.1:{port}", timeout_s=60, api_key=key)
        warm.submit(silent_wav(tmp_path.parent / "warm.wav", 1.0))  # imports and connections made once
        ingress = psutil.Process(proc.pid)
        time.sleep(0.5)
        baseline = ingress.memory_info().rss
        payload = multipart_of(silent_wav(tmp_path.parent / "big.wav", 200))  # 3.2 MB
        sent = 1 << 20

        async def stall_all():
            conns = []
            for _ in range(150):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head("POST", "/v1/jobs", key, len(payload)) + payload[:sent])
                conns.append((reader, writer))
            await asyncio.gather(*(w.drain() for _, w in conns))
            started = time.monotonic()
            peak = ingress.memory_info().rss

            async def closed(reader):
                raw = await asyncio.wait_for(reader.read(), IDLE_S + 30)
                return raw.split(b" ", 2)[1] if raw else b"", time.monotonic() - started

            results = await asyncio.gather(*(closed(r) for r, _ in conns))
            for _, writer in conns:
                writer.close()
            return results, peak

        results, peak = asyncio.run(stall_all())
        statuses = {status for status, _ in results}
        slowest = max(took for _, took in results)
        assert statuses == {b"408"}, statuses
        assert slowest < IDLE_S + 15, f"the last stalled upload was closed after {slowest:.1f} s"
        assert os.listdir(tmp_path) == []
        time.sleep(1.0)
        after = ingress.memory_info().rss
        mb = 1 << 20
        print(f"ingress RSS {baseline / mb:.0f} MB before, {peak / mb:.0f} MB with 150 stalled uploads,"
              f" {after / mb:.0f} MB after; the last closed {slowest:.1f} s after they stalled")
        assert after - baseline < 20 * mb, f"RSS {baseline / mb:.0f} -> {after / mb:.0f} MB"
    finally:
        proc.terminate()
        proc.wait(30)
