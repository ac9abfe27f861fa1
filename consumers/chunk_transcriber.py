"""Long recordings in a transcriber: the split of an Upload, and the stage that transcribes chunks.

Split (``split_upload``, called by ``Transcriber.handle`` for audio longer than
1.5 x ``KAFSCRIBE_CHUNK_S``): the blob is copied to an unnamed temp file
(checked against its sha256, never whole in memory), decoded in pieces and
cut at silences (``kafscribe.speech.chunking``); each chunk is stored as its own
blob (16 kHz mono WAV, a deterministic id, so a redone split rewrites the
same blobs) and becomes one ``Chunk`` event on ``chunks``, all produced in
the transaction that commits the Upload's offset. The chunk count is known
before anything is produced and is recorded on the job. Only boundaries are
kept, so the splitting worker's memory does not grow with the recording.

The chunks are dealt evenly to the live chunk loops that report room for one
(``kafscribe.kafka.chunk_routing``). Chunks (``ChunkTranscriber``, group
``chunk-transcribers``, a second consume loop in every transcriber process
sharing its engines, with a ``WorkerStatus`` of its own): each chunk is
admitted by its own memory estimate, counts its own attempts
(``kafscribe.store.chunks``), and is transcribed with the job's options; its
segments and words are moved onto the recording's clock and sent as a
``ChunkTranscript`` (keyed by job id) to the merger. A chunk that fails for
good is sent with its ``error``; the merger fails the job once. One engine
works at a time per process (``Transcriber.engine_lock``).

Trust: a chunk acts only on a job that exists, is its tenant's, was split into
exactly its ``count`` and whose id derives its blob (``validation.chunk_vs_job``);
any other goes to the DLQ and the job is left as it was. A deleted job's chunk
is not worked on, and its row and audio are removed again.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from dataclasses import replace

from confluent_kafka import Message

from kafscribe import metrics, validation
from kafscribe.errors import PermanentError, RetriesExhausted
from kafscribe.kafka.chunk_routing import chunk_partitions
from kafscribe.speech import audio, chunking, memory
from kafscribe.speech.engines import Cancelled, EngineOptions
from kafscribe.statuses import CANCELLED, TRANSCRIBING
from kafscribe.store import blobs as blobstore
from kafscribe.store import retention
from kafscribe.store.chunks import ChunkStore, chunk_blob_id
from kafscribe.validation import is_job_id
from schemas.events import Chunk, ChunkTranscript, Event, Result, Segment, Upload, Word, embedded_upload

from .retry import with_retries
from .stage import Output, Stage, park

log = logging.getLogger("kafscribe.chunks")


def split_upload(transcriber, event: Upload) -> list[Output]:
    """Cut ``event``'s recording into chunks; the ``Chunk`` events (or the job's failure) to produce."""
    settings, jobs = transcriber.settings, transcriber.jobs
    attempt = jobs.start_attempt(event.job_id, TRANSCRIBING, transcriber.worker_id)
    extra = {"job_id": event.job_id, "trace_id": event.trace_id, "attempt": attempt}
    if attempt > settings.max_attempts:
        reason = f"gave up after {attempt - 1} attempts (workers died or failed on this job)"
        log.error(reason, extra=extra)
        return transcriber.failure_outputs(event, reason, attempt, dead_letter=True)
    started = time.monotonic()
    deadline = started + settings.job_time_limit_s(event.audio_duration)
    store = blobstore.open_store(settings, transcriber.session)
    stored: list[tuple[str, str, int]] = []  # (blob_ref, sha256, bytes) per chunk

    def write(piece: chunking.Piece, samples) -> None:
        data = chunking.wav_bytes(samples)
        blob_id = chunk_blob_id(event.job_id, piece.index)
        ref = with_retries(lambda: store.put(blob_id, data), stage=transcriber.name,
                           attempts=settings.transient_retries)
        stored.append((ref, hashlib.sha256(data).hexdigest(), len(data)))

    try:
        with tempfile.TemporaryFile(prefix="kafscribe-split-") as tmp:
            with_retries(lambda: (tmp.seek(0), tmp.truncate(), blobstore.spool_verified(
                settings, transcriber.session, event.blob_ref, event.audio_sha256, tmp)),
                stage=transcriber.name, attempts=settings.transient_retries)
            tmp.seek(0)
            pcm = chunking.decode_stream(tmp, transcriber.max_decode_s(event), deadline)
            pieces = chunking.split(pcm, settings.chunk_s, event.audio_duration, write)
    except PermanentError as exc:  # audio.AudioError included
        reason = str(exc)
        if isinstance(exc, audio.AudioTooLong):
            reason = (f"the audio decodes to more than {transcriber.max_decode_s(event):.1f} s, longer than the"
                      f" Upload's audio_duration ({event.audio_duration:.1f} s) or KAFSCRIBE_MAX_AUDIO_S")
        log.warning("job failed while splitting: %s", reason, extra=extra)
        return transcriber.failure_outputs(event, reason, attempt, dead_letter=isinstance(exc, RetriesExhausted))
    jobs.set_chunks(event.job_id, len(pieces))
    upload = event.encode()
    topic = settings.topic("chunks")
    need = memory.estimate_for(settings, max(p.duration_s for p in pieces), event.options.model)
    partitions = chunk_partitions(event.job_id, len(pieces), settings.uploads_partitions,
                                  transcriber.view.workers(), need)
    outputs = [
        Output(topic, Chunk(
            job_id=event.job_id, tenant=event.tenant, attempt=attempt, trace_id=event.trace_id,
            index=p.index, count=len(pieces), offset_s=p.offset_s, duration_s=p.duration_s,
            blob_ref=ref, audio_sha256=sha, audio_bytes=size, upload=upload,
        ), partition=partition)
        for p, (ref, sha, size), partition in zip(pieces, stored, partitions, strict=True)
    ]
    metrics.JOBS.labels(transcriber.name, "split").inc()
    log.info("split %.1fs of audio into %d chunks in %.1fs", event.audio_duration, len(pieces),
             time.monotonic() - started, extra=extra)
    return outputs


def shifted(segments: list[Segment], offset_s: float) -> list[Segment]:
    """``segments`` (and their words) moved ``offset_s`` seconds later: onto the recording's clock."""
    return [replace(s, start=s.start + offset_s, end=s.end + offset_s,
                    words=[Word(w.word, w.start + offset_s, w.end + offset_s, w.probability) for w in s.words])
            for s in segments]


class ChunkTranscriber(Stage):
    """Stage ``chunk-transcriber`` (group ``chunk-transcribers``): Chunk -> ChunkTranscript."""

    name = "chunk-transcriber"
    group = "chunk-transcribers"
    input_topic = "chunks"

    def __init__(self, transcriber) -> None:
        self.transcriber = transcriber  # consumers.transcriber.Transcriber: engines, admission, job store
        self.settings = transcriber.settings
        self.session = transcriber.session
        self.worker_id = transcriber.worker_id
        self.jobs = transcriber.jobs
        self.chunks = ChunkStore(transcriber.session)

    @staticmethod
    def runner_id(worker_id: str) -> str:
        """Its WorkerStatus id: its own (its partitions are the chunks topic's), not read as the process's
        transcriber by anything that looks workers up by id prefix."""
        return f"chunks@{worker_id}"

    @property
    def model_name(self) -> str:
        return self.transcriber.model_name

    @property
    def throttled(self) -> bool:
        return self.transcriber.throttled

    def can_resume(self) -> bool:
        return self.transcriber.can_resume()

    def handle(self, event: Event, message: Message) -> list[Output]:
        if not isinstance(event, Chunk):
            raise PermanentError(f"expected a Chunk on {message.topic()}, got {type(event).__name__}")
        if self.deleted(event):
            return []
        reason = validation.chunk_vs_job(event, self.jobs.get(event.job_id), self.settings.blob_store)
        if reason is not None:
            log.warning("chunk refused: %s", reason, extra={"job_id": event.job_id, "trace_id": event.trace_id})
            metrics.JOBS.labels(self.name, "refused").inc()
            return [park(self.settings, self.name, event, reason, self.settings.topic(self.input_topic))]
        outputs = self.work(event)
        return [] if self.deleted(event) else outputs

    def deleted(self, event: Chunk) -> bool:
        """Whether the chunk's job was deleted (its rows and this chunk's audio are then removed again)."""
        return retention.settle_deleted(self.settings, self.session, self.jobs, event.job_id, [event.index])

    def work(self, event: Chunk) -> list[Output]:
        """Transcribe a chunk that belongs to its job."""
        upload = embedded_upload(event)  # validated already
        extra = {"job_id": event.job_id, "trace_id": event.trace_id, "chunk": event.index}
        finished = self.jobs.finished_status(event.job_id)
        if finished is not None or self.jobs.is_cancelled(event.job_id):
            log.info("job %s: chunk %d skipped", finished or CANCELLED, event.index, extra=extra)
            metrics.JOBS.labels(self.name, "skipped").inc()
            return [self.outcome(event, upload, 0, error=f"job {finished or CANCELLED}")]  # the merger cleans up
        too_big = self.transcriber.admit(replace(upload, audio_duration=event.duration_s))
        if too_big is not None:
            return [self.outcome(event, upload, 1, error=too_big)]
        attempt = self.chunks.start_attempt(event.job_id, event.index, self.worker_id)
        extra["attempt"] = attempt
        if attempt > 1:
            metrics.REDONE_JOBS.labels(self.name).inc()
        if attempt > self.settings.max_attempts:
            reason = f"chunk {event.index} gave up after {attempt - 1} attempts (workers died or failed on it)"
            log.error(reason, extra=extra)
            return [self.outcome(event, upload, attempt, error=reason)]
        started = time.monotonic()
        limit_s = self.settings.job_time_limit_s(event.duration_s)
        deadline = started + limit_s
        try:
            engine = self.transcriber.engine_for(upload.options.model)
            data = with_retries(
                lambda: blobstore.read_verified(self.settings, self.session, event.blob_ref, event.audio_sha256),
                stage=self.name, attempts=self.settings.transient_retries,
            )
            samples = audio.decode(data, event.duration_s * 1.01 + 1.0, timeout_s=deadline - time.monotonic())
            del data
            options = EngineOptions.for_job(upload.options)
            with self.transcriber.engine_lock:
                out = with_retries(
                    lambda: engine.transcribe(samples, options, deadline=deadline,
                                              should_continue=self.transcriber.cancel_check(event.job_id)),
                    stage=self.name, attempts=self.settings.transient_retries,
                )
        except PermanentError as exc:  # audio.AudioError and TimeLimitExceeded included
            if isinstance(exc.__cause__, Cancelled):
                log.info("job cancelled; chunk stopped", extra=extra)
                return [self.outcome(event, upload, attempt, error="job cancelled")]  # the merger cleans up
            reason = str(exc)
            if time.monotonic() > deadline:
                reason = f"the chunk exceeded its time limit of {limit_s:.1f} s: {exc}"
            log.warning("chunk failed: %s", reason, extra=extra)
            return [self.outcome(event, upload, attempt, error=f"chunk {event.index}: {reason}")]
        seconds = time.monotonic() - started
        metrics.AUDIO_SECONDS.labels(self.name).inc(out.duration)
        log.info("chunk %d/%d transcribed in %.1fs", event.index + 1, event.count, seconds, extra=extra)
        return [self.outcome(event, upload, attempt, out=out, engine=engine, seconds=seconds)]

    def outcome(self, event: Chunk, upload: Upload, attempt: int, *, error: str | None = None, out=None,
                engine=None, seconds: float = 0.0) -> Output:
        """The chunk's ``ChunkTranscript`` (its transcript, or ``error``) for the merger."""
        result = ChunkTranscript(
            job_id=event.job_id, tenant=event.tenant, attempt=attempt, trace_id=event.trace_id,
            index=event.index, count=event.count, offset_s=event.offset_s, duration_s=event.duration_s,
            chunk_blob_ref=event.blob_ref, upload=upload.encode(), error=error, worker_id=self.worker_id,
            processing_seconds=seconds,
        )
        if out is not None:
            result.language, result.language_probability = out.language, out.language_probability
            result.text, result.segments = out.text, shifted(out.segments, event.offset_s)
            result.engine, result.model = engine.name, engine.model_name
        return Output(self.settings.topic("chunk-transcripts"), result)

    def failure_outputs(self, event: Event, reason: str, attempt: int | None = None) -> list[Output]:
        """A chunk event that cannot be worked on (malformed, or a bug): the job fails with the reason (a
        failed Result, once the sink stores it), and the event goes to the DLQ. An event naming no usable
        job only goes to the DLQ."""
        dlq = park(self.settings, self.name, event, reason, self.settings.topic(self.input_topic))
        if not is_job_id(event.job_id) or self.transcriber._finished(event.job_id) or not split_job_of(self.jobs, event):
            return [dlq]
        try:
            source: Event = embedded_upload(event)  # type: ignore[arg-type]
        except (ValueError, AttributeError):
            source = event
        if not isinstance(event, Chunk):
            return [dlq]
        index = event.index if isinstance(event.index, int) else "?"
        result = Result.failed(source, f"chunk {index} of the job cannot be transcribed: {reason}",
                               self.worker_id, attempt)
        result.tenant, result.trace_id = event.tenant, event.trace_id
        return [Output(self.settings.topic("results"), result), dlq]


def split_job_of(jobs, event: Event) -> bool:
    """Whether ``event`` names a split job of its own tenant: only then may a bad chunk event fail it (a store
    error counts as yes: the sink checks the tenant again)."""
    try:
        job = jobs.get(event.job_id)
    except Exception:  # noqa: BLE001 - failure_outputs must not raise
        return True
    return validation.tenant_vs_job(event, job) is None and job is not None and job.get("chunks") is not None
