"""Cutting a long recording into chunks at silences, streaming.

The recording is decoded in pieces with PyAV (16 kHz mono int16), never as a
whole: at most one chunk plus its search window is in memory. Each cut is
placed near ``KAFSCRIBE_CHUNK_S`` seconds after the previous one, in the
middle of the longest silence the Silero VAD (bundled with faster-whisper,
offline) finds within +-``CUT_WINDOW`` of that point; with no silence there,
at the quietest 20 ms of the window (usually between two words). When what is left (by the Upload's measured
duration) is under ``SPLIT_FACTOR`` x the chunk length, it becomes the last
chunk, so no chunk is a sliver. Each chunk is handed to ``write`` (a WAV
blob) as soon as it is cut; only the boundaries are kept.

The pure parts (``pick_cut``, ``silences``, ``Splitter``) are what the unit
tests drive with synthetic VAD output.
"""

from __future__ import annotations

import io
import time
import wave
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

SAMPLE_RATE = 16000
CUT_WINDOW = 0.3  # a cut is searched within +-30 % of the chunk length around its target
SPLIT_FACTOR = 1.5  # only audio longer than this x the chunk length is split; a tail under it stays whole
MIN_SILENCE_MS = 200  # the shortest pause the VAD reports as a silence worth cutting at
CONTEXT_S = 1.0  # the VAD also hears this much either side of the window (no false silence at its edges)

Interval = tuple[float, float]


def should_split(duration_s: float, chunk_s: float) -> bool:
    """Whether a recording of ``duration_s`` is split into chunks (``chunk_s`` 0: never)."""
    return chunk_s > 0 and duration_s > SPLIT_FACTOR * chunk_s


def silences(speech: list[Interval], start: float, end: float) -> list[Interval]:
    """The gaps between ``speech`` stretches (sorted, seconds) inside [start, end]."""
    out, cursor = [], start
    for s, e in sorted(speech):
        if s > cursor:
            out.append((cursor, min(s, end)))
        cursor = max(cursor, e)
        if cursor >= end:
            break
    if cursor < end:
        out.append((cursor, end))
    return [(a, b) for a, b in out if b > a]


def pick_cut(gaps: list[Interval], lo: float, hi: float, target: float) -> float | None:
    """Where to cut: the middle of the longest silence within [lo, hi] (clipped to it); ties go to the one
    nearest ``target``. None: no silence there."""
    best: tuple[float, float, float] | None = None  # (length, -distance, middle)
    for a, b in gaps:
        a, b = max(a, lo), min(b, hi)
        if b <= a:
            continue
        middle = (a + b) / 2
        key = (round(b - a, 3), -abs(middle - target), middle)
        if best is None or key > best:
            best = key
    return None if best is None else best[2]


def quietest(samples: np.ndarray, frame: int = SAMPLE_RATE // 50) -> int:
    """The sample in the middle of the quietest 20 ms frame (where a cut without a silence hurts least:
    usually between two words); the middle of ``samples`` if they are shorter than a frame."""
    n = len(samples) // frame
    if n == 0:
        return len(samples) // 2
    energy = (samples[: n * frame].astype(np.float32).reshape(n, frame) ** 2).mean(axis=1)
    middle = (n - 1) / 2
    best = min(range(n), key=lambda i: (round(float(energy[i]), 1), abs(i - middle)))
    return best * frame + frame // 2


@dataclass(frozen=True)
class Piece:
    """One chunk as cut: its place on the recording's clock."""

    index: int
    offset_s: float
    duration_s: float


FindSpeech = Callable[[np.ndarray], list[Interval]]  # float32 16 kHz -> speech (start, end) seconds


class Splitter:
    """Feeds on int16 pieces of the recording; hands each finished chunk to ``write``.

    ``total_hint_s`` (the Upload's measured duration) only decides when the
    rest is short enough to be the last chunk; the samples decide everything else.
    """

    def __init__(self, chunk_s: float, total_hint_s: float, find_speech: FindSpeech,
                 write: Callable[[Piece, np.ndarray], None]) -> None:
        self.chunk = int(chunk_s * SAMPLE_RATE)
        self.window = int(CUT_WINDOW * chunk_s * SAMPLE_RATE)
        self.context = int(CONTEXT_S * SAMPLE_RATE)
        self.total_hint = int(total_hint_s * SAMPLE_RATE)
        self.find_speech = find_speech
        self.write = write
        self.buf = np.zeros(0, np.int16)
        self.pending: list[np.ndarray] = []  # fed since ``buf`` was last joined (joined only to cut)
        self.pending_len = 0
        self.start = 0  # sample of the recording where ``buf`` begins
        self.pieces: list[Piece] = []

    def feed(self, samples: np.ndarray) -> None:
        self.pending.append(samples)
        self.pending_len += len(samples)
        if not self._rest_is_long() or len(self.buf) + self.pending_len < self._needed():
            return  # the tail is kept in pieces and joined once, at the end
        self._join()
        while self._rest_is_long() and len(self.buf) >= self._needed():
            self._cut()

    def finish(self) -> list[Piece]:
        """The last chunk (whatever is left); returns every chunk's boundaries."""
        self._join()
        if len(self.buf) or not self.pieces:
            self._emit(len(self.buf))
        return self.pieces

    def _join(self) -> None:
        if self.pending:
            self.buf = np.concatenate([self.buf, *self.pending])
            self.pending, self.pending_len = [], 0

    def _needed(self) -> int:
        """Samples a cut needs: the chunk, its window after the target, and the VAD's context."""
        return self.chunk + self.window + self.context

    def _rest_is_long(self) -> bool:
        return self.total_hint - self.start > SPLIT_FACTOR * self.chunk

    def _cut(self) -> None:
        lo, hi = self.chunk - self.window, self.chunk + self.window
        start = max(0, lo - self.context)
        heard = self.buf[start:hi + self.context].astype(np.float32) / 32768.0
        speech = self.find_speech(heard)  # seconds from ``start``
        a, b = (lo - start) / SAMPLE_RATE, (hi - start) / SAMPLE_RATE
        at = pick_cut(silences(speech, 0.0, len(heard) / SAMPLE_RATE), a, b, (self.chunk - start) / SAMPLE_RATE)
        self._emit(lo + quietest(self.buf[lo:hi]) if at is None else start + int(round(at * SAMPLE_RATE)))

    def _emit(self, n: int) -> None:
        piece = Piece(len(self.pieces), self.start / SAMPLE_RATE, n / SAMPLE_RATE)
        self.write(piece, self.buf[:n])
        self.pieces.append(piece)
        self.buf = self.buf[n:].copy()
        self.start += n


def vad_speech(audio: np.ndarray) -> list[Interval]:
    """Speech stretches in 16 kHz float32 ``audio`` by faster-whisper's bundled Silero VAD, tuned to find
    the short pauses between sentences (the transcription's own VAD settings are not touched)."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    options = VadOptions(min_silence_duration_ms=MIN_SILENCE_MS, speech_pad_ms=30)
    return [(c["start"] / SAMPLE_RATE, c["end"] / SAMPLE_RATE)
            for c in get_speech_timestamps(audio, options, sampling_rate=SAMPLE_RATE)]


def decode_stream(f: BinaryIO, max_s: float, deadline: float) -> Iterator[np.ndarray]:
    """The first audio stream of ``f`` as 16 kHz mono int16 pieces (PyAV), under the door's rules
    (allowed demuxers only, no nested opens; see ``kafscribe.speech.probe``).

    Raises ``AudioTooLong`` past ``max_s`` seconds, ``AudioError`` for what does not decode.
    """
    import av

    from kafscribe.speech.audio import AudioError, AudioTooLong
    from kafscribe.speech.probe import CONTAINER_OPTIONS, _reason

    try:
        container = av.open(f, mode="r", container_options=dict(CONTAINER_OPTIONS))
    except (av.FFmpegError, ValueError, OSError, EOFError) as exc:
        raise AudioError(f"not a readable audio file: {exc}") from exc
    try:
        if not container.streams.audio:
            raise AudioError("the file has no audio stream")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        limit = int(max_s * SAMPLE_RATE)
        total = 0
        try:
            for frame in container.decode(container.streams.audio[0]):
                if time.monotonic() > deadline:
                    raise AudioError("timed out decoding the audio")
                for out in resampler.resample(frame):
                    pcm = out.to_ndarray().reshape(-1).astype(np.int16, copy=False)
                    total += len(pcm)
                    if total > limit:
                        raise AudioTooLong(f"the audio decodes to more than {max_s:.1f} s")
                    yield pcm
            for out in resampler.resample(None):
                yield out.to_ndarray().reshape(-1).astype(np.int16, copy=False)
        except av.FFmpegError as exc:
            if total == 0:
                raise AudioError(f"audio could not be decoded: {_reason(exc)}") from exc
        if total == 0:
            raise AudioError("audio decoded to no samples")
    finally:
        container.close()


def wav_bytes(samples: np.ndarray) -> bytes:
    """16 kHz mono int16 samples as a WAV file (what a chunk blob holds)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(np.ascontiguousarray(samples, dtype=np.int16).tobytes())
    return out.getvalue()


def split(pieces: Iterable[np.ndarray], chunk_s: float, total_hint_s: float,
          write: Callable[[Piece, np.ndarray], None], find_speech: FindSpeech = vad_speech) -> list[Piece]:
    """Cut the decoded ``pieces`` into chunks (see ``Splitter``); returns their boundaries."""
    splitter = Splitter(chunk_s, total_hint_s, find_speech, write)
    for piece in pieces:
        splitter.feed(piece)
    return splitter.finish()
