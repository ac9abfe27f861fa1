"""The one helper that builds a job's links (public base URL or the request's host)."""

from __future__ import annotations

from aiohttp import web

from kafscribe.settings import Settings


def job_links(request: web.Request, job_id: str) -> dict[str, str]:
    settings: Settings = request.app["settings"]
    base = settings.public_url.rstrip("/") or f"{request.scheme}://{request.host}"
    return {
        "self": f"{base}/v1/jobs/{job_id}",
        "transcript": f"{base}/v1/jobs/{job_id}/transcript",
    }
