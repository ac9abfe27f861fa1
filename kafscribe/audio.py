"""Probe and decode audio with ffmpeg: the one place that touches codecs.

``probe`` runs at the door (ingress) to refuse what is not audio (415) and to
measure the duration the router and the metrics need. ``decode`` runs in the
worker and yields 16 kHz mono float32, the input of both Whisper engines. A
file that fails here is a permanent error: retrying cannot fix it.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000


class AudioError(ValueError):
    """The bytes are not decodable audio (permanent: the job fails with this reason)."""


@dataclass(frozen=True)
class AudioInfo:
    duration: float
    format_name: str
    codec: str
    sample_rate: int
    channels: int


def probe(path: Path, timeout_s: float = 30.0) -> AudioInfo:
    """Describe the first audio stream of ``path`` or raise ``AudioError``."""
    cmd = [
        "ffprobe", "-v", "error", "-print_format", "json",
        "-show_format", "-show_streams", "-select_streams", "a", str(path),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise AudioError("ffprobe timed out reading the file") from exc
    if proc.returncode != 0:
        reason = _last_line(proc.stderr).replace(f"{path}: ", "")
        raise AudioError(f"not a readable audio file: {reason}")
    info = json.loads(proc.stdout or "{}")
    streams = info.get("streams") or []
    if not streams:
        raise AudioError("the file has no audio stream")
    stream, fmt = streams[0], info.get("format", {})
    duration = float(stream.get("duration") or fmt.get("duration") or 0.0)
    if duration <= 0:
        raise AudioError("the audio stream is empty (duration 0)")
    return AudioInfo(
        duration=duration,
        format_name=fmt.get("format_name", ""),
        codec=stream.get("codec_name", ""),
        sample_rate=int(stream.get("sample_rate") or 0),
        channels=int(stream.get("channels") or 0),
    )


def decode(data: bytes, timeout_s: float = 600.0) -> np.ndarray:
    """Decode any ffmpeg-readable bytes to 16 kHz mono float32 in [-1, 1]."""
    cmd = [
        "ffmpeg", "-nostdin", "-v", "error", "-i", "pipe:0",
        "-f", "s16le", "-ac", "1", "-acodec", "pcm_s16le", "-ar", str(SAMPLE_RATE), "pipe:1",
    ]
    try:
        proc = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise AudioError("ffmpeg timed out decoding the audio") from exc
    if proc.returncode != 0:
        raise AudioError(f"audio could not be decoded: {_last_line(proc.stderr.decode(errors='replace'))}")
    if not proc.stdout:
        raise AudioError("audio decoded to no samples")
    return np.frombuffer(proc.stdout, np.int16).astype(np.float32) / 32768.0


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"
