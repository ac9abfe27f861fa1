"""OpenAI-compatible ``POST /v1/audio/transcriptions`` and ``POST /v1/audio/translations``.

A synchronous answer on top of the durable pipeline: the upload becomes a job
like any ``POST /v1/jobs`` (same checks, quota, tenant), then the request
waits for the job to finish and answers in OpenAI's shapes (``json``,
``text``, ``srt``, ``vtt``, ``verbose_json``). Past ``KAFSCRIBE_OPENAI_WAIT_S``
the answer is ``504`` in OpenAI's error shape with the job's id and links:
the job goes on and can be polled at ``/v1/jobs/{id}``.

Every error of these routes is ``{"error": {"message", "type", "param",
"code"}}`` (``openai_errors`` rewrites the auth middleware's refusals too).
Errors after the job was accepted carry ``x-should-retry: false``: OpenAI's
clients retry 5xx answers, and a retry would submit the audio again.

Model names: ``whisper-1`` is the service's default model
(``KAFSCRIBE_MODEL``); any other name must be one of the allowed models.
``prompt`` (at most 896 characters) becomes the job's Whisper initial prompt and
``temperature`` (0..1) its one decoding temperature (absent: the engine's
fallback schedule, 0.0 then hotter where a window decodes badly); both are
stored with the job's options (``kafscribe.speech.decoding``). verbose_json's
per-segment ``temperature`` is the one the engine decoded that segment with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import web

from kafscribe import formats, metrics
from kafscribe.settings import Settings
from kafscribe.speech.decoding import MAX_PROMPT_CHARS
from kafscribe.statuses import CANCELLED, COMPLETED, FAILED
from kafscribe.store import quotas

from ...submission import SubmissionError, Unavailable, _languages, check_trace_id, parse_options
from ..appkeys import BACKENDS, SETTINGS
from ..backends import Backends
from ..door import SlowBody
from ..links import job_links
from ..responses import outage_reason
from ..upload import read_upload
from .events import stream_openai_segments
from .jobs import refuse_slow, submit

log = logging.getLogger("kafscribe.ingress.openai")

OPENAI_MODEL = "whisper-1"
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
FIELDS = ("model", "language", "prompt", "response_format", "temperature", "timestamp_granularities[]",
          "timestamp_granularities", "stream")
TRANSLATION_FIELDS = ("model", "prompt", "response_format", "temperature")
FALLBACK_S = 2.0  # a waiting request reads the job store at least this often


ERROR_TYPES = {401: "invalid_request_error", 403: "invalid_request_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "timeout_error"}


def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    """An error in OpenAI's shape; ``extra`` keys (job_id, links) go inside ``error``."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code, **extra}}
    return web.Response(text=json.dumps(body), status=status, content_type="application/json", headers=headers)


@web.middleware
async def openai_errors(request: web.Request, handler):
    """On ``/v1/audio/*``, every refusal raised elsewhere (auth, quota, routing) in OpenAI's error shape."""
    if not request.path.startswith("/v1/audio/"):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        try:
            message = json.loads(exc.text or "{}").get("error") or exc.reason
        except (ValueError, AttributeError):
            message = exc.text or exc.reason
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded", 404: "not_found",
                405: "method_not_allowed"}.get(exc.status)
        headers = {k: v for k, v in exc.headers.items() if k in ("Retry-After", "WWW-Authenticate", "Allow")}
        return openai_error(exc.status, str(message), code=code, headers=headers)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def parse_request(fields: dict[str, str], settings: Settings, task: str) -> dict[str, Any]:
    """OpenAI's form fields as our job options plus how to answer; ``BadRequest`` names the bad field."""
    model = (fields.get("model") or "").strip()
    if not model:
        raise BadRequest("you must provide a model parameter", "model", "missing_required_parameter")
    response_format = (fields.get("response_format") or "json").strip()
    if response_format not in RESPONSE_FORMATS:
        raise BadRequest(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}", "response_format")
    raw_grains = fields.get("timestamp_granularities[]") or fields.get("timestamp_granularities") or ""
    grains = [g.strip() for g in raw_grains.split(",") if g.strip()]
    bad = [g for g in grains if g not in GRANULARITIES]
    if bad:
        raise BadRequest(f"timestamp_granularities must be among {', '.join(GRANULARITIES)}; got {bad[0]!r}",
                         "timestamp_granularities")
    if grains and response_format != "verbose_json":
        raise BadRequest("timestamp_granularities needs response_format=verbose_json", "timestamp_granularities")
    stream = (fields.get("stream") or "false").strip().lower()
    if stream not in ("true", "false", "1", "0"):
        raise BadRequest("stream must be true or false", "stream")
    raw = {"task": task, "model": "" if model == OPENAI_MODEL else model, "language": fields.get("language", ""),
           "word_timestamps": "true" if "word" in grains else "false", "prompt": fields.get("prompt", ""),
           "temperature": fields.get("temperature", "")}
    try:
        options = parse_options(raw, settings)
    except SubmissionError as exc:
        param = next((n for n in ("model", "language", "prompt", "temperature")
                      if exc.reason.startswith((f"{n}=", f"{n} "))), None)
        message = exc.reason
        if param == "model":
            message += f" (or {OPENAI_MODEL}, the default model)"
        raise BadRequest(message, param) from exc
    return {"options": options, "format": response_format, "granularities": grains or ["segment"],
            "stream": stream in ("true", "1")}


async def transcriptions(request: web.Request) -> web.StreamResponse:
    """OpenAI's ``audio.transcriptions.create``: speech to text in its language."""
    return await _answer(request, "transcribe", FIELDS)


async def translations(request: web.Request) -> web.StreamResponse:
    """OpenAI's ``audio.translations.create``: speech to English text (Whisper's translate task)."""
    return await _answer(request, "translate", TRANSLATION_FIELDS)


async def _answer(request: web.Request, task: str, allowed: tuple[str, ...]) -> web.StreamResponse:
    settings: Settings = request.app[SETTINGS]
    backends: Backends = request.app[BACKENDS]
    path = None
    try:
        trace_id = check_trace_id(request.headers.get("X-Trace-Id", ""))
        received = await read_upload(request, settings, allowed=allowed,
                                     repeatable=frozenset({"timestamp_granularities[]"}))
        path = received.path
        asked = await asyncio.to_thread(parse_request, received.fields, settings, task)
        path = None  # from here on the submission removes it
        upload = await submit(request, received, asked["options"], trace_id)
    except BadRequest as exc:
        return openai_error(400, exc.message, param=exc.param, code=exc.code)
    except SlowBody as exc:
        return await refuse_slow(request, openai_error(408, exc.reason, param="file", code="timeout"))
    except quotas.LimitExceeded as exc:
        return openai_error(429, exc.reason, code="rate_limit_exceeded",
                            headers={"Retry-After": str(exc.retry_after_s)})
    except SubmissionError as exc:
        status = 413 if exc.status == 413 else 400
        param = "file" if exc.status in (413, 415) or "'file'" in exc.reason else next(
            (n for n in allowed if f"field {n!r}" in exc.reason), None)
        code = {413: "file_too_large", 415: "invalid_file_format"}.get(exc.status, "invalid_request")
        return openai_error(status, exc.reason, param=param, code=code)
    except ConnectionError:
        return openai_error(400, "the client disconnected before the upload was complete")
    except Unavailable as exc:
        log.warning("answering 503: %s", exc)
        return openai_error(503, outage_reason(exc), code="service_unavailable",
                            headers={"Retry-After": str(settings.retry_after_s)})
    finally:
        if path is not None:
            path.unlink(missing_ok=True)
    metrics.UPLOADS.inc()
    metrics.UPLOAD_BYTES.inc(upload.audio_bytes)
    extra = {"job_id": upload.job_id, "trace_id": upload.trace_id}
    log.info("openai-compatible %s of %.1fs of audio", task, upload.audio_duration, extra=extra)
    if asked["stream"]:  # segments as server-sent events while the job runs (OpenAI's streaming shape)
        return await stream_openai_segments(request, upload.job_id)
    links = job_links(request, upload.job_id)
    no_retry = {"x-should-retry": "false", "X-Job-Id": upload.job_id}
    job, result = await _wait(backends, upload.job_id, settings.openai_wait_s)
    if job is None or job["status"] not in (COMPLETED, FAILED, CANCELLED):
        status = job["status"] if job else "unknown"
        return openai_error(
            504, f"job {upload.job_id} is still {status} after {settings.openai_wait_s:g} s"
            f" (KAFSCRIBE_OPENAI_WAIT_S); it goes on: poll {links['self']}", code="job_not_finished",
            headers=no_retry, job_id=upload.job_id, links=links,
        )
    if job["status"] == CANCELLED:
        return openai_error(409, f"job {upload.job_id} was cancelled", code="job_cancelled", headers=no_retry,
                            job_id=upload.job_id, links=links)
    if job["status"] == FAILED or result is None:
        return openai_error(500, f"job {upload.job_id} failed: {job['error']}", code="job_failed",
                            headers=no_retry, job_id=upload.job_id, links=links)
    return render(asked["format"], task, result, asked["granularities"], upload.job_id)


async def _wait(backends: Backends, job_id: str, wait_s: float) -> tuple[dict | None, dict | None]:
    """Until the job ends or ``wait_s`` passes: (job, result or None).

    The job store is read first, then again when the job's outcome appears on ``finished``
    (``producers.completions``: no polling while it runs) or every ``FALLBACK_S`` (a cancel has no event).
    """
    deadline = time.monotonic() + wait_s

    def read():
        jobs = backends.jobs()
        job = jobs.get(job_id)
        return job, (jobs.get_result(job_id) if job and job["status"] == COMPLETED else None)

    job = None
    with backends.completions.watching(job_id) as seen:
        while True:
            try:
                job, result = await asyncio.to_thread(read)
            except Exception as exc:  # noqa: BLE001 - Cassandra hiccup while waiting: the job is safe, keep waiting
                log.warning("reading job %s while waiting: %s", job_id, exc)
                job, result = job, None
            if job is not None and job["status"] in (COMPLETED, FAILED, CANCELLED):
                return job, result
            left = deadline - time.monotonic()
            if left <= 0:
                return job, None
            try:
                await asyncio.wait_for(seen.wait(), min(left, FALLBACK_S))
            except TimeoutError:
                pass
            seen.clear()


def render(fmt: str, task: str, result: dict[str, Any], granularities: list[str], job_id: str) -> web.Response:
    """The finished job in OpenAI's ``response_format``."""
    segments = result["segments"]
    text = (result["text"] or "").strip()
    headers = {"X-Job-Id": job_id}
    if fmt == "text":
        return web.Response(text=text + "\n", content_type="text/plain", charset="utf-8", headers=headers)
    if fmt == "srt":
        return web.Response(text=formats.to_srt(segments), content_type="text/plain", charset="utf-8",
                            headers=headers)
    if fmt == "vtt":
        return web.Response(text=formats.to_vtt(segments), content_type="text/vtt", charset="utf-8",
                            headers=headers)
    usage = {"type": "duration", "seconds": round(result["duration"] or 0.0)}
    if fmt == "json":
        return web.json_response({"text": text, "usage": usage}, headers=headers)
    language = "english" if task == "translate" else _languages().get(result["language"], result["language"])
    body: dict[str, Any] = {"task": task, "language": language, "duration": result["duration"], "text": text}
    if "segment" in granularities:
        body["segments"] = [{
            "id": s["id"], "seek": 0, "start": s["start"], "end": s["end"], "text": s["text"], "tokens": [],
            "temperature": segment_temperature(s), "avg_logprob": s["avg_logprob"], "compression_ratio": 0.0,
            "no_speech_prob": s["no_speech_prob"],
        } for s in segments]
    if "word" in granularities:
        body["words"] = [{"word": w["word"], "start": w["start"], "end": w["end"]}
                         for s in segments for w in s.get("words") or []]
    body["usage"] = usage
    return web.json_response(body, headers=headers)


def segment_temperature(segment: dict[str, Any]) -> float:
    """What the engine decoded ``segment`` with; 0.0 (the first of the fallback schedule) for a segment
    stored before the engines reported it."""
    return segment["temperature"] if segment.get("temperature") is not None else 0.0


def _form(task: str) -> dict[str, Any]:
    props: dict[str, Any] = {
        "file": {"type": "string", "format": "binary"},
        "model": {"type": "string", "example": OPENAI_MODEL,
                  "description": f"`{OPENAI_MODEL}` (the default model) or an allowed model name"},
        "prompt": {"type": "string", "maxLength": MAX_PROMPT_CHARS,
                   "description": "Whisper's initial prompt (names, spellings, style; in the spoken language, or"
                                  " English for translations)"},
        "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS), "default": "json"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1,
                        "description": "the one decoding temperature; default: 0 with fallback to hotter ones"
                                       " where a window decodes badly"},
    }
    if task == "transcribe":
        props["language"] = {"type": "string", "description": "ISO 639-1; default: detect"}
        props["timestamp_granularities[]"] = {"type": "array", "items": {"type": "string",
                                              "enum": list(GRANULARITIES)},
                                              "description": "with verbose_json: `segment` (default), `word`"
                                                             " (the job runs with word_timestamps)"}
        props["stream"] = {"type": "boolean", "default": False}
    return {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "model"], "properties": props}}}}


_OPENAI_ERR = {"$ref": "#/components/responses/OpenAIError"}
_ANSWERS = {"200": {"description": "the text in `response_format`: json `{text}`, verbose_json `{task, language,"
                                   " duration, text, segments, words}`, text, srt, vtt",
                    "content": {"application/json": {}, "text/plain": {}, "text/vtt": {}}},
            **{code: _OPENAI_ERR for code in ("400", "401", "408", "409", "413", "429", "500", "503", "504")}}
OPENAPI_PATHS: dict[str, Any] = {
    "/v1/audio/transcriptions": {"post": {
        "tags": ["openai"], "summary": "OpenAI-compatible transcription (waits for the job, KAFSCRIBE_OPENAI_WAIT_S)",
        "requestBody": _form("transcribe"), "responses": _ANSWERS}},
    "/v1/audio/translations": {"post": {
        "tags": ["openai"], "summary": "OpenAI-compatible translation into English (waits for the job)",
        "requestBody": _form("translate"), "responses": _ANSWERS}},
}
