"""Stage ``translator`` (group ``translators``): Transcript -> Result.

A job that asked for no translation (or for the language it is already in)
passes straight through as a completed ``Result``. Otherwise the job shows
``translating`` while a backend works: ``whisper`` (speech -> English, on
the job's audio) or ``llm`` (any target, segment by segment); see
``kafscribe.translation``. A translation that cannot succeed fails the job
with the backend's message. Invalid Transcripts are refused before they get
here (``kafscribe.validation``): a failed job, or the DLQ when the event
names no usable job. A Transcript for a job that does not exist or is another
tenant's goes to the DLQ (``validation.tenant_vs_job``); a deleted job's is
dropped, and its rows are removed again after this stage's writes.
"""

from __future__ import annotations

import logging

from confluent_kafka import Message

from kafscribe import validation
from kafscribe.errors import PermanentError
from kafscribe.settings import Settings
from kafscribe.statuses import COMPLETED, FAILED, TRANSLATING
from kafscribe.store import retention
from kafscribe.store.jobs import JobStore
from kafscribe.translation import Translator, backend_name
from kafscribe.validation import is_job_id
from schemas.events import Event, Result, Transcript

from .retry import with_retries
from .stage import Output, Stage, park

log = logging.getLogger("kafscribe.translator")


class TranslatorStage(Stage):
    name = "translator"
    group = "translators"
    input_topic = "transcripts"

    def __init__(self, settings: Settings, session, worker_id: str) -> None:
        self.settings = settings
        self.session = session
        self.worker_id = worker_id
        self.jobs = JobStore(session)
        self._backends: dict[str, Translator] = {}

    def backend(self, name: str) -> Translator:
        if name not in self._backends:
            if name == "whisper":
                from kafscribe.translation.whisper_backend import WhisperTranslator

                self._backends[name] = WhisperTranslator(self.settings, self.session)
            else:
                from kafscribe.translation.llm_backend import LLMTranslator

                self._backends[name] = LLMTranslator(self.settings)
        return self._backends[name]

    def handle(self, event: Event, message: Message) -> list[Output]:
        if not isinstance(event, Transcript):
            raise PermanentError(f"expected a Transcript on {message.topic()}, got {type(event).__name__}")
        if retention.settle_deleted(self.settings, self.session, self.jobs, event.job_id):
            return []
        reason = validation.tenant_vs_job(event, self.jobs.get(event.job_id))
        if reason is not None:
            log.warning("Transcript refused: %s", reason, extra={"job_id": event.job_id, "trace_id": event.trace_id})
            return [park(self.settings, self.name, event, reason, self.settings.topic(self.input_topic))]
        outputs = self.translate(event)
        return [] if retention.settle_deleted(self.settings, self.session, self.jobs, event.job_id) else outputs

    def translate(self, event: Transcript) -> list[Output]:
        result = result_from_transcript(event)
        target = event.options.translate_to
        if target and target != event.language:
            extra = {"job_id": event.job_id, "trace_id": event.trace_id}
            self.jobs.transition(event.job_id, TRANSLATING, worker_id=self.worker_id, attempts=event.attempt)
            try:
                backend = self.backend(backend_name(self.settings, target))
                log.info("translating %s -> %s with %s", event.language, target, backend.name, extra=extra)
                result.translation = with_retries(
                    lambda: backend.translate(event, target), stage=self.name,
                    attempts=self.settings.transient_retries,
                )
            except PermanentError as exc:  # TranslationError included
                log.warning("translation failed: %s", exc, extra=extra)
                result.status, result.error = FAILED, f"translation to {target!r} failed: {exc}"
        return [Output(self.settings.topic("results"), result)]

    def failure_outputs(self, event: Event, reason: str) -> list[Output]:
        """A failed ``Result``; an event that names no usable job (not a Transcript, a bad id) goes to the DLQ."""
        if not isinstance(event, Transcript) or not is_job_id(event.job_id) or self._not_its_job(event):
            return [park(self.settings, self.name, event, reason, self.settings.topic(self.input_topic))]
        return [Output(self.settings.topic("results"), Result.failed(event, reason, self.worker_id))]


    def _not_its_job(self, event: Event) -> bool:
        try:
            return validation.tenant_vs_job(event, self.jobs.get(event.job_id)) is not None
        except Exception:  # noqa: BLE001 - failure_outputs must not raise; the sink checks again
            return False


def result_from_transcript(t: Transcript) -> Result:
    return Result(
        job_id=t.job_id, tenant=t.tenant, attempt=t.attempt, trace_id=t.trace_id, status=COMPLETED,
        options=t.options, language=t.language, language_probability=t.language_probability,
        duration=t.duration, text=t.text, segments=t.segments, engine=t.engine, model=t.model,
        worker_id=t.worker_id,
    )
