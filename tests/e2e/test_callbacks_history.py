"""Every delivery attempt gets its own number in the callback history, also for concurrent redeliveries."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from consumers.notifier import DELIVERED
from kafscribe.store.callbacks import CallbackStore
from tests.e2e.test_ssrf_delivery import Recorder, attempt_event, deliverer

pytestmark = [pytest.mark.stack]


def test_twenty_redeliveries_are_twenty_numbered_rows(stack_settings, session):
    """The ingress numbers a redelivery max+1 when it is asked; 20 quick asks all carry the same number.

    Four retrier workers (each its own Deliverer, as in separate processes) deliver them at once: the
    history must show 20 attempts numbered 1..20 (it used to show 2: same key, overwritten).
    """
    receiver = Recorder("127.0.0.1")
    try:
        event = attempt_event(f"http://127.0.0.1:{receiver.port}/hook")
        redeliveries = [replace(event, delivery_attempt=2) for _ in range(20)]
        workers = [deliverer(stack_settings, session, callback_allow_networks="127.0.0.0/8", callback_timeout_s=30.0)
                   for _ in range(4)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: workers[i % 4].attempt(redeliveries[i]), range(20)))
        attempts = CallbackStore(session).attempts(event.job_id)
        assert [a["attempt"] for a in attempts] == list(range(1, 21))
        assert [a["outcome"] for a in attempts] == [DELIVERED] * 20, attempts
        assert len(receiver.requests) == 20
    finally:
        receiver.close()


def test_numbers_continue_after_the_existing_history(stack_settings, session):
    store = CallbackStore(session)
    event = attempt_event("http://127.0.0.1:9/x", tenant="history-test")
    assert [store.record(event, 500, 1.0, "HTTP 500", "retrying") for _ in range(3)] == [1, 2, 3]
    other = replace(event, job_id=uuid.uuid4().hex)
    assert store.record(other, 200, 1.0, None, "delivered") == 1  # numbering is per job
    assert store.record(event, 200, 1.0, None, "delivered") == 4
    assert [(a["attempt"], a["outcome"]) for a in store.attempts(event.job_id)] == [
        (1, "retrying"), (2, "retrying"), (3, "retrying"), (4, "delivered")
    ]
