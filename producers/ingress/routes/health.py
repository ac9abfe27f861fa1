"""GET /healthz (process up), /readyz (Kafka and Cassandra reachable), /metrics (Prometheus)."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kafscribe.kafka.clients import kafka_reachable
from kafscribe.settings import Settings

from ..appkeys import BACKENDS, SETTINGS
from ..backends import Backends
from ..responses import json_response


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    settings: Settings = request.app[SETTINGS]
    backends: Backends = request.app[BACKENDS]

    def check() -> dict[str, bool]:
        kafka = kafka_reachable(settings, timeout_s=2)
        try:
            backends.submitter().session.execute("SELECT release_version FROM system.local", timeout=2)
            cassandra = True
        except Exception:  # noqa: BLE001
            cassandra = False
        return {"kafka": kafka, "cassandra": cassandra}

    checks = await asyncio.to_thread(check)
    ok = all(checks.values())
    if ok:
        return json_response({"status": "ready", **checks})
    return json_response({"status": "unavailable", **checks}, status=503, headers={"Retry-After": str(settings.retry_after_s)})


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


OPENAPI_PATHS: dict = {
    "/healthz": {"get": {"tags": ["operations"], "summary": "The process is up", "security": [],
                         "responses": {"200": {"description": "`{status: ok}`"}}}},
    "/readyz": {"get": {"tags": ["operations"], "summary": "Kafka and Cassandra reachable", "security": [],
                        "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
    "/metrics": {"get": {"tags": ["operations"], "summary": "Prometheus metrics", "security": [],
                         "responses": {"200": {"description": "Prometheus text format"}}}},
}
