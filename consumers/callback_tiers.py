"""Delay tiers of callback retries: which retry topic an attempt waits in, and until when.

``kafscribe.callbacks.retry`` holds attempts due now or within the shortest
tier (and redeliveries). Each ``kafscribe.callbacks.retry.<tier>`` topic
(``kafscribe/kafka/topics.toml``: ``delay_s``, broker-stamped ``LogAppendTime``) is a
FIFO delay queue: a message there is not read before its append time + the
tier's delay (or its due time, if sooner). In one partition append times only
grow, so the head is always the next one due and the consume loop can simply
hold the partition until then (``Stage.hold_until``, in ``consumers.concurrent``). Released,
an attempt is delivered when due or forwarded to the largest tier not longer
than its remaining wait: each tier passed costs one message, at most ~30 for
a 10 h backoff with the shipped tiers.
"""

from __future__ import annotations

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from kafscribe.kafka.topics import RETRY_TOPIC, retry_tiers
from kafscribe.settings import Settings
from schemas.events import CallbackAttempt, now_ms

from .stage import Output


def shortest_delay_s() -> float:
    """The shortest tier: an attempt due sooner than this waits in its delivery thread instead."""
    return min((d for _, d in retry_tiers() if d > 0), default=float("inf"))


def tier_for(wait_s: float) -> str:
    """The logical retry topic for an attempt due in ``wait_s``: the largest tier not longer than that."""
    chosen = RETRY_TOPIC
    for name, delay in retry_tiers():
        if delay <= wait_s:
            chosen = name
    return chosen


def next_tier(wait_s: float) -> str | None:
    """Where the retrier sends an attempt due in ``wait_s``: the tier that fits, or None to deliver it.

    An attempt due sooner than the shortest tier waits in its delivery thread instead of another hop.
    """
    return tier_for(wait_s) if wait_s >= shortest_delay_s() else None


def retry_output(settings: Settings, event: CallbackAttempt) -> Output:
    """``event`` on the retry topic that fits the time it still has to wait."""
    return Output(settings.topic(tier_for((event.not_before - now_ms()) / 1000)), event)


class TierClock:
    """When a message read from one of ``settings``' retry topics may be handled."""

    def __init__(self, settings: Settings) -> None:
        self.delays = {settings.topic(name): delay for name, delay in retry_tiers()}

    def release_at(self, event: CallbackAttempt, message: Message) -> float | None:
        """Epoch seconds: append time + the tier's delay, or the due time if sooner; None outside the tiers."""
        delay = self.delays.get(message.topic(), 0.0)
        if not delay:
            return None
        kind, stamp_ms = message.timestamp()
        if kind == TIMESTAMP_NOT_AVAILABLE or stamp_ms <= 0:
            stamp_ms = event.produced_at
        return min(stamp_ms / 1000 + delay, event.not_before / 1000)
