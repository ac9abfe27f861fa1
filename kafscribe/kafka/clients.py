"""Factories for confluent-kafka clients with kafscribe's delivery settings.

One place decides how every producer and consumer is configured: idempotent
``acks=all`` producers, transactional producers for consume->produce stages,
``read_committed`` consumers with manual commits.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from kafscribe.settings import Settings

_quiet = logging.getLogger("kafscribe.librdkafka")
FETCH_WAIT_MAX_MS = 100


def _base(settings: Settings, **extra: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "logger": _quiet,
        "socket.connection.setup.timeout.ms": 5000,
        # A broker back from a crash may lead partitions again at once (preferred leaders): reconnect
        # within a second, not librdkafka's 10 s backoff, or messages for it time out meanwhile.
        "reconnect.backoff.max.ms": 1000,
        **security_conf(settings),
    }
    conf.update(extra)
    return conf


def security_conf(settings: Settings) -> dict[str, str]:
    """librdkafka properties for a secured cluster (TLS and/or SASL); empty on a plaintext one."""
    protocol = settings.kafka_security_protocol.upper()
    if protocol not in SECURITY_PROTOCOLS:
        raise ValueError(f"KAFSCRIBE_KAFKA_SECURITY_PROTOCOL={protocol!r}: use one of {', '.join(SECURITY_PROTOCOLS)}")
    if protocol == "PLAINTEXT":
        return {}
    conf = {"security.protocol": protocol}
    if protocol.startswith("SASL_"):
        conf["sasl.mechanism"] = settings.kafka_sasl_mechanism or "PLAIN"
        conf["sasl.username"] = settings.kafka_sasl_username
        conf["sasl.password"] = settings.kafka_sasl_password
    if protocol.endswith("SSL"):
        files = {
            "ssl.ca.location": settings.kafka_ssl_ca_file,
            "ssl.certificate.location": settings.kafka_ssl_cert_file,
            "ssl.key.location": settings.kafka_ssl_key_file,
            "ssl.key.password": settings.kafka_ssl_key_password,
        }
        conf.update({k: v for k, v in files.items() if v})
    return conf


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")


def admin(settings: Settings) -> AdminClient:
    return AdminClient(_base(settings))


def producer(settings: Settings, *, transactional_id: str | None = None, **extra: Any) -> Producer:
    """Idempotent, acks=all producer; transactional when ``transactional_id`` is given."""
    conf = _base(
        settings,
        **{
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.max.bytes": 8 * 1024 * 1024,
        },
    )
    if transactional_id:
        conf["transactional.id"] = transactional_id
        conf["transaction.timeout.ms"] = 60000
    conf.update(extra)
    return Producer(conf)


def consumer(settings: Settings, group_id: str, **extra: Any) -> Consumer:
    """Manual-commit, read_committed consumer in ``group_id``."""
    conf = _base(
        settings,
        **{
            "group.id": group_id,
            "group.protocol": "classic",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "session.timeout.ms": settings.session_timeout_ms,
            "heartbeat.interval.ms": settings.heartbeat_ms,
            "max.poll.interval.ms": settings.max_poll_interval_ms,
            "partition.assignment.strategy": "cooperative-sticky",
            # A fetch waits at the broker until data arrives (fetch.min.bytes 1), but a partition resumed or
            # assigned meanwhile joins only the next fetch request: librdkafka's 500 ms default was the wait a
            # queued job could see between its predecessor's commit and its own start.
            "fetch.wait.max.ms": FETCH_WAIT_MAX_MS,
        },
    )
    conf.update(extra)
    return Consumer(conf)


def kafka_reachable(settings: Settings, timeout_s: float = 3.0) -> bool:
    """True when a broker answers a metadata request."""
    try:
        admin(settings).list_topics(timeout=timeout_s)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not reachable"
        return False
