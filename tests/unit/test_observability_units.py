"""Observability without servers: rules (promtool), the lag exporter's metrics, scrape targets, config."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from infra import prometheus_server
from kafscribe.cli import services
from kafscribe.kafka import lag
from kafscribe.kafka.workers import WorkerState
from kafscribe.settings import PROJECT_ROOT, Settings
from schemas.events import WorkerStatus

RULES = PROJECT_ROOT / "infra" / "prometheus" / "rules.yml"
DASHBOARD = PROJECT_ROOT / "infra" / "grafana" / "dashboards" / "kafscribe.json"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_rules_are_valid():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_rules_fire_as_documented(tmp_path):
    """Prometheus's own rule evaluator on hand-written series (tests/prometheus/rules_test.yml)."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # the test is about when alerts fire, not their wording
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    spec = yaml.safe_load((PROJECT_ROOT / "tests" / "prometheus" / "rules_test.yml").read_text())
    spec["rule_files"] = [str(tmp_path / "rules.yml")]
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(spec))
    done = promtool("test", "rules", str(tmp_path / "rules_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_generated_prometheus_config_is_valid(tmp_path):
    settings = Settings(state_dir=tmp_path)
    conf = tmp_path / "prometheus.yml"
    conf.write_text(yaml.safe_dump(prometheus_server.config(settings)))
    done = promtool("check", "config", str(conf))
    assert done.returncode == 0, done.stdout + done.stderr
    assert str(prometheus_server.targets_dir(settings) / "*.json") in conf.read_text()


def test_compose_prometheus_config_uses_the_same_rules_and_job():
    compose = yaml.safe_load((PROJECT_ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    assert [c["job_name"] for c in compose["scrape_configs"]] == [prometheus_server.JOB]
    stack = yaml.safe_load((PROJECT_ROOT / "docker-compose.kafka.yml").read_text())["services"]
    assert "./infra/prometheus/rules.yml:/etc/prometheus/rules.yml:ro" in stack["prometheus"]["volumes"]
    assert compose["rule_files"] == ["/etc/prometheus/rules.yml"]
    scraped = {t for c in compose["scrape_configs"] for s in c["static_configs"] for t in s["targets"]}
    assert "lag:9105" in scraped and stack["lag"]["command"] == ["serve", "lag"]


def test_groups_table_matches_the_stages():
    from consumers.chunk_transcriber import ChunkTranscriber
    from consumers.merger import Merger
    from consumers.notifier import CallbackRetrier, Notifier
    from consumers.sink import Sink
    from consumers.transcriber import Transcriber
    from consumers.translator import TranslatorStage

    stages = (Transcriber, TranslatorStage, Sink, Notifier, CallbackRetrier, ChunkTranscriber, Merger)
    for stage in stages:
        name, topics = lag.GROUPS[stage.group]
        assert name == stage.name
        assert topics in ((stage.input_topic,), ()), stage
    assert set(lag.GROUPS) == {s.group for s in stages}
    assert "callbacks.retry" in lag.retry_topics() and "callbacks.retry.1h" in lag.retry_topics()


def _status(worker_id: str, stage: str, age_s: float, now_ms: int, state: str = "running") -> WorkerStatus:
    return WorkerStatus(job_id="", worker_id=worker_id, host="h", pid=1, stage=stage, state=state, rss_bytes=100,
                        host_mem_available=1000, host_mem_total=2000, in_flight=0, partitions=[0],
                        produced_at=now_ms - int(age_s * 1000))


def samples(snap: lag.Snapshot) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in lag.families(snap, Settings()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def key(name: str, **labels: str) -> tuple[str, tuple]:
    return name, tuple(sorted(labels.items()))


def test_lag_counts_from_the_partition_start_without_a_commit_and_ignores_trailing_markers():
    now = 10_000_000
    snap = lag.Snapshot(taken_ms=now, partitions=[
        # never committed: all 3 retained events are behind (auto.offset.reset=earliest)
        lag.PartitionLag("transcribers", "uploads", 0, committed=-1, low=2, high=5, head_checked=True,
                         head_created_ms=now - 90_000),
        # committed 7 of 8: only the transaction's commit marker is left -> no lag
        lag.PartitionLag("translators", "transcripts", 0, committed=7, low=0, high=8, head_checked=True),
        # not read yet (the head read timed out): the offsets count
        lag.PartitionLag("sink", "results", 1, committed=4, low=0, high=6, owned=True),
        lag.PartitionLag("notifier", "finished", 0, committed=1, low=0, high=9, head_checked=True,
                         head_created_ms=now - 500_000),  # after the sink: not an unfinished job
    ], ends={("dlq", 0): 3})
    got = samples(snap)
    assert got[key("kafscribe_group_lag", group="transcribers", topic="uploads", partition="0")] == 3
    assert got[key("kafscribe_group_committed_offset", group="transcribers", topic="uploads", partition="0")] == 2
    assert got[key("kafscribe_group_lag", group="translators", topic="transcripts", partition="0")] == 0
    assert got[key("kafscribe_group_lag", group="sink", topic="results", partition="1")] == 2
    assert got[key("kafscribe_group_partition_owned", group="sink", topic="results", partition="1")] == 1
    assert got[key("kafscribe_group_head_age_seconds", group="transcribers", topic="uploads", partition="0")] == 90
    assert got[key("kafscribe_oldest_unfinished_job_seconds")] == 90
    assert got[key("kafscribe_topic_high_watermark", topic="dlq", partition="0")] == 3
    assert got[key("kafscribe_lag_up")] == 1


def test_workers_stopped_or_long_gone_are_left_out_and_stale_ones_have_no_headroom():
    now = 10_000_000
    statuses = [_status("live", "transcriber", 2, now), _status("stale", "sink", 45, now),
                _status("gone", "sink", lag.STALE_SHOWN_S + 5, now), _status("done", "sink", 3, now, "stopped")]
    workers = [WorkerState(s, "stopped" if s.state == "stopped" else ("live" if s.worker_id == "live" else "stale"),
                           900) for s in statuses]
    got = samples(lag.Snapshot(taken_ms=now, workers=workers))
    ages = {dict(k[1])["worker_id"]: v for k, v in got.items() if k[0] == "kafscribe_worker_status_age_seconds"}
    assert ages == {"live": 2, "stale": 45}
    headroom = {dict(k[1])["worker_id"] for k in got if k[0] == "kafscribe_worker_headroom_bytes"}
    assert headroom == {"live"}


def test_worker_series_are_bounded_live_workers_first_and_forged_stages_left_out():
    now = 10_000_000
    live = [_status(f"t-{i:03d}", "transcriber", 1, now) for i in range(150)]
    stale = [_status(f"s-{i}", "sink", 40 + i, now) for i in range(5)]
    odd = [_status("w-odd", "made-up-stage", 1, now)]
    workers = [WorkerState(s, "live" if s.worker_id.startswith(("t-", "w-")) else "stale", 900)
               for s in live + stale + odd]
    got = samples(lag.Snapshot(taken_ms=now, workers=workers))  # KAFSCRIBE_LAG_MAX_WORKERS=100 by default
    ages = {dict(k[1])["worker_id"] for k in got if k[0] == "kafscribe_worker_status_age_seconds"}
    assert ages == {f"t-{i:03d}" for i in range(100)}
    assert got[key("kafscribe_workers_not_exported")] == 55  # 50 live + 5 stale over the cap; the odd stage uncounted
    series = [k for k in got if k[0].startswith("kafscribe_worker_")]
    assert len(series) == 4 * 100
    few = [WorkerState(s, "live" if s.worker_id.startswith("t-") else "stale", 900) for s in live[:2] + stale]
    shown, left = lag.exported_workers(lag.Snapshot(taken_ms=now, workers=few), 4)
    assert [w.status.worker_id for w in shown] == ["t-000", "t-001", "s-0", "s-1"] and left == 3
    assert lag.exported_workers(lag.Snapshot(taken_ms=now, workers=few), 0) == ([], 7)


def test_a_failed_snapshot_says_so():
    got = samples(lag.Snapshot(taken_ms=1, ok=False, error="broker down"))
    assert got[key("kafscribe_lag_up")] == 0


@pytest.mark.parametrize(("name", "overrides", "port"), [
    ("transcriber", {}, 9101), ("notifier", {}, 9104), ("transcriber-2", {}, 9111), ("sink-3", {}, 9123),
    ("translator", {"metrics_port": 20000}, 20001), ("transcriber-2", {"metrics_port": 20000}, 20010),
    ("sink", {"metrics_port": -1}, None), ("ingress", {"http_port": 8123}, 8123), ("lag", {}, 9105),
    ("lag", {"lag_metrics_port": -1}, None), ("merger", {}, 9106), ("merger", {"metrics_port": 20000}, 20005),
])
def test_metrics_ports_of_services(name, overrides, port):
    assert services.service_metrics_port(name, Settings(**overrides)) == port


def test_scrape_targets_name_every_service_and_the_supervisor(tmp_path):
    settings = Settings(state_dir=tmp_path, http_host="0.0.0.0")
    names = ("ingress", "transcriber", "transcriber-2", "translator", "sink", "notifier", "lag")
    services.write_scrape_targets(settings, names)
    groups = json.loads((prometheus_server.targets_dir(settings) / "services.json").read_text())
    got = {g["labels"]["service"]: g["targets"] for g in groups}
    assert got == {"ingress": ["127.0.0.1:8000"], "transcriber": ["127.0.0.1:9101"],
                   "transcriber-2": ["127.0.0.1:9111"], "translator": ["127.0.0.1:9102"], "sink": ["127.0.0.1:9103"],
                   "notifier": ["127.0.0.1:9104"], "lag": ["127.0.0.1:9105"], "supervisor": ["127.0.0.1:9100"]}
    assert {g["labels"]["stage"] for g in groups} == {"ingress", "transcriber", "translator", "sink", "notifier",
                                                      "lag", "supervisor"}
    assert services.metrics_env("transcriber-2", settings) == {"KAFSCRIBE_METRICS_PORT": "9111"}
    assert services.metrics_env("ingress", settings) == {}


def test_every_dashboard_panel_has_queries():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    titles = " | ".join(p["title"] for p in panels).lower()
    for wanted in ("webhook", "headroom", "oldest unfinished job", "dead-letter", "stranded"):
        assert wanted in titles, wanted
    for panel in panels:
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
    assert len({p["id"] for p in panels}) == len(panels)


def test_a_missing_prometheus_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(prometheus_server.PrometheusError, match="apt-get install prometheus"):
        prometheus_server.up(Settings(state_dir=tmp_path, prometheus_port=19999))
    assert prometheus_server.up(Settings(state_dir=tmp_path, prometheus_port=-1)) is None  # off: nothing to find


def test_an_unreachable_broker_gives_lag_up_0_within_a_scrape_timeout():
    """No broker: the exporter answers quickly with kafscribe_lag_up 0 instead of failing the scrape."""
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    reader = lag.LagReader(Settings(kafka_bootstrap=f"127.0.0.1:{port}"))
    try:
        started = time.monotonic()
        snap = reader.snapshot()
        took = time.monotonic() - started
    finally:
        reader.close()
    assert not snap.ok and snap.error
    assert took < 4.5, took  # under the default scrape timeout (0.8 x 5 s)
    assert samples(snap)[key("kafscribe_lag_up")] == 0
