"""docker-compose.kafka.yml cannot run here; it must at least agree with the local stack."""

from __future__ import annotations

import re

import yaml

from infra import bootstrap, kafka_server
from kafscribe.settings import PROJECT_ROOT, Settings

COMPOSE = yaml.safe_load((PROJECT_ROOT / "docker-compose.kafka.yml").read_text())
SERVICES = COMPOSE["services"]


def test_every_part_of_the_stack_is_there_with_health_checks():
    for name in ("kafka", "kafka-init", "cassandra", "cassandra-init", "ingress", "transcriber",
                 "translator", "sink", "notifier", "prometheus", "grafana"):
        assert name in SERVICES, name
    for name in ("kafka", "cassandra", "ingress", "prometheus"):
        assert "healthcheck" in SERVICES[name], name
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:4.")
    assert SERVICES["cassandra"]["image"] == "cassandra:5.0"


def test_ports_are_the_standard_ones_of_the_local_stack():
    s = Settings()
    assert f"127.0.0.1:{s.kafka_port}:9092" in SERVICES["kafka"]["ports"]
    assert f"127.0.0.1:{s.cassandra_port}:9042" in SERVICES["cassandra"]["ports"]
    assert f"127.0.0.1:{s.http_port}:8000" in SERVICES["ingress"]["ports"]


def test_ports_are_published_on_loopback_only():
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_broker_settings_match_the_local_broker():
    local = dict(
        line.split("=", 1) for line in kafka_server.server_properties(Settings(), PROJECT_ROOT).splitlines()
    )
    env = SERVICES["kafka"]["environment"]
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor",
                "transaction.state.log.min.isr", "min.insync.replicas", "auto.create.topics.enable",
                "group.initial.rebalance.delay.ms", "group.min.session.timeout.ms", "message.max.bytes"):
        assert env["KAFKA_" + key.upper().replace(".", "_")] == local[key], key


def test_topics_match_infra_topics_toml():
    script = SERVICES["kafka-init"]["command"][0]
    created = {}
    for line in script.splitlines():
        m = re.search(r"--topic (\S+) --partitions (\d+)(.*)", line)
        if m:
            configs = dict(c.split("=", 1) for c in re.findall(r"--config (\S+)", m.group(3)))
            created[m.group(1)] = (int(m.group(2)), configs)
    expected = {t.name: (t.partitions, t.config) for t in bootstrap.topic_specs(Settings())}
    assert created == expected


def test_cassandra_schema_comes_from_infra_cql():
    init = SERVICES["cassandra-init"]
    assert "./infra/cql:/cql:ro" in init["volumes"]
    assert "/cql/schema.cql" in init["command"][0]
    assert bootstrap.SCHEMA_FILE == PROJECT_ROOT / "infra" / "cql" / "schema.cql"


def test_services_reach_kafka_on_the_internal_listener():
    internal = SERVICES["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    for name in ("ingress", "transcriber", "translator", "sink", "notifier"):
        bootstrap_servers = SERVICES[name]["environment"]["KAFSCRIBE_KAFKA_BOOTSTRAP"]
        assert f"INTERNAL://{bootstrap_servers}" in internal, name
