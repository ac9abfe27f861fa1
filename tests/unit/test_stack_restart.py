"""A node kafscribe started and that just died may hold its port a moment: `stack.up` waits for it (no servers)."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

from infra import stack


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_port_let_go_while_waiting_counts_as_released() -> None:
    sock = listener()
    node = SimpleNamespace(host="127.0.0.1", port=sock.getsockname()[1])
    threading.Timer(0.5, sock.close).start()
    assert stack._released(node, wait_s=10.0)


def test_a_port_still_held_after_the_wait_is_not_released() -> None:
    sock = listener()
    try:
        assert not stack._released(SimpleNamespace(host="127.0.0.1", port=sock.getsockname()[1]), wait_s=0.6)
    finally:
        sock.close()


def test_cluster_ids_never_start_with_a_dash(monkeypatch) -> None:
    from infra import kafka_server

    ids = iter([b"\xf9" + bytes(15), bytes(16)])  # base64 of 0xf9... begins with "-"
    monkeypatch.setattr(kafka_server.uuid, "uuid4", lambda: SimpleNamespace(bytes=next(ids)))
    assert kafka_server._random_cluster_id() == "AAAAAAAAAAAAAAAAAAAAAA"
