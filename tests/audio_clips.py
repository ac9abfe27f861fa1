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


def lying_flac(path: Path, seconds: float = 2.0) -> Path:
    """A real FLAC of ``seconds`` of tone whose STREAMINFO claims 2^36-1 samples (~8.6 M s at 8 kHz).

    ffprobe reports the header's claim; only decoding tells the truth.
    """
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", f"sine=d={seconds}",
                    "-ar", "8000", "-ac", "1", str(path)], check=True)
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO is the first metadata block
    # STREAMINFO body starts at byte 8; bytes 10..17 hold rate(20) channels(3) bits(5) total samples(36).
    packed = int.from_bytes(data[18:26], "big") | (2**36 - 1)
    data[18:26] = packed.to_bytes(8, "big")
    path.write_bytes(bytes(data))
    return path


def silence_flac(path: Path, seconds: float) -> Path:
    """``seconds`` of digital silence as FLAC: hours fit in a few MB."""
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono",
                    "-t", str(seconds), "-c:a", "flac", str(path)], check=True)
    return path


def hls_playlist(path: Path, target: Path) -> Path:
    """An HLS playlist that points at ``target`` (a local .ts file): what an uploader must not make us read."""
    path.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:600\n#EXTINF:600,\nfile://{target}\n#EXT-X-ENDLIST\n")
    return path
