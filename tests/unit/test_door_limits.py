"""The door's own limits, through aiohttp's test server (no Kafka or Cassandra): slow bodies, caps of uploads
and event streams, shared event polls, bounded job listings, credentials kept out of logs, outages that name
no address. The same answers on a real ingress and a real stack: tests/e2e/test_abuse_door.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp.test_utils import TestServer

from kafscribe import logs
from kafscribe.settings import Settings
from kafscribe.statuses import QUEUED
from kafscribe.store.jobs import JobStore
from producers.ingress import build_app
from producers.ingress.door import Redact, redact
from producers.ingress.responses import OUTAGE_REASON, outage_reason
from producers.ingress.routes.jobs import encode_cursor
from producers.submission import Unavailable
from tests.unit.test_ingress_door import MULTIPART, DoorOnly, body, file_part, part

KEY = "ksk_0123456789ab_" + "S3cr3tS3cr3tS3cr3tS3cr3tS3cr3t"


def door_settings(**overrides) -> Settings:
    return Settings(auth_required=False, tenant_max_unfinished=0, tenant_max_audio_s_per_day=0,
                    max_upload_bytes=1 << 20, **overrides)


def serve(settings: Settings, scenario, backends=None):
    async def main():
        app = build_app(settings, backends if backends is not None else DoorOnly())
        async with TestServer(app, host="127.0.0.1") as server:
            return await scenario(server)

    return asyncio.run(main())


async def open_upload(port: int, sent: bytes, total: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A POST /v1/jobs that announces ``total`` bytes of body and sends ``sent`` of them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Type: " + MULTIPART
                 + b"\r\nContent-Length: %d\r\n\r\n" % total + sent)
    await writer.drain()
    return reader, writer


async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, gap_s: float) -> None:
    """Send ``data`` a byte at a time, ``gap_s`` apart, until the ingress closes the connection."""
    for i in range(len(data)):
        if reader.at_eof() or writer.is_closing() or reader._buffer:  # an answer came: stop sending
            return
        try:
            writer.write(data[i:i + 1])
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(gap_s)


async def answer_now(reader: asyncio.StreamReader, timeout_s: float) -> tuple[int, dict]:
    """Status and JSON body of the answer, without waiting for the connection to end."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    return int(head.split(b" ", 2)[1]), json.loads(await asyncio.wait_for(reader.readexactly(length), timeout_s))


async def answer(reader: asyncio.StreamReader, timeout_s: float) -> tuple[int, dict, float]:
    """Status and JSON body of the answer, read to the end of the connection; the seconds it took."""
    started = time.monotonic()
    raw = await asyncio.wait_for(reader.read(), timeout_s)  # returns at EOF: the ingress closed the connection
    head, _, rest = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(rest), time.monotonic() - started


PAYLOAD = body(file_part(data=b"\x00" * 200_000))


def test_a_stalled_body_is_refused_and_its_connection_closed():
    settings = door_settings(ingress_body_idle_s=0.5, ingress_body_min_rate=0)

    async def scenario(server):
        reader, writer = await open_upload(server.port, PAYLOAD[:50_000], len(PAYLOAD))
        status, data, took = await answer(reader, 10)
        writer.close()
        return status, data, took

    status, data, took = serve(settings, scenario)
    assert status == 408 and "sent nothing for 0.5 s" in data["error"], data
    assert took < 5  # closed at once, not after aiohttp's 10 s of lingering


def test_a_trickling_body_is_refused_below_the_least_rate():
    settings = door_settings(ingress_body_idle_s=5, ingress_body_grace_s=0.5, ingress_body_min_rate=1000)

    async def scenario(server):
        reader, writer = await open_upload(server.port, PAYLOAD[:200], len(PAYLOAD))
        await trickle(reader, writer, PAYLOAD[200:260], 0.05)  # one byte every 50 ms: 20 bytes/s
        status, data, _ = await answer(reader, 10)
        writer.close()
        return status, data

    status, data = serve(settings, scenario)
    assert status == 408 and "least accepted is 1000 bytes/s" in data["error"], data


def test_a_body_over_its_total_time_is_refused():
    settings = door_settings(ingress_body_idle_s=5, ingress_body_min_rate=0, ingress_body_max_s=0.6)

    async def scenario(server):
        reader, writer = await open_upload(server.port, PAYLOAD[:100], len(PAYLOAD))
        await trickle(reader, writer, PAYLOAD[100:200], 0.05)
        status, data, _ = await answer(reader, 10)
        writer.close()
        return status, data

    status, data = serve(settings, scenario)
    assert status == 408 and "more than 0.6 s" in data["error"], data


@pytest.mark.parametrize("cap", ["ingress_max_uploads", "ingress_max_uploads_per_key"])
def test_uploads_past_a_cap_get_429_before_their_body_is_read(cap):
    settings = door_settings(ingress_body_idle_s=1.0, ingress_body_min_rate=0, **{cap: 2})

    async def scenario(server):
        held = [await open_upload(server.port, PAYLOAD[:1000], len(PAYLOAD)) for _ in range(2)]
        await asyncio.sleep(0.2)
        reader, writer = await open_upload(server.port, b"", len(PAYLOAD))
        refused = await answer_now(reader, 5)  # at once (aiohttp closes the connection up to 10 s later)
        writer.close()
        answers = [await answer(r, 10) for r, _ in held]  # the two held ones time out ...
        for _, w in held:
            w.close()
        refused_at_the_door = body(part(b"colour", b"blue"), file_part())
        reader, writer = await open_upload(server.port, refused_at_the_door, len(refused_at_the_door))
        after = await answer_now(reader, 10)  # ... and free their places
        writer.close()
        return refused, answers, after

    refused, answers, after = serve(settings, scenario)
    assert refused[0] == 429 and "limit" in refused[1]["error"], refused
    assert [a[0] for a in answers] == [408, 408]
    assert after[0] == 422 and "colour" in after[1]["error"], after  # read: past the cap again


@pytest.mark.parametrize(("budget", "spooled"), [(1 << 20, False), (10_000, True)], ids=["within", "past"])
def test_small_uploads_are_spooled_once_the_memory_budget_is_spent(budget, spooled, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    settings = door_settings(ingress_body_idle_s=1.0, ingress_body_min_rate=0, ingress_memory_upload_bytes=1 << 20,
                             ingress_memory_uploads_total_bytes=budget)

    async def scenario(server):
        reader, writer = await open_upload(server.port, PAYLOAD[:150_000], len(PAYLOAD))
        await asyncio.sleep(0.3)
        during = sorted(p.name for p in tmp_path.iterdir())
        await answer(reader, 10)
        writer.close()
        return during, sorted(p.name for p in tmp_path.iterdir())

    during, after = serve(settings, scenario)
    assert len(during) == spooled and all(name.startswith("kafscribe-upload-") for name in during), during
    assert after == []


# --- event streams -------------------------------------------------------------------------------------
class CountingJobs:
    """A job store of one queued job that counts its reads."""

    def __init__(self) -> None:
        self.reads = 0

    def get(self, job_id, tenant=None):
        self.reads += 1
        now = datetime.now(UTC)
        return {"job_id": job_id, "status": QUEUED, "attempts": 0, "error": None, "updated_at": now}

    def progress(self, job_id):
        return None

    listing_window = JobStore.listing_window


class StreamBackends(DoorOnly):
    def __init__(self) -> None:
        self.store = CountingJobs()

    def jobs(self):
        return self.store

    def connected(self) -> bool:
        return True


async def open_stream(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/jobs/j1/events HTTP/1.1\r\nHost: t\r\n\r\n")
    await writer.drain()
    return reader, writer


def test_event_streams_are_capped_per_key_share_their_reads_and_stop_when_the_client_goes():
    settings = door_settings(events_max_streams_per_key=20, events_poll_s=0.1)
    backends = StreamBackends()

    async def scenario(server):
        streams = [await open_stream(server.port) for _ in range(20)]
        for reader, _ in streams:
            await asyncio.wait_for(reader.readuntil(b"event: status"), 10)
        extra_reader, extra_writer = await open_stream(server.port)
        refused = await answer_now(extra_reader, 10)
        extra_writer.close()
        start = backends.store.reads
        await asyncio.sleep(1.0)
        during = backends.store.reads - start
        for _, writer in streams:
            writer.transport.abort()
        await asyncio.sleep(0.5)
        gone = backends.store.reads
        await asyncio.sleep(1.0)
        return refused, during, backends.store.reads - gone

    refused, during, after = serve(settings, scenario, backends)
    assert refused[0] == 429 and "event streams open" in refused[1]["error"], refused
    assert during <= 15, f"20 streams polling every 0.1 s for 1 s made {during} reads (shared: about 10)"
    assert after == 0, f"{after} reads after every client left"


# --- listing ---------------------------------------------------------------------------------------------

class FakeFuture:
    def __init__(self, rows) -> None:
        self.rows = rows
        self.query = self.message = self.query_plan = None

    def add_callbacks(self, ok, err) -> None:
        ok(self.rows)


class ListingSession:
    """A session with one listed job per day and nothing else; counts the statements run."""

    def __init__(self) -> None:
        self.statements = 0
        self.keyspace = "k"

    def prepare(self, query: str) -> str:
        return query

    def execute_async(self, query, params=None, **kw):
        from collections import namedtuple

        self.statements += 1
        if query.startswith("SELECT created_at, job_id FROM jobs_by_tenant"):
            day = datetime.strptime(params[1], "%Y%m%d").replace(tzinfo=UTC, hour=12)
            Row = namedtuple("Row", "created_at job_id")
            rows = [Row(day.replace(tzinfo=None), f"job-{params[1]}")]
            if len(params) == 3:
                rows = [r for r in rows if r.created_at.replace(tzinfo=UTC) <= params[2]]
            return FakeFuture(rows)
        if query.startswith("SELECT * FROM jobs"):
            Job = namedtuple("Job", "job_id tenant status options cancelled_at")
            return FakeFuture([Job(params[0], "t", QUEUED, "{}", None)])
        raise AssertionError(query)


def test_a_listing_makes_at_most_its_reads_and_continues_from_where_it_stopped():
    session = ListingSession()
    store = JobStore(session)
    prepared = session.statements

    async def run(**kw):
        return await store.list_jobs_async("t", limit=100, days=31, **kw)

    jobs, position = asyncio.run(run(max_reads=10))
    assert session.statements - prepared == 10  # 5 days: a partition read and a job row each
    assert len(jobs) == 5 and position is not None
    more, _ = asyncio.run(run(max_reads=10, before=position))
    # 4 more: the page goes on from the start of the day it stopped before (one read of the day above it)
    assert {j["job_id"] for j in more}.isdisjoint({j["job_id"] for j in jobs}) and len(more) == 4
    newest_next = max(datetime.strptime(j["job_id"][4:], "%Y%m%d") for j in more)
    oldest_first = min(datetime.strptime(j["job_id"][4:], "%Y%m%d") for j in jobs)
    assert newest_next == oldest_first - timedelta(days=1)  # no day skipped, none repeated


def test_a_listing_stops_as_soon_as_its_client_is_gone():
    session = ListingSession()
    store = JobStore(session)
    prepared = session.statements
    calls = []

    def alive() -> bool:
        calls.append(1)
        return len(calls) < 3

    with pytest.raises(ConnectionResetError):
        asyncio.run(store.list_jobs_async("t", limit=100, days=31, max_reads=1000, alive=alive))
    assert session.statements - prepared <= 4


@pytest.mark.parametrize("when", [timedelta(days=3650), timedelta(days=-40), timedelta(days=2910000)],
                         ids=["ten-years-ahead", "before-the-window", "year-9999"])
def test_a_cursor_outside_the_listing_window_is_422(when):
    settings = door_settings(jobs_list_days=31)
    at = datetime(9999, 12, 31, tzinfo=UTC) if when.days > 1_000_000 else datetime.now(UTC) + when
    cursor = encode_cursor((at, "zzzz"))

    async def scenario(server):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"GET /v1/jobs?cursor={cursor} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return raw

    raw = serve(settings, scenario, StreamBackends())
    assert raw.startswith(b"HTTP/1.1 422") and b"outside the listing window" in raw, raw[:300]


# --- nothing secret or internal in logs and errors ----------------------------------------------------------
def test_redact_removes_keys_and_authorization_values():
    text = f"b'Authorization: Bearer {KEY}\\x00' and {KEY} and Basic dXNlcjpwYXNz and whsec_abc+/="
    out = redact(text)
    assert "S3cr3t" not in out and "dXNlcjpwYXNz" not in out and "whsec_abc" not in out
    assert out.count("[redacted]") >= 4


def test_a_nul_after_the_key_never_puts_the_key_in_the_log(capsys):
    """aiohttp refuses the header line (400) and logs its exception, the raw line in it: the log has no key."""
    logs.setup("DEBUG")
    try:
        async def scenario(server):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /v1/jobs HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + KEY.encode()
                         + b"\x00\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return raw

        raw = serve(door_settings(), scenario)
    finally:
        logging.getLogger().handlers[:] = []
    err = capsys.readouterr().err
    assert raw.split(b" ", 2)[1] == b"400" and b"S3cr3t" not in raw, raw  # nor in the answer
    assert "Error handling request" in err  # aiohttp did log it ...
    assert "S3cr3t" not in err and "[redacted]" in err  # ... without the key


def test_the_redact_filter_keeps_tracebacks_but_not_secrets():
    record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "failed for %s", (KEY,), None)
    try:
        raise ValueError(f"bad header Authorization: Bearer {KEY}")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    Redact().filter(record)
    text = logs.JsonFormatter().format(record)
    assert "S3cr3t" not in text and "ValueError" in text and "Traceback" in text


@pytest.mark.parametrize("cause", [
    Unavailable("Cassandra unavailable: ('Unable to connect', {'127.0.0.50:9042': ConnectionRefusedError()})"),
    Unavailable("blob store unavailable: NoHostAvailable: {'10.1.2.3:9042': 'timeout'}"),
    RuntimeError("{'127.0.0.50:9042': OperationTimedOut()}"),
])
def test_an_outage_reason_names_the_service_and_no_address(cause):
    reason = outage_reason(cause)
    assert reason == OUTAGE_REASON and ":9042" not in reason and "127." not in reason


def test_a_broker_outage_names_kafka_and_nothing_else():
    reason = outage_reason(Unavailable("Kafka did not acknowledge the event: KafkaError{code=_MSG_TIMED_OUT}"))
    assert reason.startswith("Kafka unavailable") and "KafkaError" not in reason
