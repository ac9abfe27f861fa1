"""Run the real kafscribe services as subprocesses against the test stack.

A ``Pipeline`` makes an admin API key of tenant ``default`` (``self.api_key``)
and its ``http`` client sends it, so tests written before auth keep working:
jobs go to tenant ``default``, and an ``X-Tenant`` header acts for another
tenant as an admin may. Tests of tenant separation make their own tenant keys
(``Pipeline.key``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from confluent_kafka import TopicPartition

from kafscribe.kafka import clients as kafka_clients
from kafscribe.settings import Settings
from kafscribe.store import session as cassandra_session
from kafscribe.store.apikeys import KeyStore
from producers.client import HttpClient
from schemas.events import Event, decode_event


def wait_until(predicate, timeout_s: float = 90.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what} not met in {timeout_s}s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_committed(settings: Settings, logical: str, timeout_s: float, group: str) -> tuple[list[Event], bool]:
    """Every committed event of a topic, decoded (undecodable bytes skipped), as a read_committed consumer
    (group ``group``) sees it; and whether every partition was read to its end within ``timeout_s``."""
    topic = settings.topic(logical)
    consumer = kafka_clients.consumer(settings, group)
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        parts = [TopicPartition(topic, p, 0) for p in meta.partitions]
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in parts}
        consumer.assign(parts)
        positions = dict.fromkeys(ends, 0)
        events: list[Event] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(positions[p] < ends[p] for p in ends):
            msg = consumer.poll(0.3)
            if msg is None:  # transaction markers take offsets too: ask where the consumer is
                for tp in consumer.position(parts):
                    positions[tp.partition] = max(positions[tp.partition], tp.offset)
                continue
            if msg.error():
                continue
            positions[msg.partition()] = msg.offset() + 1
            try:
                events.append(decode_event(msg.value()))
            except ValueError:
                continue
        return events, all(positions[p] >= ends[p] for p in ends)
    finally:
        consumer.close()


class Pipeline:
    """Ingress + stage workers of one isolated pipeline (own topic prefix and groups)."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings.with_(http_port=free_port())
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.worker_ids: dict[str, str] = {}  # name -> the worker id of its current incarnation
        self.starts = 0
        self.api_key = self.key("default", admin=True)
        self.http = self.client(self.api_key)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.http_port}"

    def client(self, api_key: str = "") -> HttpClient:
        """A client of this pipeline's ingress sending ``api_key`` (none: unauthenticated)."""
        return HttpClient(self.url, timeout_s=60, api_key=api_key)

    def key(self, tenant: str, admin: bool = False) -> str:
        """A new API key of ``tenant`` in the test keyspace."""
        session = cassandra_session.connect(self.settings, keyspace=self.settings.cassandra_keyspace)
        try:
            return KeyStore(session).create(tenant, admin=admin, label="tests")[0]
        finally:
            session.cluster.shutdown()

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KAFSCRIBE_")}
        env.update(self.settings.to_env())
        env.update(overrides)
        return env

    def start(self, stage: str, name: str | None = None, **env_overrides: str) -> subprocess.Popen:
        name = name or stage
        self.starts += 1  # every incarnation gets an id of its own, a restart too
        env_overrides.setdefault("KAFSCRIBE_WORKER_ID", f"{name}-{os.getpid()}-{self.starts}")
        self.worker_ids[name] = env_overrides["KAFSCRIBE_WORKER_ID"]
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "kafscribe.cli.main", "serve", stage],
            env=self.env(**env_overrides), stdout=log, stderr=subprocess.STDOUT,
        )
        self.procs[name] = proc
        if stage == "ingress":
            self._wait_http(proc, name)
        return proc

    def _wait_http(self, proc: subprocess.Popen, name: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {self.log_tail(name)}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.settings.http_port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{name} not listening: {self.log_tail(name)}")

    def start_all(self, **env_overrides: str) -> Pipeline:
        self.start("ingress")
        for stage in ("transcriber", "translator", "sink", "notifier"):
            self.start(stage, **env_overrides)
        return self

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        proc.send_signal(sig)
        proc.wait(60)

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def wait_job(self, job_id: str, timeout_s: float = 240, statuses=("completed", "failed")) -> dict:
        deadline = time.monotonic() + timeout_s
        job = None
        while time.monotonic() < deadline:
            job = self.http.job(job_id)
            if job and job["status"] in statuses:
                return job
            time.sleep(0.2)
        tails = "\n".join(f"--- {n}\n{self.log_tail(n, 10)}" for n in self.procs)
        raise AssertionError(f"job {job_id} still {job and job['status']} after {timeout_s}s\n{tails}")
