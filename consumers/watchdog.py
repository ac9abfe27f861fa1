"""Liveness of a worker process: a watchdog thread and ``GET /healthz`` beside ``/metrics``.

Every ``StageRunner`` stamps ``last_beat`` at each completed poll-loop
iteration (a job in progress does not stop the loop: it runs in a thread
while the loop polls). When a runner has not beaten for
``KAFSCRIBE_WATCHDOG_S``, something below it is stuck for good (a
librdkafka call that ignored its timeout); the watchdog logs which runner and
for how long, and ends the process with ``EXIT_STUCK`` so its supervisor
(``kafscribe services``, systemd, Kubernetes) starts a fresh one: its
uncommitted job is redone by whoever owns the partition next.

``/healthz`` answers 200 with each runner's age while all beat, 503 when one
does not (for liveness probes that watch the same thing from outside).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("kafscribe.watchdog")

EXIT_STUCK = 70  # EX_SOFTWARE: "no progress", distinct from a crash's 1 and a signal's 128+n


class Watchdog:
    """Ends the process when a runner's poll loop stops completing iterations."""

    def __init__(self, runners: Sequence, timeout_s: float,
                 on_stuck: Callable[[str], None] | None = None) -> None:
        self.runners = list(runners)
        self.timeout_s = timeout_s
        self.on_stuck = on_stuck or _exit_stuck
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def ages(self) -> dict[str, float]:
        """Seconds since each running runner's last completed poll-loop iteration."""
        now = time.monotonic()
        return {f"{r.stage.name}:{r.worker_id}": now - r.last_beat for r in self.runners if not r.stopped}

    def stuck(self) -> list[str]:
        if self.timeout_s <= 0:
            return []
        return [name for name, age in self.ages().items() if age > self.timeout_s]

    def healthy(self) -> bool:
        return not self.stuck()

    def start(self) -> Watchdog:
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.timeout_s / 4)):
            stuck = self.stuck()
            if stuck:
                ages = self.ages()
                reason = ", ".join(f"{name} made no progress for {ages[name]:.0f}s" for name in stuck)
                reason += f" (limit KAFSCRIBE_WATCHDOG_S={self.timeout_s:g})"
                self.on_stuck(reason)
                return


def _exit_stuck(reason: str) -> None:
    log.critical("watchdog: %s; exiting with status %d so a supervisor restarts this worker", reason, EXIT_STUCK)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(EXIT_STUCK)  # threads are stuck in C calls: a normal exit would wait for them


def serve(port: int, host: str, watchdog: Watchdog | None) -> ThreadingHTTPServer | None:
    """``/metrics`` and ``/healthz`` on ``port`` (0 or less: not served)."""
    if port <= 0:
        return None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.split("?")[0] == "/healthz":
                ok = watchdog is None or watchdog.healthy()
                ages = watchdog.ages() if watchdog else {}
                body = json.dumps({"status": "ok" if ok else "stuck",
                                   "seconds_since_progress": {k: round(v, 1) for k, v in ages.items()},
                                   "limit_s": watchdog.timeout_s if watchdog else None}).encode()
                self._send(200 if ok else 503, "application/json", body)
            elif self.path.split("?")[0] == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest())
            else:
                self._send(404, "text/plain", b"not found\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
