"""Session fixtures: a real Kafka + Cassandra on test ports.

The stack is reused when it is already running (from an earlier test run
with ``KAFSCRIBE_TEST_KEEP_STACK=1``), otherwise started here and stopped at
the end. There is no skipping: if the servers cannot be started, every test
that needs them errors with the server's log in the message.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from infra import bootstrap, stack
from kafscribe.settings import PROJECT_ROOT, Settings
from kafscribe.store import session as cassandra_session
from tests.fakes import WebhookReceiver

TEST_STATE = Path(os.environ.get("KAFSCRIBE_TEST_STATE_DIR", PROJECT_ROOT / ".kafscribe" / "test-stack"))
# Shifts every port of the test stack, so two checkouts can each run their own stack side by side.
PORT_OFFSET = int(os.environ.get("KAFSCRIBE_TEST_PORT_OFFSET", "0"))


def base_test_settings(**overrides) -> Settings:
    """Settings of the test stack: its own ports and state, so a `make up` stack can run beside it."""
    values = dict(
        state_dir=TEST_STATE,
        kafka_bootstrap=f"127.0.0.1:{19092 + PORT_OFFSET}",
        kafka_controller_port=19093 + PORT_OFFSET,
        cassandra_port=19042 + PORT_OFFSET,
        cassandra_storage_port=17000 + PORT_OFFSET,
        cassandra_keyspace="kafscribe_test",
        blob_dir=TEST_STATE / "blobs",
        uploads_partitions=4,
        topic_partitions=2,
        session_timeout_ms=10000,
        heartbeat_ms=1000,
        metrics_port=-1,
        # No Prometheus, no lag exporter port by default (tests that want them set ports of their own).
        prometheus_port=-1,
        lag_metrics_port=-1,
        # A SASL/PLAIN listener beside the plaintext one, so secured-cluster settings are tried for real.
        kafka_sasl_port=19094 + PORT_OFFSET,
        kafka_sasl_username="kafscribe",
        kafka_sasl_password="test-sasl-password",
        # No quota unless a test sets one: jobs that tests leave unfinished pile up in the shared keyspace.
        tenant_max_unfinished=0,
    )
    values.update(overrides)
    return Settings(**values)


def _up_or_clean(settings: Settings, name: str) -> list[str]:
    """``stack.up``; if it fails part way, the nodes it did start are stopped before the error goes on.

    A failed setup runs no teardown: nodes left running would be found by the next run as "not started
    by kafscribe" and fail every test of that group.
    """
    try:
        return stack.up(settings, log=lambda line: print(f"[{name}] {line}"))
    except BaseException:
        stack.down(settings, log=lambda line: print(f"[{name}] {line}"), together=True, timeout_s=20)
        raise


@pytest.fixture(scope="session")
def stack_settings() -> Settings:
    """A running test stack (started once per session) and its settings."""
    settings = base_test_settings()
    started = _up_or_clean(settings, "stack")
    yield settings
    if started and not os.environ.get("KAFSCRIBE_TEST_KEEP_STACK"):
        # Test data is disposable: every node at once under one deadline (one by one took 90 s of CI).
        stack.down(settings, log=lambda line: print(f"[stack] {line}"), together=True, timeout_s=20)


@pytest.fixture(scope="module")
def session(stack_settings: Settings):
    """A CQL session on the test keyspace, one per test module."""
    s = cassandra_session.connect(stack_settings, keyspace=stack_settings.cassandra_keyspace)
    yield s
    s.cluster.shutdown()


# The local cluster of tests/e2e/test_cluster_e2e.py (3 brokers, 3 Cassandra nodes): the test stack's port numbers
# on 127.0.0.2-4 (the test stack binds 127.0.0.1 only, so both run side by side), its own state directory.
CLUSTER_STATE = Path(os.environ.get("KAFSCRIBE_TEST_CLUSTER_STATE_DIR", TEST_STATE.parent / "test-cluster"))
CLUSTER_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def cluster_test_settings(**overrides) -> Settings:
    """Settings of the test cluster: RF 3, min ISR 2 and keyspace RF 3 by default (min(3, nodes))."""
    values = dict(
        state_dir=CLUSTER_STATE,
        kafka_brokers=len(CLUSTER_HOSTS),
        cassandra_nodes=len(CLUSTER_HOSTS),
        kafka_bootstrap=",".join(f"{h}:{19092 + PORT_OFFSET}" for h in CLUSTER_HOSTS),
        kafka_controller_port=19093 + PORT_OFFSET,
        cassandra_hosts=",".join(CLUSTER_HOSTS),
        cassandra_port=19042 + PORT_OFFSET,
        cassandra_storage_port=17000 + PORT_OFFSET,
        kafka_heap="256m",
        cassandra_heap="512m",
        stack_timeout_s=600.0,  # six JVMs starting on two busy cores
        cassandra_keyspace="kafscribe_test",
        blob_dir=CLUSTER_STATE / "blobs",
        uploads_partitions=4,
        topic_partitions=2,
        session_timeout_ms=10000,
        heartbeat_ms=1000,
        metrics_port=-1,
        tenant_max_unfinished=0,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def cluster_settings() -> Settings:
    """A running local cluster (started once per session, stopped at the end unless KEEP_STACK) and its settings."""
    settings = cluster_test_settings()
    t0 = time.monotonic()
    started = _up_or_clean(settings, "cluster")
    print(f"[cluster] up in {time.monotonic() - t0:.1f}s (started: {', '.join(started) or 'none'})")
    yield settings
    if started and not os.environ.get("KAFSCRIBE_TEST_KEEP_STACK"):
        stack.down(settings, log=lambda line: print(f"[cluster] {line}"), together=True, timeout_s=20)


def fresh_settings(stack_settings: Settings, **overrides) -> Settings:
    """Settings with a fresh topic prefix (own topics and consumer groups), so tests never mix."""
    settings = stack_settings.with_(topic_prefix=f"t{uuid.uuid4().hex[:10]}.", **overrides)
    bootstrap.ensure_topics(settings)
    return settings


@pytest.fixture
def isolated(stack_settings: Settings) -> Settings:
    return fresh_settings(stack_settings)


@pytest.fixture(scope="module")
def receiver():
    """A local webhook receiver (tests/fakes.py), one per test module: a client's callback endpoint."""
    server = WebhookReceiver()
    yield server
    server.close()


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, Path]:
    """espeak-ng speech and broken files, made once per session."""
    from tests import audio_clips as ac

    d = tmp_path_factory.mktemp("clips")
    en = ac.speak(ac.ENGLISH, d / "en.wav")
    return {
        "en": en,
        "en_mp3": ac.to_format(en, d / "en.mp3"),
        "es": ac.speak(ac.SPANISH, d / "es.wav", voice="es", speed=140),
        "de": ac.speak(ac.GERMAN, d / "de.wav", voice="de", speed=140),
        "long": ac.speak(ac.LONG_ENGLISH, d / "long.wav"),
        "lying": ac.lying_wav(d / "lying.wav"),
        "garbage": _write(d / "garbage.wav", b"this is not audio at all\n" * 40),
        "empty": _write(d / "empty.wav", b""),
    }


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_pipeline(settings: Settings, tmp_path_factory, name: str):
    from bench.harness import Pipeline

    return Pipeline(settings, tmp_path_factory.mktemp(f"logs-{name}"))
