"""POST /v1/jobs (upload), GET /v1/jobs (list), GET and DELETE /v1/jobs/{id}, its transcript."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from kafscribe import formats, metrics
from kafscribe.settings import Settings
from kafscribe.speech.decoding import MAX_PROMPT_CHARS
from kafscribe.statuses import CANCELLED, COMPLETED, QUEUED, STATUSES, TERMINAL
from kafscribe.store import quotas, retention
from kafscribe.store import session as cassandra_session
from kafscribe.webhooks.guard import mask_url
from schemas.events import JobOptions, Upload

from ...submission import SubmissionError, Submitter, Unavailable, check_trace_id, parse_options
from .. import auth
from ..appkeys import BACKENDS, SETTINGS
from ..backends import Backends
from ..door import SlowBody, answer_and_close, client_gone
from ..links import job_links
from ..responses import cassandra_outage, error, in_store, json_response, unavailable
from ..upload import Received, read_upload
from . import events

log = logging.getLogger("kafscribe.ingress")


async def create_job(request: web.Request) -> web.Response:
    settings: Settings = request.app[SETTINGS]
    path = None  # the temp file while this handler owns it
    try:
        trace_id = check_trace_id(request.headers.get("X-Trace-Id", ""))
        received = await read_upload(request, settings)
        path = received.path
        if received.fields.get("callback_url"):
            options = await asyncio.to_thread(parse_options, received.fields, settings)  # resolves its host
        else:
            options = parse_options(received.fields, settings)
        path = None  # from here on the submission removes it, even if this handler is cancelled meanwhile
        upload = await submit(request, received, options, trace_id)
    except SlowBody as exc:
        log.info("refusing a slow upload: %s", exc.reason)
        return await refuse_slow(request, error(exc.status, exc.reason))
    except SubmissionError as exc:
        return error(exc.status, exc.reason)
    except quotas.LimitExceeded as exc:
        return error(429, exc.reason, **{"Retry-After": str(exc.retry_after_s)})
    except ConnectionError as exc:  # the client went away mid-upload; nobody reads this answer
        log.info("client disconnected mid-upload (%s); nothing kept", type(exc).__name__)
        return error(400, "the client disconnected before the upload was complete")
    except Unavailable as exc:
        return unavailable(settings, exc)
    finally:
        if path is not None:
            path.unlink(missing_ok=True)
    metrics.UPLOADS.inc()
    metrics.UPLOAD_BYTES.inc(upload.audio_bytes)
    log.info("accepted %.1fs of audio", upload.audio_duration, extra={"job_id": upload.job_id, "trace_id": upload.trace_id})
    return json_response(
        {"job_id": upload.job_id, "status": QUEUED, "links": job_links(request, upload.job_id)},
        status=202,
        headers={"Location": f"/v1/jobs/{upload.job_id}"},
    )


async def refuse_slow(request: web.Request, response: web.Response) -> web.Response:
    """Answer a slow or stalled upload and close its connection, its quota reservation given back first:
    the client is answered inside the handler, before the quota middleware's own release would run."""
    await auth.release_held(request)
    return await answer_and_close(request, response)


async def submit(request: web.Request, received: Received, options: JobOptions, trace_id: str) -> Upload:
    """Store, record and publish ``received`` for the caller's tenant (``POST /v1/jobs`` and ``/v1/audio/*``).

    Shielded: a client that goes away mid-submission must not leave a blob
    without its row or event. The temp file (if any) is removed when it ends.
    The quota reservation made before the body was read (``auth``) goes with
    the submission: its job id becomes the job's, the decoded duration is
    charged to the tenant's audio quotas, and it is released unless the job
    is accepted (``quotas.LimitExceeded`` when an audio quota refuses).
    """
    backends: Backends = request.app[BACKENDS]
    reserved = auth.reservation(request)
    try:
        submitter = backends.submitter() if backends.connected() else await asyncio.to_thread(backends.submitter)
        if reserved is None and request.app[SETTINGS].tenant_max_audio_s_per_day > 0:  # no job quota; a day's
            reserved = (await auth.quotas_for(request),
                        quotas.Reservation(auth.caller(request).tenant, uuid.uuid4().hex))
    except BaseException:
        if received.path is not None:
            received.path.unlink(missing_ok=True)
        raise
    if reserved is not None:
        reserved[1].state = "submitting"  # from here on the submission releases it, even if this handler is cancelled
    return await asyncio.shield(asyncio.ensure_future(_submit_then_remove(
        submitter, received.audio, received.path, options, reserved, filename=received.filename,
        tenant=auth.caller(request).tenant, trace_id=trace_id,
    )))


async def _submit_then_remove(
    submitter: Submitter, audio: Path | bytes, path: Path | None, options: JobOptions,
    reserved: tuple[quotas.TenantQuotas, quotas.Reservation] | None, **kwargs: str,
) -> Upload:
    accepted = False
    try:
        if reserved is None:
            upload = await submitter.submit_async(audio, options, **kwargs)
        else:
            limits, held = reserved
            upload = await submitter.submit_async(audio, options, job_id=held.job_id, id_is_new=True,
                                                  admit=functools.partial(_admit, limits, held), **kwargs)
            await limits.accept(held)
        accepted = True
        return upload
    finally:
        if reserved is not None and not accepted:
            await reserved[0].release(reserved[1])
        if path is not None:
            path.unlink(missing_ok=True)


async def _admit(limits: quotas.TenantQuotas, held: quotas.Reservation, seconds: float) -> None:
    """Charge the decoded duration to the tenant's audio quotas; a Cassandra failure is an outage (503)."""
    try:
        await limits.admit(held, seconds)
    except quotas.LimitExceeded:
        raise
    except Exception as exc:
        raise Unavailable(f"Cassandra unavailable: {type(exc).__name__}: {exc}") from exc


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
    backends: Backends = request.app[BACKENDS]
    job_id = request.match_info["job_id"]
    scope = auth.job_scope(request)

    def load():
        jobs = backends.jobs()
        job = jobs.get(job_id, tenant=scope)  # another tenant's job reads as missing
        return job, (jobs.get_result(job_id) if job and job["status"] == COMPLETED else None)

    job, result = await in_store(request, load)
    if job is None:
        raise web.HTTPNotFound(text=json.dumps({"error": f"no job {job_id}"}), content_type="application/json")
    return job, result


async def get_job(request: web.Request) -> web.Response:
    job, result = await load_job(request)
    view = job_view(job, result)
    view["progress"] = await events.progress_view(request, job)
    if job.get("chunks"):
        view["chunks"] = job["chunks"]  # a long recording split across transcribers
        if job["status"] not in TERMINAL:
            view["partial_text"] = await events.partial_text(request, job)
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


# --- api: listing and deleting ---------------------------------------------------------
LIST_DEFAULT, LIST_MAX = 20, 100


def encode_cursor(position: tuple[datetime, str]) -> str:
    """An opaque cursor for the job after which the next page starts."""
    created, job_id = position
    raw = f"{int(created.timestamp() * 1000)}:{job_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The position a cursor names; ``ValueError`` if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ms, job_id = raw.split(":", 1)
        created = datetime.fromtimestamp(int(ms) / 1000, UTC)
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError, OSError) as exc:
        raise ValueError("cursor is not valid; use next_cursor of the previous page") from exc
    if not job_id or len(job_id) > 128:
        raise ValueError("cursor is not valid; use next_cursor of the previous page")
    return created, job_id


async def list_jobs(request: web.Request) -> web.Response:
    """The caller's tenant's jobs, newest first: ``limit``, ``cursor`` (from ``next_cursor``), ``status``."""
    settings: Settings = request.app[SETTINGS]
    backends: Backends = request.app[BACKENDS]
    q = request.query
    try:
        limit = int(q.get("limit", LIST_DEFAULT))
    except ValueError:
        return error(422, f"limit must be an integer from 1 to {LIST_MAX}")
    if not 1 <= limit <= LIST_MAX:
        return error(422, f"limit must be an integer from 1 to {LIST_MAX}")
    status = q.get("status") or None
    if status is not None and status not in STATUSES:
        return error(422, f"status must be one of {', '.join(STATUSES)}")
    try:
        before = decode_cursor(q["cursor"]) if q.get("cursor") else None
    except ValueError as exc:
        return error(422, str(exc))
    tenant = auth.caller(request).tenant
    try:
        store = backends.jobs() if backends.connected() else await in_store(request, backends.jobs)
    except Unavailable as exc:
        return unavailable(settings, exc)
    if before is not None:
        oldest, newest = store.listing_window(settings.jobs_list_days)
        if not oldest <= before[0] <= newest + timedelta(seconds=settings.max_clock_skew_s):
            return error(422, f"cursor is outside the listing window (the last {settings.jobs_list_days} UTC days up"
                              " to now); use next_cursor of the previous page")
    try:
        jobs, position = await store.list_jobs_async(
            tenant, limit=limit, before=before, status=status, days=settings.jobs_list_days,
            max_reads=settings.jobs_list_max_reads, alive=lambda: not client_gone(request),
        )
    except ConnectionResetError:
        log.info("job listing stopped: the client went away")
        return error(400, "the client went away")
    except Exception as exc:
        if cassandra_session.is_outage(exc):
            raise cassandra_outage(request, exc) from exc
        raise
    views = []
    for job in jobs:
        view = job_view(job, None)
        view["links"] = job_links(request, job["job_id"])
        views.append(view)
    body: dict[str, Any] = {"tenant": tenant, "jobs": views, "next_cursor": None}
    if position is not None:
        body["next_cursor"] = encode_cursor(position)
        query = {"limit": str(limit), "cursor": body["next_cursor"], **({"status": status} if status else {})}
        body["links"] = {"next": str(request.rel_url.with_query(query))}
    return json_response(body)


async def delete_job(request: web.Request) -> web.Response:
    """A finished job is removed with its audio, result and segments (200, then 404); an unfinished one is
    cancelled (202): a worker that holds it stops at its next check and it ends ``cancelled``."""
    settings: Settings = request.app[SETTINGS]
    backends: Backends = request.app[BACKENDS]
    job, _ = await load_job(request)
    job_id = job["job_id"]

    def act() -> str:
        store = backends.jobs()
        if job["status"] in TERMINAL:
            retention.delete_job(settings, backends.submitter().session, store, job)
            return "deleted"
        return CANCELLED if store.cancel(job_id) else "finished"

    outcome = await in_store(request, act)
    if outcome == "deleted":
        log.info("job deleted", extra={"job_id": job_id, "trace_id": job["trace_id"]})
        return json_response({"job_id": job_id, "deleted": True})
    if outcome == "finished":
        return error(409, "the job finished meanwhile; DELETE it again to remove it")
    log.info("job cancelled", extra={"job_id": job_id, "trace_id": job["trace_id"]})
    return json_response({"job_id": job_id, "status": CANCELLED, "links": job_links(request, job_id)}, status=202)


_JOB_ID = {"$ref": "#/components/parameters/JobId"}
_ERR = {"$ref": "#/components/responses/Error"}
_JOB = {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}
OPENAPI_PATHS: dict[str, Any] = {
    "/v1/jobs": {
        "post": {
            "tags": ["jobs"], "summary": "Submit audio: a job (202 once Kafka and Cassandra have it)",
            "parameters": [{"name": "X-Trace-Id", "in": "header", "schema": {"type": "string"}}],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["file"], "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "language": {"type": "string", "description": "ISO 639-1; default: detect"},
                    "task": {"type": "string", "enum": ["transcribe", "translate"]},
                    "translate_to": {"type": "string"}, "callback_url": {"type": "string"},
                    "model": {"type": "string"}, "callback_include_transcript": {"type": "boolean"},
                    "word_timestamps": {"type": "boolean", "description": "words with start, end, probability"},
                    "vad_filter": {"type": "boolean", "description": "skip silence (Silero VAD)"},
                    "prompt": {"type": "string", "maxLength": MAX_PROMPT_CHARS,
                               "description": "Whisper's initial prompt: names, spellings, style"},
                    "temperature": {"type": "number", "minimum": 0, "maximum": 1,
                                    "description": "the one decoding temperature; default: 0 with fallback to"
                                                   " hotter ones where a window decodes badly"}}}}}},
            "responses": {"202": {"description": "queued: `{job_id, status, links}`"},
                          "408": _ERR,
                          "413": _ERR, "415": _ERR, "422": _ERR, "429": _ERR, "503": _ERR},
        },
        "get": {
            "tags": ["jobs"], "summary": "The caller's tenant's jobs, newest first (cursor paging)",
            "parameters": [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": LIST_MAX,
                                                             "default": LIST_DEFAULT}},
                {"name": "cursor", "in": "query", "schema": {"type": "string"},
                 "description": "`next_cursor` of the previous page"},
                {"name": "status", "in": "query", "schema": {"type": "string", "enum": list(STATUSES)}},
            ],
            "responses": {"200": {"description": "`{tenant, jobs, next_cursor, links.next}` (`next_cursor` null at"
                                                 " the end)"}, "422": _ERR, "503": _ERR},
        },
    },
    "/v1/jobs/{job_id}": {
        "get": {"tags": ["jobs"], "summary": "A job: status, options, audio; its result when completed",
                "parameters": [_JOB_ID], "responses": {"200": {"description": "the job", "content": _JOB},
                                                         "404": _ERR}},
        "delete": {"tags": ["jobs"], "summary": "Cancel an unfinished job (202) or delete a finished one (200)",
                   "parameters": [_JOB_ID], "responses": {
                       "200": {"description": "deleted with its audio, result and segments; then 404"},
                       "202": {"description": "cancelled: a worker holding it stops at its next check"},
                       "404": _ERR, "409": _ERR, "503": _ERR}},
    },
    "/v1/jobs/{job_id}/transcript": {"get": {
        "tags": ["jobs"], "summary": "The transcript (or its translation) rendered",
        "parameters": [_JOB_ID,
                       {"name": "format", "in": "query", "schema": {"type": "string", "enum": list(formats.FORMATS)}},
                       {"name": "lang", "in": "query", "schema": {"type": "string"},
                        "description": "the source language (default) or the translation's"}],
        "responses": {"200": {"description": "the transcript", "content": {
            "text/plain": {}, "application/x-subrip": {}, "text/vtt": {}, "application/json": {}}},
            "404": _ERR, "409": _ERR, "422": _ERR},
    }},
}
