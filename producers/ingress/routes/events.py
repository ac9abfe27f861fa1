"""Server-sent events of a job: ``GET /v1/jobs/{id}/events``, and the OpenAI-shaped stream.

One poll loop (``job_events``) reads the job from Cassandra every
``KAFSCRIBE_EVENTS_POLL_S`` (in a thread: nothing blocks the event loop) and
yields what changed since the last read: its status, its progress (the
highest fraction any attempt reported, see ``kafscribe.store.progress``) and the
segments decoded since. Every segment is sent once, in order, by id: the live
ones while the job is transcribing, then those of the stored result that were
not sent yet, so a client that connects late or after the end still gets them
all. The stream ends after the job's final status.

What a stream may cost is bounded: an API key may hold
``KAFSCRIBE_EVENTS_MAX_STREAMS_PER_KEY`` streams open on one ingress process
(``429`` beyond), a stream stops polling as soon as its client is gone
(checked before every read, not only when a keep-alive fails to write), and
streams of the same job at the same point share one read per poll
(``SharedPolls``): 200 streams of one job cost one Cassandra read per
``KAFSCRIBE_EVENTS_POLL_S``, not 200.

Two renderings of that loop:

- ``GET /v1/jobs/{id}/events``: ``event: status | progress | segment`` with
  JSON data; ``event: gone`` if the job is deleted meanwhile. Every event
  carries an ``id:``, the ``Cursor`` of what was sent up to it (the last
  segment id, the status, the progress); a client that reconnects with
  ``Last-Event-ID`` (browsers' ``EventSource`` does it by itself) gets only
  what is newer than that: later segments, a changed status, higher progress.
  Reconnecting after the final status answers ``204`` (``EventSource`` stops).
- ``stream_openai_segments``: OpenAI's streaming-transcription shape
  (``data: {"type": "transcript.text.delta", "delta": ...}`` per segment, then
  ``transcript.text.done`` with the full text; a failed or cancelled job ends
  with ``data: {"error": {...}}``, which the ``openai`` package raises as an
  ``APIError``). The OpenAI-compatible route calls it for ``stream=true``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from kafscribe.settings import Settings
from kafscribe.statuses import COMPLETED, QUEUED, STATUSES, TRANSCRIBING, TRANSLATING
from kafscribe.store import session as cassandra_session

from ...submission import Unavailable
from .. import auth
from ..appkeys import BACKENDS, SETTINGS
from ..backends import Backends
from ..door import Busy, client_gone, door
from ..responses import cassandra_outage, error

log = logging.getLogger("kafscribe.ingress")

RUNNING = (QUEUED, TRANSCRIBING, TRANSLATING)  # not finished: a stream of the job goes on


@dataclass(frozen=True)
class Cursor:
    """How far a stream got: the last segment id sent, the last status, the last progress (an event's ``id``)."""

    last_id: int = -1
    status: str | None = None
    fraction: float = -1.0

    def encode(self) -> str:
        return f"{self.last_id}/{self.status or '-'}/{self.fraction:g}"

    @classmethod
    def decode(cls, raw: str) -> Cursor:
        """The cursor of a ``Last-Event-ID``; ``ValueError`` if it is not one this server wrote."""
        parts = raw.strip().split("/")
        if len(parts) != 3:
            raise ValueError("Last-Event-ID is not an id of this stream")
        last_id, status, fraction = int(parts[0]), parts[1], float(parts[2])
        if last_id < -1 or not -1.0 <= fraction <= 1.0 or status not in ("-", *STATUSES):
            raise ValueError("Last-Event-ID is not an id of this stream")
        return cls(last_id, None if status == "-" else status, fraction)


@dataclass
class Snapshot:
    """The job as one poll read it (``job`` None: gone, or never this caller's)."""

    job: dict[str, Any] | None
    fraction: float | None = None
    segments: list[dict[str, Any]] = field(default_factory=list)  # with id > the last one sent
    text: str | None = None  # the final text, once completed


def read_snapshot(backends: Backends, job_id: str, scope: str | None, after: int) -> Snapshot:
    """Blocking read of the job, its progress and its segments with id > ``after`` (run in a thread)."""
    jobs = backends.jobs()
    job = jobs.get(job_id, tenant=scope)
    if job is None:
        return Snapshot(None)
    snap = Snapshot(job, fraction=jobs.progress(job_id))
    if job["status"] == COMPLETED:
        result = jobs.get_result(job_id)
        if result is not None:
            snap.segments = [s for s in result["segments"] if s["id"] > after]
            snap.text = result["text"]
    elif job["status"] != QUEUED:
        snap.segments = jobs.live_segments(job_id, after=after)
    return snap


class SharedPolls:
    """Reads of a job that streams share: one read per (job, scope, position) at a time, and a read that
    finished less than half a poll interval ago is handed to the streams that ask after it."""

    def __init__(self, settings: Settings) -> None:
        self.fresh_s = settings.events_poll_s / 2
        self._reads: dict[tuple[str, str | None, int], tuple[float, asyncio.Future]] = {}

    async def read(self, backends: Backends, job_id: str, scope: str | None, after: int) -> Snapshot:
        key = (job_id, scope, after)
        now = time.monotonic()
        hit = self._reads.get(key)
        if hit is None or (hit[1].done() and now - hit[0] > self.fresh_s):
            task = asyncio.ensure_future(asyncio.to_thread(read_snapshot, backends, job_id, scope, after))
            hit = (now, task)
            self._reads[key] = hit
            task.add_done_callback(lambda _t: self._expire(key, hit))
        return await asyncio.shield(hit[1])  # a stream that goes away does not cancel the others' read

    def _expire(self, key, hit) -> None:
        """Forget a finished read once it is stale (no table of every job ever streamed)."""
        loop = asyncio.get_running_loop()
        loop.call_later(self.fresh_s, lambda: self._reads.get(key) is hit and self._reads.pop(key, None))


POLLS = web.AppKey("event_polls", SharedPolls)


def progress_fraction(job: dict[str, Any], recorded: float | None) -> float:
    """What a client sees: 1 once transcribed, else the highest fraction recorded (0 before any)."""
    if job["status"] in (TRANSLATING, COMPLETED):
        return 1.0
    return round(min(max(recorded or 0.0, 0.0), 1.0), 4)


def status_data(job: dict[str, Any]) -> dict[str, Any]:
    return {"job_id": job["job_id"], "status": job["status"], "attempts": job["attempts"] or 0,
            "error": job["error"], "updated_at": _iso(job["updated_at"])}


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


async def job_events(
    request: web.Request, job_id: str, since: Cursor = Cursor()
) -> AsyncIterator[tuple[str, dict[str, Any], Cursor]]:
    """``(event, data, cursor)`` of the job until it ends: status, progress, segment; ``gone`` if deleted;
    ``poll`` after each read of a running job (renderers skip it; a chance for a keep-alive). ``cursor``
    is what was sent up to this event; with ``since``, only what is newer than it is sent.

    Raises ``web.HTTPNotFound`` before the first event if the caller may not see the job.
    """
    settings: Settings = request.app[SETTINGS]
    backends: Backends = request.app[BACKENDS]
    scope = auth.job_scope(request)
    last_id, status, fraction = since.last_id, since.status, since.fraction
    polls = request.app.get(POLLS)
    first = True
    while True:
        if not first and client_gone(request):
            log.info("events of %s: the client went away; polling stops", job_id)
            return
        try:
            if polls is not None:
                snap = await polls.read(backends, job_id, scope, last_id)
            else:
                snap = await asyncio.to_thread(read_snapshot, backends, job_id, scope, last_id)
        except Exception as exc:
            if not (isinstance(exc, Unavailable) or cassandra_session.is_outage(exc)):
                raise
            if first:
                raise cassandra_outage(request, exc) from exc
            log.warning("events of %s: Cassandra unavailable (%s); retrying", job_id, exc)
            yield "poll", {}, Cursor(last_id, status, fraction)  # keep-alives go on (and a gone client is noticed) during the outage
            await asyncio.sleep(settings.events_poll_s)
            continue
        if snap.job is None:
            if first:
                raise web.HTTPNotFound(text=json.dumps({"error": f"no job {job_id}"}),
                                       content_type="application/json")
            yield "gone", {"job_id": job_id, "status": "deleted"}, Cursor(last_id, status, fraction)
            return
        first = False
        job = snap.job
        if job["status"] != status and job["status"] in RUNNING:
            status = job["status"]
            yield "status", status_data(job), Cursor(last_id, status, fraction)
        now = progress_fraction(job, snap.fraction)
        if now > fraction and (job["status"] != QUEUED or now > 0):
            fraction = now
            yield "progress", {"fraction": now}, Cursor(last_id, status, fraction)
        for segment in snap.segments:
            if segment["id"] > last_id:
                last_id = segment["id"]
                yield "segment", segment_data(segment), Cursor(last_id, status, fraction)
        if job["status"] not in RUNNING:
            if job["status"] != status:  # a client that saw the final status already gets nothing more
                data = status_data(job)
                if snap.text is not None:
                    data["text"] = snap.text
                yield "status", data, Cursor(last_id, job["status"], fraction)
            return
        yield "poll", {}, Cursor(last_id, status, fraction)  # nothing to send: a chance to keep the connection alive
        await asyncio.sleep(settings.events_poll_s)


def segment_data(segment: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "start", "end", "text", "words")
    return {k: segment.get(k, []) if k == "words" else segment[k] for k in keys}


def _sse(event: str | None, data: dict[str, Any], event_id: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    tail = f"id: {event_id}\n" if event_id else ""  # after data: readers that take lines by position keep working
    return f"{head}data: {json.dumps(data, separators=(',', ':'), default=str)}\n{tail}\n".encode()


async def _open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
    })
    await response.prepare(request)
    return response


async def _pump(request: web.Request, job_id: str, render, since: Cursor = Cursor()) -> web.StreamResponse:
    """Send ``render(event, data, cursor)`` of each job event (None: skip), with keep-alive comments between;
    ``204`` when there is nothing newer than ``since`` and the job has ended."""
    settings: Settings = request.app[SETTINGS]
    try:
        with door(request).stream(auth.caller(request).key_id):
            return await _pump_open(request, job_id, render, since, settings)
    except Busy as exc:
        return error(429, exc.reason, **{"Retry-After": "5"})


async def _pump_open(request: web.Request, job_id: str, render, since: Cursor, settings: Settings):
    events = job_events(request, job_id, since)
    response: web.StreamResponse | None = None
    last_write = time.monotonic()
    try:
        async for event, data, cursor in events:
            if response is None:  # the first event: the job exists and is the caller's
                response = await _open_stream(request)
            chunk = render(event, data, cursor)
            if chunk:
                await response.write(chunk)
                last_write = time.monotonic()
            elif time.monotonic() - last_write > settings.events_keepalive_s:
                await response.write(b": keep-alive\n\n")
                last_write = time.monotonic()
    except ConnectionResetError:
        log.info("events of %s: the client went away", job_id)
        if response is None:
            raise
        return response  # nothing more to send to anyone
    finally:
        await events.aclose()
    if response is None:  # a resumed stream of an ended job: nothing newer (EventSource stops on 204)
        return web.Response(status=204)
    if client_gone(request):  # the stream stopped because its client left: nobody to end it for
        return response
    await response.write_eof()
    return response


async def get_job_events(request: web.Request) -> web.StreamResponse:
    """``GET /v1/jobs/{id}/events``; with ``Last-Event-ID``, only what is newer than that event (422 if the
    header is not an id of this stream)."""
    job_id = request.match_info["job_id"]
    since = Cursor()
    if request.headers.get("Last-Event-ID", "").strip():
        try:
            since = Cursor.decode(request.headers["Last-Event-ID"])
        except ValueError as exc:
            return error(422, str(exc))

    def render(event: str, data: dict[str, Any], cursor: Cursor) -> bytes | None:
        return None if event == "poll" else _sse(event, data, cursor.encode())

    return await _pump(request, job_id, render, since)


async def stream_openai_segments(request: web.Request, job_id: str) -> web.StreamResponse:
    """The job's segments as OpenAI streaming-transcription events, ending when the job ends."""
    text: list[str] = []

    def render(event: str, data: dict[str, Any], cursor: Cursor) -> bytes | None:
        if event == "segment":
            text.append(data["text"])
            return _sse(None, {"type": "transcript.text.delta", "delta": data["text"]})
        if event == "status" and data["status"] == COMPLETED:
            final = data.get("text")
            return _sse(None, {"type": "transcript.text.done",
                               "text": final if final is not None else "".join(text).strip()})
        if event == "gone" or (event == "status" and data["status"] not in RUNNING):
            status = data["status"]
            message = f"job {job_id} is {status}" + (f": {data['error']}" if data.get("error") else "")
            return _sse(None, {"error": {"message": message, "type": "server_error", "param": None,
                                         "code": f"job_{status}"}})
        return None

    return await _pump(request, job_id, render)


async def partial_text(request: web.Request, job: dict[str, Any]) -> str:
    """The text of the segments transcribed so far, in order (a split job: its done chunks' prefix)."""
    backends: Backends = request.app[BACKENDS]
    try:
        segments = await asyncio.to_thread(lambda: backends.jobs().live_segments(job["job_id"]))
    except Exception as exc:  # noqa: BLE001 - the view still answers; partial text is best effort
        log.warning("live segments of %s unreadable: %s", job["job_id"], exc)
        return ""
    return "".join(s["text"] for s in segments).strip()


async def progress_view(request: web.Request, job: dict[str, Any]) -> dict[str, float]:
    """``progress`` of the job view: ``{"fraction": ...}`` (see ``progress_fraction``)."""
    backends: Backends = request.app[BACKENDS]
    try:
        recorded = await asyncio.to_thread(lambda: backends.jobs().progress(job["job_id"]))
    except Exception as exc:  # noqa: BLE001 - the view still answers; progress is best effort
        log.warning("progress of %s unreadable: %s", job["job_id"], exc)
        recorded = None
    return {"fraction": progress_fraction(job, recorded)}


_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
_ERR = {"description": "`{error, status}`", "content": {"application/json": {"schema": {"type": "object"}}}}

OPENAPI_PATHS: dict[str, Any] = {
    "/v1/jobs/{job_id}/events": {"get": {
        "tags": ["jobs"],
        "summary": "Server-sent events of a job: status changes, progress, each segment as it is decoded",
        "description": (
            "`text/event-stream`. `event: status` (`{job_id, status, attempts, error, updated_at}`; the last one"
            " is the final status, with `text` when completed), `event: progress` (`{fraction}`, 0..1, never"
            " lower than before, also across redone attempts), `event: segment` (`{id, start, end, text,"
            " words}`, each id once, in order; the stored result's segments complete the live ones), `event:"
            " gone` if the job is deleted meanwhile. The stream ends after the final status. Every event has an"
            " `id`; reconnecting with `Last-Event-ID` sends only what is newer (later segments, a changed status,"
            " higher progress), `204` if the job ended and nothing is newer; without it the job is replayed from"
            " its first segment."
        ),
        "parameters": [_JOB_ID, {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"},
                                 "description": "the `id` of the last event received (resume)"}],
        "responses": {"200": {"description": "the event stream",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                      "204": {"description": "resumed after the final status: nothing newer"},
                      "404": _ERR, "422": _ERR,
                      "429": {**_ERR, "description": "this API key has its limit of open event streams"},
                      "503": _ERR},
    }},
}
