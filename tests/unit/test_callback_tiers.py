"""The delay tiers of callback retries, by the notifier's own rules (no servers).

Which tier an attempt waits in (``tier_for``), where the retrier sends it next (``next_tier``) and when the
consume loop releases it (``TierClock.release_at``): a retry costs a bounded number of messages.
"""

from __future__ import annotations

import pytest
from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME

from consumers.callback_tiers import RETRY_TOPIC, TierClock, next_tier, retry_tiers, tier_for
from infra import bootstrap
from kafscribe.settings import Settings
from schemas.events import CallbackAttempt

# --- the tier rule ---------------------------------------------------------------


def test_tiers_come_from_topics_toml_shortest_first():
    tiers = retry_tiers()
    assert tiers[0] == (RETRY_TOPIC, 0.0)
    delays = [d for _, d in tiers]
    assert delays == sorted(delays) and len(set(delays)) == len(delays) and len(tiers) >= 4
    specs = {s.name: s for s in bootstrap.topic_specs(Settings(topic_prefix=""))}
    for name, _ in tiers[1:]:
        assert specs[name].config["message.timestamp.type"] == "LogAppendTime", name


@pytest.mark.parametrize(("wait_s", "topic"), [
    (-5, RETRY_TOPIC), (0.0, RETRY_TOPIC), (0.99, RETRY_TOPIC), (1.0, "callbacks.retry.1s"),
    (7, "callbacks.retry.5s"), (45, "callbacks.retry.30s"), (599, "callbacks.retry.2m"),
    (3599, "callbacks.retry.10m"), (36000, "callbacks.retry.1h"),
])
def test_an_attempt_goes_to_the_largest_tier_not_longer_than_its_wait(wait_s, topic):
    assert tier_for(wait_s) == topic


class TierMessage:
    """A message as the broker returns it from a tier: its topic and its append time (LogAppendTime)."""

    def __init__(self, topic: str, appended_ms: int) -> None:
        self._topic, self._appended_ms = topic, appended_ms

    def topic(self) -> str:
        return self._topic

    def timestamp(self) -> tuple[int, int]:
        return TIMESTAMP_LOG_APPEND_TIME, self._appended_ms


def hops(wait_s: float) -> int:
    """Messages one retry costs until delivered, by the notifier's own rules on a simulated clock.

    ``next_tier`` is what ``CallbackRetrier.handle`` asks (forward, or deliver here); ``TierClock.release_at``
    is when the consume loop lets a tier's message go.
    """
    clock = TierClock(Settings(topic_prefix=""))
    now_ms_, due_ms = 1_000_000, 1_000_000 + int(wait_s * 1000)
    event = CallbackAttempt(job_id="j", tenant="t", attempt=1, produced_at=now_ms_, trace_id="x", event_id="e",
                            url="https://example.com/hook", event_type="job.completed", body="{}",
                            delivery_attempt=2, not_before=due_ms)
    tier, count = tier_for(wait_s), 1  # the failed delivery's attempt goes to the tier that fits (retry_output)
    while tier is not None:
        released = clock.release_at(event, TierMessage(tier, now_ms_))
        now_ms_ = now_ms_ if released is None else int(released * 1000)  # callbacks.retry: no hold
        tier = next_tier((due_ms - now_ms_) / 1000)
        count += tier is not None
    return count


def test_hops_per_retry_are_bounded():
    # Every backoff the defaults can produce (up to 10 h): a few dozen messages, not one per second.
    worst = max(hops(w / 10) for w in range(0, 360_000, 7))
    assert worst <= 30, worst
    assert hops(0.5) == 1 and hops(8) == 4 and hops(45) == 4
