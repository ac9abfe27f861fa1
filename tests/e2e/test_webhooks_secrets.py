"""Per-tenant webhook secrets in Cassandra: creation, rotation with overlap, the CLI, and real deliveries
verified with the reference implementation (`standardwebhooks`) and with our own helper."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import standardwebhooks

from consumers.notifier import DELIVERED
from kafscribe.store.webhook_secrets import WebhookSecrets
from kafscribe.webhooks import signing as webhooks
from tests.e2e.test_ssrf_delivery import Recorder, attempt_event, deliverer

pytestmark = [pytest.mark.stack]


@pytest.fixture(scope="module")
def receiver():
    server = Recorder("127.0.0.1")
    yield server
    server.close()


def tenant() -> str:
    return "t-" + uuid.uuid4().hex[:12]


def test_a_tenant_gets_its_own_secret_on_first_use_and_keeps_it(session):
    store = WebhookSecrets(session, overlap_s=3600)
    a, b = tenant(), tenant()
    first = store.current(a)
    assert first.version == 1 and first.secret.startswith("whsec_")
    assert store.current(a) == first
    assert store.current(b).secret != first.secret
    assert store.signing(a) == [first.secret]


def test_concurrent_first_uses_agree_on_one_secret(session):
    store = WebhookSecrets(session, overlap_s=3600)
    name = tenant()
    with ThreadPoolExecutor(8) as pool:
        seen = set(pool.map(lambda _: store.current(name).secret, range(16)))
    assert len(seen) == 1 and [v.version for v in store.versions(name)] == [1]


def test_rotation_signs_with_both_during_the_overlap_then_only_the_new(session):
    store = WebhookSecrets(session, overlap_s=3600)
    name = tenant()
    old = store.current(name)
    new = store.rotate(name)
    assert new.version == 2 and new.secret != old.secret
    assert store.signing(name) == [new.secret, old.secret]
    assert store.previous_valid_until(name) > datetime.now(UTC) + timedelta(minutes=59)
    assert store.signing(name, now=datetime.now(UTC) + timedelta(seconds=3601)) == [new.secret]
    newest = store.rotate(name)
    assert store.signing(name) == [newest.secret, new.secret, old.secret]  # rotated twice within the window
    assert WebhookSecrets(session, overlap_s=0).signing(name) == [newest.secret]


def run_cli(stack_settings, *args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAFSCRIBE_")}
    env.update(stack_settings.to_env())
    done = subprocess.run([sys.executable, "-m", "kafscribe.cli.main", "webhooks", "secret", *args],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


def test_cli_prints_the_secret_last_and_rotates(stack_settings, session):
    store = WebhookSecrets(session, overlap_s=stack_settings.callback_secret_overlap_s)
    name = tenant()
    lines = run_cli(stack_settings, "--tenant", name)
    assert lines[-1] == store.current(name).secret and lines[-1].startswith("whsec_")
    assert run_cli(stack_settings, "--tenant", name)[-1] == lines[-1]  # shown again, not replaced
    rotated = run_cli(stack_settings, "--tenant", name, "--rotate")
    assert rotated[-1] != lines[-1] and rotated[-1] == store.current(name).secret
    assert any("previous secret also signs until" in line for line in rotated)


def test_deliveries_verify_with_the_reference_library_across_a_rotation(stack_settings, session, receiver):
    name = tenant()
    url = f"http://127.0.0.1:{receiver.port}/hook"
    d = deliverer(stack_settings, session, callback_allow_networks="127.0.0.0/8", callback_secret_overlap_s=3600)

    def deliver() -> dict:
        event = attempt_event(url, tenant=name)
        before = len(receiver.requests)
        assert d.attempt(event) == []
        assert d.store.attempts(event.job_id)[0]["outcome"] == DELIVERED
        (request,) = receiver.requests[before:]
        return request

    old = d.secrets.current(name).secret
    request = deliver()
    assert standardwebhooks.Webhook(old).verify(request["body"], request["headers"])["type"] == "job.completed"
    webhooks.verify(old, request["headers"], request["body"])

    new = d.secrets.rotate(name).secret
    request = deliver()
    for secret in (new, old):  # during the overlap both sign
        standardwebhooks.Webhook(secret).verify(request["body"], request["headers"])
        webhooks.verify(secret, request["headers"], request["body"])
    assert len(request["headers"]["webhook-signature"].split(" ")) == 2

    no_overlap = deliverer(stack_settings, session, callback_allow_networks="127.0.0.0/8",
                           callback_secret_overlap_s=0)
    d = no_overlap
    request = deliver()
    standardwebhooks.Webhook(new).verify(request["body"], request["headers"])
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(old).verify(request["body"], request["headers"])
    with pytest.raises(webhooks.WebhookVerificationError):
        webhooks.verify(old, request["headers"], request["body"])
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(d.secrets.current(tenant()).secret).verify(request["body"], request["headers"])
