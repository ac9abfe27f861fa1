"""The Avro contract: wire format, corrupt input, dataclass parity, backward compatibility."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
from pathlib import Path

import fastavro
import pytest

from schemas import codec
from schemas.events import (
    EVENT_CLASSES,
    DeadLetter,
    JobOptions,
    Result,
    Segment,
    Translation,
    Upload,
    WorkerStatus,
    decode_event,
)

SCHEMA_DIR = Path(codec.__file__).parent


def rabin64(data: bytes) -> int:
    """CRC-64-AVRO exactly as the Avro specification writes it."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def test_wire_format_is_single_object_encoding():
    upload = Upload(job_id="j1", blob_ref="file:j1", audio_sha256="ab", audio_bytes=3, audio_duration=1.5)
    data = upload.encode()
    assert data[:2] == b"\xc3\x01"
    canonical = fastavro.schema.to_parsing_canonical_form(codec.schema("Upload"))
    assert data[2:10] == rabin64(canonical.encode()).to_bytes(8, "little")
    body = fastavro.schemaless_reader(io.BytesIO(data[10:]), codec.schema("Upload"), None)
    assert body["job_id"] == "j1" and body["options"]["task"] == "transcribe"


def test_every_event_round_trips():
    seg = Segment(id=0, start=0.0, end=1.25, text="hola", avg_logprob=-0.2, no_speech_prob=0.01)
    events = [
        Upload(job_id="a", blob_ref="cassandra:a", audio_sha256="x", audio_bytes=1, audio_duration=2.0,
               options=JobOptions(language="es", translate_to="en", callback_url="https://x.test/cb")),
        Result(job_id="b", status="completed", segments=[seg],
               translation=Translation("es", "en", "whisper", "hello", [seg])),
        Result(job_id="c", status="failed", error="audio could not be decoded"),
        WorkerStatus(job_id="", worker_id="w", host="h", pid=1, stage="transcriber", state="running",
                     rss_bytes=1, host_mem_available=2, host_mem_total=3, partitions=[0, 3]),
        DeadLetter(job_id="", source_topic="t", source_partition=0, source_offset=9, stage="s",
                   reason="r", payload=b"\x00\xff"),
    ]
    for event in events:
        assert decode_event(event.encode()) == event


@pytest.mark.parametrize(
    "data, message",
    [
        (None, "missing C3 01 header"),
        (b"", "missing C3 01 header"),
        (b"{\"job_id\": 1}", "missing C3 01 header"),
        (b"\xc3\x01" + b"\x00" * 8 + b"x", "unknown schema fingerprint"),
    ],
)
def test_garbage_raises_decode_error(data, message):
    with pytest.raises(codec.DecodeError, match=message):
        codec.decode(data)


def test_truncated_or_padded_body_is_corrupt():
    data = Upload(job_id="j", blob_ref="file:j", audio_sha256="a", audio_bytes=1, audio_duration=1.0).encode()
    with pytest.raises(codec.CorruptEventError):
        codec.decode(data[:-3])
    with pytest.raises(codec.CorruptEventError, match="trailing"):
        codec.decode(data + b"\x00\x00")


@pytest.mark.parametrize("event_type", codec.EVENT_TYPES)
def test_dataclass_fields_match_the_avsc(event_type):
    avsc = json.loads((SCHEMA_DIR / f"{event_type}.avsc").read_text())
    schema_fields = [f["name"] for f in avsc["fields"]]
    class_fields = [f.name for f in dataclasses.fields(EVENT_CLASSES[event_type])]
    assert sorted(schema_fields) == sorted(class_fields)
    assert avsc["namespace"] == "kafscribe.v1"
    assert schema_fields[:5] == ["job_id", "tenant", "attempt", "produced_at", "trace_id"]


def _previous_versions(event_type: str) -> list[tuple[str, dict]]:
    """Every frozen version in schemas/history/, plus the last committed one (if git knows it)."""
    versions = [(p.name, json.loads(p.read_text())) for p in sorted((SCHEMA_DIR / "history").glob(f"{event_type}.v*.avsc"))]
    rel = f"schemas/{event_type}.avsc"
    proc = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=SCHEMA_DIR.parent, capture_output=True, text=True)
    if proc.returncode == 0:
        versions.append((f"HEAD:{rel}", json.loads(proc.stdout)))
    return versions


def _sample(schema: dict) -> dict:
    """A record for ``schema`` with every field set (defaults where given)."""
    parsed = fastavro.parse_schema(schema, _write_hint=False)
    out = {}
    for f in schema["fields"]:
        if "default" in f:
            continue
        out[f["name"]] = _value(f["type"])
    # validate the sample is writable
    fastavro.schemaless_writer(io.BytesIO(), parsed, out)
    return out


def _value(t):
    if isinstance(t, list):
        return _value(t[0]) if t[0] != "null" else None
    if isinstance(t, dict):
        if t["type"] == "record":
            return {f["name"]: _value(f["type"]) for f in t["fields"] if "default" not in f}
        if t["type"] == "array":
            return []
        return _value(t["type"])
    return {"string": "s", "int": 1, "long": 1, "double": 1.0, "boolean": True, "bytes": b"b"}.get(t, "s")


@pytest.mark.parametrize("event_type", codec.EVENT_TYPES)
def test_current_schema_reads_every_previous_version(event_type):
    current = fastavro.parse_schema(json.loads((SCHEMA_DIR / f"{event_type}.avsc").read_text()), _write_hint=False)
    versions = _previous_versions(event_type)
    assert versions, f"{event_type} has no frozen version in schemas/history/"
    for label, old in versions:
        writer = fastavro.parse_schema(old, _write_hint=False)
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, _sample(old))
        buf.seek(0)
        try:
            fastavro.schemaless_reader(buf, writer, current)
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{event_type}: data written with {label} is unreadable by the current schema: {exc}")


def test_events_in_an_older_schema_version_decode_to_the_current_shape(tmp_path, monkeypatch):
    """A producer still on an older Upload (without a later field) is read with the current schema."""
    current = json.loads((SCHEMA_DIR / "Upload.avsc").read_text())
    older = json.loads(json.dumps(current))
    older["fields"] = [f for f in older["fields"] if f["name"] != "trace_id"]
    hist = tmp_path / "history"
    hist.mkdir()
    for p in (SCHEMA_DIR / "history").glob("*.avsc"):
        (hist / p.name).write_text(p.read_text())
    (hist / "Upload.v0.avsc").write_text(json.dumps(older))
    for name in codec.EVENT_TYPES:
        (tmp_path / f"{name}.avsc").write_text((SCHEMA_DIR / f"{name}.avsc").read_text())
    monkeypatch.setattr(codec, "SCHEMA_DIR", tmp_path)
    codec._registry.cache_clear()
    try:
        parsed_old = fastavro.parse_schema(older, _write_hint=False)
        buf = io.BytesIO()
        buf.write(codec.MAGIC + codec.schema_fingerprint(parsed_old))
        record = _sample(older) | {"job_id": "old-1"}
        fastavro.schemaless_writer(buf, parsed_old, record)
        event = decode_event(buf.getvalue())
        assert isinstance(event, Upload) and event.job_id == "old-1" and event.trace_id == ""
    finally:
        codec._registry.cache_clear()


def test_failed_result_keeps_the_jobs_options_and_identity():
    upload = Upload(job_id="j9", tenant="acme", attempt=1, trace_id="t", blob_ref="file:j9", audio_sha256="a",
                    audio_bytes=1, audio_duration=1.0, options=JobOptions(callback_url="https://x.test/cb"))
    result = Result.failed(upload, "audio could not be decoded", "w1", attempt=2)
    assert (result.job_id, result.tenant, result.trace_id, result.attempt) == ("j9", "acme", "t", 2)
    assert (result.status, result.error, result.worker_id) == ("failed", "audio could not be decoded", "w1")
    assert result.options.callback_url == "https://x.test/cb"
    letter = DeadLetter(job_id="j9", source_topic="t", source_partition=0, source_offset=0, stage="s",
                        reason="r", payload=b"")
    assert Result.failed(letter, "r", "w").options == JobOptions()


def test_words_and_job_flags_round_trip_and_v1_events_read_with_their_defaults():
    """Segments carry words; a Transcript written with the frozen v1 (no words, no flags) still reads."""
    from schemas.events import Transcript, Word

    seg = Segment(id=0, start=0.5, end=1.5, text=" hi there",
                  words=[Word(" hi", 0.5, 0.9, 0.93), Word(" there", 0.9, 1.5, 0.8)])
    result = Result(job_id="w", status="completed", segments=[seg],
                    options=JobOptions(word_timestamps=True, vad_filter=True))
    assert decode_event(result.encode()) == result
    v1 = json.loads((SCHEMA_DIR / "history" / "Transcript.v1.avsc").read_text())
    parsed = fastavro.parse_schema(v1, _write_hint=False)
    record = _sample(v1) | {"job_id": "old", "segments": [{"id": 0, "start": 0.0, "end": 1.0, "text": "x",
                                                            "avg_logprob": 0.0, "no_speech_prob": 0.0}],
                            "options": {"task": "transcribe", "language": None, "translate_to": None,
                                        "model": None, "callback_url": None,
                                        "callback_include_transcript": False}}
    buf = io.BytesIO()
    buf.write(codec.MAGIC + codec.schema_fingerprint(parsed))
    fastavro.schemaless_writer(buf, parsed, record)
    event = decode_event(buf.getvalue())
    assert isinstance(event, Transcript) and event.job_id == "old"
    assert event.segments[0].words == []
    assert (event.options.word_timestamps, event.options.vad_filter) == (False, False)
