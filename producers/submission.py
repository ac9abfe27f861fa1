"""Accepting a job: validate, store the audio, write the job row, publish ``Upload``.

One code path for the HTTP ingress and the direct-producer client, so both
give the same guarantees: nothing is acknowledged before the broker has the
event and the job row exists; bad input is refused with a clear reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import unicodedata
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafscribe.kafka import routing
from kafscribe.kafka.workers import WorkerView
from kafscribe.languages import LANGUAGES
from kafscribe.settings import Settings
from kafscribe.speech import audio, decoding, memory
from kafscribe.speech import probe as audio_probe
from kafscribe.statuses import FAILED
from kafscribe.store import blobs as blobstore
from kafscribe.store.jobs import JobStore
from kafscribe.validation import check_options
from kafscribe.webhooks.guard import CallbackRefused, check_url
from schemas.events import JobOptions, Upload

from .publisher import Publisher, PublishError

log = logging.getLogger("kafscribe.submission")

OPTION_FIELDS = ("language", "task", "translate_to", "callback_url", "model", "callback_include_transcript",
                 "word_timestamps", "vad_filter", "prompt", "temperature")
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
MAX_FILENAME_CHARS = 255
MAX_TRACE_ID_CHARS = 128
MAX_TENANT_CHARS = 128
READ_CHUNK_BYTES = 1 << 20


class SubmissionError(Exception):
    """Refused input; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Unavailable(Exception):
    """Kafka or Cassandra is down: nothing was accepted; try again later (503)."""


def check_text(name: str, value: str, max_chars: int, allowed_controls: str = "") -> str:
    """``value`` if it is valid UTF-8 text without control characters (but ``allowed_controls``) and at most
    ``max_chars``; else 422.

    Header and multipart values arrive with invalid UTF-8 bytes as lone
    surrogates (``surrogateescape``); they would fail later, in Cassandra or
    Avro, as a 503 the client retries forever.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SubmissionError(422, f"{name} is not valid UTF-8 (at character {exc.start})") from exc
    if len(value) > max_chars:
        raise SubmissionError(422, f"{name} is {len(value)} characters; the limit is {max_chars}")
    for i, char in enumerate(value):
        if char not in allowed_controls and unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            raise SubmissionError(422, f"{name} contains a control character ({char!r} at {i})")
    return value


def check_trace_id(trace_id: str) -> str:
    """A trace id is printable ASCII without spaces, at most 128 characters (W3C ids fit); else 422."""
    check_text("X-Trace-Id", trace_id, MAX_TRACE_ID_CHARS)
    bad = next((c for c in trace_id if not "!" <= c <= "~"), None)
    if bad is not None:
        raise SubmissionError(422, f"X-Trace-Id must be printable ASCII without spaces; found {bad!r}")
    return trace_id


def _languages() -> dict[str, str]:
    """Whisper's language table (``kafscribe.languages``: no engine import on the event loop)."""
    return LANGUAGES


def parse_options(raw: dict[str, str], settings: Settings) -> JobOptions:
    """Client options (strings from a form or CLI) as ``JobOptions``; 422 on error.

    Here the strings are read (trimmed, codes lower-cased, flags and numbers
    parsed) and the callback URL is checked against the SSRF guard; whether
    the values are allowed is ``kafscribe.validation.check_options``, the
    rules every worker applies to the same options, so the door and the
    workers refuse the same jobs with the same words.
    """
    unknown = sorted(set(raw) - set(OPTION_FIELDS))
    if unknown:
        raise SubmissionError(422, f"unknown option(s): {', '.join(unknown)}; allowed: {', '.join(OPTION_FIELDS)}")
    opts = JobOptions()
    opts.language = (raw.get("language") or "").strip().lower() or None
    opts.translate_to = (raw.get("translate_to") or "").strip().lower() or None
    opts.task = (raw.get("task") or "transcribe").strip().lower()
    opts.model = (raw.get("model") or "").strip() or None
    url = (raw.get("callback_url") or "").strip() or None
    if url is not None:
        try:
            check_url(url, settings.callback_allow_networks)
        except CallbackRefused as exc:
            raise SubmissionError(422, str(exc)) from exc
    opts.callback_url = url
    include = (raw.get("callback_include_transcript") or "false").strip().lower()
    opts.callback_include_transcript = include in ("1", "true", "yes")
    opts.word_timestamps = parse_flag(raw, "word_timestamps")
    opts.vad_filter = parse_flag(raw, "vad_filter")
    opts.prompt = (raw.get("prompt") or "").strip() or None
    try:
        opts.temperature = decoding.parse_temperature(raw.get("temperature") or "")
    except ValueError as exc:
        raise SubmissionError(422, str(exc)) from exc
    problem = check_options(settings, opts)
    if problem:
        raise SubmissionError(422, problem)
    return opts


def parse_flag(raw: dict[str, str], name: str) -> bool:
    """A yes/no option (true/false, 1/0, yes/no, on/off; absent = false); anything else is a 422."""
    value = (raw.get(name) or "").strip().lower()
    if value not in TRUE_WORDS + FALSE_WORDS:
        raise SubmissionError(422, f"{name}={value[:40]!r} must be true or false")
    return value in TRUE_WORDS


@dataclass
class Submitter:
    settings: Settings
    session: Any  # cassandra Session
    publisher: Publisher
    view: WorkerView | None = None  # live worker statuses, for memory-aware routing

    def __post_init__(self) -> None:
        self.jobs = JobStore(self.session)
        self.blobs = blobstore.open_store(self.settings, self.session)

    def submit(
        self, path: Path, options: JobOptions, *, filename: str = "", tenant: str = "default",
        trace_id: str = "", job_id: str | None = None,
    ) -> Upload:
        """``submit_async`` for callers without an event loop (the direct producer, tests)."""
        return asyncio.run(
            self.submit_async(path, options, filename=filename, tenant=tenant, trace_id=trace_id, job_id=job_id)
        )

    async def submit_async(
        self, audio_source: Path | bytes, options: JobOptions, *, filename: str = "", tenant: str = "default",
        trace_id: str = "", job_id: str | None = None, id_is_new: bool = False,
        admit: Callable[[float], Awaitable[None]] | None = None,
    ) -> Upload:
        """Accept the audio (a file, or the bytes of a small upload); returns the published ``Upload``.

        Nothing here blocks the event loop: the probe gives the loop back while
        it decodes, the blob, the job row and the event are awaited (driver and
        delivery callbacks), never run in a thread. A file is streamed to the
        blob store and hashed on the way, never read whole. A blob never
        outlives a refusal: if the job row or the publish fails, the blob is
        deleted before ``Unavailable`` is raised.

        ``id_is_new``: ``job_id`` was just made by the caller (the ingress's quota reservation), so it is
        not looked up. ``admit(duration)`` runs once the audio is decoded, before anything is stored:
        it may refuse the upload by raising (the ingress's quotas of audio seconds).
        """
        is_file = isinstance(audio_source, Path)
        filename = check_text("filename", filename or (audio_source.name if is_file else ""), MAX_FILENAME_CHARS)
        check_text("tenant", tenant, MAX_TENANT_CHARS)
        if trace_id:
            check_trace_id(trace_id)
        if job_id is not None and not id_is_new:
            await self._check_unused(job_id)
        size = audio_source.stat().st_size if is_file else len(audio_source)
        if size == 0:
            raise SubmissionError(415, "the file is empty")
        if size > self.settings.max_upload_bytes:
            raise SubmissionError(413, f"file is {size} bytes; the limit is {self.settings.max_upload_bytes}")
        try:
            info = await audio_probe.measure_async(audio_source, self.settings.max_audio_s)
        except audio.AudioTooLong as exc:
            raise SubmissionError(413, str(exc)) from exc
        except audio.AudioError as exc:
            raise SubmissionError(415, str(exc)) from exc
        if admit is not None:
            await admit(info.duration)
        job_id = job_id or uuid.uuid4().hex
        if is_file:
            upload = await self._store_file(audio_source, job_id, info.duration, options, filename, tenant, trace_id)
        else:
            upload = await self._store_bytes(audio_source, job_id, info.duration, options, filename, tenant, trace_id)
        try:
            await self.publisher.publish_async(
                self.settings.topic("uploads"), upload.job_id.encode(), upload.encode(),
                partition=self.choose_partition(upload),
            )
        except PublishError as exc:
            await self._refuse_row(job_id, f"not queued: {exc}")
            await self._forget_blob(job_id)
            raise Unavailable(str(exc)) from exc
        return upload

    def _upload(self, job_id: str, blob_ref: str, sha256: str, size: int, duration: float, options: JobOptions,
                filename: str, tenant: str, trace_id: str) -> Upload:
        return Upload(
            job_id=job_id, tenant=tenant, trace_id=trace_id or uuid.uuid4().hex, blob_ref=blob_ref,
            audio_sha256=sha256, audio_bytes=size, audio_duration=duration, filename=filename, options=options,
        )

    async def _store_file(self, path: Path, job_id: str, duration: float, options: JobOptions, filename: str,
                          tenant: str, trace_id: str) -> Upload:
        """A file upload: streamed to the blob store and hashed on the way, then the job row."""
        digest = hashlib.sha256()
        sizes = [0]

        async def chunks():
            async for chunk in _read_chunks(path):
                digest.update(chunk)
                sizes[0] += len(chunk)
                yield chunk

        try:
            blob_ref = await self.blobs.put_async(job_id, chunks())
        except Exception as exc:  # noqa: BLE001 - Cassandra/file errors all mean "not accepted"
            await self._forget_blob(job_id)
            raise Unavailable(f"blob store unavailable: {type(exc).__name__}: {exc}") from exc
        upload = self._upload(job_id, blob_ref, digest.hexdigest(), sizes[0], duration, options, filename, tenant,
                              trace_id)
        try:
            await self.jobs.create_async(upload)
        except Exception as exc:  # noqa: BLE001 - Cassandra errors all mean "not accepted"
            await self._forget_blob(job_id)
            raise Unavailable(f"job store unavailable: {type(exc).__name__}: {exc}") from exc
        return upload

    async def _store_bytes(self, data: bytes, job_id: str, duration: float, options: JobOptions, filename: str,
                           tenant: str, trace_id: str) -> Upload:
        """A small upload held in memory: its hash is known up front, so the blob and the job row are
        written at the same time (one round trip less before the 202). Either failing refuses the
        upload: the blob is deleted and a row already written is marked failed, as for a failed publish."""
        upload = self._upload(job_id, self.blobs.ref(job_id), hashlib.sha256(data).hexdigest(), len(data), duration,
                              options, filename, tenant, trace_id)

        async def one_chunk():
            yield data

        blob, row = await asyncio.gather(self.blobs.put_async(job_id, one_chunk()), self.jobs.create_async(upload),
                                         return_exceptions=True)
        if not isinstance(blob, BaseException) and not isinstance(row, BaseException):
            return upload
        failed, what = (blob, "blob store") if isinstance(blob, BaseException) else (row, "job store")
        if not isinstance(row, BaseException):
            await self._refuse_row(job_id, f"not queued: the {what} failed")
        await self._forget_blob(job_id)
        raise Unavailable(f"{what} unavailable: {type(failed).__name__}: {failed}") from failed

    async def _refuse_row(self, job_id: str, reason: str) -> None:
        """Mark the row of a job that was not accepted as failed (best effort; a thread: a failure path)."""
        try:
            await asyncio.to_thread(self.jobs.transition, job_id, FAILED, error=reason)
        except Exception:  # noqa: BLE001 - best effort; the client gets 503 either way
            pass

    async def _check_unused(self, job_id: str) -> None:
        """A job id given by the caller must be new: reusing one would overwrite that job's blob and row."""
        try:
            existing = await asyncio.to_thread(self.jobs.get, job_id)  # direct producers only, not the door
        except Exception as exc:  # noqa: BLE001 - Cassandra errors all mean "not accepted"
            raise Unavailable(f"job store unavailable: {type(exc).__name__}: {exc}") from exc
        if existing is not None:
            raise SubmissionError(409, f"job {job_id} exists; a job id is used once")
        try:
            deleted = await asyncio.to_thread(self.jobs.is_deleted, job_id)
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"job store unavailable: {type(exc).__name__}: {exc}") from exc
        if deleted:  # the workers would drop its Upload: say so now rather than accept it
            raise SubmissionError(409, f"job {job_id} was deleted; a job id is used once")

    async def _forget_blob(self, job_id: str) -> None:
        """Delete the blob of a job that was not accepted (best effort: the store may be what failed)."""
        try:
            await self.blobs.delete_async(job_id)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not delete the blob of refused job %s: %s", job_id, exc)

    def choose_partition(self, upload: Upload) -> int | None:
        """Partition of the live transcriber with the memory that is expected to finish the job first
        (``routing``); None lets the key hash decide."""
        if self.view is None:
            return None
        need = memory.estimate_for(self.settings, upload.audio_duration, upload.options.model)
        workers, model = self.view.workers(), upload.options.model or ""
        choice = routing.choose_partition(workers, need, dict(self.view.reserved), routed=dict(self.view.routed),
                                          audio_s=upload.audio_duration, model=model, routed_s=self.view.routed_s())
        if choice is None:
            return None
        partition, worker_id = choice
        chosen = next(w for w in workers if w.status.worker_id == worker_id)
        self.view.reserve(worker_id, need, upload.audio_duration * routing.speed_for(chosen, model))
        return partition


async def _read_chunks(audio_source: Path | bytes):
    """The audio in pieces of ``READ_CHUNK_BYTES``: bytes as they are, a file read in a thread (large uploads only)."""
    if not isinstance(audio_source, Path):
        for start in range(0, len(audio_source), READ_CHUNK_BYTES):
            yield audio_source[start:start + READ_CHUNK_BYTES]
        return
    f = await asyncio.to_thread(open, audio_source, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, READ_CHUNK_BYTES):
            yield chunk
    finally:
        f.close()
