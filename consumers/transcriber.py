"""Stage ``transcriber`` (group ``transcribers``): Upload -> Transcript.

Reads the audio from the blob store (verifying its sha256), decodes it with
ffmpeg and runs Whisper. The engine and model are loaded once per process;
a job asking for another allowed model loads that one once too. A job whose
audio is bad fails here with the reason and goes straight to ``results``.

Admission: before a job starts, the worker checks its memory headroom
against the job's estimate (``kafscribe.speech.memory``) and waits -- partitions
paused, still polling, reporting ``throttled`` -- rather than run out of
memory; after ``KAFSCRIBE_THROTTLE_LEAVE_S`` it leaves the group so the
partitions move to workers that have the memory. That is only for a
temporary shortage: a job whose estimate exceeds what this worker could
offer even when idle (``memory.idle_capacity_bytes``) fails at once with the
reason -- or, when another live transcriber reports the headroom for it, is
handed to that worker (re-produced onto one of its partitions, at most
``MAX_HANDOFFS`` times) -- so it can never hold a partition. With a budget
(``KAFSCRIBE_MEMORY_BUDGET_BYTES``) nothing outside the process frees memory
for it, so a job that does not fit between jobs fails; without one, other
processes' memory is the temporary shortage worth waiting for.

Trust: the event was validated by the loop (``kafscribe.validation``). Here
the audio is decoded with a bound -- at most the ``Upload``'s
``audio_duration`` (+1 %, +1 s), which admission budgeted for, and never more
than ``KAFSCRIBE_MAX_AUDIO_S`` -- and the job has a time limit
(``Settings.job_time_limit_s``): past it, the job fails. An ``Upload`` that
reuses the id of a finished job goes to the DLQ and the finished job is left
as it was; so does one that reuses the id of another tenant's job, or of a
job submitted with other audio or options (``validation.upload_vs_job``).
A valid Upload whose job has no row yet (a direct producer that skipped it)
gets one written from the Upload (``JobStore.adopt``); an invalid one for a
job that does not exist goes to the DLQ and leaves no row. A deleted job is
never worked on, and whatever this worker wrote for it is removed again
(``retention.settle_deleted``, before and after the job's work). Only models
in ``Settings.allowed_model_names`` are ever loaded.

Prefetch: while a job runs, the consume loop hands the next
kept ``Upload`` to ``prefetch``, which reads its blob and decodes it in a
thread, so the next job starts at the engine. A prefetch is admitted like a
job: only when the headroom covers the running job's estimate plus the
prefetched audio (else it is skipped and done in the job, as before), and
the job it serves subtracts what is already resident from its own estimate.
It changes nothing in the job store; a failed or discarded prefetch is
simply redone inside the job, with the usual retries and error reasons.

Redo: every start counts an attempt in the job row; a job started more than
``KAFSCRIBE_MAX_ATTEMPTS`` times (its workers kept dying) fails, with its
errors, and a copy of its ``Upload`` goes to the DLQ.

Progress and cancellation: while the engine decodes, each segment and the
fraction of audio done are recorded for live readers (``kafscribe.store.progress``);
a job cancelled by its client is skipped before it starts and stopped between
segments (``Engine.transcribe``'s ``should_continue``): nothing is produced
for it, and its offset is committed.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace

import numpy as np
import psutil
from confluent_kafka import Message

from kafscribe import metrics, validation
from kafscribe.errors import PermanentError, RetriesExhausted
from kafscribe.kafka.routing import choose_partition
from kafscribe.kafka.workers import RUNNING, WorkerView
from kafscribe.settings import Settings
from kafscribe.speech import audio, chunking, memory
from kafscribe.speech.engines import Cancelled, Engine, EngineOptions, load_engine
from kafscribe.statuses import CANCELLED, TRANSCRIBING
from kafscribe.store import blobs as blobstore
from kafscribe.store import retention
from kafscribe.store.jobs import JobStore
from kafscribe.store.progress import ProgressReporter
from kafscribe.validation import is_job_id
from schemas.events import Chunk, Event, Result, Transcript, Upload, now_ms

from .chunk_transcriber import split_upload
from .retry import with_retries
from .stage import LeaveGroup, Output, Stage, hand_on, park
from .status import WorkMeter

MIB = 2**20
MAX_HANDOFFS = 3  # an Upload handed on this often (views can be stale) fails instead

log = logging.getLogger("kafscribe.transcriber")


@dataclass
class Prefetched:
    """A job's audio read and decoded ahead of time (``Transcriber.prefetch``)."""

    samples: np.ndarray
    read_s: float
    decode_s: float

    @property
    def nbytes(self) -> int:
        return int(self.samples.nbytes)


def prefetch_bytes(duration_s: float) -> int:
    """Memory a prefetch holds while it waits: the float32 samples, plus the blob and PCM while decoding."""
    return int(max(duration_s, 0.0) * memory.AUDIO_BYTES_PER_SECOND)


class Transcriber(Stage):
    name = "transcriber"
    group = "transcribers"
    input_topic = "uploads"

    def __init__(self, settings: Settings, session, worker_id: str) -> None:
        self.settings = settings
        self.session = session
        self.worker_id = worker_id
        self.jobs = JobStore(session)
        self.default_engine = load_engine(settings)
        self._engines: dict[str, Engine] = {settings.model: self.default_engine}
        self.throttled = False
        self._last_need = memory.estimate_for(settings, 30.0)
        self.view = WorkerView(settings)  # the other transcribers, for jobs this one can never fit
        self.engine_lock = threading.Lock()  # one engine at a time per process (uploads and chunks)
        self.meter = WorkMeter(self.model_name, settings.device)  # speed per model, the running job (status)

    @property
    def model_name(self) -> str:
        return self.default_engine.model_name

    def engine_for(self, model: str | None) -> Engine:
        model = model or self.settings.model
        if model not in self._engines:
            if problem := validation.model_problem(self.settings, model):  # validated already; never load the rest
                raise PermanentError(problem)
            self._engines[model] = load_engine(self.settings, model=model)
        return self._engines[model]

    # --- memory admission ------------------------------------------------------------
    def headroom(self) -> int:
        gpu = memory.gpu_status(self.settings.device)
        return memory.headroom_bytes(
            self.settings.memory_budget_bytes, memory.process_rss(),
            int(psutil.virtual_memory().available), gpu.free if gpu else None,
        )

    def idle_capacity(self, collect: bool = True) -> int:
        """The most this worker could offer a job: measured between jobs, so its RSS is its idle RSS
        (``collect``: after a garbage collection, which frees what the last job left)."""
        if collect:
            gc.collect()
        gpu = memory.gpu_status(self.settings.device)
        return memory.idle_capacity_bytes(
            self.settings.memory_budget_bytes, memory.process_rss(), int(psutil.virtual_memory().total),
            gpu.total if gpu else None, gpu.process_used if gpu else None,
        )

    def can_resume(self) -> bool:
        # A need above the idle capacity is failed on arrival, so waiting for it always ends.
        ok = self.headroom() >= min(self._last_need, self.idle_capacity())
        self.throttled = not ok
        return ok

    def admit(self, event: Upload, resident: int = 0) -> str | None:
        """Wait until there is memory for ``event``; raise ``LeaveGroup`` if that takes too long.

        ``resident``: bytes of the job already in this process (its prefetched samples), which
        its estimate need not find free again. Returns why the job can never run here (its
        estimate exceeds this worker's idle capacity), or None once it may start.
        """
        model = event.options.model or self.settings.model
        need = max(0, memory.estimate_for(self.settings, event.audio_duration, model) - resident)
        capacity = self.idle_capacity(collect=False)  # a collection costs; only needed near the limit
        if need > capacity:
            capacity = self.idle_capacity()
        if need > capacity:
            return (f"the job needs about {need / MIB:.0f} MiB ({event.audio_duration:.0f} s of audio, model"
                    f" {model!r}) but this worker can never offer more than {capacity / MIB:.0f} MiB"
                    " (KAFSCRIBE_MEMORY_BUDGET_BYTES, or host/GPU memory)")
        self._last_need = need
        metrics.JOB_ESTIMATE_BYTES.labels(self.name).set(need)
        started = time.monotonic()
        while (free := self.headroom()) < need:
            self.throttled = True
            waited = time.monotonic() - started
            if waited > self.settings.throttle_leave_s:
                metrics.THROTTLED_SECONDS.labels(self.name).inc(waited)
                raise LeaveGroup(f"{free / 2**20:.0f} MiB free, job {event.job_id} needs {need / 2**20:.0f} MiB")
            time.sleep(0.5)
        if self.throttled:
            metrics.THROTTLED_SECONDS.labels(self.name).inc(time.monotonic() - started)
        self.throttled = False
        return None

    def hand_off_or_fail(self, event: Upload, too_big: str) -> list[Output]:
        """A job this worker can never fit: hand it to a live transcriber whose reported headroom
        fits it (the Upload is re-produced onto one of its partitions, in the transaction that
        commits this offset), else fail it with ``too_big``. ``attempt`` counts the hand-offs."""
        extra = {"job_id": event.job_id, "trace_id": event.trace_id}
        need = memory.estimate_for(self.settings, event.audio_duration, event.options.model)
        others = [w for w in self.view.workers() if w.status.worker_id != self.worker_id
                  and w.status.stage == "transcriber" and w.status.state == RUNNING and w.headroom >= need]
        choice = choose_partition(others, need) if event.attempt <= MAX_HANDOFFS else None
        if choice is None:
            log.warning("job refused: %s", too_big, extra=extra)
            return self.failure_outputs(event, too_big)
        partition, worker_id = choice
        log.info("handing the job to %s (partition %d): %s", worker_id, partition, too_big, extra=extra)
        metrics.JOBS.labels(self.name, "handed_off").inc()
        moved = replace(event, attempt=event.attempt + 1, produced_at=now_ms())
        return [Output(self.settings.topic(self.input_topic), moved, partition=partition)]

    # --- the next job's audio, while this one runs ----------------------------------------
    def max_decode_s(self, event: Upload) -> float:
        """Admission budgeted for the claimed duration: decode no more than that (+ rounding slack)."""
        return min(self.settings.max_audio_s, event.audio_duration * 1.01 + 1.0)

    def prefetch(self, event: Event, message: Message) -> Prefetched | None:
        """Read and decode ``event``'s audio ahead of its job (called by the loop, in a thread).

        None when there is no memory to spare for it now (the job does it itself, later);
        exceptions are left to the job, which does the work again with its retries.
        """
        if not isinstance(event, Upload) or self.splits(event):
            return None  # a recording to split is read in pieces by the split itself
        held = prefetch_bytes(event.audio_duration)
        if self.headroom() < self._last_need + held:
            metrics.PREFETCHES.labels(self.name, "no_memory").inc()
            return None
        t0 = time.monotonic()
        data = blobstore.read_verified(self.settings, self.session, event.blob_ref, event.audio_sha256)
        t1 = time.monotonic()
        samples = audio.decode(data, self.max_decode_s(event),
                               timeout_s=self.settings.job_time_limit_s(event.audio_duration))
        metrics.PREFETCHES.labels(self.name, "done").inc()
        return Prefetched(samples, t1 - t0, time.monotonic() - t1)

    @staticmethod
    def _prefetched(prefetched: Future | None, timeout_s: float) -> Prefetched | None:
        if prefetched is None:
            return None
        try:
            return prefetched.result(timeout=max(0.0, timeout_s))
        except Exception as exc:  # noqa: BLE001 - the job reads and decodes again, with its own error handling
            log.info("prefetch not used: %r", exc)
            return None

    # --- one job -------------------------------------------------------------------------
    def handle(self, event: Event, message: Message, prefetched: Future | None = None) -> list[Output]:
        if not isinstance(event, Upload):
            raise PermanentError(f"expected an Upload on {message.topic()}, got {type(event).__name__}")
        if self.deleted(event):
            return []
        outputs = self.work(event, message, prefetched)
        chunks = [o.event.index for o in outputs if isinstance(o.event, Chunk)]  # a split wrote their audio
        return [] if self.deleted(event, chunks) else outputs

    def deleted(self, event: Upload, chunks: list[int] | None = None) -> bool:
        """Whether the job was deleted (its rows, and the audio of ``chunks``, are then removed again)."""
        if not retention.settle_deleted(self.settings, self.session, self.jobs, event.job_id, chunks or ()):
            return False
        log.info("job deleted; nothing produced", extra={"job_id": event.job_id, "trace_id": event.trace_id})
        metrics.JOBS.labels(self.name, "deleted").inc()
        return True

    def foreign(self, event: Upload) -> list[Output] | None:
        """The DLQ letter for an Upload that may not act on the job of its id (another tenant's, other
        audio or options), else None; a valid Upload whose job has no row gets one (``JobStore.adopt``)."""
        job = self.jobs.get(event.job_id)
        if job is None:
            self.jobs.adopt(event)
            return None
        reason = validation.upload_vs_job(event, job)
        if reason is None:
            return None
        log.warning("Upload refused: %s", reason, extra={"job_id": event.job_id, "trace_id": event.trace_id})
        metrics.JOBS.labels(self.name, "refused").inc()
        return [park(self.settings, self.name, event, reason, self.settings.topic(self.input_topic))]

    def work(self, event: Upload, message: Message, prefetched: Future | None = None) -> list[Output]:
        """The job's work once it is known not deleted: checks against the job, split or transcribe."""
        began = time.monotonic()
        phases = {"queue_wait": max(0.0, (now_ms() - event.produced_at) / 1000)} if event.produced_at else {}
        finished = self.jobs.finished_status(event.job_id)
        if finished == CANCELLED or (finished is None and job_cancelled(self.jobs, event.job_id)):
            return self.skip_cancelled(event)
        if finished is not None:
            reason = f"job {event.job_id} already finished ({finished}); an Upload may not reuse its id"
            log.warning(reason, extra={"job_id": event.job_id, "trace_id": event.trace_id})
            return [park(self.settings, self.name, event, reason, self.settings.topic(self.input_topic))]
        if (refused := self.foreign(event)) is not None:
            return refused
        if self.splits(event):
            return split_upload(self, event)  # no admission: the chunks are admitted one by one
        if moved := hand_on(self.settings, self.view, self.worker_id, event, self.queued(), MAX_HANDOFFS):
            return [moved]  # more wait here and a peer is idle: it starts this one at once
        self.meter.began(event.options.model, event.audio_duration)
        ready = prefetched.result() if prefetched is not None and prefetched.done() and \
            prefetched.exception() is None else None
        t = time.monotonic()
        too_big = self.admit(event, resident=ready.nbytes if ready is not None else 0)
        phases["admission"] = time.monotonic() - t
        if too_big is not None:
            return self.hand_off_or_fail(event, too_big)
        attempt = self.jobs.start_attempt(event.job_id, TRANSCRIBING, self.worker_id)
        phases["status"] = time.monotonic() - began - phases["admission"]
        extra = {"job_id": event.job_id, "trace_id": event.trace_id, "attempt": attempt}
        if attempt > 1:
            metrics.REDONE_JOBS.labels(self.name).inc()
        if attempt > self.settings.max_attempts:
            reason = f"gave up after {attempt - 1} attempts (workers died or failed on this job)"
            log.error(reason, extra=extra)
            return self.failure_outputs(event, reason, attempt, dead_letter=True)
        log.info("transcribing %.1fs of audio", event.audio_duration, extra=extra)
        started = time.monotonic()
        limit_s = self.settings.job_time_limit_s(event.audio_duration)
        deadline = started + limit_s
        max_audio_s = self.max_decode_s(event)
        try:
            engine = self.engine_for(event.options.model)
            t = time.monotonic()
            ready = self._prefetched(prefetched, deadline - t)
            if ready is not None:
                phases.update(prefetch_wait=time.monotonic() - t, blob_read=0.0, decode=0.0,
                              prefetched_read=ready.read_s, prefetched_decode=ready.decode_s)
                samples = ready.samples
            else:
                t = time.monotonic()
                data = with_retries(
                    lambda: blobstore.read_verified(self.settings, self.session, event.blob_ref,
                                                    event.audio_sha256),
                    stage=self.name, attempts=self.settings.transient_retries,
                )
                phases["blob_read"] = time.monotonic() - t
                t = time.monotonic()
                try:
                    samples = audio.decode(data, max_audio_s, timeout_s=deadline - time.monotonic())
                except audio.AudioTooLong as exc:
                    raise PermanentError(
                        f"the audio decodes to more than {max_audio_s:.1f} s, longer than the Upload's"
                        f" audio_duration ({event.audio_duration:.1f} s) or the limit"
                        f" ({self.settings.max_audio_s:.0f} s, KAFSCRIBE_MAX_AUDIO_S)"
                    ) from exc
                phases["decode"] = time.monotonic() - t
                del data
            del ready
            t = time.monotonic()
            out = self.run_engine(engine, samples, event, attempt, deadline)
            phases["engine"] = time.monotonic() - t
            self.meter.measured(event.options.model, event.audio_duration, phases["engine"])
        except PermanentError as exc:  # audio.AudioError and TimeLimitExceeded included
            if isinstance(exc.__cause__, Cancelled):
                return self.skip_cancelled(event, attempt)
            reason = str(exc)
            timed_out = time.monotonic() > deadline
            if timed_out:
                reason = (f"the job exceeded its time limit of {limit_s:.1f} s (KAFSCRIBE_JOB_TIME_LIMIT_MIN_S +"
                          f" KAFSCRIBE_JOB_TIME_LIMIT_FACTOR x {event.audio_duration:.1f} s of audio): {exc}")
            log.warning("job failed: %s", reason, extra=extra)
            # transient failures that outlasted the retries: parked for an operator too (not when out of time)
            dead_letter = isinstance(exc, RetriesExhausted) and not timed_out
            return self.failure_outputs(event, reason, attempt, dead_letter=dead_letter)
        seconds = time.monotonic() - started
        metrics.AUDIO_SECONDS.labels(self.name).inc(out.duration)
        if out.duration > 0:
            metrics.REALTIME_FACTOR.labels(engine.name).observe(seconds / out.duration)
        transcript = Transcript(
            job_id=event.job_id, tenant=event.tenant, attempt=attempt, trace_id=event.trace_id,
            blob_ref=event.blob_ref, audio_sha256=event.audio_sha256, audio_bytes=event.audio_bytes,
            audio_duration=event.audio_duration, filename=event.filename, options=event.options,
            language=out.language, language_probability=out.language_probability, duration=out.duration,
            text=out.text, segments=out.segments, engine=engine.name, model=engine.model_name,
            worker_id=self.worker_id, processing_seconds=seconds,
        )
        for phase, value in phases.items():
            if not phase.startswith("prefetched_"):
                metrics.JOB_PHASE_SECONDS.labels(self.name, phase).observe(value)
        log.info("transcribed in %.1fs (%s)", seconds, out.language,
                 extra={**extra, "phases": {k: round(v, 4) for k, v in phases.items()}})
        return [Output(self.settings.topic("transcripts"), transcript)]

    def splits(self, event: Upload) -> bool:
        """Whether the recording is long enough to be cut into chunks (``KAFSCRIBE_CHUNK_S``)."""
        return chunking.should_split(event.audio_duration, self.settings.chunk_s)

    # --- progress and cancellation (kafscribe.store.progress; the job store moves the status) -------
    def run_engine(self, engine: Engine, samples, event: Upload, attempt: int, deadline: float):
        """The engine on the job's audio with its options, reporting progress, stopping if cancelled."""
        progress = ProgressReporter(self.jobs, event.job_id, attempt, min_interval_s=self.settings.progress_interval_s,
                                    ttl_s=self.settings.progress_ttl_s)
        try:
            with self.engine_lock:
                out = with_retries(
                    lambda: engine.transcribe(samples, EngineOptions.for_job(event.options), deadline=deadline,
                                              on_segment=self.segment_hook(progress),
                                              should_continue=self.cancel_check(event.job_id)),
                    stage=self.name, attempts=self.settings.transient_retries,
                )
            progress.fraction(1.0, force=True)
            return out
        finally:
            progress.close()

    @staticmethod
    def segment_hook(progress: ProgressReporter):
        """The engine's ``on_segment``: each decoded segment and the fraction done go to the reporter."""
        def on_segment(segment, fraction: float) -> None:
            if segment is None:
                progress.fraction(fraction)
            else:
                progress.segment(segment, fraction)
        return on_segment

    def cancel_check(self, job_id: str):
        """The engine's ``should_continue``: False once the job is cancelled (read at most once per
        ``KAFSCRIBE_CANCEL_CHECK_S``; a failed read lets the job go on)."""
        every_s = self.settings.cancel_check_s
        last = [time.monotonic(), True]

        def should_continue() -> bool:
            if time.monotonic() - last[0] >= every_s:
                last[0] = time.monotonic()
                try:
                    last[1] = not job_cancelled(self.jobs, job_id)
                except Exception as exc:  # noqa: BLE001 - a cancel check must not fail the job
                    log.warning("cancel check failed: %s", exc, extra={"job_id": job_id})
            return last[1]
        return should_continue

    def skip_cancelled(self, event: Upload, attempt: int | None = None) -> list[Output]:
        """A cancelled job: nothing more is produced; its offset is committed like any other."""
        log.info("job cancelled; stopped" if attempt else "job cancelled before it started; skipped",
                 extra={"job_id": event.job_id, "trace_id": event.trace_id})
        metrics.JOBS.labels(self.name, "cancelled").inc()
        return []

    def _finished(self, job_id: str) -> bool:
        try:
            return self.jobs.finished_status(job_id) is not None
        except Exception:  # noqa: BLE001 - failure_outputs must not raise; the sink skips finished jobs anyway
            return False

    def _not_its_job(self, event: Upload) -> bool:
        """Whether ``event`` names no job, or one it may not act on: then a failure leaves no row and
        fails no one else's job (a store error: the sink checks the tenant again)."""
        try:
            job = self.jobs.get(event.job_id)
        except Exception:  # noqa: BLE001 - failure_outputs must not raise
            return False
        return job is None or validation.upload_vs_job(event, job) is not None

    def failure_outputs(self, event: Event, reason: str, attempt: int | None = None,
                        dead_letter: bool = False) -> list[Output]:
        """A failed ``Result`` (the job ends, the client is told); with ``dead_letter`` the
        input is also parked in the DLQ for an operator. An event that names no usable job
        (not an Upload, an invalid id, a job already finished, no job at all, another tenant's
        job or one submitted with other audio or options) only goes to the DLQ: a failed
        Result would reach the notifier for a job that ended long ago, or leave a row."""
        if not isinstance(event, Upload) or not is_job_id(event.job_id) or self._finished(event.job_id) \
                or self._not_its_job(event):
            return [park(self.settings, self.name, event, reason, self.settings.topic(self.input_topic))]
        result = Result.failed(event, reason, self.worker_id, attempt)
        outputs = [Output(self.settings.topic("results"), result)]
        if dead_letter:
            outputs.append(park(self.settings, self.name, event, reason, self.settings.topic(self.input_topic)))
        return outputs


def job_cancelled(jobs: JobStore, job_id: str) -> bool:
    """Whether the client cancelled the job: ``JobStore.is_cancelled``
    where the store has it, else the job row's status."""
    check = getattr(jobs, "is_cancelled", None)
    if check is not None:
        return bool(check(job_id))
    job = jobs.get(job_id)
    return job is not None and job["status"] == CANCELLED
