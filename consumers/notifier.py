"""Stages ``notifier`` (finished job -> first delivery) and ``callback-retry`` (later deliveries).

The notifier consumes ``kafscribe.finished``, which the sink produces in the
same transaction that commits its Cassandra writes: when a callback goes
out, ``GET /v1/jobs/{id}`` already answers ``completed`` with the result.

It POSTs a signed JSON event (``job.completed`` / ``job.failed``) to the
job's ``callback_url`` once, with a short timeout, signed with the tenant's
current secret(s) (``kafscribe.store.webhook_secrets``). The URL is checked and
resolved once per attempt and the connection goes to the checked address
(``kafscribe.webhooks.guard``); redirects are not followed. A timeout, a
3xx, a 5xx, a 408/429 or a connection error schedules the next attempt on
``kafscribe.callbacks.retry`` (exponential backoff with jitter) -- the
notifier never holds a partition waiting on a slow client. Any other 4xx,
or an address the guard refuses, ends delivery. After the last attempt the
event goes to ``kafscribe.dlq``. Every attempt is recorded in Cassandra.

``callback-retry`` consumes the retry topics: ``kafscribe.callbacks.retry``
(due now or within a second, and redeliveries) and the delay tiers
``kafscribe.callbacks.retry.<tier>`` (``kafscribe/kafka/topics.toml``). A tier is a
FIFO delay queue: the consume loop holds its partition until the head's
append time + the tier's delay (no thread waits, nothing is re-produced
meanwhile), then the attempt is delivered if due or forwarded to the largest
tier not longer than its remaining wait -- a bounded number of hops per
retry. Both stages deliver up to ``KAFSCRIBE_CALLBACK_CONCURRENCY`` callbacks
at once (the consume loop's concurrent mode), so a receiver that hangs until
the timeout holds back no one else.

Trust: a callback goes only where the stored job says, signed only with its
own tenant's secret. The notifier refuses (DLQ, with the reason) a ``Result``
whose job does not exist, is another tenant's, or whose ``callback_url`` is
not the one the job was submitted with; ``callback-retry`` refuses a
``CallbackAttempt`` that is not, field for field, the callback event the
notifier stored for its job (``validation.callback_vs_job``). A deleted job
gets no callback, and the rows of its attempts are removed again. What ACLs
must still prevent: docs/trust-model.md.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime

from confluent_kafka import Message

from kafscribe import metrics, validation
from kafscribe.errors import PermanentError
from kafscribe.settings import Settings
from kafscribe.statuses import COMPLETED
from kafscribe.store import retention
from kafscribe.store.callbacks import CallbackStore
from kafscribe.store.jobs import JobStore
from kafscribe.store.webhook_secrets import WebhookSecrets
from kafscribe.webhooks import guard as callback_guard
from kafscribe.webhooks import links
from kafscribe.webhooks import signing as webhooks
from kafscribe.webhooks.guard import CallbackRefused, Resolver, check_url
from schemas.events import CallbackAttempt, Event, Result, now_ms

from .callback_tiers import RETRY_TOPIC, TierClock, next_tier, retry_output, retry_tiers
from .stage import Abandoned, Output, Stage, park

log = logging.getLogger("kafscribe.notifier")

DELIVERED, RETRYING, GAVE_UP = "delivered", "retrying", "gave_up"


def backoff_s(settings: Settings, attempt: int) -> float:
    """Delay before attempt ``attempt + 1`` (attempt >= 1): exponential, capped, ±20 % jitter."""
    base = settings.callback_backoff_base_s * settings.callback_backoff_factor ** (attempt - 1)
    return min(base, settings.callback_backoff_max_s) * random.uniform(0.8, 1.2)


def event_body(settings: Settings, result: Result) -> tuple[str, str]:
    """(event type, JSON body) of the callback for ``result``."""
    event_type = "job.completed" if result.status == COMPLETED else "job.failed"
    data: dict = {
        "job_id": result.job_id,
        "status": result.status,
        "error": result.error,
        "tenant": result.tenant,
        "links": links.job_links(links.configured_base(settings), result.job_id),
    }
    if result.options.callback_include_transcript and result.status == COMPLETED:
        data["transcript"] = {
            "language": result.language,
            "text": result.text,
            "segments": [asdict(s) for s in result.segments],
        }
        if result.translation:
            data["transcript"]["translation"] = {
                "language": result.translation.target_language,
                "text": result.translation.text,
                "segments": [asdict(s) for s in result.translation.segments],
            }
    body = {"type": event_type, "timestamp": datetime.now(UTC).isoformat(), "data": data}
    return event_type, json.dumps(body, separators=(",", ":"))


class Deliverer:
    """One delivery attempt and what follows from it (record, retry, or dead letter)."""

    def __init__(self, settings: Settings, session, stage: str,
                 resolve: Resolver = callback_guard.system_resolver) -> None:
        self.settings = settings
        self.session = session
        self.store = CallbackStore(session)
        self.jobs = JobStore(session)
        self.secrets = WebhookSecrets(session, settings.callback_secret_overlap_s)
        self.stage = stage
        self.resolve = resolve  # injectable: tests play a rebinding DNS server

    def deleted(self, job_id: str) -> bool:
        """Whether the job was deleted (its rows, attempts included, are then removed again)."""
        return retention.settle_deleted(self.settings, self.session, self.jobs, job_id)

    def refuse(self, event: Event, reason: str, topic: str) -> list[Output]:
        log.warning("callback refused: %s", reason, extra={"job_id": event.job_id, "trace_id": event.trace_id})
        metrics.WEBHOOK_DELIVERIES.labels(self.stage, "refused").inc()
        return [park(self.settings, self.stage, event, reason, topic)]

    def attempt(self, event: CallbackAttempt) -> list[Output]:
        outcome, status, error, latency_ms = self._post(event)
        exhausted = outcome == RETRYING and event.delivery_attempt >= self.settings.callback_max_attempts
        if exhausted:
            outcome = GAVE_UP
        number = self.store.record(event, status, latency_ms, error, outcome)
        metrics.WEBHOOK_DELIVERIES.labels(self.stage, outcome).inc()
        extra = {"job_id": event.job_id, "trace_id": event.trace_id, "attempt": number}
        log.info("callback %s (HTTP %s) %s", outcome, status, error or "", extra=extra)
        if outcome == DELIVERED:
            return []
        if outcome == RETRYING:
            delay = backoff_s(self.settings, event.delivery_attempt)
            nxt = replace(event, delivery_attempt=event.delivery_attempt + 1, produced_at=now_ms(),
                          not_before=now_ms() + int(delay * 1000), last_error=error)
            return [retry_output(self.settings, nxt)]
        if exhausted:
            reason = f"callback not delivered after {event.delivery_attempt} attempts: {error}"
            return [park(self.settings, self.stage, event, reason, self.settings.topic("callbacks.retry"))]
        return []  # refused by the receiver (4xx) or by the guard: stop, recorded as gave_up

    def _post(self, event: CallbackAttempt) -> tuple[str, int | None, str | None, float]:
        try:
            target = check_url(event.url, self.settings.callback_allow_networks, self.resolve)
        except CallbackRefused as exc:
            return GAVE_UP, None, f"refused: {exc}", 0.0
        body = event.body.encode()
        signing = self.secrets.signing(event.tenant or "default")
        headers = webhooks.headers(signing, event.event_id, body)
        started = time.monotonic()
        try:
            status = callback_guard.post(target, body, headers, self.settings.callback_timeout_s)
        except (TimeoutError, OSError, ValueError) as exc:
            return RETRYING, None, f"{type(exc).__name__}: {exc}", _ms(started)
        latency = _ms(started)
        if 200 <= status < 300:
            return DELIVERED, status, None, latency
        if 300 <= status < 400:
            return RETRYING, status, f"HTTP {status} (redirects are not followed)", latency
        if status >= 500 or status in (408, 429):
            return RETRYING, status, f"HTTP {status}", latency
        return GAVE_UP, status, f"HTTP {status}", latency


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000


class Notifier(Stage):
    name = "notifier"
    group = "notifier"
    input_topic = "finished"  # what the sink has stored, never a result the API cannot show yet

    def __init__(self, settings: Settings, session, worker_id: str) -> None:
        self.settings = settings
        self.deliverer = Deliverer(settings, session, self.name)
        self.concurrency = settings.callback_concurrency  # the consume loop's concurrent mode

    def handle(self, event: Event, message: Message) -> list[Output]:
        if not isinstance(event, Result):
            raise PermanentError(f"expected a Result on {message.topic()}, got {type(event).__name__}")
        if not event.options.callback_url:
            return []
        deliverer = self.deliverer
        if deliverer.deleted(event.job_id):
            return []
        job = deliverer.jobs.get(event.job_id)
        reason = validation.tenant_vs_job(event, job)
        if reason is None and job is not None \
                and validation.stored_options(job).callback_url != event.options.callback_url:
            reason = f"its callback_url is not the one job {event.job_id} was submitted with"
        if reason is not None:
            return deliverer.refuse(event, reason, self.settings.topic(self.input_topic))
        outputs = self.deliver(event)
        return [] if deliverer.deleted(event.job_id) else outputs

    def deliver(self, event: Result) -> list[Output]:
        """The first attempt of the job's callback (the event stored first, for retries and redelivery)."""
        event_type, body = event_body(self.settings, event)
        attempt = CallbackAttempt(
            job_id=event.job_id, tenant=event.tenant, attempt=event.attempt, trace_id=event.trace_id,
            event_id=webhooks.event_id(event.job_id, event_type), url=event.options.callback_url,
            event_type=event_type, body=body, delivery_attempt=1, not_before=now_ms(),
        )
        self.deliverer.store.save_event(attempt)
        return self.deliverer.attempt(attempt)

    def failure_outputs(self, event: Event, reason: str) -> list[Output]:
        return [park(self.settings, self.name, event, reason, self.settings.topic(self.input_topic))]


class CallbackRetrier(Stage):
    """Later attempts: waits in the delay tiers (held by the consume loop), then delivers or forwards."""

    name = "callback-retry"
    group = "notifier-retry"
    input_topic = RETRY_TOPIC

    def __init__(self, settings: Settings, session, worker_id: str, stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.deliverer = Deliverer(settings, session, self.name)
        self._stop = stop or threading.Event()
        self.concurrency = settings.callback_concurrency  # the consume loop's concurrent mode
        self.input_topics = tuple(name for name, _ in retry_tiers())
        self._clock = TierClock(settings)

    def hold_until(self, event: Event, message: Message) -> float | None:
        """The consume loop holds a tier's partition until then (``callback_tiers``)."""
        return self._clock.release_at(event, message) if isinstance(event, CallbackAttempt) else None

    def handle(self, event: Event, message: Message) -> list[Output]:
        if not isinstance(event, CallbackAttempt):
            raise PermanentError(f"expected a CallbackAttempt on {message.topic()}, got {type(event).__name__}")
        deliverer = self.deliverer
        if deliverer.deleted(event.job_id):
            return []
        reason = validation.callback_vs_job(event, deliverer.jobs.get(event.job_id),
                                            deliverer.store.get_event(event.job_id))
        if reason is not None:
            return deliverer.refuse(event, reason, self.settings.topic(RETRY_TOPIC))
        outputs = self.attempt_or_forward(event)
        return [] if deliverer.deleted(event.job_id) else outputs

    def attempt_or_forward(self, event: CallbackAttempt) -> list[Output]:
        """Deliver the attempt if due, else forward it to the delay tier that fits."""
        wait_s = (event.not_before - now_ms()) / 1000
        if next_tier(wait_s) is not None:
            return [retry_output(self.settings, event)]  # not due: on to the tier that fits
        if wait_s > 0 and self._stop.wait(wait_s):  # under the shortest tier: wait here
            raise Abandoned("stopping before a callback was due")
        return self.deliverer.attempt(event)

    def failure_outputs(self, event: Event, reason: str) -> list[Output]:
        return [park(self.settings, self.name, event, reason, self.settings.topic(self.input_topic))]
