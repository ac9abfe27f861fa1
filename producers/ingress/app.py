"""The ingress app factory: routes, middlewares, lifecycle, and ``serve``."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import time

from aiohttp import web

from kafscribe import logs, metrics
from kafscribe.settings import Settings
from kafscribe.store import retention

from . import auth, upload
from .appkeys import BACKENDS, SETTINGS
from .backends import Backends
from .door import DOOR, Door, install_redaction
from .routes import audio, callbacks, docs, events, health, jobs, workers

log = logging.getLogger("kafscribe.ingress")


@web.middleware
async def count_requests(request: web.Request, handler):
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        metrics.HTTP_REQUESTS.labels(request.method, route, str(exc.status)).inc()
        raise
    metrics.HTTP_REQUESTS.labels(request.method, route, str(response.status)).inc()
    return response


def build_app(settings: Settings, backends: Backends | None = None) -> web.Application:
    """The ingress app; ``backends`` defaults to fresh Cassandra/Kafka handles for ``settings``."""
    app = web.Application(
        middlewares=[count_requests, audio.openai_errors, auth.authenticate],
        client_max_size=settings.max_upload_bytes + (1 << 20),
    )
    app[SETTINGS] = settings
    app[DOOR] = Door(settings)  # caps of uploads and event streams in progress
    app[events.POLLS] = events.SharedPolls(settings)
    install_redaction()  # no credential in any log line, aiohttp's own error paths included
    auth.setup(app, settings)  # refuses auth off on a non-loopback address before anything starts
    app[BACKENDS] = backends if backends is not None else Backends(settings)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    docs.setup(app, ROUTE_MODULES)  # /openapi.json from the modules' OPENAPI_PATHS, /docs, its assets

    async def sweep(app: web.Application) -> None:
        await asyncio.to_thread(upload.remove_orphans)

    async def close(app: web.Application) -> None:
        await asyncio.to_thread(app[BACKENDS].close)

    app.on_startup.append(sweep)
    app.cleanup_ctx.append(_retention_sweep)
    app.on_cleanup.append(close)
    return app


# Every route: (method, path, handler). Each route module describes its routes in OPENAPI_PATHS.
ROUTES = [
    ("POST", "/v1/jobs", jobs.create_job),
    ("GET", "/v1/jobs", jobs.list_jobs),
    ("GET", "/v1/jobs/{job_id}", jobs.get_job),
    ("DELETE", "/v1/jobs/{job_id}", jobs.delete_job),
    ("GET", "/v1/jobs/{job_id}/transcript", jobs.get_transcript),
    ("GET", "/v1/jobs/{job_id}/events", events.get_job_events),
    ("GET", "/v1/jobs/{job_id}/callbacks", callbacks.get_callbacks),
    ("POST", "/v1/jobs/{job_id}/callbacks/redeliver", callbacks.redeliver_callback),
    ("POST", "/v1/audio/transcriptions", audio.transcriptions),
    ("POST", "/v1/audio/translations", audio.translations),
    ("GET", "/v1/workers", workers.list_workers),
    ("GET", "/healthz", health.healthz),
    ("GET", "/readyz", health.readyz),
    ("GET", "/metrics", health.metrics_endpoint),
]
ROUTE_MODULES = [jobs, events, callbacks, audio, workers, health, docs]


async def _retention_sweep(app: web.Application):
    """Remove audio past KAFSCRIBE_AUDIO_RETENTION_S every KAFSCRIBE_RETENTION_SWEEP_S (kafscribe.store.retention)."""
    settings: Settings = app[SETTINGS]
    task = asyncio.create_task(_sweep_forever(app)) if settings.retention_sweep_s > 0 else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _sweep_forever(app: web.Application) -> None:
    settings: Settings = app[SETTINGS]
    sweeper = None
    while True:
        await asyncio.sleep(settings.retention_sweep_s)  # not at start: a restarting ingress adds no load
        try:
            if sweeper is None:
                session = (await asyncio.to_thread(app[BACKENDS].submitter)).session
                sweeper = retention.AudioSweeper(settings, session)
            await asyncio.to_thread(sweeper.sweep)
        except Exception as exc:  # noqa: BLE001 - Cassandra down: try again next round
            log.warning("audio retention sweep failed: %s: %s", type(exc).__name__, exc)
            sweeper = None


def serve(settings: Settings) -> int:
    """Run the ingress: one process, or ``KAFSCRIBE_INGRESS_PROCESSES`` sharing the port (SO_REUSEPORT)."""
    logs.setup(settings.log_level)
    count = settings.ingress_processes if settings.ingress_processes > 0 else (os.cpu_count() or 1)
    if count == 1:
        log.info("ingress listening on %s:%s", settings.http_host, settings.http_port)
        web.run_app(build_app(settings), host=settings.http_host, port=settings.http_port, print=None)
        return 0
    return IngressGroup(settings, count).run()


def _serve_child(settings: Settings, parent: int) -> None:
    """One of several ingress processes: its own loop, Cassandra session and producer; the port is shared."""
    _die_with_parent(parent)
    logs.setup(settings.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the group's parent decides when to stop (SIGTERM)
    web.run_app(build_app(settings), host=settings.http_host, port=settings.http_port, print=None,
                reuse_port=True, handle_signals=True)


def _die_with_parent(parent: int) -> None:
    """Linux: get SIGTERM when the group's parent dies, even by SIGKILL (no orphan keeps the port)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


class IngressGroup:
    """``count`` ingress processes on one port; a crashed one is restarted, a failed start stops the group.

    A failed start is an exit with an error status within ``STARTUP_S`` (port taken, bad settings);
    a process killed by a signal is replaced whenever it dies.

    The kernel spreads new connections over the processes (SO_REUSEPORT). SIGTERM
    or SIGINT stops them all (each finishes its requests in progress first).
    """

    STARTUP_S = 10.0
    RESTART_GAP_S = 1.0

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self._ctx = multiprocessing.get_context("spawn")
        self._stopping = False

    def _start(self):
        proc = self._ctx.Process(target=_serve_child, args=(self.settings, os.getpid()), name="kafscribe-ingress")
        proc.start()
        proc.started_at = time.monotonic()
        return proc

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        procs = [self._start() for _ in range(self.count)]
        log.info("ingress: %d processes listening on %s:%s (pids %s)", self.count, self.settings.http_host,
                 self.settings.http_port, ", ".join(str(p.pid) for p in procs))
        code = 0
        while not self._stopping:
            time.sleep(0.2)
            for i, proc in enumerate(procs):
                if proc.is_alive() or self._stopping:
                    continue
                if proc.exitcode > 0 and time.monotonic() - proc.started_at < self.STARTUP_S:  # not a kill: an error
                    log.error("ingress process %s exited with %s at start; stopping the group", proc.pid, proc.exitcode)
                    self._stopping, code = True, 1
                    break
                ran = time.monotonic() - proc.started_at
                if ran < self.RESTART_GAP_S:  # one that dies at once is not restarted in a tight loop
                    time.sleep(self.RESTART_GAP_S - ran)
                log.warning("ingress process %s exited with %s; starting another", proc.pid, proc.exitcode)
                procs[i] = self._start()
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        return code

    def _stop(self, signum, frame) -> None:
        self._stopping = True
