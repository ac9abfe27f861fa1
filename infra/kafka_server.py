"""Kafka 4.x brokers in KRaft mode as plain Java processes: one node, or a local cluster.

One node is broker and controller. In a cluster of n brokers (``infra.nodes``),
brokers 1-3 are also the controller quorum (static voters) and the others are
brokers only; every node is formatted with the same cluster id. The internal
topics (consumer offsets, transaction state) get the same replication factor
and min ISR as kafscribe's topics (``bootstrap.replication``), so on one node
they are 1 and 1 and transactions work. ``auto.create.topics.enable`` is off:
topics come only from ``kafscribe/kafka/topics.toml`` (see ``bootstrap``).
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from kafscribe.settings import Settings

from .bootstrap import replication
from .nodes import Node, controller_count, kafka_nodes
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


def server_properties(settings: Settings, data_dir: Path, node: Node | None = None) -> str:
    nodes = kafka_nodes(settings)
    node = node or nodes[0]
    host, port, cport = node.host, node.port, settings.kafka_controller_port
    voters = nodes[: controller_count(len(nodes))]
    rf, min_isr = replication(settings, len(nodes))
    props = {
        "process.roles": "broker,controller" if node in voters else "broker",
        "node.id": str(node.index),
        "controller.quorum.voters": ",".join(f"{v.index}@{v.host}:{cport}" for v in voters),
        "listeners": f"PLAINTEXT://{host}:{port}" + (f",CONTROLLER://{host}:{cport}" if node in voters else ""),
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir),
        "num.partitions": "1",
        "auto.create.topics.enable": "false",
        "offsets.topic.replication.factor": str(rf),
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": str(rf),
        "transaction.state.log.min.isr": str(min_isr),
        "transaction.state.log.num.partitions": "1",
        "min.insync.replicas": str(min_isr),
        "default.replication.factor": str(rf),
        "group.initial.rebalance.delay.ms": "0",
        # Workers may shorten their session timeout in tests (default floor is 6 s).
        "group.min.session.timeout.ms": "2000",
        "log.retention.hours": "168",
        "message.max.bytes": str(8 * 1024 * 1024),
    }
    if len(nodes) == 1:
        del props["default.replication.factor"]  # the single node's file stays as docker-compose's broker has it
    if settings.kafka_sasl_port:
        props.update(_sasl_listener(settings, node, node in voters))
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _sasl_listener(settings: Settings, node: Node, voter: bool) -> dict[str, str]:
    """An extra SASL_PLAINTEXT listener with one PLAIN user (the client's own settings), to try secured clients on."""
    if not (settings.kafka_sasl_username and settings.kafka_sasl_password):
        raise ValueError("KAFSCRIBE_KAFKA_SASL_PORT needs KAFSCRIBE_KAFKA_SASL_USERNAME and _PASSWORD (its one user)")
    user, password = settings.kafka_sasl_username, settings.kafka_sasl_password
    host, port, cport = node.host, node.port, settings.kafka_controller_port
    sasl = f"SASL_PLAINTEXT://{host}:{settings.kafka_sasl_port}"
    controller = f",CONTROLLER://{host}:{cport}" if voter else ""
    return {
        "listeners": f"PLAINTEXT://{host}:{port}{controller},{sasl}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port},{sasl}",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
        "sasl.enabled.mechanisms": "PLAIN",
        "listener.name.sasl_plaintext.plain.sasl.jaas.config": (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'user_{user}="{password}";'
        ),
    }


def prepare(settings: Settings, jars: Path, node: Node | None = None) -> tuple[ServerProcess, list[str]]:
    """Write config, format storage on first use, and return the launch argv of ``node`` (default: node 1)."""
    node = node or kafka_nodes(settings)[0]
    root = node.root(settings.state_dir)
    data_dir, log_dir = root / "data", node.log_dir(settings.state_dir)
    for d in (root, data_dir, log_dir):
        d.mkdir(parents=True, exist_ok=True)
    props = root / "server.properties"
    props.write_text(server_properties(settings, data_dir, node))
    log4j = root / "log4j2.properties"
    log4j.write_text(LOG4J2.format(log_dir=log_dir))
    java = [
        "java", f"-Xmx{settings.kafka_heap}", f"-Xms{settings.kafka_heap}",
        f"-Dlog4j2.configurationFile={log4j}", f"-Dkafka.logs.dir={log_dir}",
        "-XX:+UseG1GC", "-Djava.awt.headless=true",
        "-cp", f"{jars}/*",
    ]
    if not (data_dir / "meta.properties").exists():
        fmt = [*java, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id(settings)}", "-c", str(props)]
        proc = subprocess.run(fmt, capture_output=True, text=True, cwd=root)
        if proc.returncode != 0:
            raise RuntimeError(f"formatting Kafka storage of {node.name} failed:\n{proc.stdout}{proc.stderr}")
    server = ServerProcess(node.name, settings.state_dir)
    return server, [*java, server.tag, MAIN_CLASS, str(props)]


def cluster_id(settings: Settings) -> str:
    """The id every broker of the local stack is formatted with (made once, kept in the state dir)."""
    path = settings.state_dir / "kafka-cluster-id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_random_cluster_id() + "\n")
    return path.read_text().strip()


def _random_cluster_id() -> str:
    """Kafka cluster ids are 16 random bytes, URL-safe base64 without padding, never starting with "-"
    (as Kafka's own ``Uuid.randomUuid``: a command line takes such an id for an option)."""
    import base64

    while (cid := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"):
        pass
    return cid
