"""What the ingress refuses at the door, through aiohttp's test server: no Kafka or Cassandra needed.

Every bad upload in ``BAD_UPLOADS`` is refused before the backends are
touched (``DoorOnly`` fails the test if they are), with its status and
reason, and leaves no temp file. The same table runs against a real ingress
process with its own TMPDIR in tests/e2e/test_ingress_stack.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from kafscribe.settings import Settings
from producers.ingress import build_app
from producers.ingress.upload import MAX_FIELD_BYTES
from producers.submission import SubmissionError, check_text, check_trace_id

BOUNDARY = b"kafscribe-test-boundary"
AUDIO = b"RIFF" + b"\x00" * 60  # never probed: every row is refused before
LIMIT = 64 * 1024  # max_upload_bytes of these tests


def part(name: bytes | None, body: bytes, filename: bytes | None = None, headers: bytes = b"") -> bytes:
    disposition = b"form-data"
    if name is not None:
        disposition += b'; name="' + name + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    return b"--" + BOUNDARY + b"\r\nContent-Disposition: " + disposition + b"\r\n" + headers + b"\r\n" + body + b"\r\n"


def body(*parts: bytes) -> bytes:
    return b"".join(parts) + b"--" + BOUNDARY + b"--\r\n"


def file_part(filename: bytes = b"a.wav", data: bytes = AUDIO, headers: bytes = b"") -> bytes:
    return part(b"file", data, filename, headers)


MULTIPART = b"multipart/form-data; boundary=" + BOUNDARY

# id, extra request headers, content type, body, status, reason (a substring of the error)
BAD_UPLOADS = [
    ("second-file-part", b"", MULTIPART, body(file_part(), file_part(b"b.wav")), 422, "second one"),
    ("bogus-charset-after-file", b"", MULTIPART,
     body(file_part(), part(b"language", b"en", headers=b"Content-Type: text/plain; charset=x-bogus\r\n")),
     422, "unknown charset"),
    ("unknown-field", b"", MULTIPART, body(part(b"colour", b"blue"), file_part()), 422, "unknown field 'colour'"),
    ("unknown-field-after-file", b"", MULTIPART, body(file_part(), part(b"colour", b"blue")), 422, "unknown field"),
    ("field-over-limit", b"", MULTIPART, body(file_part(), part(b"callback_url", b"x" * (MAX_FIELD_BYTES + 1))),
     422, f"exceeds the limit of {MAX_FIELD_BYTES} bytes"),
    ("field-twice", b"", MULTIPART, body(part(b"language", b"en"), part(b"language", b"de"), file_part()),
     422, "given twice"),
    ("field-invalid-utf8", b"", MULTIPART, body(part(b"language", b"e\xffn"), file_part()), 422, "not valid utf-8"),
    ("field-control-char", b"", MULTIPART, body(part(b"language", b"e\x00n"), file_part()), 422, "control character"),
    ("bad-option-value", b"", MULTIPART, body(part(b"language", b"klingon"), file_part()), 422, "klingon"),
    ("trace-id-invalid-utf8", b"X-Trace-Id: ab\xff\xfe\r\n", MULTIPART, body(file_part()), 422,
     "X-Trace-Id is not valid UTF-8"),
    ("trace-id-too-long", b"X-Trace-Id: " + b"a" * 129 + b"\r\n", MULTIPART, body(file_part()), 422,
     "limit is 128"),
    ("trace-id-with-space", b"X-Trace-Id: a b\r\n", MULTIPART, body(file_part()), 422, "printable ASCII"),
    ("filename-invalid-utf8", b"", MULTIPART, body(file_part(b"a\xff\xfe.wav")), 422, "filename is not valid UTF-8"),
    ("filename-raw-control-char", b"", MULTIPART, body(file_part(b"a\x07.wav")), 422, "Invalid HTTP header"),
    ("filename-encoded-control-char", b"", MULTIPART,
     body(part(b"file", AUDIO, headers=b"Content-Disposition: form-data; name=file; filename*=UTF-8''a%0Ab.wav\r\n")
          .replace(b"Content-Disposition: form-data; name=\"file\"\r\n", b"", 1)),
     422, "filename contains a control"),
    ("filename-too-long", b"", MULTIPART, body(file_part(b"a" * 300 + b".wav")), 422, "filename is 304 characters"),
    ("file-over-limit", b"", MULTIPART, body(file_part(data=b"\x00" * (LIMIT + 1))), 413, f"limit of {LIMIT}"),
    ("no-file-part", b"", MULTIPART, body(part(b"language", b"en")), 422, "missing the 'file' part"),
    ("part-without-name", b"", MULTIPART, body(part(None, b"x"), file_part()), 422, "form-data name"),
    ("gzip-encoded-part", b"", MULTIPART, body(file_part(headers=b"Content-Encoding: gzip\r\n")), 422,
     "encoded parts"),
    ("base64-part", b"", MULTIPART, body(part(b"language", b"ZW4=", headers=b"Content-Transfer-Encoding: base64\r\n"),
                                         file_part()), 422, "encoded parts"),
    ("nested-multipart", b"", MULTIPART,
     body(part(b"file", b"--in\r\n\r\nx\r\n--in--", headers=b"Content-Type: multipart/mixed; boundary=in\r\n")),
     422, "nested multipart"),
    ("not-multipart", b"", b"application/json", b'{"file": "x"}', 422, "multipart/form-data"),
    ("no-boundary", b"", b"multipart/form-data", body(file_part()), 422, "malformed multipart"),
    ("truncated-body", b"", MULTIPART, file_part()[:-10], 422, "malformed multipart"),
]


class DoorOnly:
    """Backends that fail the test when used: every row must be refused at the door."""

    def submitter(self):
        raise AssertionError("a bad upload reached the backends")

    def close(self) -> None:
        pass


async def post_raw(port: int, extra: bytes, content_type: bytes, payload: bytes) -> tuple[int, dict]:
    """POST /v1/jobs with raw header bytes (clients can send bytes no HTTP library would)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (b"POST /v1/jobs HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: " + content_type
            + b"\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(payload))
    writer.write(head + payload)
    await writer.drain()
    response = await reader.read()
    writer.close()
    head_bytes, _, rest = response.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ", 2)[1]), json.loads(rest)


@pytest.fixture
def tmpdir_of_ingress(tmp_path, monkeypatch) -> Path:
    """The in-process ingress writes its temp files here (tempfile honours tempfile.tempdir)."""
    directory = tmp_path / "ingress-tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def door_settings(settings: Settings | None = None) -> Settings:
    """No key lookup or quota here: both need Cassandra (tests/test_auth*.py cover them)."""
    return (settings or Settings(max_upload_bytes=LIMIT)).with_(auth_required=False, tenant_max_unfinished=0)


def run_with_server(coro_fn, settings: Settings | None = None):
    async def main():
        app = build_app(door_settings(settings), DoorOnly())
        async with TestServer(app, host="127.0.0.1") as server:
            return await coro_fn(server)

    return asyncio.run(main())


@pytest.mark.parametrize("row", BAD_UPLOADS, ids=[r[0] for r in BAD_UPLOADS])
def test_bad_upload_is_refused_at_the_door_with_its_reason(row, tmpdir_of_ingress):
    _, extra, content_type, payload, status, reason = row
    got_status, got = run_with_server(lambda server: post_raw(server.port, extra, content_type, payload))
    assert (got_status, got["status"]) == (status, status), got
    assert reason in got["error"], got
    assert os.listdir(tmpdir_of_ingress) == []


FIELD = part(b"language", b"en")
FILE = file_part(data=b"\x00" * 40_000)
DISCONNECT_AT = {  # where the client goes away: bytes of the body sent before the connection is reset
    "in-a-text-field": len(FIELD) - 5,
    "in-the-file": len(FIELD) + 20_000,
    "after-the-file-before-the-end": len(FIELD) + len(FILE),
}


@pytest.mark.parametrize("spooled", [True, False], ids=["spooled", "in-memory"])
@pytest.mark.parametrize("where", DISCONNECT_AT, ids=list(DISCONNECT_AT))
def test_client_disconnecting_mid_upload_leaves_no_temp_file(where, spooled, tmpdir_of_ingress):
    # spooled: files above KAFSCRIBE_INGRESS_MEMORY_UPLOAD_BYTES go to a temp file; smaller ones never touch disk
    settings = Settings(max_upload_bytes=LIMIT, ingress_memory_upload_bytes=0 if spooled else len(FILE))
    payload = body(FIELD, FILE)
    cut = DISCONNECT_AT[where]

    async def scenario(server):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /v1/jobs HTTP/1.1\r\nHost: test\r\nContent-Type: " + MULTIPART
                     + b"\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload[:cut])
        await writer.drain()
        seen = set()
        for _ in range(50):  # 1 s for the ingress to take what was sent
            seen.update(os.listdir(tmpdir_of_ingress))
            await asyncio.sleep(0.02)
        writer.transport.abort()
        for _ in range(250):  # generous: 5 s for the handler to notice and clean up
            if not os.listdir(tmpdir_of_ingress):
                break
            await asyncio.sleep(0.02)
        return seen

    seen = run_with_server(scenario, settings)
    if where != "in-a-text-field" and spooled:  # the file part had started: its temp file existed
        assert len(seen) == 1 and next(iter(seen)).startswith("kafscribe-upload-")
    else:
        assert seen == set()
    assert os.listdir(tmpdir_of_ingress) == []


def test_huge_field_is_refused_after_a_few_kb_not_read_whole(tmpdir_of_ingress):
    """A 32 MiB field (client_max_size is far above it) is refused once it passes the cap."""
    big = body(part(b"callback_url", b"x" * (32 << 20)), file_part())
    settings = Settings(max_upload_bytes=64 << 20)
    status, got = run_with_server(lambda server: post_raw(server.port, b"", MULTIPART, big), settings)
    assert status == 422 and "exceeds the limit" in got["error"]


@pytest.mark.parametrize("value, reason", [
    ("ok-name.wav", None),
    ("naïve façade.flac", None),
    ("a\udcffb", "not valid UTF-8"),
    ("a\nb", "control character"),
    ("a\u2028b", "control character"),
    ("x" * 256, "limit is 255"),
])
def test_check_text(value, reason):
    if reason is None:
        assert check_text("filename", value, 255) == value
    else:
        with pytest.raises(SubmissionError, match=reason) as err:
            check_text("filename", value, 255)
        assert err.value.status == 422


def test_check_trace_id_accepts_w3c_ids_and_refuses_non_ascii():
    w3c = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert check_trace_id(w3c) == w3c
    with pytest.raises(SubmissionError, match="printable ASCII"):
        check_trace_id("trace-é")


def test_language_table_is_whisper_s_without_importing_torch():
    """parse_options runs on the event loop: it must not import whisper (and so torch) to know the codes."""
    import subprocess
    import sys

    code = ("import sys; from kafscribe.settings import Settings; from producers.ingress import build_app; "
            "from producers.submission import _languages, parse_options; "
            "parse_options({'language': 'de', 'translate_to': 'en'}, Settings()); "
            "assert 'torch' not in sys.modules and 'whisper' not in sys.modules, 'torch imported'; "
            "from whisper.tokenizer import LANGUAGES; assert _languages() == LANGUAGES; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


@pytest.mark.parametrize("sizes", [[], [0], [1], [7, 3], [10], [25], [4, 4, 4, 4, 4, 5], [0, 0, 13, 0]])
def test_rechunk_cuts_any_stream_into_fixed_pieces(sizes):
    from kafscribe.store.blobs import rechunk

    data = os.urandom(sum(sizes))
    chunks, offset = [], 0
    for n in sizes:
        chunks.append(data[offset:offset + n])
        offset += n
    pieces = list(rechunk(iter(chunks), 10))
    assert b"".join(pieces) == data
    assert all(len(p) == 10 for p in pieces[:-1]) and 0 < len(pieces[-1]) <= 10 or pieces == [b""]


def test_remove_orphans_takes_only_files_of_dead_ingress_processes(tmp_path):
    import subprocess
    import sys

    from producers.ingress.upload import TEMP_PREFIX, remove_orphans

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    names = {f"{TEMP_PREFIX}{dead}-abc": False, f"{TEMP_PREFIX}{os.getpid()}-mine": True,
             f"{TEMP_PREFIX}{os.getppid()}-alive": True, "kafscribe-other-1-x": True, "unrelated": True}
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert remove_orphans(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, kept in names.items() if kept)


def test_routes_that_need_no_backend_answer_through_the_test_client(tmpdir_of_ingress):
    from aiohttp.test_utils import TestClient

    async def scenario():
        app = build_app(door_settings(), DoorOnly())
        async with TestClient(TestServer(app)) as client:
            health = await client.get("/healthz")
            assert (health.status, await health.json()) == (200, {"status": "ok"})
            bad_format = await client.get("/v1/jobs/abc/transcript?format=docx")
            got = await bad_format.json()
            assert bad_format.status == 422 and "format must be one of" in got["error"]
            refused = await client.post("/v1/jobs", data=b"not multipart", headers={"Content-Type": "text/plain"})
            assert refused.status == 422
            metrics = await (await client.get("/metrics")).text()
            assert 'route="/v1/jobs",status="422"' in metrics
            assert (await client.get("/nowhere")).status == 404

    asyncio.run(scenario())


def test_the_ingress_keeps_its_state_under_app_keys():
    """String keys make aiohttp warn (NotAppKeyWarning): every piece of app state has a ``web.AppKey``."""
    import warnings

    from aiohttp import web

    from kafscribe.settings import Settings
    from producers.ingress import build_app
    from producers.ingress.appkeys import BACKENDS, SETTINGS

    with warnings.catch_warnings():
        warnings.simplefilter("error", web.NotAppKeyWarning)
        app = build_app(Settings())
    try:
        assert app[SETTINGS].http_port == Settings().http_port
        assert all(isinstance(key, web.AppKey) for key in app), list(app)
    finally:
        app[BACKENDS].close()
