"""Probing uploads in-process with PyAV: the door's check, without a subprocess per upload.

``audio.probe`` (a path) and the ingress (bytes or a path, through ``measure_async``)
both end here. The rules are the ones the ffprobe/ffmpeg probe had:

- Only the uploaded bytes are read: the file is handed to libavformat as a
  Python file object, demuxers are limited to ``audio.DEMUXERS``
  (``format_whitelist``) and nested opens to no protocol at all
  (``protocol_whitelist=none``), so a playlist (HLS, concat) or a reference
  movie cannot make us read another file or a URL.
- The duration is the decoded one: samples are counted frame by frame (never
  kept) and the count stops as soon as it passes the limit, so a header that
  promises 2^36 samples or three hours of silence costs what the limit allows.
- A stream whose packets mostly fail to decode is refused, like ffmpeg does by
  default (``-max_error_rate`` 2/3); one that decodes to nothing is refused.

The work is a generator that yields between packets: ``measure`` drives it to
the end (worker threads, CLI), ``measure_async`` gives the event loop back
every few milliseconds, so a long file never stalls other requests and the
ingress needs no thread for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import BinaryIO

import av
import av.logging

from kafscribe.speech.audio import DEMUXERS, AudioError, AudioInfo, AudioTooLong, FormatRefused

# libav reports why it refused a file in the exception (``exc.log``) only while its log
# callback is installed; its lines are not worth a log record each (a hostile upload makes hundreds).
av.logging.set_level(av.logging.ERROR)
logging.getLogger("libav").setLevel(logging.CRITICAL)

CONTAINER_OPTIONS = {"format_whitelist": ",".join(DEMUXERS), "protocol_whitelist": "none"}
# Format detection reads up to ``probesize`` bytes; libavformat's 5 MB default costs a 2 s WAV 8 ms of
# CPU (its S/PDIF scan reads it all), a few KB cost 0.5 ms. A file not recognised from its first
# FAST_PROBE_BYTES is opened again with the default, so odd files (a large ID3 tag) still open.
FAST_PROBE_BYTES = 4096
MAX_ERROR_RATE = 2 / 3  # ffmpeg's default -max_error_rate: more failed packets than this fails the file
YIELD_EVERY_S = 0.004  # measure_async hands the loop back at least this often
REFUSED_FORMAT = "{!r} is not an accepted audio format (playlists and formats that read other files or URLs are refused)"
_SNIFF = ((b"#EXTM3U", "hls"), (b"ffconcat", "concat"))

Source = Path | bytes | bytearray | memoryview


def default_timeout_s(limit_s: float) -> float:
    """The time a probe may take: generous for a file at the limit (the same rule as before)."""
    return 30.0 + limit_s / 20


def measure(source: Source, limit_s: float, timeout_s: float | None = None) -> AudioInfo:
    """Describe the first audio stream of ``source`` with its decoded duration (blocking)."""
    steps = _measure(source, limit_s, timeout_s)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


async def measure_async(source: Source, limit_s: float, timeout_s: float | None = None) -> AudioInfo:
    """``measure`` on the event loop, giving it back every ``YIELD_EVERY_S`` of decoding."""
    steps = _measure(source, limit_s, timeout_s)
    since = time.monotonic()
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        if time.monotonic() - since >= YIELD_EVERY_S:
            await asyncio.sleep(0)
            since = time.monotonic()


def _measure(source: Source, limit_s: float, timeout_s: float | None) -> Generator[None, None, AudioInfo]:
    deadline = time.monotonic() + (default_timeout_s(limit_s) if timeout_s is None else timeout_s)
    with _open_file(source) as f:
        _refuse_playlists(f)
        try:
            container = _open_container(f, {"probesize": str(FAST_PROBE_BYTES)})
            if not container.streams.audio:
                container.close()
                raise AudioError("the file has no audio stream")
        except FormatRefused:
            raise
        except AudioError:
            f.seek(0)
            yield
            container = _open_container(f, {})
        try:
            yield
            return (yield from _count(container, limit_s, deadline))
        finally:
            container.close()


def _open_container(f: BinaryIO, extra: dict[str, str]):
    try:
        return av.open(f, mode="r", container_options={**CONTAINER_OPTIONS, **extra})
    except av.FFmpegError as exc:
        kind = FormatRefused if _refused_format(exc) else AudioError
        raise kind(f"not a readable audio file: {_reason(exc)}") from exc
    except (ValueError, OSError, EOFError) as exc:  # PyAV's own complaints about odd inputs
        raise AudioError(f"not a readable audio file: {exc}") from exc


def _count(container, limit_s: float, deadline: float) -> Generator[None, None, AudioInfo]:
    if not container.streams.audio:
        raise AudioError("the file has no audio stream")
    stream = container.streams.audio[0]
    ctx = stream.codec_context
    seconds = 0.0
    good = bad = 0
    last_error: av.FFmpegError | None = None
    packets = container.demux(stream)
    while True:
        if time.monotonic() > deadline:
            raise AudioError("timed out decoding the audio")
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.FFmpegError as exc:  # a demuxer error mid-file: what was read so far is the audio
            last_error = exc
            break
        try:
            frames = packet.decode()  # the last packet (None data) flushes the decoder
        except av.FFmpegError as exc:
            bad += 1
            last_error = exc
            continue
        good += 1
        for frame in frames:
            if frame.sample_rate > 0:
                seconds += frame.samples / frame.sample_rate
        if seconds > limit_s:
            raise AudioTooLong(f"the audio is longer than the limit of {limit_s:.0f} s (KAFSCRIBE_MAX_AUDIO_S)")
        yield
    if bad and bad > MAX_ERROR_RATE * (good + bad):
        raise AudioError(f"audio could not be decoded: {_reason(last_error)}")
    if seconds <= 0:
        if last_error is not None:
            raise AudioError(f"audio could not be decoded: {_reason(last_error)}")
        raise AudioError("the audio stream is empty (duration 0)")
    return AudioInfo(
        duration=seconds,
        format_name=container.format.name,
        codec=getattr(ctx.codec, "canonical_name", "") or ctx.name,
        sample_rate=int(ctx.sample_rate or 0),
        channels=int(ctx.channels or 0),
        header_duration=_header_duration(container, stream),
    )


@contextlib.contextmanager
def _open_file(source: Source) -> Iterator[BinaryIO]:
    """A binary file object over ``source``: bytes stay in memory, a path is opened (and closed)."""
    if not isinstance(source, Path):
        with io.BytesIO(source) as f:
            yield f
        return
    try:
        f = open(source, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise AudioError(f"cannot read the uploaded file: {exc.strerror}") from exc
    with f:
        yield f


def _refuse_playlists(f: BinaryIO) -> None:
    """Name the playlist formats that libavformat only detects by file name (a temp file has none)."""
    head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    f.seek(0)
    for magic, name in _SNIFF:
        if head.startswith(magic):
            raise FormatRefused("not a readable audio file: " + REFUSED_FORMAT.format(name))


def _refused_format(exc: av.FFmpegError) -> bool:
    """Whether libav refused the container format (its whitelist): its log line is all it says."""
    log = getattr(exc, "log", None)
    return bool(log) and "not on whitelist" in log[2] and log[2].startswith("Format")


def _reason(exc: av.FFmpegError | None) -> str:
    """libav's complaint in words a client can act on."""
    if exc is None:
        return "unknown error"
    log = getattr(exc, "log", None)  # (level, item name, message) of the last libav error line
    if _refused_format(exc):
        return REFUSED_FORMAT.format(log[1])
    if log and log[2].strip():
        return f"{exc.strerror} ({log[2].strip()})" if exc.strerror else log[2].strip()
    return exc.strerror or str(exc)


def _header_duration(container, stream) -> float:
    """What the container claims (for logs only): the stream's duration, else the file's."""
    try:
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        if container.duration is not None:
            return container.duration / av.time_base
    except (TypeError, ValueError, OverflowError):
        pass
    return 0.0
