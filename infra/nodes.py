"""Where each node of the local stack lives: its address, ports, state and log directories.

One node per server is the default. With ``KAFSCRIBE_KAFKA_BROKERS`` or
``KAFSCRIBE_CASSANDRA_NODES`` above 1 the local stack is a cluster on loopback
addresses: node n listens on the first configured address + n-1 (127.0.0.1,
127.0.0.2, ...) with the same port numbers, so Cassandra's nodes share one
storage port as a real cluster does. Node 1 keeps the single-node names and
directories, so a stack started before clusters existed is still found.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from kafscribe.settings import Settings

DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class Node:
    server: str  # "kafka" | "cassandra"
    index: int  # 1-based
    host: str
    port: int

    @property
    def name(self) -> str:
        """Pid-file and process-tag name: ``kafka``, ``kafka-2``, ``cassandra-3`` ..."""
        return self.server if self.index == 1 else f"{self.server}-{self.index}"

    def root(self, state_dir: Path) -> Path:
        """Config and data of this node."""
        return state_dir / self.name

    def log_dir(self, state_dir: Path) -> Path:
        return state_dir / "logs" if self.index == 1 else state_dir / "logs" / self.name

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _hosts(first: str, count: int, what: str) -> list[str]:
    if count < 1:
        raise ValueError(f"{what}: at least 1 node, not {count}")
    try:
        base = ipaddress.IPv4Address(first)
    except ipaddress.AddressValueError as exc:
        if count > 1:
            raise ValueError(f"{what}: a local cluster needs an IPv4 loopback address to start from, not {first!r}") from exc
        return [DEFAULT_HOST]
    if not base.is_loopback:
        if count > 1:
            raise ValueError(f"{what}: a local cluster runs on loopback addresses (127.x.x.x), not {first}")
        return [DEFAULT_HOST]
    hosts = [str(base + i) for i in range(count)]
    if not ipaddress.IPv4Address(hosts[-1]).is_loopback:
        raise ValueError(f"{what}: {count} nodes from {first} leave the loopback range")
    return hosts


def kafka_nodes(settings: Settings) -> list[Node]:
    first = settings.kafka_bootstrap.split(",")[0].strip().rsplit(":", 1)[0]
    hosts = _hosts(first, settings.kafka_brokers, "KAFSCRIBE_KAFKA_BROKERS")
    return [Node("kafka", i + 1, h, settings.kafka_port) for i, h in enumerate(hosts)]


def cassandra_nodes(settings: Settings) -> list[Node]:
    points = settings.cassandra_contact_points or [DEFAULT_HOST]
    hosts = _hosts(points[0], settings.cassandra_nodes, "KAFSCRIBE_CASSANDRA_NODES")
    return [Node("cassandra", i + 1, h, settings.cassandra_port) for i, h in enumerate(hosts)]


def controller_count(brokers: int) -> int:
    """KRaft voters: 3 when there are 3 brokers or more (survives one loss), else 1 (an even quorum adds nothing)."""
    return 3 if brokers >= 3 else 1


def cassandra_token(index: int, count: int) -> int:
    """Evenly spaced Murmur3 token of node ``index`` (1-based) of ``count``; node 1 keeps token 0."""
    step = 2**64 // count
    raw = (index - 1) * step
    return raw - 2**64 if raw >= 2**63 else raw
