"""Transcript renderings: plain text, SubRip (srt), WebVTT (vtt), JSON."""

from __future__ import annotations

import json
from typing import Any

FORMATS = ("json", "txt", "srt", "vtt")


def _timestamp(seconds: float, sep: str) -> str:
    ms = max(0, int(round(seconds * 1000)))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_txt(segments: list[dict[str, Any]]) -> str:
    return "\n".join(s["text"].strip() for s in segments) + "\n"


def to_srt(segments: list[dict[str, Any]]) -> str:
    blocks = [
        f"{i}\n{_timestamp(s['start'], ',')} --> {_timestamp(s['end'], ',')}\n{s['text'].strip()}\n"
        for i, s in enumerate(segments, 1)
    ]
    return "\n".join(blocks)


def to_vtt(segments: list[dict[str, Any]]) -> str:
    blocks = [
        f"{_timestamp(s['start'], '.')} --> {_timestamp(s['end'], '.')}\n{s['text'].strip()}\n"
        for s in segments
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def render(fmt: str, segments: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> tuple[str, str]:
    """(body, content type) of ``segments`` in ``fmt``."""
    if fmt == "txt":
        return to_txt(segments), "text/plain; charset=utf-8"
    if fmt == "srt":
        return to_srt(segments), "application/x-subrip; charset=utf-8"
    if fmt == "vtt":
        return to_vtt(segments), "text/vtt; charset=utf-8"
    if fmt == "json":
        return json.dumps({**(meta or {}), "segments": segments}, default=str), "application/json"
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
