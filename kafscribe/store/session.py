"""Cassandra session factory: one ``Cluster`` per process, short timeouts, consistency from settings.

Consistency is decided here, not at each call site: every write (batches and
lightweight transactions included) runs at ``KAFSCRIBE_CASSANDRA_WRITE_CONSISTENCY``,
every SELECT (prepared or not) at ``KAFSCRIBE_CASSANDRA_READ_CONSISTENCY``, and
LWTs' Paxos phase at ``KAFSCRIBE_CASSANDRA_SERIAL_CONSISTENCY``. The defaults,
LOCAL_QUORUM both ways, make every read see every acknowledged write (R + W > RF)
and survive one replica down at RF 3; at RF 1 they are the same as ONE.
"""

from __future__ import annotations

import logging
import ssl

from cassandra import ConsistencyLevel
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import DCAwareRoundRobinPolicy, ExponentialReconnectionPolicy
from cassandra.query import SimpleStatement

from kafscribe.settings import Settings, SettingsError


def consistency_level(value: str, setting: str) -> int:
    """The driver's level named ``value`` (``LOCAL_QUORUM``, ``quorum`` ...); a clear error otherwise."""
    level = ConsistencyLevel.name_to_value.get(value.strip().upper())
    if level is None:
        names = ", ".join(sorted(ConsistencyLevel.name_to_value))
        raise SettingsError(f"KAFSCRIBE_{setting.upper()}={value!r}: use one of {names}")
    return level


def _is_read(cql: str) -> bool:
    return cql.lstrip().upper().startswith("SELECT")


class KafscribeSession(Session):
    """A ``Session`` whose SELECTs run at the read consistency (the profile's level is the write one)."""

    read_consistency: int = ConsistencyLevel.LOCAL_QUORUM

    def prepare(self, query, *args, **kwargs):
        statement = super().prepare(query, *args, **kwargs)
        if isinstance(query, str) and _is_read(query):
            statement.consistency_level = self.read_consistency
        return statement

    def execute_async(self, query, parameters=None, *args, **kwargs):
        if isinstance(query, str) and _is_read(query):
            query = SimpleStatement(query, consistency_level=self.read_consistency)
        return super().execute_async(query, parameters, *args, **kwargs)


class _Cluster(Cluster):
    read_consistency: int = ConsistencyLevel.LOCAL_QUORUM

    def _new_session(self, keyspace):  # Cluster._new_session, with our Session class
        session = KafscribeSession(self, self.metadata.all_hosts(), keyspace)
        session.read_consistency = self.read_consistency
        self._session_register_user_types(session)
        self.sessions.add(session)
        return session


def connect(settings: Settings, *, keyspace: str | None = None, timeout_s: float = 10.0) -> Session:
    """Open a session (optionally bound to ``keyspace``); raises if unreachable."""
    write = consistency_level(settings.cassandra_write_consistency, "cassandra_write_consistency")
    read = consistency_level(settings.cassandra_read_consistency, "cassandra_read_consistency")
    serial = consistency_level(settings.cassandra_serial_consistency, "cassandra_serial_consistency")
    if serial not in (ConsistencyLevel.SERIAL, ConsistencyLevel.LOCAL_SERIAL):
        raise SettingsError("KAFSCRIBE_CASSANDRA_SERIAL_CONSISTENCY: use SERIAL or LOCAL_SERIAL")
    cluster = _Cluster(
        settings.cassandra_contact_points,
        port=settings.cassandra_port,
        connect_timeout=timeout_s,
        control_connection_timeout=timeout_s,
        reconnection_policy=ExponentialReconnectionPolicy(0.5, 10.0),
        execution_profiles={
            EXEC_PROFILE_DEFAULT: ExecutionProfile(
                load_balancing_policy=DCAwareRoundRobinPolicy(local_dc=settings.cassandra_local_dc),
                request_timeout=timeout_s,
                consistency_level=write,
                serial_consistency_level=serial,
            )
        },
        protocol_version=5,
        **security_options(settings),
    )
    cluster.read_consistency = read
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
