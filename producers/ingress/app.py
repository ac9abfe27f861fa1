"""The ingress app factory: routes, middlewares, lifecycle, and ``serve``."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from kafscribe import logs, metrics, retention
from kafscribe.settings import Settings

from . import auth, upload
from .backends import Backends
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
    app["settings"] = settings
    auth.setup(app, settings)  # refuses auth off on a non-loopback address before anything starts
    app["backends"] = backends if backends is not None else Backends(settings)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    docs.setup(app, ROUTE_MODULES)  # /openapi.json from the modules' OPENAPI_PATHS, /docs, its assets

    async def sweep(app: web.Application) -> None:
        await asyncio.to_thread(upload.remove_orphans)

    async def close(app: web.Application) -> None:
        await asyncio.to_thread(app["backends"].close)

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
    """Remove audio past KAFSCRIBE_AUDIO_RETENTION_S every KAFSCRIBE_RETENTION_SWEEP_S (kafscribe.retention)."""
    settings: Settings = app["settings"]
    task = asyncio.create_task(_sweep_forever(app)) if settings.retention_sweep_s > 0 else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _sweep_forever(app: web.Application) -> None:
    settings: Settings = app["settings"]
    sweeper = None
    while True:
        await asyncio.sleep(settings.retention_sweep_s)  # not at start: a restarting ingress adds no load
        try:
            if sweeper is None:
                session = (await asyncio.to_thread(app["backends"].submitter)).session
                sweeper = retention.AudioSweeper(settings, session)
            await asyncio.to_thread(sweeper.sweep)
        except Exception as exc:  # noqa: BLE001 - Cassandra down: try again next round
            log.warning("audio retention sweep failed: %s: %s", type(exc).__name__, exc)
            sweeper = None


def serve(settings: Settings) -> int:
    logs.setup(settings.log_level)
    log.info("ingress listening on %s:%s", settings.http_host, settings.http_port)
    web.run_app(build_app(settings), host=settings.http_host, port=settings.http_port, print=None)
    return 0
