"""One Kafka 4.x node in KRaft mode (broker + controller) as a plain Java process.

Transactions work on a single node because the transaction-state and offsets
topics get replication factor 1 and min ISR 1. ``auto.create.topics.enable``
is off: topics come only from ``infra/topics.toml`` (see ``bootstrap``).
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from kafscribe.settings import Settings

from .process import ServerProcess

MAIN_CLASS = "kafka.Kafka"

LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log_dir}/kafka-server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


def server_properties(settings: Settings, data_dir: Path) -> str:
    host = "127.0.0.1"
    port, cport = settings.kafka_port, settings.kafka_controller_port
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{host}:{cport}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir),
        "num.partitions": "1",
        "auto.create.topics.enable": "false",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "min.insync.replicas": "1",
        "group.initial.rebalance.delay.ms": "0",
        # Workers may shorten their session timeout in tests (default floor is 6 s).
        "group.min.session.timeout.ms": "2000",
        "log.retention.hours": "168",
        "message.max.bytes": str(8 * 1024 * 1024),
    }
    if settings.kafka_sasl_port:
        props.update(_sasl_listener(settings, host))
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _sasl_listener(settings: Settings, host: str) -> dict[str, str]:
    """An extra SASL_PLAINTEXT listener with one PLAIN user (the client's own settings), to try secured clients on."""
    if not (settings.kafka_sasl_username and settings.kafka_sasl_password):
        raise ValueError("KAFSCRIBE_KAFKA_SASL_PORT needs KAFSCRIBE_KAFKA_SASL_USERNAME and _PASSWORD (its one user)")
    user, password = settings.kafka_sasl_username, settings.kafka_sasl_password
    sasl = f"SASL_PLAINTEXT://{host}:{settings.kafka_sasl_port}"
    port, cport = settings.kafka_port, settings.kafka_controller_port
    return {
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport},{sasl}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port},{sasl}",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
        "sasl.enabled.mechanisms": "PLAIN",
        "listener.name.sasl_plaintext.plain.sasl.jaas.config": (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'user_{user}="{password}";'
        ),
    }


def prepare(settings: Settings, jars: Path) -> tuple[ServerProcess, list[str]]:
    """Write config, format storage on first use, and return the launch argv."""
    root = settings.state_dir / "kafka"
    data_dir, log_dir = root / "data", settings.state_dir / "logs"
    for d in (root, data_dir, log_dir):
        d.mkdir(parents=True, exist_ok=True)
    props = root / "server.properties"
    props.write_text(server_properties(settings, data_dir))
    log4j = root / "log4j2.properties"
    log4j.write_text(LOG4J2.format(log_dir=log_dir))
    java = [
        "java", f"-Xmx{settings.kafka_heap}", f"-Xms{settings.kafka_heap}",
        f"-Dlog4j2.configurationFile={log4j}", f"-Dkafka.logs.dir={log_dir}",
        "-XX:+UseG1GC", "-Djava.awt.headless=true",
        "-cp", f"{jars}/*",
    ]
    if not (data_dir / "meta.properties").exists():
        cluster_id = _random_cluster_id()
        fmt = [*java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)]
        proc = subprocess.run(fmt, capture_output=True, text=True, cwd=root)
        if proc.returncode != 0:
            raise RuntimeError(f"formatting Kafka storage failed:\n{proc.stdout}{proc.stderr}")
    server = ServerProcess("kafka", settings.state_dir)
    return server, [*java, server.tag, MAIN_CLASS, str(props)]


def _random_cluster_id() -> str:
    """Kafka cluster ids are 16 random bytes, URL-safe base64 without padding."""
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
