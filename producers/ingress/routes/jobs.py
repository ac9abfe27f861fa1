"""POST /v1/jobs (upload), GET /v1/jobs/{id} and its transcript."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from kafscribe import cassandra_session, formats, metrics
from kafscribe.callback_guard import mask_url
from kafscribe.jobstore import COMPLETED
from kafscribe.settings import Settings
from schemas.events import JobOptions, Upload

from ...submission import SubmissionError, Submitter, Unavailable, check_trace_id, parse_options
from .. import auth
from ..backends import Backends
from ..links import job_links
from ..responses import error, json_response, unavailable
from ..upload import read_upload

log = logging.getLogger("kafscribe.ingress")


async def create_job(request: web.Request) -> web.Response:
    settings: Settings = request.app["settings"]
    backends: Backends = request.app["backends"]
    path = None  # the temp file while this handler owns it
    try:
        trace_id = check_trace_id(request.headers.get("X-Trace-Id", ""))
        received = await read_upload(request, settings)
        path, filename = received.path, received.filename
        if received.fields.get("callback_url"):
            options = await asyncio.to_thread(parse_options, received.fields, settings)  # resolves its host
        else:
            options = parse_options(received.fields, settings)
        tenant = auth.caller(request).tenant
        submitter = backends.submitter() if backends.connected() else await asyncio.to_thread(backends.submitter)
        owned, path = path, None  # the task removes it, even if this handler is cancelled meanwhile
        # Shielded: a client that goes away mid-submission must not leave a blob without its row or event.
        upload = await asyncio.shield(asyncio.ensure_future(_submit_then_remove(
            submitter, received.audio, owned, options, filename=filename, tenant=tenant, trace_id=trace_id
        )))
    except SubmissionError as exc:
        return error(exc.status, exc.reason)
    except ConnectionError as exc:  # the client went away mid-upload; nobody reads this answer
        log.info("client disconnected mid-upload (%s); nothing kept", type(exc).__name__)
        return error(400, "the client disconnected before the upload was complete")
    except Unavailable as exc:
        log.warning("refusing upload: %s", exc)
        return unavailable(settings, str(exc))
    finally:
        if path is not None:
            path.unlink(missing_ok=True)
    metrics.UPLOADS.inc()
    metrics.UPLOAD_BYTES.inc(upload.audio_bytes)
    log.info("accepted %.1fs of audio", upload.audio_duration, extra={"job_id": upload.job_id, "trace_id": upload.trace_id})
    return json_response(
        {"job_id": upload.job_id, "status": "queued", "links": job_links(request, upload.job_id)},
        status=202,
        headers={"Location": f"/v1/jobs/{upload.job_id}"},
    )


async def _submit_then_remove(
    submitter: Submitter, audio: Path | bytes, path: Path | None, options: JobOptions, **kwargs: str
) -> Upload:
    try:
        return await submitter.submit_async(audio, options, **kwargs)
    finally:
        if path is not None:
            path.unlink(missing_ok=True)


def job_view(job: dict[str, Any], result: dict[str, Any] | None) -> dict[str, Any]:
    view = {
        "job_id": job["job_id"],
        "status": job["status"],
        "tenant": job["tenant"],
        "created_at": job["created_at"],
        "updated_at": job["updated_at"],
        "attempts": job["attempts"] or 0,
        "worker_id": job["worker_id"],
        "error": job["error"],
        "options": {**job["options"], "callback_url": mask_url(job["options"].get("callback_url"))},
        "audio": {"filename": job["filename"], "bytes": job["audio_bytes"], "duration": job["audio_duration"]},
    }
    if result is not None and job["status"] == COMPLETED:
        view["result"] = {
            "language": result["language"],
            "language_probability": result["language_probability"],
            "duration": result["duration"],
            "text": result["text"],
            "segments": result["segments"],
            "engine": result["engine"],
            "model": result["model"],
        }
        if result["target_language"]:
            view["result"]["translation"] = {
                "language": result["target_language"],
                "text": result["translated_text"],
                "segments": result["translated_segments"],
            }
    return view


async def load_job(request: web.Request) -> tuple[dict, dict | None]:
    backends: Backends = request.app["backends"]
    job_id = request.match_info["job_id"]
    scope = auth.job_scope(request)

    def load():
        jobs = backends.jobs()
        try:
            job = jobs.get(job_id, tenant=scope)  # another tenant's job reads as missing
            return job, (jobs.get_result(job_id) if job and job["status"] == COMPLETED else None)
        except Exception as exc:
            if cassandra_session.is_outage(exc):
                raise Unavailable(f"Cassandra unavailable: {exc}") from exc
            raise

    try:
        job, result = await asyncio.to_thread(load)
    except Unavailable as exc:
        raise web.HTTPServiceUnavailable(
            text=json.dumps({"error": str(exc)}), content_type="application/json",
            headers={"Retry-After": str(request.app["settings"].retry_after_s)},
        ) from exc
    if job is None:
        raise web.HTTPNotFound(text=json.dumps({"error": f"no job {job_id}"}), content_type="application/json")
    return job, result


async def get_job(request: web.Request) -> web.Response:
    job, result = await load_job(request)
    view = job_view(job, result)
    view["links"] = job_links(request, job["job_id"])
    return json_response(view)


async def get_transcript(request: web.Request) -> web.Response:
    fmt = request.query.get("format", "json")
    if fmt not in formats.FORMATS:
        return error(422, f"format must be one of {', '.join(formats.FORMATS)}")
    job, result = await load_job(request)
    if job["status"] != COMPLETED or result is None:
        return error(409, f"job is {job['status']}; the transcript exists once it is completed")
    lang = request.query.get("lang") or result["language"]
    if lang == result["language"]:
        segments, text = result["segments"], result["text"]
    elif lang == result["target_language"]:
        segments, text = result["translated_segments"], result["translated_text"]
    else:
        have = [x for x in (result["language"], result["target_language"]) if x]
        return error(404, f"no transcript in {lang!r}; available: {', '.join(have)}")
    body, content_type = formats.render(fmt, segments, {"job_id": job["job_id"], "language": lang, "text": text})
    return web.Response(text=body, content_type=content_type.split(";")[0], charset="utf-8")
