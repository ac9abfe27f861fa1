"""Test audio made here and now: espeak-ng speech, converted by ffmpeg."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

ENGLISH = "The quick brown fox jumps over the lazy dog. Kafka carries every upload to a worker."
SPANISH = "Hola, me llamo Carlos. Hoy hace buen tiempo y vamos a la playa con mis amigos."
GERMAN = "Guten Morgen. Heute ist das Wetter schön und wir gehen in den Park."
LONG_ENGLISH = " ".join(
    [
        "This is a longer recording used to test what happens when a worker dies in the middle of a job.",
        "The pipeline must finish the job on another worker and must never store the result twice.",
        "Every event is produced in a transaction together with the offset of its input.",
        "A worker that crashes before it commits leaves the offset where it was, so the job is redone.",
    ]
)


def speak(text: str, path: Path, voice: str = "en", speed: int = 150) -> Path:
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True)
    return path


def to_format(src: Path, dst: Path) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(src), str(dst)], check=True)
    return dst


def lying_wav(path: Path, seconds: int = 8) -> Path:
    """A WAV whose header promises MP3 audio but whose payload is noise.

    ffprobe accepts it (codec mp3, a duration); decoding fails -- the case of a
    file that passes the door and fails in the worker.
    """
    data = os.urandom(2000 * seconds)
    fmt = struct.pack("<HHIIHH", 0x0055, 1, 16000, 2000, 1, 0)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path
