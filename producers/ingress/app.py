"""The ingress app factory: routes, middlewares, lifecycle, and ``serve``."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from kafscribe import logs, metrics
from kafscribe.settings import Settings

from . import auth, upload
from .backends import Backends
from .routes import callbacks, events, health, jobs, workers

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
        middlewares=[count_requests, auth.authenticate], client_max_size=settings.max_upload_bytes + (1 << 20)
    )
    app["settings"] = settings
    auth.setup(app, settings)  # refuses auth off on a non-loopback address before anything starts
    app["backends"] = backends if backends is not None else Backends(settings)
    app.router.add_post("/v1/jobs", jobs.create_job)
    app.router.add_get("/v1/jobs/{job_id}", jobs.get_job)
    app.router.add_get("/v1/jobs/{job_id}/transcript", jobs.get_transcript)
    app.router.add_get("/v1/jobs/{job_id}/events", events.get_job_events)
    app.router.add_get("/v1/jobs/{job_id}/callbacks", callbacks.get_callbacks)
    app.router.add_post("/v1/jobs/{job_id}/callbacks/redeliver", callbacks.redeliver_callback)
    app.router.add_get("/v1/workers", workers.list_workers)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics_endpoint)

    async def sweep(app: web.Application) -> None:
        await asyncio.to_thread(upload.remove_orphans)

    async def close(app: web.Application) -> None:
        await asyncio.to_thread(app["backends"].close)

    app.on_startup.append(sweep)
    app.on_cleanup.append(close)
    return app


def serve(settings: Settings) -> int:
    logs.setup(settings.log_level)
    log.info("ingress listening on %s:%s", settings.http_host, settings.http_port)
    web.run_app(build_app(settings), host=settings.http_host, port=settings.http_port, print=None)
    return 0
