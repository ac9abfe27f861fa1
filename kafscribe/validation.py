"""What every consumer checks in an event it could decode, before doing any work with it.

Direct producers are trusted to write the topics, not to be right: an event
that decodes may still carry a NaN duration, a model the operator never
allowed, a timestamp from next year or a partition that does not exist. Each
check returns the reason in words (``None`` = fine); the consume loop turns a
reason into the stage's ``failure_outputs`` (an ``Upload`` ends as a failed
job with that reason; an event that names no usable job goes to the DLQ). A
``WorkerStatus`` is judged where every view of the workers reads it
(``kafscribe.kafka.workers.check_worker_status``). Nothing here raises: a
check that cannot make sense of a value refuses it.

Then, against the job it names (``*_vs_job``, pure functions of the event and
the stored rows, called by each stage before it acts): an event may only act
on a job that exists, is its tenant's, and -- for an ``Upload`` -- was
submitted with the same audio and options; a chunk must belong to a job that
was split into exactly its count, and name the audio its job's id derives.
Refused events go to the DLQ with the reason and the job is left as it was
(docs/trust-model.md says what each topic's writers can and cannot do).

Limits (all settings): ``KAFSCRIBE_MAX_AUDIO_S`` (durations),
``KAFSCRIBE_MAX_UPLOAD_BYTES`` (sizes), ``KAFSCRIBE_ALLOWED_MODELS``
(models), ``KAFSCRIBE_MAX_CLOCK_SKEW_S`` (how far in the future a
``produced_at`` may lie).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from kafscribe.languages import CODES
from kafscribe.settings import Settings
from kafscribe.speech import decoding
from kafscribe.statuses import COMPLETED, FAILED
from kafscribe.store.blobs import is_blob_ref
from kafscribe.store.chunks import chunk_blob_id
from schemas.events import (
    CallbackAttempt,
    Chunk,
    ChunkTranscript,
    Event,
    JobOptions,
    Result,
    Transcript,
    Upload,
    embedded_upload,
    now_ms,
)

MAX_ID_CHARS = 128
# Printable, no whitespace or '/', so the id works as a Kafka key, a Cassandra key and in /v1/jobs/{id}.
_ID = re.compile(rf"[A-Za-z0-9._:@+=-]{{1,{MAX_ID_CHARS}}}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
TASKS = ("transcribe", "translate")
RESULT_STATUSES = (COMPLETED, FAILED)  # how a Result ends its job
# What each stage's input topic carries.
EXPECTED_TYPES: dict[str, type[Event]] = {
    "uploads": Upload, "transcripts": Transcript, "results": Result, "finished": Result,
    "callbacks.retry": CallbackAttempt, "chunks": Chunk, "chunk-transcripts": ChunkTranscript,
}
MAX_CHUNKS = 100_000  # chunks of one recording (4 h at 1 s each would be 14 400)


def languages() -> frozenset[str]:
    """Whisper's language codes (a static table: importing an engine's would load its runtime)."""
    return CODES


def is_job_id(job_id: object) -> bool:
    """Whether ``job_id`` can name a job (a failed job can be written for it)."""
    return isinstance(job_id, str) and _ID.fullmatch(job_id) is not None


def finite(value: object, low: float = 0.0, high: float = math.inf) -> bool:
    """A real number in [low, high] (NaN and infinities are not)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and low <= value <= high)


def check_event(settings: Settings, input_topic: str, event: Event, now: int | None = None) -> str | None:
    """Why ``event`` (decoded from the logical topic ``input_topic``) must not be worked on, or None."""
    try:
        return _check_event(settings, input_topic, event, now)
    except Exception as exc:  # noqa: BLE001 - a value no rule foresaw is refused, never a crash of the loop
        return f"invalid event: {type(exc).__name__}: {exc}"


def _check_event(settings: Settings, input_topic: str, event: Event, now: int | None) -> str | None:
    expected = EXPECTED_TYPES.get(input_topic)
    if expected is not None and not isinstance(event, expected):
        return f"expected {expected.__name__} events on {input_topic}, got {type(event).__name__}"
    reason = _check_common(settings, event, now_ms() if now is None else now)
    if reason:
        return reason
    if isinstance(event, Upload):
        return _check_audio(settings, event) or check_options(settings, event.options)
    if isinstance(event, Transcript):
        return _check_transcript(settings, event)
    if isinstance(event, Result):
        return _check_result(settings, event)
    if isinstance(event, CallbackAttempt):
        return _check_callback(event)
    if isinstance(event, (Chunk, ChunkTranscript)):
        return _check_chunk(settings, event)
    return None


def _check_common(settings: Settings, event: Event, now: int) -> str | None:
    if not is_job_id(event.job_id):
        return (f"job_id {_show(event.job_id)} is not a valid id (1-{MAX_ID_CHARS} characters of"
                " letters, digits and ._:@+=-)")
    if not isinstance(event.tenant, str) or not 0 < len(event.tenant) <= MAX_ID_CHARS:
        return f"tenant {_show(event.tenant)} must be 1-{MAX_ID_CHARS} characters"
    if not finite(event.attempt, 0, 10**6):
        return f"attempt {_show(event.attempt)} is out of range"
    return check_produced_at(settings, event.produced_at, now)


def check_produced_at(settings: Settings, produced_at: object, now: int) -> str | None:
    """A timestamp in the past, or at most ``KAFSCRIBE_MAX_CLOCK_SKEW_S`` ahead of ``now`` (ms)."""
    if not finite(produced_at, 0):
        return f"produced_at {_show(produced_at)} is not a timestamp"
    ahead_s = (produced_at - now) / 1000  # type: ignore[operator]
    if ahead_s > settings.max_clock_skew_s:
        return (f"produced_at lies {ahead_s:.0f} s in the future (more than KAFSCRIBE_MAX_CLOCK_SKEW_S"
                f"={settings.max_clock_skew_s:.0f})")
    return None


def _check_audio(settings: Settings, event: Upload | Transcript) -> str | None:
    if not finite(event.audio_duration, 0, settings.max_audio_s) or event.audio_duration <= 0:
        return (f"audio_duration {_show(event.audio_duration)} must be a number of seconds in"
                f" (0, {settings.max_audio_s:.0f}] (KAFSCRIBE_MAX_AUDIO_S)")
    if not finite(event.audio_bytes, 1, settings.max_upload_bytes):
        return f"audio_bytes {_show(event.audio_bytes)} must be in [1, {settings.max_upload_bytes}]"
    if not isinstance(event.audio_sha256, str) or not _SHA256.fullmatch(event.audio_sha256):
        return "audio_sha256 must be 64 lower-case hex digits"
    if not isinstance(event.blob_ref, str) or not event.blob_ref:
        return "blob_ref is empty"
    if isinstance(event, Upload) and not is_blob_ref(event.blob_ref):  # later events copy the Upload's
        return (f"blob_ref {_show(event.blob_ref)} must be cassandra:<id> or file:<id> (an id of letters,"
                " digits and _.- that does not start with a dot)")
    return None


def check_options(settings: Settings, options: JobOptions) -> str | None:
    """Why a job cannot run with ``options``, in the words its client sees, or None.

    The one set of option rules: the door (``producers.submission.parse_options``,
    a 422) and every worker (``check_event``, a failed job for a direct
    producer's event) both ask this function, so a job the door accepts is
    never refused by a worker, and a refusal reads the same from either. The
    rules: the task, Whisper language codes, a model the operator serves
    (``model_problem``), the decoder's prompt (at most
    ``decoding.MAX_PROMPT_CHARS``) and temperature (0..1).
    """
    if options.task not in TASKS:
        return f"task={_show(options.task)} must be one of {', '.join(TASKS)}"
    codes = languages()
    for name in ("language", "translate_to"):
        value = getattr(options, name)
        if value is not None and value not in codes:
            return f"{name}={_show(value)} is not a Whisper language code (e.g. en, es, de)"
    return (model_problem(settings, options.model) or decoding.prompt_problem(options.prompt)
            or decoding.temperature_problem(options.temperature))


def model_problem(settings: Settings, model: str | None) -> str | None:
    """Why a job may not ask for ``model`` (None: it may; None means the worker's default model).

    Only ``Settings.allowed_model_names`` (``KAFSCRIBE_ALLOWED_MODELS``) are ever loaded; the
    answer lists them, as that is what the client can choose from.
    """
    allowed = settings.allowed_model_names()
    if model is not None and model not in allowed:
        return f"model={_show(model)} is not served here; choose one of {', '.join(sorted(allowed))}"
    return None


def _check_transcript(settings: Settings, event: Transcript) -> str | None:
    reason = _check_audio(settings, event) or check_options(settings, event.options)
    if reason:
        return reason
    slack = 1.0 + 0.01 * event.audio_duration  # the worker decodes at most this much past the claim
    if not finite(event.duration, 0, event.audio_duration + slack):
        return f"duration {_show(event.duration)} is not within the audio's {event.audio_duration:.1f} s"
    if not finite(event.processing_seconds, 0):
        return f"processing_seconds {_show(event.processing_seconds)} is not a duration"
    # Whisper may time a last segment up to the end of its 30 s window.
    return _check_segments(event.segments, event.audio_duration + slack + 30.0)


def _check_result(settings: Settings, event: Result) -> str | None:
    if event.status not in RESULT_STATUSES:
        return f"status {_show(event.status)} must be one of {', '.join(RESULT_STATUSES)}"
    if event.duration is not None and not finite(event.duration, 0, settings.max_audio_s * 1.01 + 1):
        return f"duration {_show(event.duration)} is out of range"
    return _check_segments(event.segments, settings.max_audio_s + 31.0)


def _check_segments(segments: Iterable, end_s: float) -> str | None:
    for s in segments:
        if not (finite(s.start, 0, end_s) and finite(s.end, 0, end_s)):  # order is the engine's business
            return f"segment {s.id} has times {_show(s.start)}-{_show(s.end)} outside the audio"
        if s.temperature is not None and not finite(s.temperature, 0.0, 10.0):
            return f"segment {s.id} has temperature {_show(s.temperature)}"
    return None


def _check_chunk(settings: Settings, event: Chunk | ChunkTranscript) -> str | None:
    """A chunk of a split recording: its place in the recording, its audio, its job's Upload."""
    if not (isinstance(event.count, int) and 1 <= event.count <= MAX_CHUNKS):
        return f"count {_show(event.count)} must be a number of chunks in [1, {MAX_CHUNKS}]"
    if not (isinstance(event.index, int) and 0 <= event.index < event.count):
        return f"index {_show(event.index)} must be in [0, {event.count - 1}] (count {event.count})"
    try:
        upload = embedded_upload(event)
    except ValueError as exc:
        return f"chunk {event.index}: {exc}"
    reason = _check_audio(settings, upload) or check_options(settings, upload.options)
    if reason:
        return f"chunk {event.index}: its job's Upload is invalid: {reason}"
    slack = 1.0 + 0.01 * upload.audio_duration  # the splitter decodes at most this much past the claim
    if not finite(event.offset_s, 0, upload.audio_duration + slack):
        return f"offset_s {_show(event.offset_s)} is not within the recording's {upload.audio_duration:.1f} s"
    if not finite(event.duration_s, 0, upload.audio_duration + slack) or event.duration_s <= 0 \
            or event.offset_s + event.duration_s > upload.audio_duration + slack:
        return (f"duration_s {_show(event.duration_s)} at offset {event.offset_s:.1f} s does not fit in the"
                f" recording's {upload.audio_duration:.1f} s")
    if isinstance(event, Chunk):
        if not isinstance(event.audio_sha256, str) or not _SHA256.fullmatch(event.audio_sha256):
            return "audio_sha256 must be 64 lower-case hex digits"
        if not isinstance(event.blob_ref, str) or not event.blob_ref:
            return "blob_ref is empty"
        if not finite(event.audio_bytes, 1, settings.max_upload_bytes):
            return f"audio_bytes {_show(event.audio_bytes)} must be in [1, {settings.max_upload_bytes}]"
        return None
    if event.error is not None and not isinstance(event.error, str):
        return "error must be text or null"
    return _check_segments(event.segments, event.offset_s + event.duration_s + 31.0)


def _check_callback(event: CallbackAttempt) -> str | None:
    if not finite(event.delivery_attempt, 1, 10**4):
        return f"delivery_attempt {_show(event.delivery_attempt)} is out of range"
    if not finite(event.not_before, 0):
        return f"not_before {_show(event.not_before)} is not a timestamp"
    return None


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


# --- events against the job they name -----------------------------------------------------------
def stored_options(job: Mapping[str, Any]) -> JobOptions:
    """The options a job row holds (a dict, as the job store reads it), with defaults for fields it lacks."""
    raw = job.get("options") or {}
    return JobOptions(**{k: v for k, v in raw.items() if k in JobOptions.__dataclass_fields__})


def tenant_vs_job(event: Event, job: Mapping[str, Any] | None) -> str | None:
    """Why ``event`` may not act on ``job`` (None: no such job): it names no job, or another tenant's."""
    if job is None:
        return f"job {_show(event.job_id)} does not exist; an event may not create it"
    if job.get("tenant") != event.tenant:
        return f"job {_show(event.job_id)} belongs to another tenant than the event's {_show(event.tenant)}"
    return None


def upload_vs_job(upload: Upload, job: Mapping[str, Any]) -> str | None:
    """Why an ``Upload`` may not act on the existing ``job`` of its id: another tenant's, or submitted with
    other audio or options (an Upload may not take over a job it did not create)."""
    reason = tenant_vs_job(upload, job)
    if reason:
        return f"{reason}; an Upload may not reuse its id"
    if job.get("blob_ref") != upload.blob_ref or job.get("audio_sha256") != upload.audio_sha256:
        return f"job {_show(upload.job_id)} was submitted with other audio; an Upload may not reuse its id"
    if dataclasses.asdict(stored_options(job)) != dataclasses.asdict(upload.options):
        return f"job {_show(upload.job_id)} was submitted with other options; an Upload may not reuse its id"
    return None


def chunk_vs_job(event: Chunk | ChunkTranscript, job: Mapping[str, Any] | None, blob_scheme: str) -> str | None:
    """Why a chunk event may not act on ``job``: not its tenant's, the job was not split into ``count``
    chunks, its audio is not the blob the job's id derives for its index, or its embedded Upload is not
    the job's."""
    reason = tenant_vs_job(event, job)
    if reason:
        return reason
    assert job is not None
    if job.get("chunks") is None:
        return f"job {_show(event.job_id)} was never split; a chunk event may not act on it"
    if event.count != job["chunks"]:
        return f"count {event.count} is not the {job['chunks']} chunks job {_show(event.job_id)} was split into"
    ref = event.blob_ref if isinstance(event, Chunk) else event.chunk_blob_ref
    if ref != f"{blob_scheme}:{chunk_blob_id(event.job_id, event.index)}":
        return f"chunk {event.index}: {_show(ref)} is not the audio of this job's chunk {event.index}"
    try:
        upload = embedded_upload(event)
    except ValueError as exc:
        return f"chunk {event.index}: {exc}"
    reason = upload_vs_job(upload, job)
    return f"chunk {event.index}: its Upload: {reason}" if reason else None


CALLBACK_FIELDS = ("event_id", "tenant", "url", "event_type", "body")


def callback_vs_job(attempt: CallbackAttempt, job: Mapping[str, Any] | None,
                    stored: Mapping[str, Any] | None) -> str | None:
    """Why a ``CallbackAttempt`` may not be delivered: its job does not exist or is another tenant's, or it
    is not the callback event the notifier stored for the job (event id, tenant, URL, type and body)."""
    reason = tenant_vs_job(attempt, job)
    if reason:
        return reason
    if stored is None:
        return f"job {_show(attempt.job_id)} has no stored callback event; an attempt may not make one up"
    for name in CALLBACK_FIELDS:
        if getattr(attempt, name) != stored.get(name):
            return f"its {name} is not that of the callback event stored for job {_show(attempt.job_id)}"
    return None
