"""Secured-cluster settings reach the real clients.

Kafka: the test broker has a SASL_PLAINTEXT (PLAIN) listener beside its
plaintext one, so the stages' transactional consume -> produce + commit path
runs over SASL for real, and a wrong password or a plaintext client is shut
out. Cassandra: the driver gets the credentials and a TLS context built from
our settings (the local node runs without an authenticator, so only the
client side is exercised here).
"""

from __future__ import annotations

import ssl
import subprocess
import uuid

import pytest
from cassandra.auth import PlainTextAuthProvider
from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import NewTopic

from kafscribe.kafka import clients as kafka_clients
from kafscribe.settings import Settings
from kafscribe.store import session as cassandra_session


def _sasl(settings: Settings, **overrides) -> Settings:
    values = dict(
        kafka_bootstrap=f"127.0.0.1:{settings.kafka_sasl_port}",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
    )
    values.update(overrides)
    return settings.with_(**values)


def test_security_conf_maps_settings_to_librdkafka():
    plain = Settings()
    assert kafka_clients.security_conf(plain) == {}
    conf = kafka_clients.security_conf(plain.with_(
        kafka_security_protocol="sasl_ssl", kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="u",
        kafka_sasl_password="p", kafka_ssl_ca_file="/etc/ca.pem",
    ))
    assert conf == {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "u",
                    "sasl.password": "p", "ssl.ca.location": "/etc/ca.pem"}
    with pytest.raises(ValueError, match="KAFSCRIBE_KAFKA_SECURITY_PROTOCOL"):
        kafka_clients.security_conf(plain.with_(kafka_security_protocol="TLS"))


@pytest.mark.stack
def test_transactional_stage_path_works_over_sasl(stack_settings: Settings):
    secured = _sasl(stack_settings)
    topic = f"sasl-{uuid.uuid4().hex[:8]}"
    admin = kafka_clients.admin(secured)
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)

    producer = kafka_clients.producer(secured, transactional_id=f"sasl-test-{uuid.uuid4().hex[:6]}")
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"over sasl")
    producer.commit_transaction(30)

    consumer = kafka_clients.consumer(secured, f"sasl-{uuid.uuid4().hex[:6]}")
    consumer.assign([TopicPartition(topic, 0, 0)])
    msg = None
    for _ in range(60):
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            break
    assert msg is not None and msg.value() == b"over sasl"

    # ...and the consume -> produce + commit transaction of a stage, over the same listener.
    consumer.subscribe([topic])
    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"second")
    producer.send_offsets_to_transaction([TopicPartition(topic, 0, 1)], consumer.consumer_group_metadata(), 30)
    producer.commit_transaction(30)
    consumer.close()


@pytest.mark.stack
def test_wrong_password_and_plaintext_clients_are_shut_out(stack_settings: Settings):
    assert kafka_clients.kafka_reachable(_sasl(stack_settings), timeout_s=10)
    assert not kafka_clients.kafka_reachable(_sasl(stack_settings, kafka_sasl_password="wrong"), timeout_s=5)
    plaintext_on_sasl_port = stack_settings.with_(kafka_bootstrap=f"127.0.0.1:{stack_settings.kafka_sasl_port}")
    assert not kafka_clients.kafka_reachable(plaintext_on_sasl_port, timeout_s=5)
    with pytest.raises(KafkaException):
        kafka_clients.admin(_sasl(stack_settings, kafka_sasl_password="wrong")).list_topics(timeout=5)


def test_cassandra_options_carry_credentials_and_tls(tmp_path):
    assert cassandra_session.security_options(Settings()) == {}
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=cassandra.test"], check=True, capture_output=True)
    options = cassandra_session.security_options(Settings(
        cassandra_username="app", cassandra_password="pw", cassandra_ssl_ca_file=str(cert),
        cassandra_ssl_cert_file=str(cert), cassandra_ssl_key_file=str(key),
    ))
    auth = options["auth_provider"]
    assert isinstance(auth, PlainTextAuthProvider) and (auth.username, auth.password) == ("app", "pw")
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert any(c["subject"] == ((("commonName", "cassandra.test"),),) for c in context.get_ca_certs())


@pytest.mark.stack
def test_cassandra_session_opens_with_credentials_configured(stack_settings: Settings):
    session = cassandra_session.connect(stack_settings.with_(cassandra_username="app", cassandra_password="pw"))
    try:
        assert session.execute("SELECT release_version FROM system.local").one() is not None
    finally:
        session.cluster.shutdown()
