"""Abuse of the operator's side, on the real stack: one row per attack with the answer it must get.

* forged ``WorkerStatus`` events (long, odd or many distinct worker ids, made-up stages) cannot grow the lag
  exporter's ``/metrics`` past its cap;
* ``kafscribe settings`` shows no password written into a URL, and shows what is not secret;
* a leaked webhook secret is revoked at once: the next delivery verifies with the new secret only
  (checked with the reference ``standardwebhooks`` library).

And the container path's bootstrap: ``kafscribe stack bootstrap`` (what docker-compose.kafka.yml runs)
creates every topic of topics.toml and every table of infra/cql on a fresh prefix and keyspace.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable

import pytest
import standardwebhooks
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import free_port, wait_until
from consumers.notifier import DELIVERED
from infra import bootstrap
from kafscribe.kafka import clients as kafka_clients
from kafscribe.kafka.workers import MAX_WORKER_ID_CHARS
from kafscribe.store import session as cassandra_session
from kafscribe.store.webhook_secrets import WebhookSecrets
from kafscribe.webhooks import signing as webhooks
from schemas.events import WorkerStatus, now_ms
from tests.conftest import fresh_settings, make_pipeline
from tests.e2e.test_ssrf_delivery import Recorder, attempt_event, deliverer

pytestmark = [pytest.mark.stack]

CAP = 100  # KAFSCRIBE_LAG_MAX_WORKERS's default
WORKER_SERIES = ("kafscribe_worker_status_age_seconds", "kafscribe_worker_headroom_bytes",
                 "kafscribe_worker_rss_bytes", "kafscribe_worker_in_flight_jobs")


def cli(settings, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KAFSCRIBE_")}
    base.update(settings.to_env() if env is None else env)
    return subprocess.run([sys.executable, "-m", "kafscribe.cli.main", *args], env=base, capture_output=True,
                          text=True, timeout=180)


def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _status(worker_id: str, stage: str = "transcriber", age_s: float = 0.0, state: str = "running") -> WorkerStatus:
    return WorkerStatus(job_id="", worker_id=worker_id, host="forged", pid=1, stage=stage, state=state,
                        rss_bytes=10**8, host_mem_available=10**10, host_mem_total=2 * 10**10, partitions=[0],
                        produced_at=now_ms() - int(age_s * 1000))


def forged_worker_statuses(request) -> None:
    """Hundreds of forged statuses add at most the cap's worth of worker series; bad ids add none."""
    settings = fresh_settings(request.getfixturevalue("stack_settings"))
    pipe = make_pipeline(settings, request.getfixturevalue("tmp_path_factory"), "forged-statuses")
    port = free_port()
    try:
        pipe.start("lag", KAFSCRIBE_LAG_METRICS_PORT=str(port))
        before = wait_until(lambda: _scraped(port), timeout_s=60, what="the lag exporter answers")
        assert sum(len(before.get(name, [])) for name in WORKER_SERIES) == 0
        tag = uuid.uuid4().hex[:8]
        forged = (
            [_status(f"long-{tag}-{i:03d}-" + "x" * 300) for i in range(300)]  # the reported attack
            + [_status(f"w {tag} {i}\n") for i in range(50)]  # odd characters
            + [_status(f"many-{tag}-{i:03d}") for i in range(300)]  # valid ids, far more than the cap
            + [_status(f"stage-{tag}-{i}", stage=f"made-up-{i}") for i in range(50)]
            + [_status(f"old-{tag}-{i}", age_s=700) for i in range(50)]  # stale for over 10 minutes
            + [_status(f"stopped-{tag}-{i}", state="stopped") for i in range(50)]
        )
        producer = kafka_clients.producer(settings)
        for status in forged:
            producer.produce(settings.topic("worker-status"), key=status.worker_id.encode(), value=status.encode())
        assert producer.flush(30) == 0
        after = wait_until(lambda: _not_exported(port, 300 - CAP), timeout_s=60,
                           what="the exporter's view read the forged statuses")
        shown = [s for name in WORKER_SERIES for s in after.get(name, [])]
        assert len(shown) == 4 * CAP  # the issue measured 1,201 new series from 300 statuses
        ids = {s.labels["worker_id"] for s in shown}
        assert len(ids) == CAP and all(i.startswith(f"many-{tag}-") for i in ids), sorted(ids)[:5]
        assert {s.labels["stage"] for s in shown} == {"transcriber"}
        for samples in after.values():
            for s in samples:
                for value in s.labels.values():
                    assert len(value) <= MAX_WORKER_ID_CHARS and re.fullmatch(r"[\w.:@-]*", value), value
        assert "ignoring status of worker" in pipe.log_tail("lag", 400)
    finally:
        pipe.stop()


def _scraped(port: int) -> dict | None:
    try:
        got = scrape(port)
    except OSError:
        return None
    return got if [s.value for s in got.get("kafscribe_lag_up", [])] == [1.0] else None


def _not_exported(port: int, expected: int) -> dict | None:
    got = scrape(port)
    return got if [s.value for s in got.get("kafscribe_workers_not_exported", [])] == [expected] else None


def settings_listing(request) -> None:
    """`kafscribe settings`: no password of a URL, secrets masked, a duration named "secret" shown."""
    stack_settings = request.getfixturevalue("stack_settings")
    password = "pw-" + uuid.uuid4().hex
    env = {**stack_settings.to_env(),
           "KAFSCRIBE_LLM_BASE_URL": f"https://translator:{password}@llm.example.com/v1",
           "KAFSCRIBE_PUBLIC_URL": f"https://ops:{password}@api.example.com",
           "KAFSCRIBE_LLM_API_KEY": f"sk-{password}",
           "KAFSCRIBE_CALLBACK_SECRET_OVERLAP_S": "3600"}
    done = cli(stack_settings, "settings", env=env)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert password not in out and "translator:" not in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("KAFSCRIBE_")}
    assert rows["KAFSCRIBE_LLM_BASE_URL"] == "https://****@llm.example.com/v1"
    assert rows["KAFSCRIBE_PUBLIC_URL"] == "https://****@api.example.com"
    assert rows["KAFSCRIBE_LLM_API_KEY"].startswith("****")
    assert rows["KAFSCRIBE_KAFKA_SASL_PASSWORD"].startswith("****")  # the test stack's SASL password
    assert rows["KAFSCRIBE_CALLBACK_SECRET_OVERLAP_S"] == "3600.0"
    assert rows["KAFSCRIBE_KAFKA_BOOTSTRAP"] == stack_settings.kafka_bootstrap


def revoked_secret(request) -> None:
    """Rotation keeps a leaked secret valid for the overlap; `--revoke` ends it before the next delivery."""
    stack_settings = request.getfixturevalue("stack_settings")
    session = request.getfixturevalue("session")
    receiver = Recorder("127.0.0.1")
    try:
        tenant = "t-" + uuid.uuid4().hex[:12]
        url = f"http://127.0.0.1:{receiver.port}/hook"
        d = deliverer(stack_settings, session, callback_allow_networks="127.0.0.0/8",
                      callback_secret_overlap_s=86400)

        def deliver() -> dict:
            event = attempt_event(url, tenant=tenant)
            before = len(receiver.requests)
            assert d.attempt(event) == []
            assert d.store.attempts(event.job_id)[0]["outcome"] == DELIVERED
            (got,) = receiver.requests[before:]
            return got

        def secret_cli(*flags: str) -> list[str]:
            done = cli(stack_settings, "webhooks", "secret", "--tenant", tenant, *flags)
            assert done.returncode == 0, done.stderr
            return done.stdout.strip().splitlines()

        leaked = secret_cli()[-1]
        rotated = secret_cli("--rotate")[-1]
        overlap = deliver()
        standardwebhooks.Webhook(leaked).verify(overlap["body"], overlap["headers"])  # what the finding showed
        lines = secret_cli("--revoke")
        new = lines[-1]
        assert new not in (leaked, rotated) and new.startswith("whsec_")
        assert any(line.startswith("revoked version(s) 1, 2") for line in lines), lines
        got = deliver()
        assert standardwebhooks.Webhook(new).verify(got["body"], got["headers"])["type"] == "job.completed"
        webhooks.verify(new, got["headers"], got["body"])
        for old in (leaked, rotated):
            with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
                standardwebhooks.Webhook(old).verify(got["body"], got["headers"])
        assert len(got["headers"]["webhook-signature"].split(" ")) == 1
        store = WebhookSecrets(session, 86400)
        assert [v.version for v in store.versions(tenant)] == [3] and store.previous_valid_until(tenant) is None
        assert secret_cli("--revoke")[-1] != new  # a second revoke: a fourth secret, the third ends
        done = cli(stack_settings, "webhooks", "secret", "--tenant", tenant, "--rotate", "--revoke")
        assert done.returncode == 2 and "not allowed with" in done.stderr
    finally:
        receiver.close()


FINDINGS: list[tuple[str, Callable]] = [
    ("forged worker statuses cannot grow the lag exporter's metrics past its cap", forged_worker_statuses),
    ("kafscribe settings shows no URL password and masks only secrets", settings_listing),
    ("a revoked webhook secret signs nothing from the next delivery on", revoked_secret),
]


@pytest.mark.parametrize("check", [check for _, check in FINDINGS], ids=[what for what, _ in FINDINGS])
def test_operator_side_abuse_gets_its_answer(check, request):
    check(request)


def test_stack_bootstrap_creates_every_topic_and_table_on_a_fresh_prefix_and_keyspace(stack_settings):
    """What the compose file's init service runs, against the real stack."""
    settings = stack_settings.with_(topic_prefix=f"b{uuid.uuid4().hex[:10]}.",
                                    cassandra_keyspace=f"kafscribe_boot_{uuid.uuid4().hex[:8]}")
    done = cli(settings, "stack", "bootstrap", "--wait", "60")
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        specs = bootstrap.topic_specs(settings)
        have = kafka_clients.admin(settings).list_topics(timeout=10).topics
        for spec in specs:
            assert spec.name in have, spec.name
            assert len(have[spec.name].partitions) == spec.partitions, spec.name
        tables = set(re.findall(r"CREATE TABLE IF NOT EXISTS \{keyspace\}\.(\w+)", bootstrap.SCHEMA_FILE.read_text()))
        session = cassandra_session.connect(settings)
        try:
            rows = session.execute("SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s",
                                   (settings.cassandra_keyspace,))
            assert {r.table_name for r in rows} >= tables and len(tables) > 5
        finally:
            session.cluster.shutdown()
        assert "schema ensured" in done.stdout and f"{len(specs)} topics of topics.toml present" in done.stdout
        again = cli(settings, "stack", "bootstrap", "--wait", "60")  # idempotent: nothing created twice
        assert again.returncode == 0 and "created topic" not in again.stdout, again.stdout + again.stderr
    finally:
        _drop(settings)
    unreachable = settings.with_(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    refused = cli(unreachable, "stack", "bootstrap", "--wait", "2")
    assert refused.returncode == 1 and "did not answer within 2s" in refused.stderr


def _drop(settings) -> None:
    admin = kafka_clients.admin(settings)
    names = [s.name for s in bootstrap.topic_specs(settings)]
    for fut in admin.delete_topics(names, operation_timeout=30).values():
        try:
            fut.result()
        except Exception:  # noqa: BLE001 - a topic the failed bootstrap never made
            pass
    session = cassandra_session.connect(settings)
    try:
        session.execute(f"DROP KEYSPACE IF EXISTS {settings.cassandra_keyspace}", timeout=60)
    finally:
        session.cluster.shutdown()
