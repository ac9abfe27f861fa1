"""A real Prometheus scraping real kafscribe processes: lag from the broker, every dashboard query answers.

The module starts Debian's Prometheus on a test port (19090 + KAFSCRIBE_TEST_PORT_OFFSET, data wiped
first, scrape interval 1 s) with the project's rules; each test writes file-SD targets for the
processes it started.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from bench.harness import free_port, wait_until
from infra import prometheus_server
from kafscribe.kafka import clients as kafka_clients
from kafscribe.settings import PROJECT_ROOT
from tests.conftest import PORT_OFFSET, TEST_STATE, fresh_settings, make_pipeline
from tests.e2e.test_loop_rebalance import upload
from tests.fakes import WebhookReceiver

pytestmark = [pytest.mark.stack, pytest.mark.slow]

DASHBOARD = PROJECT_ROOT / "infra" / "grafana" / "dashboards" / "kafscribe.json"


@pytest.fixture(scope="module")
def prometheus(stack_settings):
    """Our Prometheus on the test port, fresh data; its settings (state dir, port)."""
    settings = stack_settings.with_(state_dir=TEST_STATE / "prometheus-test", prometheus_port=19090 + PORT_OFFSET,
                                    prometheus_scrape_s=1.0)
    prometheus_server.down(settings)  # one left over by a killed session
    shutil.rmtree(prometheus_server.home(settings), ignore_errors=True)  # no series from earlier runs
    prometheus_server.up(settings)
    yield settings
    prometheus_server.down(settings)


def api(settings, path: str, **params: str) -> dict:
    url = f"{prometheus_server.url(settings)}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


def targets_up(settings, services: set[str]) -> bool:
    active = api(settings, "targets")["activeTargets"]
    health = {t["labels"].get("service"): t["health"] for t in active}
    return all(health.get(s) == "up" for s in services) and health


def test_an_undelivered_upload_with_no_consumer_shows_lag_within_one_scrape(prometheus, stack_settings, session,
                                                                             tmp_path_factory):
    settings = fresh_settings(stack_settings)
    job_id = f"stranded-{uuid.uuid4().hex[:8]}"
    created = datetime.now(UTC) - timedelta(seconds=300)  # the job row says it was submitted 5 minutes ago
    session.execute("INSERT INTO jobs (job_id, tenant, status, created_at) VALUES (%s, 'default', 'queued', %s)",
                    (job_id, created))
    pipe = make_pipeline(settings, tmp_path_factory, "lag-only")
    port = free_port()
    try:
        pipe.start("lag", KAFSCRIBE_LAG_METRICS_PORT=str(port))
        prometheus_server.write_targets(prometheus, "lag-only", [("lag-only", f"127.0.0.1:{port}", {"stage": "lag"})])
        selector = 'kafscribe_group_lag{service="lag-only",group="transcribers",topic="uploads",partition="1"}'
        wait_until(lambda: api(prometheus, "query", query=f"{selector} == 0")["result"], timeout_s=90,
                   what="the exporter scraped, partition 1 without lag")

        producer = kafka_clients.producer(settings)
        producer.produce(settings.topic("uploads"), key=job_id.encode(), value=upload(job_id).encode(), partition=1)
        assert producer.flush(30) == 0
        acked = time.time()

        def samples_after_ack() -> list[tuple[float, float]]:
            result = api(prometheus, "query", query=f"{selector}[60s]")["result"]
            values = [(float(t), float(v)) for t, v in (result[0]["values"] if result else [])]
            return [(t, v) for t, v in values if t > acked]

        first_scrape_after = wait_until(samples_after_ack, timeout_s=30, what="a scrape after the upload")[0]
        assert first_scrape_after[1] == 1, "the first scrape after the broker's ack shows the undelivered upload"
        assert first_scrape_after[0] - acked < 5, "scrape interval is 1 s"

        # No consumer at all: the partition is stranded, and the job's age comes from its row.
        stranded = 'kafscribe:partition_stranded{service="lag-only",group="transcribers",partition="1"} == 1'
        wait_until(lambda: api(prometheus, "query", query=stranded)["result"], timeout_s=30, what="stranded")
        owned = api(prometheus, "query", query='kafscribe_group_partition_owned{service="lag-only",partition="1",'
                                                'group="transcribers"}')["result"]
        assert owned and owned[0]["value"][1] == "0"
        age = wait_until(lambda: api(prometheus, "query",
                                     query='kafscribe_oldest_unfinished_job_seconds{service="lag-only"} > 0')["result"],
                         timeout_s=30, what="job age")
        assert 295 < float(age[0]["value"][1]) < 420

        # A member of the group that owns the partition but never reads it (and reports no jobs):
        # owned, idle, still stranded -- the case of the issue.
        idle = kafka_clients.consumer(settings, settings.topic_prefix + "transcribers")
        assigned: list = []
        idle.subscribe([settings.topic("uploads")], on_assign=lambda c, tps: (assigned.extend(tps), c.pause(tps)))
        try:
            deadline = time.monotonic() + 60
            while not assigned and time.monotonic() < deadline:
                idle.poll(0.2)
            assert {tp.partition for tp in assigned} == {0, 1, 2, 3}
            owned_query = ('kafscribe_group_partition_owned{service="lag-only",group="transcribers",partition="1"}'
                           ' == 1')
            wait_until(lambda: (idle.poll(0.1), api(prometheus, "query", query=owned_query)["result"])[1],
                       timeout_s=30, what="the idle member seen as the owner")
            assert api(prometheus, "query", query=stranded)["result"], "owned by an idle member: still stranded"
        finally:
            idle.close()
    finally:
        pipe.stop()
        (prometheus_server.targets_dir(prometheus) / "lag-only.json").unlink(missing_ok=True)


def test_every_dashboard_query_returns_data_after_a_few_jobs(prometheus, stack_settings, clips, tmp_path_factory):
    receiver = WebhookReceiver()
    settings = fresh_settings(stack_settings, engine="faster-whisper", model="tiny.en", status_interval_s=1.0,
                              callback_allow_networks="127.0.0.0/8", callback_backoff_base_s=0.5)
    pipe = make_pipeline(settings, tmp_path_factory, "dashboard")
    ports = {name: free_port() for name in ("transcriber", "translator", "sink", "notifier", "lag")}
    try:
        pipe.start("ingress")
        for stage in ("transcriber", "translator", "sink", "notifier"):
            pipe.start(stage, KAFSCRIBE_METRICS_PORT=str(ports[stage]))
        pipe.start("lag", KAFSCRIBE_LAG_METRICS_PORT=str(ports["lag"]))
        targets = [("ingress", f"127.0.0.1:{pipe.settings.http_port}", {"stage": "ingress"})]
        targets += [(name, f"127.0.0.1:{port}", {"stage": name}) for name, port in ports.items()]
        prometheus_server.write_targets(prometheus, "dashboard", targets)
        wait_until(lambda: targets_up(prometheus, {t[0] for t in targets}), timeout_s=90, what="every target up")

        # A few jobs, one after the other (so counters grow between scrapes), each with a callback;
        # the second callback fails once (a 503 then a retry), and one event that is not Avro goes to the DLQ.
        receiver.script.extend([200, 503])
        for clip in ("en", "en_mp3"):
            job_id = pipe.http.submit(clips[clip], callback_url=receiver.url + "/hook")["job_id"]
            assert pipe.wait_job(job_id, timeout_s=240)["status"] == "completed"
        wait_until(lambda: len(receiver.requests) >= 3, timeout_s=60, what="callbacks incl. a retry")
        producer = kafka_clients.producer(settings)
        producer.produce(settings.topic("uploads"), key=b"garbage", value=b"\x00not avro at all")
        assert producer.flush(30) == 0
        wait_until(lambda: api(prometheus, "query", query="kafscribe_dead_letters_total > 0")["result"],
                   timeout_s=60, what="the DLQ event counted")
        time.sleep(3)  # a few more scrapes and rule evaluations

        panels = json.loads(DASHBOARD.read_text())["panels"]
        empty = []
        for panel in panels:
            for target in panel["targets"]:
                result = api(prometheus, "query", query=target["expr"])["result"]
                values = [float(r["value"][1]) for r in result]
                if not values or all(v != v for v in values):  # nothing, or only NaN
                    empty.append(f'{panel["title"]}: {target["expr"]}')
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        done = api(prometheus, "query", query='sum(kafscribe_jobs_total{stage="sink",outcome="ok"})')["result"]
        assert float(done[0]["value"][1]) == 2
        assert api(prometheus, "query", query="sum(kafscribe_jobs_total)")["result"]
    finally:
        pipe.stop()
        receiver.close()
        (prometheus_server.targets_dir(prometheus) / "dashboard.json").unlink(missing_ok=True)


def test_services_up_runs_prometheus_scraping_every_service_and_down_stops_it(stack_settings, tmp_path):
    """`kafscribe services up` (what `make up` runs): file SD names every service; all are up in Prometheus."""
    import os
    import socket

    from kafscribe.cli import services

    base = free_port()
    settings = fresh_settings(stack_settings, state_dir=tmp_path / "state", http_port=free_port(),
                              metrics_port=base, lag_metrics_port=free_port(), supervisor_metrics_port=free_port(),
                              prometheus_port=free_port(), prometheus_scrape_s=1.0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAFSCRIBE_")}
    env.update(settings.to_env())
    names = ("ingress", "sink", "lag")
    try:
        services.up(settings, names=names, log=print, env=env)
        rows = {r.name: r for r in services.status(settings)}
        assert rows["prometheus"].pid, rows
        expected = {"ingress", "sink", "lag", "supervisor"}
        wait_until(lambda: targets_up(settings, expected), timeout_s=120, what="every service scraped")
        scraped = {t["labels"]["service"]: t["scrapeUrl"] for t in api(settings, "targets")["activeTargets"]}
        assert scraped["sink"] == f"http://127.0.0.1:{base + 2}/metrics"  # the sink's place in the block
        assert wait_until(lambda: api(settings, "query", query='kafscribe_lag_up{service="lag"} == 1')["result"],
                          timeout_s=60, what="lag exporter reads the broker")

        # `make up` again: the same Prometheus reloads its config; one that was gone is started again.
        pid = prometheus_server.process(settings).pid()
        assert services.up(settings, names=names, log=print, env=env) == []
        assert prometheus_server.process(settings).pid() == pid
        prometheus_server.down(settings)
        services.up(settings, names=names, log=print, env=env)
        assert prometheus_server.process(settings).pid() not in (None, pid) and prometheus_server.ready(settings)
    finally:
        services.down(settings, log=print)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", settings.prometheus_port)) != 0, "services down stops Prometheus"
    assert not prometheus_server.process(settings).alive()
