"""Ingest at the speed of the log: the in-process probe against hostile files, the thread-free upload path,
several ingress processes on one port."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from bench.harness import wait_until
from kafscribe.speech import audio
from kafscribe.speech import probe as audio_probe
from kafscribe.store import blobs as blobstore
from kafscribe.store.jobs import JobStore
from tests import audio_clips as ac
from tests.conftest import fresh_settings, make_pipeline
from tests.unit.test_ingress_door import MULTIPART, body, file_part, post_raw

FORMATS = ("wav", "mp3", "ogg", "m4a", "flac", "webm", "aiff", "opus", "wma", "ts")


@pytest.fixture(scope="module")
def made(tmp_path_factory, clips) -> dict[str, Path]:
    """The English clip in every format the door should take."""
    d = tmp_path_factory.mktemp("ingest-formats")
    return {fmt: ac.to_format(clips["en"], d / f"en.{fmt}") for fmt in FORMATS}


def ffmpeg_seconds(path: Path) -> float:
    """The independent reference: what the ffmpeg CLI decodes, in seconds (16 kHz mono s16le)."""
    pcm = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1",
                          "-ar", "16000", "pipe:1"], capture_output=True, check=True).stdout
    return len(pcm) / audio.PCM_BYTES_PER_SECOND


@pytest.mark.parametrize("fmt", FORMATS)
def test_probe_measures_what_ffmpeg_decodes(made, fmt):
    path = made[fmt]
    expected = ffmpeg_seconds(path)
    assert audio.probe(path, max_duration_s=60).duration == pytest.approx(expected, abs=0.05)
    # the ingress probes small uploads from memory: the same answer
    assert audio_probe.measure(path.read_bytes(), 60).duration == pytest.approx(expected, abs=0.05)


REFUSED = "is not an accepted audio format"


@pytest.mark.parametrize("name, content, refused_as", [
    ("hls", b"#EXTM3U\n#EXT-X-TARGETDURATION:600\n#EXTINF:600,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n", "hls"),
    ("hls-after-bom", b"\xef\xbb\xbf\n#EXTM3U\n#EXTINF:1,\nhttp://127.0.0.1:9/x.ts\n", "hls"),
    ("ffconcat", b"ffconcat version 1.0\nfile /etc/passwd\n", "concat"),
    ("sdp-rtp-stream", b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                       b"m=audio 5004 RTP/AVP 0\r\n", "sdp"),
])
def test_formats_that_open_other_files_or_urls_are_refused_by_name(tmp_path, name, content, refused_as):
    for source in (content, _write(tmp_path / "upload", content)):
        with pytest.raises(audio.AudioError, match=f"'{refused_as}' {REFUSED}"):
            audio_probe.measure(source, 60)


def test_a_playlist_is_not_followed_even_if_its_demuxer_were_allowed(tmp_path, clips, monkeypatch):
    """The second lock: nested opens are refused (protocol_whitelist=none) whatever the demuxer."""
    segment = ac.to_format(clips["en"], tmp_path / "secret.ts")
    playlist = ac.hls_playlist(tmp_path / "upload.m3u8", segment)  # the extension makes libavformat take it
    monkeypatch.setattr(audio_probe, "_SNIFF", ())
    monkeypatch.setitem(audio_probe.CONTAINER_OPTIONS, "format_whitelist", "hls,mpegts")
    with pytest.raises(audio.AudioError, match="Error when loading first segment"):
        audio_probe.measure(playlist, 3600)
    monkeypatch.setitem(audio_probe.CONTAINER_OPTIONS, "protocol_whitelist", "file")
    assert audio_probe.measure(playlist, 3600).duration > 1  # the attack the first lock stops is real


def test_an_image_is_refused_with_its_format_named(tmp_path):
    png = tmp_path / "cover.png"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x64",
                    "-frames", "1", str(png)], check=True)
    with pytest.raises(audio.AudioError, match=f"'png_pipe' {REFUSED}"):
        audio.probe(png, max_duration_s=60)


def test_headers_that_lie_are_measured_by_decoding(tmp_path, clips):
    # a WAV whose RIFF and data sizes claim 4 GiB of samples: its 2-8 s of real samples are what counts
    data = bytearray(clips["en"].read_bytes())
    at = data.index(b"data")
    data[4:8] = data[at + 4:at + 8] = struct.pack("<I", 0xFFFFFFF0)
    assert audio_probe.measure(bytes(data), 60).duration == pytest.approx(ffmpeg_seconds(clips["en"]), abs=0.05)
    # a FLAC whose STREAMINFO claims 2^36-1 samples, measured from memory too
    flac = ac.lying_flac(tmp_path / "lying.flac", seconds=2.0)
    info = audio_probe.measure(flac.read_bytes(), 60)
    assert info.duration == pytest.approx(2.0, abs=0.05) and info.header_duration > 8_000_000
    # MP3 frames in a WAV that says so, with noise for a payload: refused, in words
    with pytest.raises(audio.AudioError, match="could not be decoded"):
        audio_probe.measure(clips["lying"].read_bytes(), 60)


def test_empty_and_garbage_are_refused(tmp_path, clips):
    for source in (b"", _write(tmp_path / "empty", b""), clips["garbage"].read_bytes(), b"RIFF", b"\x00" * 10_000):
        with pytest.raises(audio.AudioError, match="not a readable audio file|no audio stream"):
            audio_probe.measure(source, 60)
    with pytest.raises(audio.AudioError, match="cannot read the uploaded file"):
        audio.probe(tmp_path / "gone.wav", max_duration_s=60)


@pytest.mark.parametrize("fmt", ["wav", "mp3", "ogg", "m4a", "flac", "webm"])
def test_truncated_files_are_measured_or_refused_never_crash(made, fmt):
    data = made[fmt].read_bytes()
    full = ffmpeg_seconds(made[fmt])
    for cut in (len(data) * 3 // 4, len(data) // 2, 1000, 100, 12, 1):
        try:
            info = audio_probe.measure(data[:cut], 60)
        except audio.AudioError:
            continue
        assert 0 < info.duration <= full + 0.05, (cut, info)


def test_mutated_files_only_ever_give_audio_errors_or_bounded_durations(made):
    rng = random.Random(15)
    outcomes = {"measured": 0, "refused": 0}
    for fmt in ("wav", "mp3", "ogg", "flac", "m4a"):
        data = made[fmt].read_bytes()
        for _ in range(40):
            mutated = bytearray(data)
            for _ in range(rng.choice((1, 5, 50))):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            try:
                info = audio_probe.measure(bytes(mutated), 30, timeout_s=20)
            except audio.AudioTooLong:
                outcomes["refused"] += 1
            except audio.AudioError:
                outcomes["refused"] += 1
            else:
                assert 0 < info.duration <= 30
                outcomes["measured"] += 1
    assert outcomes["measured"] > 0  # most single-byte flips leave a decodable file


def test_long_audio_stops_at_the_limit_and_async_probing_gives_the_loop_back(tmp_path):
    long = ac.silence_flac(tmp_path / "silence.flac", seconds=3 * 3600)
    started = time.monotonic()
    with pytest.raises(audio.AudioTooLong, match="longer than the limit of 60 s"):
        audio_probe.measure(long, 60)
    assert time.monotonic() - started < 10  # stopped at the limit, not after decoding 3 hours

    async def probe_while_ticking():
        gaps, last = [], time.monotonic()
        probing = asyncio.ensure_future(audio_probe.measure_async(long, 4 * 3600))
        while not probing.done():
            await asyncio.sleep(0)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
        return probing.result(), gaps

    info, gaps = asyncio.run(probe_while_ticking())
    assert info.duration == pytest.approx(3 * 3600, abs=1)
    assert len(gaps) > 100 and max(gaps) < 0.5  # yields every few ms; a generous bound for a busy machine


def test_a_stuck_probe_times_out(clips):
    with pytest.raises(audio.AudioError, match="timed out"):
        audio_probe.measure(clips["en"].read_bytes(), 60, timeout_s=0)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- the thread-free upload path, on the real stack ---------------------------------------------------------


def test_async_blob_put_stores_the_same_rows_as_put_chunks(stack_settings, session, tmp_path):
    settings = stack_settings.with_(blob_chunk_bytes=1000, blob_dir=tmp_path)
    data = os.urandom(4321)

    async def pieces():
        for piece in (data[:17], data[17:2500], b"", data[2500:]):
            yield piece

    for scheme in ("cassandra", "file"):
        store = blobstore.open_store(settings, session, scheme=scheme)
        blob_id = uuid.uuid4().hex
        ref = asyncio.run(store.put_async(blob_id, pieces()))
        assert blobstore.read_verified(settings, session, ref, hashlib.sha256(data).hexdigest()) == data
        if scheme == "cassandra":
            rows = list(session.execute("SELECT idx, data FROM audio_chunks WHERE blob_id=%s", (blob_id,)))
            assert [(r.idx, len(r.data)) for r in rows] == [(0, 1000), (1, 1000), (2, 1000), (3, 1000), (4, 321)]
        asyncio.run(store.delete_async(blob_id))
        with pytest.raises(blobstore.BlobError, match="not found"):
            store.get(ref)


@pytest.fixture(scope="module")
def door(stack_settings, tmp_path_factory):
    """An ingress of two processes on one port (no workers), with its own TMPDIR."""
    tmpdir = tmp_path_factory.mktemp("ingest-tmpdir")
    settings = fresh_settings(stack_settings, ingress_processes=2)
    pipe = make_pipeline(settings, tmp_path_factory, "ingest-door")
    pipe.start("ingress", TMPDIR=str(tmpdir))
    pipe.tmpdir = tmpdir
    yield pipe
    pipe.stop()


def serving(pipe) -> set[int]:
    """Pids listening on the pipeline's HTTP port."""
    return {c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
            and c.laddr and c.laddr.port == pipe.settings.http_port and c.pid}


def upload_many(pipe, data: bytes, n: int) -> list[tuple[int, dict]]:
    header = b"Authorization: Bearer " + pipe.api_key.encode() + b"\r\n"

    async def many():
        return await asyncio.gather(*(post_raw(pipe.settings.http_port, header, MULTIPART,
                                               body(file_part(b"c%d.mp3" % i, data))) for i in range(n)))

    return asyncio.run(many())


def test_uploads_to_several_processes_are_durable_and_never_touch_disk(door, clips, session):
    group = psutil.Process(door.procs["ingress"].pid)
    children = wait_until(lambda: serving(door) if len(serving(door)) == 2 else None, 60, "two processes listening")
    assert children <= {p.pid for p in group.children()}  # (besides multiprocessing's resource tracker)
    data = clips["en_mp3"].read_bytes()
    answers = upload_many(door, data, 16)
    assert [status for status, _ in answers] == [202] * 16, answers
    jobs = JobStore(session)
    for _, got in answers:  # the 202 came after the row (and the broker's ack): every row is there
        job = jobs.get(got["job_id"])
        assert job["status"] == "queued" and job["audio_bytes"] == len(data)
        assert job["audio_sha256"] == hashlib.sha256(data).hexdigest()
    assert os.listdir(door.tmpdir) == []  # small uploads are probed and stored from memory


def test_a_crashed_ingress_process_is_replaced_and_sigterm_stops_the_group(door, clips):
    first = wait_until(lambda: serving(door) if len(serving(door)) == 2 else None, 60, "two processes listening")
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    now = wait_until(lambda: serving(door) if len(serving(door)) == 2 and victim not in serving(door) else None,
                     60, "a replacement process")
    assert len(now - first) == 1
    answers = upload_many(door, clips["en_mp3"].read_bytes(), 4)
    assert [status for status, _ in answers] == [202] * 4, answers
    door.kill("ingress", signal.SIGTERM)
    assert door.procs["ingress"].returncode == 0
    wait_until(lambda: not serving(door) and not any(psutil.pid_exists(p) for p in now), 30, "the group to stop")


def test_a_group_whose_processes_cannot_start_stops_with_an_error(door):
    """A port held by a process without SO_REUSEPORT: every child fails to bind, the group exits 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "kafscribe.cli.main", "serve", "ingress"],
                              env=door.env(KAFSCRIBE_HTTP_PORT=str(port)), capture_output=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert b"at start; stopping the group" in done.stdout + done.stderr
