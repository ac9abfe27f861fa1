"""`kafscribe stack up|down|status`: the local Kafka + Cassandra pair.

``up`` is idempotent: a server already running from this state directory is
reused (and said so); a server on the port that we did not start is used as
it is. ``down`` stops only what our pid files name. Readiness is a real
client call (Kafka metadata, a CQL session), never a sleep.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from kafscribe.cassandra_session import cassandra_reachable
from kafscribe.kafka_clients import kafka_reachable
from kafscribe.settings import Settings

from . import bootstrap, cassandra_server, jars, kafka_server
from .process import ServerProcess


class StackError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


@dataclass
class ServerStatus:
    name: str
    port: int
    pid: int | None
    ready: bool
    note: str = ""

    def line(self) -> str:
        pid = self.pid if self.pid is not None else "-"
        state = "ready" if self.ready else "not ready"
        return f"{self.name:<10} pid={pid!s:<8} port={self.port:<6} {state}{'  (' + self.note + ')' if self.note else ''}"


_SERVERS: dict[str, tuple[Callable, Callable[[Settings], int], Callable[[Settings, float], bool]]] = {
    "kafka": (kafka_server.prepare, lambda s: s.kafka_port, kafka_reachable),
    "cassandra": (cassandra_server.prepare, lambda s: s.cassandra_port, cassandra_reachable),
}


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def status(settings: Settings) -> list[ServerStatus]:
    out = []
    for name, (_, port_of, ready) in _SERVERS.items():
        port = port_of(settings)
        pid = ServerProcess(name, settings.state_dir).pid()
        is_ready = _port_open(port) and ready(settings, 3.0)
        note = "" if pid or not is_ready else "not started by kafscribe"
        out.append(ServerStatus(name, port, pid, is_ready, note))
    return out


def up(settings: Settings, log: Callable[[str], None] = print, bootstrap_schema: bool = True) -> list[str]:
    """Start whatever is not running, wait until both are ready, bootstrap.

    Returns the names of the servers this call started.
    """
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    started: list[str] = []
    for name, (prepare, port_of, _ready) in _SERVERS.items():
        proc = ServerProcess(name, settings.state_dir)
        port = port_of(settings)
        if proc.alive():
            log(f"{name}: already running (pid {proc.pid()}, port {port})")
            continue
        if _port_open(port):
            log(f"{name}: port {port} is in use by a server kafscribe did not start; using it")
            continue
        t0 = time.monotonic()
        jar_dir = jars.resolve(name, settings.cache_dir)
        server, argv = prepare(settings, jar_dir)
        pid = server.start(argv)
        started.append(name)
        log(f"{name}: started pid {pid} on port {port} (jars ready in {time.monotonic() - t0:.1f}s)")
    _wait_ready(settings, log)
    if bootstrap_schema:
        for change in bootstrap.ensure_topics(settings):
            log(f"kafka: {change}")
        n = bootstrap.ensure_schema(settings)
        log(f"cassandra: schema ensured ({n} statements, keyspace {settings.cassandra_keyspace})")
    return started


def _wait_ready(settings: Settings, log: Callable[[str], None]) -> None:
    t0 = time.monotonic()
    pending = dict(_SERVERS)
    while pending:
        for name, (_, port_of, ready) in list(pending.items()):
            proc = ServerProcess(name, settings.state_dir)
            if _port_open(port_of(settings)) and ready(settings, 3.0):
                log(f"{name}: ready after {time.monotonic() - t0:.1f}s")
                del pending[name]
            elif proc.pid_file.exists() and not proc.alive():
                raise StackError(f"{name} exited during start-up; last log lines:\n{proc.log_tail()}")
        if pending and time.monotonic() - t0 > settings.stack_timeout_s:
            tails = "\n".join(
                f"--- {n} ---\n{ServerProcess(n, settings.state_dir).log_tail()}" for n in pending
            )
            raise StackError(f"not ready after {settings.stack_timeout_s:.0f}s: {', '.join(pending)}\n{tails}")
        if pending:
            time.sleep(1.0)


def down(settings: Settings, log: Callable[[str], None] = print, timeout_s: float = 60.0) -> list[str]:
    """Stop the servers our pid files name (Kafka first: it flushes faster)."""
    stopped = []
    for name in ("kafka", "cassandra"):
        proc = ServerProcess(name, settings.state_dir)
        pid = proc.pid()
        if proc.stop(timeout_s):
            stopped.append(name)
            log(f"{name}: stopped pid {pid}")
        else:
            log(f"{name}: not running (no kafscribe pid file)")
    return stopped
