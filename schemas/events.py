"""Dataclasses for the events of ``schemas/*.avsc`` (the .avsc files are the truth).

``to_record`` / ``from_record`` convert to and from the plain dicts that the
codec reads and writes; a test checks that every dataclass has exactly the
fields of its schema.
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from . import codec

T = TypeVar("T")


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class JobOptions:
    language: str | None = None
    task: str = "transcribe"
    translate_to: str | None = None
    model: str | None = None
    callback_url: str | None = None
    callback_include_transcript: bool = False
    word_timestamps: bool = False
    vad_filter: bool = False
    prompt: str | None = None
    temperature: float | None = None


@dataclass
class Word:
    word: str
    start: float
    end: float
    probability: float = 0.0


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    words: list[Word] = field(default_factory=list)
    temperature: float | None = None  # what the engine decoded it with (None: not reported)


@dataclass
class Translation:
    source_language: str
    target_language: str
    backend: str
    text: str
    segments: list[Segment]


@dataclass(kw_only=True)
class Event:
    job_id: str
    tenant: str = "default"
    attempt: int = 1
    produced_at: int = field(default_factory=now_ms)
    trace_id: str = ""

    EVENT_TYPE: typing.ClassVar[str] = ""

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def encode(self) -> bytes:
        return codec.encode(self.EVENT_TYPE, self.to_record())


@dataclass(kw_only=True)
class AudioRef:
    blob_ref: str
    audio_sha256: str
    audio_bytes: int
    audio_duration: float
    filename: str = ""


@dataclass(kw_only=True)
class Upload(Event, AudioRef):
    options: JobOptions = field(default_factory=JobOptions)
    EVENT_TYPE: typing.ClassVar[str] = "Upload"


@dataclass(kw_only=True)
class Transcript(Event, AudioRef):
    options: JobOptions
    language: str
    language_probability: float
    duration: float
    text: str
    segments: list[Segment]
    engine: str
    model: str
    worker_id: str
    processing_seconds: float
    EVENT_TYPE: typing.ClassVar[str] = "Transcript"


@dataclass(kw_only=True)
class Result(Event):
    status: str
    error: str | None = None
    options: JobOptions = field(default_factory=JobOptions)
    language: str | None = None
    language_probability: float | None = None
    duration: float | None = None
    text: str | None = None
    segments: list[Segment] = field(default_factory=list)
    translation: Translation | None = None
    engine: str = ""
    model: str = ""
    worker_id: str = ""
    EVENT_TYPE: typing.ClassVar[str] = "Result"

    @classmethod
    def failed(cls, event: Event, reason: str, worker_id: str, attempt: int | None = None) -> Result:
        """The end of ``event``'s job with ``reason``, keeping its options (callback URL) when it has them."""
        result = cls(job_id=event.job_id, tenant=event.tenant, attempt=attempt or event.attempt,
                     trace_id=event.trace_id, status="failed", error=reason, worker_id=worker_id)
        options = getattr(event, "options", None)
        if isinstance(options, JobOptions):
            result.options = options
        return result


@dataclass(kw_only=True)
class CallbackAttempt(Event):
    event_id: str
    url: str
    event_type: str
    body: str
    delivery_attempt: int
    not_before: int
    last_error: str | None = None
    EVENT_TYPE: typing.ClassVar[str] = "CallbackAttempt"


@dataclass(kw_only=True)
class WorkerStatus(Event):
    worker_id: str
    host: str
    pid: int
    stage: str
    state: str
    rss_bytes: int
    host_mem_available: int
    host_mem_total: int
    gpu_mem_free: int | None = None
    gpu_mem_total: int | None = None
    gpu_mem_used: int | None = None
    gpu_device: int | None = None
    memory_budget: int | None = None
    in_flight: int = 0
    partitions: list[int] = field(default_factory=list)
    model: str = ""
    backlog: int = 0
    work_s: float = 0.0
    speed: dict[str, float] = field(default_factory=dict)
    EVENT_TYPE: typing.ClassVar[str] = "WorkerStatus"


@dataclass(kw_only=True)
class DeadLetter(Event):
    source_topic: str
    source_partition: int
    source_offset: int
    stage: str
    reason: str
    payload: bytes
    EVENT_TYPE: typing.ClassVar[str] = "DeadLetter"


@dataclass(kw_only=True)
class Chunk(Event):
    """One piece of a long recording to transcribe; ``upload`` is the job's encoded Upload."""

    index: int
    count: int
    offset_s: float
    duration_s: float
    blob_ref: str
    audio_sha256: str
    audio_bytes: int
    upload: bytes
    EVENT_TYPE: typing.ClassVar[str] = "Chunk"


@dataclass(kw_only=True)
class ChunkTranscript(Event):
    """A chunk's transcript (times on the recording's clock), or its ``error``; the merger reads these."""

    index: int
    count: int
    offset_s: float
    duration_s: float
    chunk_blob_ref: str
    upload: bytes
    error: str | None = None
    language: str = ""
    language_probability: float = 0.0
    text: str = ""
    segments: list[Segment] = field(default_factory=list)
    engine: str = ""
    model: str = ""
    worker_id: str = ""
    processing_seconds: float = 0.0
    EVENT_TYPE: typing.ClassVar[str] = "ChunkTranscript"


EVENT_CLASSES: dict[str, type[Event]] = {
    cls.EVENT_TYPE: cls for cls in (Upload, Transcript, Result, CallbackAttempt, WorkerStatus, DeadLetter,
                                    Chunk, ChunkTranscript)
}


def from_record(cls: type[T], record: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from a decoded Avro record (nested records too)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in record:
            kwargs[f.name] = _convert(hints[f.name], record[f.name])
    return cls(**kwargs)


def _convert(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(inner[0], value)
    if origin is list:
        (item,) = typing.get_args(hint)
        return [_convert(item, v) for v in value]
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_record(hint, value)
    return value


def decode_event(data: bytes | None) -> Event:
    """Decode bytes into the matching event dataclass (raises ``codec.DecodeError``)."""
    event_type, record = codec.decode(data)
    return from_record(EVENT_CLASSES[event_type], record)


def embedded_upload(event: Chunk | ChunkTranscript) -> Upload:
    """The job's Upload carried by a chunk event (``ValueError`` if it is not one, or not this job's)."""
    try:
        upload = decode_event(event.upload)
    except codec.DecodeError as exc:
        raise ValueError(f"its upload field is not an Upload event: {exc}") from exc
    if not isinstance(upload, Upload):
        raise ValueError(f"its upload field holds a {type(upload).__name__}, not an Upload")
    if upload.job_id != event.job_id:
        raise ValueError(f"its upload field is job {upload.job_id!r}'s, not {event.job_id!r}'s")
    return upload
