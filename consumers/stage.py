"""The stage contract: what a stage gives the consume loop, every hook declared with its default.

A stage is the job's own work (transcribe, translate, store, notify); the
loop (``consumers.loop``) does everything around it: consume, keep the worker
in its group, commit in a transaction, redo, pause. The loop calls only what
``Stage`` declares here, so a reader finds every way a stage can steer the loop
on one page, and a stage overrides only what it needs:

- ``handle`` (required): do the work, return the outputs to produce in the
  transaction that commits the input's offset. Failures the job can meet are
  outputs too (a failed ``Result``); raise only for bugs, ``LeaveGroup``, or a
  store outage (``consumers.retry`` decides what each one means).
- ``failure_outputs`` (required): what to emit when ``handle`` raised or the
  event failed validation: the job must still end, with a reason.
- ``concurrency`` and ``hold_until``: more than one message at a time, and
  partitions held until a message is due (``consumers.concurrent``).
- ``input_topics``: a stage reading several topics (the callback retry tiers).
- ``prefetch``: prepare the next message while the current one runs.
- ``can_resume``, ``throttled``: rejoining the group after ``LeaveGroup``, and
  what the worker status reports meanwhile.
- ``model_name``, ``runner_id``: what the worker status reports.
- ``queued``: how many messages wait behind the one being handled (the
  worker sets it to ``StageRunner.backlog``).

Also here: ``Output`` (an event to produce), ``park`` (the one dead-letter
builder), ``hand_on`` (a job given to an idle peer, in the transaction that
commits its offset) and the two exceptions by which a job leaves the loop
uncommitted.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import ClassVar

from confluent_kafka import Message

from kafscribe import metrics
from kafscribe.kafka import routing
from kafscribe.settings import Settings
from kafscribe.speech import memory
from schemas.events import DeadLetter, Event, Upload, now_ms

log = logging.getLogger("kafscribe.stage")


@dataclass
class Output:
    """An event to produce in the same transaction as the input's offset commit."""

    topic: str
    event: Event
    partition: int | None = None

    @property
    def key(self) -> bytes:
        return self.event.job_id.encode()


def park(settings: Settings, stage: str, event: Event | None, reason: str, source_topic: str = "", *,
         message: Message | None = None) -> Output:
    """A ``DeadLetter`` for an operator: why no stage could finish ``event`` (or the raw ``message``).

    With ``message`` (bytes that did not decode, say) the letter names its topic, partition and
    offset and carries its bytes as they were; otherwise it carries ``event`` re-encoded.
    """
    if message is not None:
        letter = DeadLetter(
            job_id=(message.key() or b"").decode(errors="replace"), source_topic=message.topic(),
            source_partition=message.partition(), source_offset=message.offset(), stage=stage, reason=reason,
            payload=message.value() or b"",
        )
    else:
        assert event is not None, "park needs the event or the message"
        letter = DeadLetter(
            job_id=event.job_id, tenant=event.tenant, trace_id=event.trace_id, source_topic=source_topic,
            source_partition=-1, source_offset=-1, stage=stage, reason=reason, payload=event.encode(),
        )
    return Output(settings.topic("dlq"), letter)


def hand_on(settings: Settings, view, worker_id: str, event: Upload, waiting: int, max_moves: int) -> Output | None:
    """Nobody idle while work waits: the ``Upload`` a transcriber is about to start, moved to an idle peer.

    When ``waiting`` more jobs wait behind it here and ``view`` (a ``WorkerView``) shows a live
    transcriber with nothing to do and the memory for it (``routing.idle_peer``), the job is
    re-produced onto one of that peer's partitions -- as an output, so in the one transaction that
    commits its offset here: it is neither lost (the transaction aborts whole) nor doubled (the
    offset commits with it) -- and this worker goes on with the next. ``attempt`` counts the moves
    (at most ``max_moves``, shared with the memory hand-off). None: start it here.
    """
    if waiting <= 0 or view is None or event.attempt > max_moves:
        return None
    need = memory.estimate_for(settings, event.audio_duration, event.options.model)
    choice = routing.idle_peer(view.workers(), worker_id, need, routed_s=view.routed_s())
    if choice is None:
        return None
    partition, peer = choice
    view.reserve(peer, need, event.audio_duration * routing.DEFAULT_SPEED["cpu"])  # busy for the next choice
    log.info("handing the job on to idle %s (partition %d): %d more wait here", peer, partition, waiting,
             extra={"job_id": event.job_id, "trace_id": event.trace_id})
    metrics.JOBS.labels("transcriber", "handed_on").inc()
    return Output(settings.topic("uploads"), replace(event, attempt=event.attempt + 1, produced_at=now_ms()),
                  partition=partition)


class Abandoned(Exception):
    """The job was given up (shutdown or partition lost); its offset stays uncommitted."""


class LeaveGroup(Exception):
    """The worker cannot take work for a while (short of memory): hand its partitions to others.

    The job's offset stays uncommitted; the worker unsubscribes, keeps reporting
    its status, and subscribes again once ``Stage.can_resume()`` says so.
    """


class Stage:
    """Base of every stage: the hooks the consume loop calls, with what they do when not overridden."""

    name: ClassVar[str]  # "transcriber": metrics, logs, the transactional id
    group: ClassVar[str]  # logical consumer group, "transcribers"
    input_topic: ClassVar[str]  # logical topic, "uploads"
    input_topics: tuple[str, ...] = ()  # logical topics, when the stage reads several (else input_topic)
    concurrency: int = 1  # messages handled at once; above 1 the loop runs them in a pool
    throttled: bool = False  # waiting for memory (reported in the worker status as "throttled")
    model_name: str = ""  # the model it has loaded (reported in the worker status)

    def handle(self, event: Event, message: Message, prefetched: Future | None = None) -> list[Output]:
        """Do the work; return outputs. Raise only for bugs: failures are outputs too.

        ``prefetched`` (only for a stage that overrides ``prefetch``): a Future of what
        ``prefetch`` returned for this message, if it was prepared ahead.
        """
        raise NotImplementedError

    def failure_outputs(self, event: Event, reason: str) -> list[Output]:
        """What to emit when ``handle`` raised (a bug) or the event is invalid: the job must still end."""
        raise NotImplementedError

    def topics(self) -> tuple[str, ...]:
        """The logical topics this stage reads: ``input_topics``, else ``input_topic`` alone."""
        return self.input_topics or (self.input_topic,)

    def hold_until(self, event: Event, message: Message) -> float | None:
        """Concurrent mode: an epoch time before which ``message`` must not be handled (None: now).

        The loop pauses the partition at that message and resumes it then, so nothing
        behind it is skipped ahead and no thread waits.
        """
        return None

    def prefetch(self, event: Event, message: Message) -> object | None:
        """One-at-a-time mode: prepare the next kept message while the current job runs (in a thread).

        Its result reaches ``handle`` as ``prefetched``; it is discarded if the message is
        dropped (partition revoked or rewound). The default prepares nothing.
        """
        return None

    @property
    def prefetches(self) -> bool:
        """Whether this stage prepares messages ahead (it overrides ``prefetch``)."""
        return type(self).prefetch is not Stage.prefetch

    def can_resume(self) -> bool:
        """After ``LeaveGroup``: whether the worker may join its group again (polled about once a second)."""
        return True

    def queued(self) -> int:
        """Messages waiting behind the one being handled (0: none known; the worker binds the runner's)."""
        return 0

    def runner_id(self, worker_id: str) -> str:
        """The worker id a second stage of a process reports its status under."""
        return f"{worker_id}-{self.name}"
