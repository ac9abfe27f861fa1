"""`kafscribe stack up|down|status`: the local Kafka + Cassandra, one node each or a loopback cluster.

``up`` is idempotent: a node already running from this state directory is
reused (and said so); a server on a node's address and port that we did not
start is used as it is. ``down`` stops only what our pid files name.
Readiness is a real client call (Kafka metadata from each broker and the
whole cluster registered, a CQL session on each node), never a sleep. The
node layout (``infra.nodes``) is recorded in the state directory: a state
directory made for one layout is refused for another, since a KRaft quorum and
a Cassandra ring cannot be regrown in place here.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kafscribe.kafka.clients import kafka_reachable
from kafscribe.settings import Settings
from kafscribe.store.session import cassandra_reachable

from . import bootstrap, cassandra_server, jars, kafka_server
from .nodes import Node, cassandra_nodes, kafka_nodes
from .process import ServerProcess, stop_together


class StackError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


@dataclass
class ServerStatus:
    name: str
    port: int
    pid: int | None
    ready: bool
    note: str = ""
    host: str = "127.0.0.1"

    def line(self) -> str:
        pid = self.pid if self.pid is not None else "-"
        state = "ready" if self.ready else "not ready"
        address = f"{self.host}:{self.port}"
        return f"{self.name:<12} pid={pid!s:<8} {address:<16} {state}{'  (' + self.note + ')' if self.note else ''}"


LAYOUT_FILE = "stack-layout.json"


def nodes(settings: Settings) -> list[Node]:
    """Every node of the local stack, Kafka's first."""
    return kafka_nodes(settings) + cassandra_nodes(settings)


def _prepare(node: Node):
    return kafka_server.prepare if node.server == "kafka" else cassandra_server.prepare


def node_ready(settings: Settings, node: Node, timeout_s: float = 3.0) -> bool:
    """The node itself answers: Kafka metadata from this broker, a CQL session through this node."""
    if not _port_open(node.host, node.port):
        return False
    if node.server == "kafka":
        return kafka_reachable(settings.with_(kafka_bootstrap=node.address), timeout_s)
    return cassandra_reachable(settings.with_(cassandra_hosts=node.host, cassandra_local_dc=""), timeout_s)


def _brokers_registered(settings: Settings, timeout_s: float = 3.0) -> int:
    from kafscribe.kafka import clients as kafka_clients

    try:
        return len(kafka_clients.admin(settings).list_topics(timeout=timeout_s).brokers)
    except Exception:  # noqa: BLE001 - not answering yet
        return 0


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _released(node: Node, wait_s: float = 30.0) -> bool:
    """Whether the port of a node kafscribe started, and that has just died, is let go within ``wait_s``.

    A SIGKILLed JVM can hold its listener for seconds while it dies: taken for a foreign server, it was
    waited for until the stack timed out (the soak drill restarts a killed broker at once).
    """
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not _port_open(node.host, node.port):
            return True
        time.sleep(0.25)
    return False


def status(settings: Settings) -> list[ServerStatus]:
    """One row per node of the layout; a Kafka row notes how many brokers the cluster has registered."""
    out = []
    knodes = kafka_nodes(settings)
    registered = _brokers_registered(settings) if len(knodes) > 1 else None
    for node in nodes(settings):
        pid = ServerProcess(node.name, settings.state_dir).pid()
        is_ready = node_ready(settings, node)
        notes = []
        if is_ready and not pid:
            notes.append("not started by kafscribe")
        if node.server == "kafka" and registered is not None and is_ready:
            notes.append(f"{registered}/{len(knodes)} brokers registered")
        out.append(ServerStatus(node.name, node.port, pid, is_ready, ", ".join(notes), node.host))
    return out


def _check_layout(settings: Settings) -> None:
    """Refuse a state directory made for another number of brokers/nodes; record the layout otherwise."""
    path = settings.state_dir / LAYOUT_FILE
    want = {"kafka_brokers": settings.kafka_brokers, "cassandra_nodes": settings.cassandra_nodes}
    if path.exists():
        have = json.loads(path.read_text())
    elif (settings.state_dir / "kafka" / "data" / "meta.properties").exists():
        have = {"kafka_brokers": 1, "cassandra_nodes": 1}  # made before layouts were recorded
    else:
        have = want
    if have != want:
        raise StackError(
            f"{settings.state_dir} holds a stack of {have['kafka_brokers']} broker(s) and"
            f" {have['cassandra_nodes']} Cassandra node(s), not {want['kafka_brokers']} and"
            f" {want['cassandra_nodes']}: use another KAFSCRIBE_STATE_DIR, or `kafscribe stack down` and remove it"
        )
    path.write_text(json.dumps(want) + "\n")


def up(settings: Settings, log: Callable[[str], None] = print, bootstrap_schema: bool = True) -> list[str]:
    """Start whatever node is not running, wait until all are ready, bootstrap.

    Returns the names of the nodes this call started.
    """
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    _check_layout(settings)
    to_start: list[Node] = []
    for node in nodes(settings):
        proc = ServerProcess(node.name, settings.state_dir)
        ours = proc.pid_file.exists()  # read before alive(), which clears the pid file of a dead server
        if proc.alive():
            log(f"{node.name}: already running (pid {proc.pid()}, {node.address})")
        elif _port_open(node.host, node.port) and not (ours and _released(node)):
            log(f"{node.name}: {node.address} is in use by a server kafscribe did not start; using it")
        else:
            to_start.append(node)
    if any(node.server == "kafka" for node in to_start):
        bootstrap.replication(settings, settings.kafka_brokers)  # refuse RF > brokers before starting any
        kafka_server.cluster_id(settings)  # one id for every broker, made before they format at once
    t0 = time.monotonic()
    jar_dirs = {server: jars.resolve(server, settings.cache_dir) for server in {n.server for n in to_start}}
    # Preparing a broker formats its storage (a JVM run of seconds): all nodes at once.
    with ThreadPoolExecutor(max_workers=max(1, len(to_start))) as pool:
        prepared = list(pool.map(lambda n: _prepare(n)(settings, jar_dirs[n.server], n), to_start))
    ready_s = time.monotonic() - t0
    started: list[str] = []
    for node, (server, argv) in zip(to_start, prepared, strict=True):
        pid = server.start(argv)
        started.append(node.name)
        log(f"{node.name}: started pid {pid} on {node.address} (jars and config ready in {ready_s:.1f}s)")
    _wait_ready(settings, log)
    if bootstrap_schema:
        for change in bootstrap.ensure_topics(settings):
            log(f"kafka: {change}")
        n = bootstrap.ensure_schema(settings, warn=lambda line: log(f"cassandra: {bootstrap.WARNING}{line}"),
                                    expect_nodes=settings.cassandra_nodes)
        log(f"cassandra: schema ensured ({n} statements, keyspace {settings.cassandra_keyspace})")
    return started


def _wait_ready(settings: Settings, log: Callable[[str], None]) -> None:
    t0 = time.monotonic()
    pending = {node.name: node for node in nodes(settings)}
    brokers = settings.kafka_brokers
    registered = brokers <= 1
    while True:
        for name, node in list(pending.items()):
            proc = ServerProcess(name, settings.state_dir)
            if node_ready(settings, node):
                log(f"{name}: ready after {time.monotonic() - t0:.1f}s")
                del pending[name]
            elif proc.pid_file.exists() and not proc.alive():
                raise StackError(f"{name} exited during start-up; last log lines:\n{proc.log_tail()}")
        if not pending and not registered:  # every broker answers; the controller must know them all
            registered = _brokers_registered(settings) >= brokers
            if registered:
                log(f"kafka: all {brokers} brokers registered after {time.monotonic() - t0:.1f}s")
        if not pending and registered:
            return
        if time.monotonic() - t0 > settings.stack_timeout_s:
            if not pending:
                raise StackError(f"only {_brokers_registered(settings)}/{brokers} Kafka brokers registered"
                                 f" after {settings.stack_timeout_s:.0f}s")
            tails = "\n".join(
                f"--- {n} ---\n{ServerProcess(n, settings.state_dir).log_tail()}" for n in pending
            )
            raise StackError(f"not ready after {settings.stack_timeout_s:.0f}s: {', '.join(pending)}\n{tails}")
        time.sleep(1.0)


def down(settings: Settings, log: Callable[[str], None] = print, timeout_s: float = 60.0,
         together: bool = False) -> list[str]:
    """Stop every node our pid files name (Kafka's first: they flush faster).

    ``together``: signal every node at once and wait for them as a group (the test session's teardown,
    whose data is disposable): a node that outlasts ``timeout_s`` is killed.
    """
    names = [n.name for n in nodes(settings)]
    for pid_file in sorted(settings.state_dir.glob("*.pid")):  # nodes of a larger layout than configured
        name = pid_file.stem
        if name.split("-")[0] in ("kafka", "cassandra") and name not in names:
            names.append(name)
    names.sort(key=lambda n: (not n.startswith("kafka"), n))
    groups = [names] if together else [[name] for name in names]
    stopped = []
    for group in groups:
        pids = {name: ServerProcess(name, settings.state_dir).pid() for name in group}
        ended = {p.name for p in stop_together([ServerProcess(name, settings.state_dir) for name in group], timeout_s)}
        for name in group:
            if name in ended:
                stopped.append(name)
                log(f"{name}: stopped pid {pids[name]}")
            else:
                log(f"{name}: not running (no kafscribe pid file)")
    return stopped
