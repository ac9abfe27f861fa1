"""GET /v1/workers: every worker seen on the status topic."""

from __future__ import annotations

from aiohttp import web

from ..appkeys import BACKENDS, SETTINGS
from ..backends import Backends
from ..responses import json_response


async def list_workers(request: web.Request) -> web.Response:
    """Every worker seen on the status topic: live, stale (no status for worker_stale_s) or stopped."""
    backends: Backends = request.app[BACKENDS]
    workers = []
    for w in sorted(backends.view.workers(), key=lambda w: (w.status.stage, w.status.worker_id)):
        s = w.status
        workers.append({
            "worker_id": s.worker_id, "stage": s.stage, "state": w.liveness, "activity": s.state,
            "host": s.host, "pid": s.pid, "last_seen": s.produced_at, "model": s.model,
            "in_flight": s.in_flight, "backlog": s.backlog, "partitions": s.partitions,
            "memory": {"rss": s.rss_bytes, "host_available": s.host_mem_available, "host_total": s.host_mem_total,
                       "gpu_free": s.gpu_mem_free, "gpu_total": s.gpu_mem_total, "gpu_used": s.gpu_mem_used,
                       "gpu_device": s.gpu_device, "budget": s.memory_budget,
                       "headroom": w.headroom},
        })
    return json_response({"stale_after_s": request.app[SETTINGS].worker_stale_s, "workers": workers})


OPENAPI_PATHS: dict = {
    "/v1/workers": {"get": {
        "tags": ["operations"], "summary": "Every worker seen on the status topic (admin keys only)",
        "responses": {"200": {"description": "`{stale_after_s, workers}`"},
                      "403": {"$ref": "#/components/responses/Error"}}}},
}
