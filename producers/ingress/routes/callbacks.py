"""GET /v1/jobs/{id}/callbacks and POST .../callbacks/redeliver."""

from __future__ import annotations

import asyncio

from aiohttp import web

from kafscribe.settings import Settings
from kafscribe.store import quotas
from kafscribe.webhooks.guard import mask_url
from schemas.events import CallbackAttempt, now_ms

from ...publisher import PublishError
from .. import auth
from ..appkeys import BACKENDS, SETTINGS
from ..backends import Backends
from ..responses import error, json_response, unavailable
from .jobs import load_job


async def get_callbacks(request: web.Request) -> web.Response:
    """Every delivery attempt of the job's callback event."""
    backends: Backends = request.app[BACKENDS]
    job, _ = await load_job(request)

    def load():
        store = backends.callbacks()
        return store.get_event(job["job_id"]), store.attempts(job["job_id"])

    event, attempts = await asyncio.to_thread(load)
    return json_response({
        "job_id": job["job_id"],
        "callback_url": mask_url(job["options"].get("callback_url")),
        "event": None if event is None else {
            "event_id": event["event_id"], "event_type": event["event_type"], "url": mask_url(event["url"]),
            "created_at": event["created_at"],
        },
        "attempts": [
            {k: a[k] for k in ("attempt", "attempted_at", "status_code", "latency_ms", "error", "outcome")}
            for a in attempts
        ],
    })


async def redeliver_callback(request: web.Request) -> web.Response:
    """Send the job's callback event again, now (one attempt; the usual schedule while attempts remain)."""
    settings: Settings = request.app[SETTINGS]
    backends: Backends = request.app[BACKENDS]
    job, _ = await load_job(request)

    def send():
        store = backends.callbacks()
        event = store.get_event(job["job_id"])
        if event is None:
            return None
        limiter = auth.gate(request).redeliveries()
        limiter.claim(job["job_id"])  # once per job per interval, else LimitExceeded (429)
        attempts = store.attempts(job["job_id"])
        attempt = CallbackAttempt(
            job_id=job["job_id"], tenant=event["tenant"], trace_id=job["trace_id"] or "",
            event_id=event["event_id"], url=event["url"], event_type=event["event_type"], body=event["body"],
            delivery_attempt=max((a["attempt"] for a in attempts), default=0) + 1, not_before=now_ms(),
        )
        try:
            backends.publisher.publish(settings.topic("callbacks.retry"), attempt.job_id.encode(), attempt.encode())
        except PublishError:
            limiter.release(job["job_id"])
            raise
        return attempt

    try:
        attempt = await asyncio.to_thread(send)
    except PublishError as exc:
        return unavailable(settings, str(exc))
    except quotas.LimitExceeded as exc:
        return error(429, exc.reason, **{"Retry-After": str(exc.retry_after_s)})
    if attempt is None:
        return error(409, "this job has no callback event (no callback_url, or not finished yet)")
    return json_response({"job_id": attempt.job_id, "event_id": attempt.event_id,
                  "delivery_attempt": attempt.delivery_attempt}, status=202)


_JOB_ID = {"$ref": "#/components/parameters/JobId"}
_ERR = {"$ref": "#/components/responses/Error"}
OPENAPI_PATHS: dict = {
    "/v1/jobs/{job_id}/callbacks": {"get": {
        "tags": ["callbacks"], "summary": "The job's callback event and every delivery attempt",
        "parameters": [_JOB_ID], "responses": {"200": {"description": "`{job_id, callback_url, event, attempts}`"},
                                               "404": _ERR}}},
    "/v1/jobs/{job_id}/callbacks/redeliver": {"post": {
        "tags": ["callbacks"], "summary": "Send the callback again now (once per job per REDELIVER_INTERVAL_S)",
        "parameters": [_JOB_ID], "responses": {"202": {"description": "`{job_id, event_id, delivery_attempt}`"},
                                               "404": _ERR, "409": _ERR, "429": _ERR, "503": _ERR}}},
}
