"""Stage ``translator`` (group ``translators``): Transcript -> Result.

A job that asked for no translation (or for the language it is already in)
passes straight through as a completed ``Result``.
"""

from __future__ import annotations

import logging

from confluent_kafka import Message

from kafscribe.jobstore import COMPLETED, FAILED, JobStore
from kafscribe.settings import Settings
from schemas.events import Event, Result, Transcript

from .loop import Output
from .retry import PermanentFailure

log = logging.getLogger("kafscribe.translator")


class TranslatorStage:
    name = "translator"
    group = "translators"
    input_topic = "transcripts"

    def __init__(self, settings: Settings, session, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.jobs = JobStore(session)

    def handle(self, event: Event, message: Message) -> list[Output]:
        if not isinstance(event, Transcript):
            raise PermanentFailure(f"expected a Transcript on {message.topic()}, got {type(event).__name__}")
        result = result_from_transcript(event)
        target = event.options.translate_to
        if target and target != event.language:
            result.status, result.error = FAILED, f"translation to {target!r} is not available yet"
        return [Output(self.settings.topic("results"), result)]

    def failure_outputs(self, event: Event, reason: str) -> list[Output]:
        result = Result(job_id=event.job_id, tenant=event.tenant, attempt=event.attempt,
                        trace_id=event.trace_id, status=FAILED, error=reason, worker_id=self.worker_id)
        if isinstance(event, Transcript):
            result.options = event.options
        return [Output(self.settings.topic("results"), result)]


def result_from_transcript(t: Transcript) -> Result:
    return Result(
        job_id=t.job_id, tenant=t.tenant, attempt=t.attempt, trace_id=t.trace_id, status=COMPLETED,
        options=t.options, language=t.language, language_probability=t.language_probability,
        duration=t.duration, text=t.text, segments=t.segments, engine=t.engine, model=t.model,
        worker_id=t.worker_id,
    )
