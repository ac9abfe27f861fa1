"""Cassandra session factory: one ``Cluster`` per process, short timeouts."""

from __future__ import annotations

import logging
import ssl

from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import DCAwareRoundRobinPolicy, ExponentialReconnectionPolicy

from .settings import Settings


def connect(settings: Settings, *, keyspace: str | None = None, timeout_s: float = 10.0) -> Session:
    """Open a session (optionally bound to ``keyspace``); raises if unreachable."""
    cluster = Cluster(
        settings.cassandra_contact_points,
        port=settings.cassandra_port,
        connect_timeout=timeout_s,
        control_connection_timeout=timeout_s,
        reconnection_policy=ExponentialReconnectionPolicy(0.5, 10.0),
        execution_profiles={
            EXEC_PROFILE_DEFAULT: ExecutionProfile(
                load_balancing_policy=DCAwareRoundRobinPolicy(), request_timeout=timeout_s
            )
        },
        protocol_version=5,
        **security_options(settings),
    )
    try:
        session = cluster.connect(keyspace)
    except Exception:
        cluster.shutdown()
        raise
    return session


def security_options(settings: Settings) -> dict:
    """``Cluster`` keyword arguments for a secured cluster: credentials and/or TLS (none on a plain one)."""
    options: dict = {}
    if settings.cassandra_username:
        options["auth_provider"] = PlainTextAuthProvider(settings.cassandra_username, settings.cassandra_password)
    if settings.cassandra_ssl_ca_file:
        context = ssl.create_default_context(cafile=settings.cassandra_ssl_ca_file)
        context.check_hostname = False  # contact points are usually addresses; the CA still vouches for the node
        if settings.cassandra_ssl_cert_file:
            context.load_cert_chain(settings.cassandra_ssl_cert_file, settings.cassandra_ssl_key_file or None)
        options["ssl_context"] = context
    return options


def cassandra_reachable(settings: Settings, timeout_s: float = 3.0) -> bool:
    """True when a CQL session can be opened."""
    log = logging.getLogger("cassandra")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        session = connect(settings, timeout_s=timeout_s)
        session.cluster.shutdown()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not reachable"
        return False
    finally:
        log.setLevel(level)


def is_outage(exc: BaseException | None) -> bool:
    """Cassandra unreachable or overloaded (anywhere in the cause chain): retry later, never blame the job."""
    from cassandra import OperationTimedOut, ReadTimeout, Unavailable, WriteTimeout
    from cassandra.cluster import NoHostAvailable

    outage = (NoHostAvailable, OperationTimedOut, Unavailable, ReadTimeout, WriteTimeout, ConnectionError)
    while exc is not None:
        if isinstance(exc, outage):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
