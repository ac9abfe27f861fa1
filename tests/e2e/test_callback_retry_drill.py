"""Notifier processes stopped and killed while retries wait in the tiers: nothing is lost or sent early.

Runs the real ``kafscribe serve notifier`` processes (both loops, concurrent
mode, status reports) against the test stack and a local webhook receiver.
"""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from bench.harness import wait_until
from consumers.callback_tiers import RETRY_TOPIC
from tests.conftest import fresh_settings, make_pipeline
from tests.e2e.test_callback_retry import attempt, produce
from tests.fakes import WebhookReceiver

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def started(pipe, name: str) -> None:
    """Start a notifier process and wait until both its loops run."""
    pipe.start("notifier", name=name)
    wait_until(lambda: pipe.log_tail(name, 200).count("stage started") >= 2, 60, f"{name} started")


def test_retries_survive_a_stopped_and_a_killed_notifier(stack_settings, tmp_path_factory):
    receiver = WebhookReceiver()
    settings = fresh_settings(stack_settings, callback_allow_networks="127.0.0.0/8")
    pipe = make_pipeline(settings, tmp_path_factory, "retry-drill")
    try:
        started(pipe, "notifier-1")
        warm = attempt(f"warm-{uuid.uuid4().hex[:6]}", receiver.url + "/warm", 0)
        produce(settings, RETRY_TOPIC, [warm])
        wait_until(lambda: receiver.for_job(warm.job_id), 60, "the first notifier delivering")

        events = [attempt(f"drill-{i}-{uuid.uuid4().hex[:6]}", receiver.url + "/drill", 3 + 1.5 * i)
                  for i in range(20)]
        produce(settings, RETRY_TOPIC, events)
        time.sleep(4)
        started(pipe, "notifier-2")
        pipe.kill("notifier-1", signal.SIGTERM)  # clean stop: its partitions move at once
        time.sleep(6)
        started(pipe, "notifier-3")
        killed_at = time.time()
        pipe.kill("notifier-2", signal.SIGKILL)  # dead: its partitions move after the session timeout

        for ev in events:
            wait_until(lambda ev=ev: receiver.for_job(ev.job_id), 90, f"delivery of {ev.job_id}")
        late = {}
        for ev in events:
            requests = receiver.for_job(ev.job_id)
            assert len({r["headers"]["webhook-id"] for r in requests}) == 1  # a redelivery is recognisable
            late[ev.job_id] = min(r["received_at"] for r in requests) - ev.not_before / 1000
        print("lateness (s):", [round(v, 2) for v in late.values()])
        print("deliveries per event:", [len(receiver.for_job(ev.job_id)) for ev in events])
        assert all(v >= -0.05 for v in late.values()), "delivered before it was due"
        before = [late[ev.job_id] for ev in events if ev.not_before / 1000 < killed_at]
        # A clean stop hands over at once: one cooperative rebalance (a few heartbeats), not a session timeout.
        # (How many fell due before the kill depends on how fast the notifiers started on this machine.)
        assert before and max(before) < 6.0
        # A killed notifier's partitions wait out the session timeout before they move.
        assert max(late.values()) < settings.session_timeout_ms / 1000 + 10
    finally:
        pipe.stop()
        receiver.close()
