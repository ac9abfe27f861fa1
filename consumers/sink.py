"""Stage ``sink`` (group ``sink``): Result -> Cassandra rows; the job becomes completed or failed.

Writes are upserts keyed by job_id (and segment index), so a replayed
``Result`` rewrites the same rows: one job, one result, whatever happens.

Once the rows are written, the same ``Result`` goes to ``kafscribe.finished``
in the transaction that commits the input offset. Whoever reads
``finished`` (``read_committed``: the notifier) acts only on jobs whose
outcome the API can already show: a ``Result`` for a job that already
ended otherwise (cancelled by its client, failed after its last attempt)
is dropped here, so no callback announces an outcome the API does not show.

Trust: a ``Result`` for a job that does not exist (never created, or deleted)
or that is another tenant's writes nothing: it goes to the DLQ with the
reason (``validation.tenant_vs_job``), so no event leaves a row nobody
created. A deleted job's rows are removed again after the sink's writes
(``retention.settle_deleted``) and nothing goes to ``finished``.
"""

from __future__ import annotations

import logging

from confluent_kafka import Message

from kafscribe import validation
from kafscribe.errors import PermanentError
from kafscribe.settings import Settings
from kafscribe.store import retention
from kafscribe.store.jobs import JobStore
from schemas.events import Event, Result

from .retry import with_retries
from .stage import Output, Stage, park

log = logging.getLogger("kafscribe.sink")


class Sink(Stage):
    name = "sink"
    group = "sink"
    input_topic = "results"

    def __init__(self, settings: Settings, session, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.session = session
        self.jobs = JobStore(session)

    def handle(self, event: Event, message: Message) -> list[Output]:
        if not isinstance(event, Result):
            raise PermanentError(f"expected a Result on {message.topic()}, got {type(event).__name__}")
        extra = {"job_id": event.job_id, "trace_id": event.trace_id}
        if self.deleted(event):
            log.info("job deleted; this %s result is dropped", event.status, extra=extra)
            return []
        reason = validation.tenant_vs_job(event, self.jobs.get(event.job_id))
        if reason is not None:
            log.warning("Result refused: %s", reason, extra=extra)
            return [park(self.settings, self.name, event, reason, self.settings.topic(self.input_topic))]
        outputs = self.store(event, extra)
        return [] if self.deleted(event) else outputs

    def deleted(self, event: Result) -> bool:
        return with_retries(lambda: retention.settle_deleted(self.settings, self.session, self.jobs, event.job_id),
                            stage=self.name, attempts=self.settings.transient_retries)

    def store(self, event: Result, extra: dict) -> list[Output]:
        """Write the job's outcome; the Result goes on to ``finished`` unless the API shows another."""
        stored = with_retries(lambda: self.jobs.save_result(event), stage=self.name,
                              attempts=self.settings.transient_retries)
        if not stored:  # finished before: a replay of this Result, or a job cancelled / failed meanwhile
            status = with_retries(lambda: self.jobs.finished_status(event.job_id), stage=self.name,
                                  attempts=self.settings.transient_retries)
            if status != event.status:  # the client must not be told an outcome the API does not show
                log.info("job already %s; this %s result is dropped", status, event.status, extra=extra)
                return []
        log.info("job %s", event.status, extra=extra)
        return [Output(self.settings.topic("finished"), event)]

    def failure_outputs(self, event: Event, reason: str) -> list[Output]:
        # The sink is the last word on a job: if it cannot store it, park the event in the DLQ.
        return [park(self.settings, self.name, event, reason, self.settings.topic(self.input_topic))]
