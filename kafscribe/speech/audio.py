"""Probe and decode audio: the one place that touches codecs.

``probe`` runs at the door (ingress) to refuse what is not audio (415) or is
too long (413), and to measure the duration the router, the admission and
the limits use; it runs in-process with PyAV (``kafscribe.speech.probe``).
``decode`` runs in the worker (ffmpeg) and yields 16 kHz mono float32, the
input of both Whisper engines. A file that fails here is a permanent error:
retrying cannot fix it.

What we trust: only decoded samples. A header's duration is a claim (a FLAC
whose STREAMINFO promises 2^36-1 samples decodes to 2 s), so ``probe``
decodes -- bounded: it stops at the limit, and the samples are counted,
never kept. ``decode`` keeps at most ``max_duration_s`` of samples.

What may be read: only the uploaded bytes. Both are restricted to the
demuxers of ``DEMUXERS`` (audio/video containers) and to no other file or
URL: playlists (HLS, concat), image sequences and devices are not demuxers
we allow, so an uploaded ``.m3u8`` cannot make us open other files or URLs.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kafscribe.errors import PermanentError

SAMPLE_RATE = 16000
PCM_BYTES_PER_SECOND = SAMPLE_RATE * 2  # s16le mono
# Containers of audio (and of video with audio) that ffmpeg may demux. Deliberately no
# playlists (hls, concat), image sequences, devices or network formats.
DEMUXERS = (
    "wav", "w64", "mp3", "flac", "ogg", "mov", "matroska", "webm", "aac", "asf", "amr", "aiff", "caf",
    "wv", "ape", "tta", "au", "voc", "ac3", "eac3", "dts", "mpc", "mpc8", "truehd", "avi", "flv",
    "mpegts", "mpeg", "rm", "wsaud", "gsm", "sox", "ircam", "mlp", "dsf",
)
_CHUNK = 1 << 20


class AudioError(PermanentError, ValueError):
    """The bytes are not decodable audio (permanent: the job fails with this reason)."""


class AudioTooLong(AudioError):
    """The audio decodes to more than the allowed duration (refused at the door: 413)."""


class FormatRefused(AudioError):
    """A container format that is never read (playlists, formats that read other files or URLs)."""


@dataclass(frozen=True)
class AudioInfo:
    duration: float  # decoded seconds (never the header's claim)
    format_name: str
    codec: str
    sample_rate: int
    channels: int
    header_duration: float = 0.0  # what the container claims, for logs only


def default_max_duration_s() -> float:
    """``KAFSCRIBE_MAX_AUDIO_S`` of this process's environment (else its documented default)."""
    from kafscribe.settings import Settings

    raw = os.environ.get("KAFSCRIBE_MAX_AUDIO_S")
    return Settings.from_env({"KAFSCRIBE_MAX_AUDIO_S": raw}).max_audio_s if raw else Settings().max_audio_s


def input_args(path: Path) -> list[str]:
    """ffmpeg/ffprobe input options: this one file, through an allowed demuxer, nothing else."""
    return ["-protocol_whitelist", "file", "-format_whitelist", ",".join(DEMUXERS), "-i", f"file:{path}"]


def probe(path: Path, max_duration_s: float | None = None, timeout_s: float | None = None) -> AudioInfo:
    """Describe the first audio stream of ``path`` with its decoded duration (in-process, PyAV).

    Raises ``AudioTooLong`` above ``max_duration_s`` (default: ``KAFSCRIBE_MAX_AUDIO_S``),
    ``AudioError`` for anything that is not decodable audio. See ``kafscribe.speech.probe``.
    """
    from kafscribe.speech.probe import measure

    limit = default_max_duration_s() if max_duration_s is None else max_duration_s
    return measure(Path(path), limit, timeout_s)


def decode(data: bytes, max_duration_s: float | None = None, timeout_s: float = 600.0) -> np.ndarray:
    """Decode ``data`` to 16 kHz mono float32 in [-1, 1], keeping at most ``max_duration_s`` seconds.

    Audio longer than that raises ``AudioTooLong`` (ffmpeg is stopped just past
    the limit, so a long file never fills memory); the default limit is
    ``KAFSCRIBE_MAX_AUDIO_S``.
    """
    limit = default_max_duration_s() if max_duration_s is None else max_duration_s
    # An unnamed temporary file (seekable, unlike a pipe: MP4s with the index at the end decode),
    # handed to ffmpeg as /dev/fd/N: nothing is left on disk even if this process is killed.
    with tempfile.TemporaryFile(prefix="kafscribe-audio-") as tmp:
        tmp.write(data)
        tmp.flush()
        fd = tmp.fileno()
        pcm = _run_ffmpeg(input_args(Path(f"/dev/fd/{fd}")), limit, timeout_s, keep=True, pass_fds=(fd,))
    assert isinstance(pcm, bytearray)
    if len(pcm) / PCM_BYTES_PER_SECOND > limit:
        raise AudioTooLong(f"the audio decodes to more than {limit:.1f} s")
    if not pcm:
        raise AudioError("audio decoded to no samples")
    return np.frombuffer(pcm, np.int16).astype(np.float32) / 32768.0


def _run_ffmpeg(
    inputs: list[str], limit_s: float, timeout_s: float, *, keep: bool, pass_fds: tuple[int, ...] = ()
) -> bytearray | int:
    """Decode the first audio stream to s16le, stopping 0.5 s past ``limit_s``.

    Returns the PCM (``keep``) or only its byte count. The output is capped in
    this process too, whatever ffmpeg does; ``timeout_s`` kills a stuck decode.
    """
    if timeout_s <= 0:
        raise AudioError("ffmpeg timed out decoding the audio")
    stop_at = limit_s + 0.5
    cap = int(math.ceil(stop_at * PCM_BYTES_PER_SECOND)) + PCM_BYTES_PER_SECOND
    cmd = ["ffmpeg", "-nostdin", "-v", "error", *inputs, "-map", "0:a:0", "-t", f"{stop_at:.3f}",
           "-f", "s16le", "-ac", "1", "-acodec", "pcm_s16le", "-ar", str(SAMPLE_RATE), "pipe:1"]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, pass_fds=pass_fds)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout_s, kill)
        timer.daemon = True
        timer.start()
        pcm = bytearray()
        total = 0
        try:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(_CHUNK):
                total += len(chunk)
                if keep:
                    pcm += chunk
                if total > cap:  # never happens with -t; a guard against a misbehaving decoder
                    proc.kill()
                    break
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if timed_out.is_set():
            raise AudioError("ffmpeg timed out decoding the audio")
        if rc != 0 and total <= cap:
            err.seek(0)
            raise AudioError(f"audio could not be decoded: {_reason(err.read().decode(errors='replace'))}")
    return pcm if keep else total


def _reason(stderr: str) -> str:
    """ffmpeg's complaint in words a client can act on."""
    refused = re.search(r"\[(\w+) @ [^]]*\] Format not on whitelist", stderr)
    if refused:
        return (f"{refused.group(1)!r} is not an accepted audio format (playlists and formats that"
                " read other files or URLs are refused)")
    return re.sub(r"^file:.*?: ", "", _last_line(stderr))


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"
