"""docker-compose.kafka.yml cannot run here (no Docker engine); it must at least agree with the local stack,
create topics and tables only through the project's bootstrap, and reserve a GPU in its gpu profile."""

from __future__ import annotations

import re

import yaml

from infra import bootstrap, kafka_server
from kafscribe.cli.main import build_parser
from kafscribe.settings import PROJECT_ROOT, Settings

COMPOSE = yaml.safe_load((PROJECT_ROOT / "docker-compose.kafka.yml").read_text())
SERVICES = COMPOSE["services"]


def test_every_part_of_the_stack_is_there_with_health_checks():
    for name in ("kafka", "cassandra", "bootstrap", "ingress", "transcriber",
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


KAFSCRIBE_SERVICES = ("ingress", "transcriber", "translator", "sink", "notifier", "merger", "lag", "transcriber-gpu")


def test_the_init_service_runs_the_projects_own_bootstrap():
    """Topics and tables have one home (topics.toml, infra/cql): the compose file runs the bootstrap."""
    init = SERVICES["bootstrap"]
    assert init["build"] == "." and init["command"][:2] == ["stack", "bootstrap"]
    assert init["depends_on"] == {"kafka": {"condition": "service_healthy"},
                                  "cassandra": {"condition": "service_healthy"}}
    args = build_parser().parse_args(init["command"])
    assert (args.command, args.action, args.wait) == ("stack", "bootstrap", 300.0)
    for name in KAFSCRIBE_SERVICES:
        assert SERVICES[name]["depends_on"] == {"bootstrap": {"condition": "service_completed_successfully"}}, name
    assert not [n for n in SERVICES if n.endswith("-init")]  # no hand-written init left beside it


def test_the_bootstrap_command_runs_infra_bootstrap(monkeypatch):
    from kafscribe.cli.main import main

    calls = []
    monkeypatch.setattr(bootstrap, "run", lambda settings, wait_s=None: calls.append((settings, wait_s)))
    assert main(["stack", "bootstrap", "--wait", "7"]) == 0
    assert [w for _, w in calls] == [7.0]

    def unreachable(settings, wait_s=None):
        raise bootstrap.NotReachable("kafka at kafka:29092 did not answer within 7s")

    monkeypatch.setattr(bootstrap, "run", unreachable)
    assert main(["stack", "bootstrap", "--wait", "7"]) == 1


def test_no_topic_name_or_table_is_written_in_the_compose_file():
    text = (PROJECT_ROOT / "docker-compose.kafka.yml").read_text()
    for spec in bootstrap.topic_specs(Settings()):
        assert spec.name not in text, spec.name
    tables = re.findall(r"CREATE TABLE IF NOT EXISTS \{keyspace\}\.(\w+)", bootstrap.SCHEMA_FILE.read_text())
    assert len(tables) > 5
    assert "kafka-topics" not in text and "cqlsh -f" not in text and "schema.cql" not in text
    assert "CREATE " not in text.upper()
    assert not re.search(r"\.(" + "|".join(tables) + r")\b", text)  # no keyspace.table


def test_every_kafscribe_variable_of_the_compose_file_is_a_setting():
    for name in ("bootstrap", *KAFSCRIBE_SERVICES):
        env = {k: str(v) for k, v in SERVICES[name]["environment"].items()}
        Settings.from_env(env)  # an unknown KAFSCRIBE_* variable raises


def test_the_gpu_profile_reserves_a_gpu_for_a_cuda_transcriber():
    gpu = [name for name, service in SERVICES.items() if "gpu" in service.get("profiles", [])]
    assert gpu == ["transcriber-gpu"]
    service = SERVICES["transcriber-gpu"]
    assert service["command"] == ["serve", "transcriber"]
    assert service["build"] == {"context": ".", "target": "gpu"}
    assert service["environment"]["KAFSCRIBE_DEVICE"] == "auto"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] >= 1
    for name, other in SERVICES.items():  # a host without a GPU starts everything else
        if name != "transcriber-gpu":
            assert "profiles" not in other and "resources" not in other.get("deploy", {}), name
    assert SERVICES["transcriber"]["deploy"]["replicas"] == "${CPU_TRANSCRIBERS:-1}"
    deployment = (PROJECT_ROOT / "docs" / "deployment.md").read_text()
    assert "docker compose -f docker-compose.kafka.yml --profile gpu up" in deployment


def test_the_dockerfile_builds_cpu_by_default_and_a_cuda_stage_for_the_gpu_profile():
    text = (PROJECT_ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    stages = re.findall(r"^FROM \$\{(\w+)\} AS (\w+)$", text, re.M)
    assert stages[-1] == ("PYTHON_IMAGE", "cpu")  # the last stage: what `build: .` makes
    assert ("CUDA_IMAGE", "gpu") in stages
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:12.") and "cudnn" in args["CUDA_IMAGE"]
    gpu_stage = text.split("AS gpu", 1)[1].split("FROM ", 1)[0]
    assert "KAFSCRIBE_DEVICE=auto" in gpu_stage and 'ENTRYPOINT ["kafscribe"]' in gpu_stage


def test_prometheus_of_the_compose_file_scrapes_the_gpu_transcriber():
    conf = yaml.safe_load((PROJECT_ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for c in conf["scrape_configs"] for s in c["static_configs"] for t in s["targets"]}
    assert "transcriber-gpu:9101" in targets


def test_services_reach_kafka_on_the_internal_listener():
    internal = SERVICES["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    for name in ("bootstrap", *KAFSCRIBE_SERVICES):
        bootstrap_servers = SERVICES[name]["environment"]["KAFSCRIBE_KAFKA_BOOTSTRAP"]
        assert f"INTERNAL://{bootstrap_servers}" in internal, name
