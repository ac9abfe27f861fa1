"""Stage ``merger`` (group ``mergers``): ChunkTranscripts -> the job's one Transcript.

Every chunk of a job arrives on one partition (key = job id), so one merger
sees them in order of arrival, one at a time. For each:

1. A finished or cancelled job: nothing (a cancelled job gets no Transcript);
   the first chunk seen after the job ended removes every chunk's audio
   (chunk transcribers send skipped chunks on, with an error, for this).
2. The chunk's result is stored as an upsert (``job_chunks``, keyed by job
   and index): a redone chunk rewrites the same row.
3. Once every chunk is stored, the job's ``Transcript`` is built
   (``assemble``) and produced to ``transcripts`` in the transaction that
   commits this input's offset; a chunk that failed for good instead ends
   the job with a failed ``Result`` carrying the chunk's reason.

Exactly once: the job's ``merged_by`` mark (``kafscribe.store.chunks``) names
the input (topic, partition, offset) that produced the Transcript or the
failure, written before the transaction. The same input redone (the merger
died after the mark, before its commit) produces it again -- the earlier
transaction never committed; any other input finds the mark and produces
nothing, since inputs of a partition are committed in order (an earlier
one was committed, or it would be redone first). Progress (chunks done /
total) and the segments of the contiguous prefix of done chunks are written
for live readers as chunks arrive (``kafscribe.store.progress``). The chunks'
audio is removed when the job is merged or failed.

Trust: before any of that, the chunk must belong to its job
(``validation.chunk_vs_job``: the job exists and is the event's tenant's, was
split into exactly ``count`` chunks, and the chunk's audio is the blob its
job's id derives); any other goes to the DLQ and nothing is written or
removed. Audio is only ever removed by ids derived from the job's own id,
never a reference an event names. A deleted job: nothing is produced, and its
rows are removed again after the merger's own writes.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from confluent_kafka import Message

from kafscribe import metrics, validation
from kafscribe.errors import PermanentError
from kafscribe.settings import Settings
from kafscribe.store import blobs as blobstore
from kafscribe.store import retention
from kafscribe.store.chunks import ChunkStore, chunk_blob_id
from kafscribe.store.jobs import JobStore
from kafscribe.validation import is_job_id
from schemas.events import ChunkTranscript, Event, Result, Segment, Transcript, Upload, embedded_upload

from .chunk_transcriber import split_job_of
from .stage import Output, Stage, park

log = logging.getLogger("kafscribe.merger")


def vote_language(parts: list[ChunkTranscript]) -> tuple[str, float]:
    """The language spoken longest across chunks (duration-weighted), and its mean probability there."""
    seconds: dict[str, float] = defaultdict(float)
    weighted: dict[str, float] = defaultdict(float)
    for p in parts:
        seconds[p.language] += p.duration_s
        weighted[p.language] += p.duration_s * p.language_probability
    if not seconds:
        return "", 0.0
    language = max(seconds, key=lambda lang: (seconds[lang], lang))
    return language, (weighted[language] / seconds[language] if seconds[language] > 0 else 0.0)


def renumbered(parts: list[ChunkTranscript], first_id: int = 0) -> list[Segment]:
    """The chunks' segments in chunk order, numbered from ``first_id`` on."""
    segments = [s for p in sorted(parts, key=lambda p: p.index) for s in p.segments]
    out = []
    for i, s in enumerate(segments):
        out.append(Segment(id=first_id + i, start=s.start, end=s.end, text=s.text, avg_logprob=s.avg_logprob,
                           no_speech_prob=s.no_speech_prob, words=list(s.words), temperature=s.temperature))
    return out


def assemble(upload: Upload, parts: list[ChunkTranscript], worker_id: str, attempt: int) -> Transcript:
    """The job's Transcript from all of its chunks (any order in, chunk order out)."""
    parts = sorted(parts, key=lambda p: p.index)
    language, probability = vote_language(parts)
    segments = renumbered(parts)
    last = parts[-1]
    return Transcript(
        job_id=upload.job_id, tenant=upload.tenant, attempt=attempt, trace_id=upload.trace_id,
        blob_ref=upload.blob_ref, audio_sha256=upload.audio_sha256, audio_bytes=upload.audio_bytes,
        audio_duration=upload.audio_duration, filename=upload.filename, options=upload.options,
        language=language, language_probability=probability, duration=last.offset_s + last.duration_s,
        text=" ".join(t for t in (p.text.strip() for p in parts) if t), segments=segments,
        engine=last.engine, model=last.model, worker_id=worker_id,
        processing_seconds=sum(p.processing_seconds for p in parts),
    )


def all_chunk_blobs(event: ChunkTranscript) -> list[str]:
    """The audio of every chunk of the event's job (chunk blob ids follow from the job id and index; the
    count was checked against the job's)."""
    scheme = event.chunk_blob_ref.partition(":")[0]
    return [f"{scheme}:{chunk_blob_id(event.job_id, i)}" for i in range(event.count)]


def own_blob(event: ChunkTranscript) -> str:
    """The audio of the event's chunk, derived from its job's id and its index (never the ref it names)."""
    return f"{event.chunk_blob_ref.partition(':')[0]}:{chunk_blob_id(event.job_id, event.index)}"


def done_prefix(parts: dict[int, ChunkTranscript]) -> list[ChunkTranscript]:
    """The done chunks 0..k-1 with none missing before them (what a live reader may see in order)."""
    out = []
    while len(out) in parts and parts[len(out)].error is None:
        out.append(parts[len(out)])
    return out


class Merger(Stage):
    name = "merger"
    group = "mergers"
    input_topic = "chunk-transcripts"

    def __init__(self, settings: Settings, session, worker_id: str) -> None:
        self.settings = settings
        self.session = session
        self.worker_id = worker_id
        self.jobs = JobStore(session)
        self.chunks = ChunkStore(session)

    def handle(self, event: Event, message: Message) -> list[Output]:
        if not isinstance(event, ChunkTranscript):
            raise PermanentError(f"expected a ChunkTranscript on {message.topic()}, got {type(event).__name__}")
        if self.deleted(event):
            return []
        job = self.jobs.get(event.job_id)
        reason = validation.chunk_vs_job(event, job, self.settings.blob_store)
        if reason is not None:
            log.warning("chunk transcript refused: %s", reason,
                        extra={"job_id": event.job_id, "trace_id": event.trace_id})
            metrics.JOBS.labels(self.name, "refused").inc()
            return [park(self.settings, self.name, event, reason, self.settings.topic(self.input_topic))]
        outputs = self.merge(event, message, job)
        return [] if self.deleted(event) else outputs

    def deleted(self, event: ChunkTranscript) -> bool:
        """Whether the chunk's job was deleted (its rows and chunk audio are then removed again)."""
        return retention.settle_deleted(self.settings, self.session, self.jobs, event.job_id, [event.index])

    def merge(self, event: ChunkTranscript, message: Message, job: dict) -> list[Output]:
        """Store the chunk of its job; the job's Transcript (or failure) once every chunk is in."""
        extra = {"job_id": event.job_id, "trace_id": event.trace_id, "chunk": event.index}
        finished = self.jobs.finished_status(event.job_id)
        merged_by = self.chunks.merged_by(event.job_id)
        if finished is not None:  # cancelled, or failed some other way: no Transcript; the chunks' audio goes
            log.info("job %s: chunk %d ignored", finished, event.index, extra=extra)
            if merged_by is None:  # the first chunk seen since: every chunk's audio, once
                self.drop_blobs(all_chunk_blobs(event))
                self.chunks.mark_merged(event.job_id, f"ended {finished}")
            else:
                self.drop_blobs([own_blob(event)])
            return []
        marker = f"{message.topic()}:{message.partition()}:{message.offset()}"
        if merged_by is not None and merged_by != marker:
            log.info("job already merged (by %s): chunk %d ignored", merged_by, event.index, extra=extra)
            self.drop_blobs([own_blob(event)])  # a chunk done after its job failed
            return []
        self.chunks.save_result(event)
        upload = embedded_upload(event)
        if event.error is not None:
            self.chunks.mark_merged(event.job_id, marker)
            self.drop_blobs(all_chunk_blobs(event))
            log.warning("chunk failed, so does the job: %s", event.error, extra=extra)
            metrics.JOBS.labels(self.name, "chunk_failed").inc()
            result = Result.failed(upload, event.error, self.worker_id, event.attempt)
            return [Output(self.settings.topic("results"), result)]
        parts = {r.index: r.result for r in self.chunks.rows(event.job_id)
                 if r.result is not None and r.result.error is None and r.index < event.count}
        self.report_progress(event, parts)
        if len(parts) < event.count:
            return []
        self.chunks.mark_merged(event.job_id, marker)
        attempt = max(1, (job or {}).get("attempts") or 1)  # the job's attempt (chunks count their own)
        transcript = assemble(upload, list(parts.values()), self.worker_id, attempt)
        self.drop_blobs([own_blob(p) for p in parts.values()])
        log.info("merged %d chunks (%.1fs of audio)", event.count, transcript.duration, extra=extra)
        metrics.JOBS.labels(self.name, "merged").inc()
        return [Output(self.settings.topic("transcripts"), transcript)]

    def report_progress(self, event: ChunkTranscript, parts: dict[int, ChunkTranscript]) -> None:
        """Chunks done / total, and the segments that this chunk added to the done prefix (numbered as in
        the final Transcript) for live readers. Best effort, like all progress (``kafscribe.store.progress``)."""
        before = renumbered(done_prefix({i: p for i, p in parts.items() if i != event.index}))
        added = renumbered(done_prefix(parts))[len(before):]
        ttl = self.settings.progress_ttl_s
        try:
            futures = [self.jobs.record_live_segment(event.job_id, s, ttl) for s in added]
            futures.append(self.jobs.record_progress(event.job_id, 0, len(parts) / max(event.count, 1), ttl))
            for future in futures:
                future.result()
        except Exception as exc:  # noqa: BLE001 - progress never fails the merge
            log.warning("progress not recorded: %s", exc, extra={"job_id": event.job_id})

    def drop_blobs(self, refs: list[str]) -> None:
        """Remove chunk audio (retention: the chunks are no longer needed); best effort."""
        for ref in dict.fromkeys(refs):
            try:
                scheme, _, blob_id = ref.partition(":")
                blobstore.open_store(self.settings, self.session, scheme=scheme).delete(blob_id)
            except Exception as exc:  # noqa: BLE001 - a leftover blob never fails the job
                log.warning("chunk blob %s not removed: %s", ref, exc)

    def failure_outputs(self, event: Event, reason: str) -> list[Output]:
        """A ChunkTranscript that cannot be merged (malformed, or a bug): the job fails with the reason, the
        event goes to the DLQ; an event naming no usable job only goes to the DLQ."""
        dlq = park(self.settings, self.name, event, reason, self.settings.topic(self.input_topic))
        try:
            finished = self.jobs.finished_status(event.job_id) if is_job_id(event.job_id) else "unknown"
        except Exception:  # noqa: BLE001 - failure_outputs must not raise
            finished = "unknown"
        if finished is not None or not split_job_of(self.jobs, event):
            return [dlq]
        try:
            source: Event = embedded_upload(event)  # type: ignore[arg-type]
        except (ValueError, AttributeError):
            source = event
        result = Result.failed(source, f"a chunk's transcript cannot be merged: {reason}", self.worker_id)
        result.tenant, result.trace_id = event.tenant, event.trace_id
        return [Output(self.settings.topic("results"), result), dlq]

