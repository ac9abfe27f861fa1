"""Ingress hygiene on the real stack: a real ingress process with its own TMPDIR, real Kafka and Cassandra.

After every bad upload the ingress's TMPDIR is empty and no blob exists; a
good upload leaves no temp file and a blob whose sha256 is the file's; a
failed job row or publish deletes the blob; peak memory does not grow with
the size of fields or files.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import uuid
import wave
from pathlib import Path

import pytest

from bench.harness import wait_until
from infra import bootstrap
from kafscribe.statuses import FAILED, QUEUED
from kafscribe.store import blobs as blobstore
from kafscribe.store import session as cassandra_session
from kafscribe.store.jobs import JobStore
from producers.publisher import Publisher
from producers.submission import SubmissionError, Submitter, Unavailable, parse_options
from tests.conftest import fresh_settings, make_pipeline
from tests.unit.test_ingress_door import BAD_UPLOADS, LIMIT, MULTIPART, body, file_part, part, post_raw

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def door(stack_settings, tmp_path_factory):
    """An ingress alone (no workers) with its own TMPDIR and its own file blob directory.

    Every file part is spooled to a temp file (KAFSCRIBE_INGRESS_MEMORY_UPLOAD_BYTES=0): the temp-file rules
    are what this module checks (tests/e2e/test_ingest.py covers uploads kept in memory).
    """
    tmpdir = tmp_path_factory.mktemp("ingress-tmpdir")
    blob_dir = tmp_path_factory.mktemp("ingress-blobs")
    settings = fresh_settings(stack_settings, max_upload_bytes=LIMIT, blob_store="file", blob_dir=blob_dir,
                              ingress_memory_upload_bytes=0)
    pipe = make_pipeline(settings, tmp_path_factory, "ingress-door")
    pipe.start("ingress", TMPDIR=str(tmpdir))
    pipe.tmpdir, pipe.blob_dir = tmpdir, blob_dir
    yield pipe
    pipe.stop()


def key_header(pipe) -> bytes:
    """The Pipeline's API key as a raw header line."""
    return b"Authorization: Bearer " + pipe.api_key.encode() + b"\r\n"


def post(pipe, extra: bytes, content_type: bytes, payload: bytes) -> tuple[int, dict]:
    return asyncio.run(post_raw(pipe.settings.http_port, key_header(pipe) + extra, content_type, payload))


def test_bad_uploads_at_a_real_ingress_leave_no_temp_file_and_no_blob(door, clips):
    rows = [*BAD_UPLOADS,
            ("not-audio", b"", MULTIPART, body(file_part(data=clips["garbage"].read_bytes())), 415, "not a readable"),
            ("empty-file", b"", MULTIPART, body(file_part(data=b"")), 415, "empty"),
            ("bad-tenant", b"X-Tenant: t\xff\r\n", MULTIPART, body(file_part(data=clips["en_mp3"].read_bytes())),
             422, "invalid tenant name")]  # refused by auth (an admin key may name a tenant)
    failures = []
    for name, extra, content_type, payload, status, reason in rows:
        got_status, got = post(door, extra, content_type, payload)
        left = os.listdir(door.tmpdir)
        if got_status != status or reason not in got.get("error", "") or left:
            failures.append((name, got_status, got, left))
    assert failures == []
    assert os.listdir(door.blob_dir) == []
    assert door.alive("ingress")


def test_good_upload_streams_to_the_blob_store_with_its_sha256(door, clips, session):
    data = clips["en_mp3"].read_bytes()
    status, got = post(door, b"X-Trace-Id: trace-ok-1\r\n", MULTIPART,
                       body(part(b"language", b"en"), file_part(b"speech \xc3\xa9.mp3", data)))
    assert status == 202, got
    assert os.listdir(door.tmpdir) == []
    job = JobStore(session).get(got["job_id"])
    assert job["status"] == QUEUED and job["filename"] == "speech é.mp3" and job["trace_id"] == "trace-ok-1"
    assert job["audio_sha256"] == hashlib.sha256(data).hexdigest() and job["audio_bytes"] == len(data)
    assert blobstore.read_verified(door.settings, session, job["blob_ref"], job["audio_sha256"]) == data


def test_http_client_streams_a_file_with_an_awkward_name(door, clips, session, tmp_path):
    awkward = tmp_path / 'naïve "quoted"\nname.mp3'
    awkward.write_bytes(clips["en_mp3"].read_bytes())
    got = door.http.submit(awkward, language="en")
    job = JobStore(session).get(got["job_id"])
    assert job["filename"] == "naïve %22quoted%22%0Aname.mp3"
    assert job["audio_bytes"] == awkward.stat().st_size


def test_disconnect_mid_upload_at_a_real_ingress_leaves_no_temp_file(door):
    payload = body(file_part(data=b"\x00" * 50_000))
    sock = socket.create_connection(("127.0.0.1", door.settings.http_port))
    sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\n" + key_header(door) + b"Content-Type: " + MULTIPART
                 + b"\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload[:25_000])
    wait_until(lambda: os.listdir(door.tmpdir), 10, "the upload's temp file to exist")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    sock.close()
    wait_until(lambda: not os.listdir(door.tmpdir), 10, "the temp file to be removed")
    assert door.alive("ingress")
    log = wait_until(lambda: [ln for ln in door.log_tail("ingress", 200).splitlines() if "disconnected" in ln],
                     10, "the disconnect to be logged")
    assert '"level": "info"' in log[-1] and '"level": "error"' not in door.log_tail("ingress", 200)


def test_concurrent_uploads_are_all_accepted_and_leave_no_temp_file(door, clips):
    data = clips["en_mp3"].read_bytes()

    async def many():
        port = door.settings.http_port
        return await asyncio.gather(*(
            post_raw(port, key_header(door) + b"X-Trace-Id: conc-%d\r\n" % i, MULTIPART, body(file_part(b"c%d.mp3" % i, data)))
            for i in range(8)))

    answers = asyncio.run(many())
    assert [status for status, _ in answers] == [202] * 8, answers
    assert len({got["job_id"] for _, got in answers}) == 8
    assert os.listdir(door.tmpdir) == []


def test_temp_file_of_an_ingress_killed_mid_upload_is_removed_when_it_restarts(door):
    payload = body(file_part(data=b"\x00" * 50_000))
    with socket.create_connection(("127.0.0.1", door.settings.http_port)) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\n" + key_header(door) + b"Content-Type: " + MULTIPART
                     + b"\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload[:25_000])
        wait_until(lambda: os.listdir(door.tmpdir), 10, "the upload's temp file to exist")
        door.kill("ingress")
    assert len(os.listdir(door.tmpdir)) == 1  # a dead process cannot clean up after itself
    door.start("ingress", TMPDIR=str(door.tmpdir))
    wait_until(lambda: not os.listdir(door.tmpdir), 10, "the orphaned temp file to be removed")


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak resident memory so far, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def send_ignoring_close(port: int, payload: bytes) -> bytes:
    """Send a whole request; the ingress may answer early and close, which is fine."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            return sock.recv(4096)
        except ConnectionResetError:
            return b""


def silent_wav(path: Path, seconds: int) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00\x00" * 16000 * seconds)
    return path


def test_peak_memory_does_not_grow_with_field_or_file_size(stack_settings, tmp_path_factory, tmp_path, clips):
    """Cassandra blob store. Peak RSS after an 8 MiB file, then after a 40 MiB one: the larger file adds
    far less than its size, as it is streamed in chunks; three 32 MiB fields are refused after 4 KiB."""
    settings = fresh_settings(stack_settings, max_upload_bytes=64 << 20)
    pipe = make_pipeline(settings, tmp_path_factory, "ingress-memory")
    pipe.start("ingress", TMPDIR=str(tmp_path))
    try:
        pid, port = pipe.procs["ingress"].pid, pipe.settings.http_port
        start = peak_rss(pid)
        assert pipe.http.submit(silent_wav(tmp_path.parent / "small.wav", 262))["job_id"]  # 8 MiB
        small = peak_rss(pid)
        assert pipe.http.submit(silent_wav(tmp_path.parent / "large.wav", 1310))["job_id"]  # 40 MiB
        large = peak_rss(pid)
        fields = body(*(part(b"callback_url", b"x" * (32 << 20)) for _ in range(3)), file_part())
        head = (b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + key_header(pipe) + b"Content-Type: " + MULTIPART
                + b"\r\nContent-Length: %d\r\n\r\n" % len(fields))
        answer = send_ignoring_close(port, head + fields)
        assert answer == b"" or b" 422 " in answer.split(b"\r\n", 1)[0]
        after_fields = peak_rss(pid)
        mib = 1 << 20
        print(f"ingress peak RSS {start / mib:.0f} MiB; first upload (8 MiB) +{(small - start) / mib:.1f} MiB; "
              f"40 MiB upload +{(large - small) / mib:.1f} MiB; 3x32 MiB fields +{(after_fields - large) / mib:.1f} MiB")
        # streamed: 0.2-12 MiB measured, the same for 110 MiB (malloc arenas); read whole it would be >= 40
        assert large - small < 20 * mib
        assert after_fields - large < 4 * mib
        assert os.listdir(tmp_path) == []
    finally:
        pipe.stop()


def _source(clips, kind: str):
    """The same clip as a file (streamed: blob, then row) or as bytes (small uploads: blob and row at once)."""
    return clips["en_mp3"] if kind == "file" else clips["en_mp3"].read_bytes()


@pytest.mark.parametrize("source", ["file", "bytes"])
@pytest.mark.parametrize("scheme", ["cassandra", "file"])
def test_failed_publish_deletes_the_blob_and_fails_the_job(stack_settings, session, clips, tmp_path, scheme,
                                                           source):
    # topics of this prefix do not exist (auto-creation is off): the broker never acknowledges
    settings = stack_settings.with_(topic_prefix=f"absent{uuid.uuid4().hex[:8]}.", blob_store=scheme,
                                    blob_dir=tmp_path)
    publisher = Publisher(settings, delivery_timeout_s=1.0)
    try:
        submitter = Submitter(settings, session, publisher)
        job_id = uuid.uuid4().hex
        with pytest.raises(Unavailable):
            submitter.submit(_source(clips, source), parse_options({}, settings), job_id=job_id)
    finally:
        publisher.close()
    job = JobStore(session).get(job_id)
    assert job["status"] == FAILED and "not queued" in job["error"]
    with pytest.raises(blobstore.BlobError, match="not found"):
        submitter.blobs.get(f"{scheme}:{job_id}")


@pytest.fixture
def scratch(stack_settings):
    """A scratch keyspace (blobs in Cassandra) whose tables a test may drop after the submitter prepared them."""
    keyspace = f"kafscribe_scratch_{uuid.uuid4().hex[:8]}"
    settings = stack_settings.with_(cassandra_keyspace=keyspace, blob_store="cassandra")
    bootstrap.ensure_schema(settings)
    session = cassandra_session.connect(settings, keyspace=keyspace)
    publisher = Publisher(fresh_settings(stack_settings), delivery_timeout_s=5.0)
    try:
        yield settings, session, Submitter(settings, session, publisher)
    finally:
        publisher.close()
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
        session.cluster.shutdown()


@pytest.mark.parametrize("source", ["file", "bytes"])
def test_failed_job_row_deletes_the_blob(scratch, clips, source):
    settings, session, submitter = scratch
    session.execute(f"DROP TABLE {settings.cassandra_keyspace}.jobs", timeout=60)
    with pytest.raises(Unavailable, match="job store unavailable"):
        submitter.submit(_source(clips, source), parse_options({}, settings))
    assert list(session.execute("SELECT blob_id FROM audio_chunks")) == []  # the keyspace is this test's


def test_failed_blob_write_of_a_small_upload_fails_its_row(scratch, clips):
    """Blob and row are written at once for bytes: a failed blob write leaves the row failed, never queued."""
    settings, session, submitter = scratch
    session.execute(f"DROP TABLE {settings.cassandra_keyspace}.audio_chunks", timeout=60)
    job_id = uuid.uuid4().hex
    with pytest.raises(Unavailable, match="blob store unavailable"):
        submitter.submit(_source(clips, "bytes"), parse_options({}, settings), job_id=job_id)
    job = JobStore(session).get(job_id)
    assert job["status"] == FAILED and "not queued: the blob store failed" in job["error"]
    assert JobStore(session).unfinished_jobs("default", 10) == []  # no quota slot held


def test_direct_submit_refuses_bad_text_before_storing_anything(stack_settings, session, clips, tmp_path):
    settings = fresh_settings(stack_settings, blob_store="file", blob_dir=tmp_path)
    publisher = Publisher(settings)
    try:
        submitter = Submitter(settings, session, publisher)
        for kwargs, reason in [({"tenant": "t\udcff"}, "tenant is not valid UTF-8"),
                               ({"trace_id": "x" * 200}, "limit is 128"),
                               ({"filename": "a\x1b[31m.wav"}, "control character")]:
            with pytest.raises(SubmissionError, match=reason) as err:
                submitter.submit(clips["en_mp3"], parse_options({}, settings), **kwargs)
            assert err.value.status == 422
        assert os.listdir(tmp_path) == []
    finally:
        publisher.close()


@pytest.mark.parametrize("scheme", ["cassandra", "file"])
def test_put_chunks_stores_uneven_chunks_in_fixed_rows_and_delete_removes_them(
        stack_settings, session, tmp_path, scheme):
    settings = stack_settings.with_(blob_chunk_bytes=1000, blob_dir=tmp_path)
    store = blobstore.open_store(settings, session, scheme=scheme)
    data = os.urandom(4321)
    blob_id = uuid.uuid4().hex
    ref = store.put_chunks(blob_id, iter([data[:17], data[17:2500], b"", data[2500:]]))
    assert blobstore.read_verified(settings, session, ref, hashlib.sha256(data).hexdigest()) == data
    if scheme == "cassandra":
        rows = list(session.execute("SELECT idx, data FROM audio_chunks WHERE blob_id=%s", (blob_id,)))
        assert [(r.idx, len(r.data)) for r in rows] == [(0, 1000), (1, 1000), (2, 1000), (3, 1000), (4, 321)]
    store.delete(blob_id)
    with pytest.raises(blobstore.BlobError, match="not found"):
        store.get(ref)
    assert os.listdir(tmp_path) == []  # no .tmp left by the file store either


def test_direct_submit_refuses_a_used_job_id_and_keeps_that_job_s_blob(stack_settings, session, clips, tmp_path):
    settings = fresh_settings(stack_settings, blob_store="file", blob_dir=tmp_path)
    publisher = Publisher(settings)
    try:
        submitter = Submitter(settings, session, publisher)
        first = submitter.submit(clips["en_mp3"], parse_options({}, settings))
        with pytest.raises(SubmissionError, match="exists") as err:
            submitter.submit(clips["garbage"], parse_options({}, settings), job_id=first.job_id)
        assert err.value.status == 409
    finally:
        publisher.close()
    assert blobstore.read_verified(settings, session, first.blob_ref, first.audio_sha256)
    assert JobStore(session).get(first.job_id)["audio_sha256"] == first.audio_sha256
