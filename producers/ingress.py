"""The HTTP ingress (aiohttp): accept uploads, answer job queries, expose health and metrics.

``POST /v1/jobs`` answers ``202`` only after the ``Upload`` event was
acknowledged by Kafka and the job row written; ``503`` with ``Retry-After``
when Kafka or Cassandra is down. Blocking calls (ffprobe, Cassandra, the
broker ack) run in threads so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kafscribe import cassandra_session, formats, logs, metrics
from kafscribe.callbackstore import CallbackStore
from kafscribe.jobstore import COMPLETED, JobStore
from kafscribe.kafka_clients import kafka_reachable
from kafscribe.settings import Settings
from schemas.events import CallbackAttempt, now_ms

from .publisher import Publisher, PublishError
from .submission import SubmissionError, Submitter, Unavailable, parse_options
from .worker_view import WorkerView

log = logging.getLogger("kafscribe.ingress")


class Backends:
    """Lazily (re)connected Cassandra session + the Kafka publisher."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.publisher = Publisher(settings)
        self.view = WorkerView(settings)
        self._session = None
        self._submitter: Submitter | None = None
        self._callbacks: CallbackStore | None = None
        self._lock = threading.Lock()
        self._next_try = 0.0

    def submitter(self) -> Submitter:
        with self._lock:
            if self._submitter is None:
                if time.monotonic() < self._next_try:
                    raise Unavailable("Cassandra unavailable (reconnecting)")
                try:
                    self._session = cassandra_session.connect(
                        self.settings, keyspace=self.settings.cassandra_keyspace, timeout_s=5
                    )
                except Exception as exc:  # noqa: BLE001
                    self._next_try = time.monotonic() + 2
                    raise Unavailable(f"Cassandra unavailable: {exc}") from exc
                self._submitter = Submitter(self.settings, self._session, self.publisher, self.view)
            return self._submitter

    def jobs(self) -> JobStore:
        return self.submitter().jobs

    def callbacks(self) -> CallbackStore:
        submitter = self.submitter()  # connects to Cassandra if needed
        with self._lock:
            if self._callbacks is None:  # statements are prepared once, not per request
                self._callbacks = CallbackStore(submitter.session)
            return self._callbacks

    def close(self) -> None:
        self.view.close()
        self.publisher.close()
        if self._session is not None:
            self._session.cluster.shutdown()


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(data, default=_default), status=status, content_type="application/json", headers=headers
    )


def _default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _error(status: int, reason: str, **headers: str) -> web.Response:
    return _json({"error": reason, "status": status}, status=status, headers=headers or None)


def _unavailable(settings: Settings, reason: str) -> web.Response:
    return _error(503, reason, **{"Retry-After": str(settings.retry_after_s)})


def _links(request: web.Request, job_id: str) -> dict[str, str]:
    settings: Settings = request.app["settings"]
    base = settings.public_url.rstrip("/") or f"{request.scheme}://{request.host}"
    return {
        "self": f"{base}/v1/jobs/{job_id}",
        "transcript": f"{base}/v1/jobs/{job_id}/transcript",
    }


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


async def _read_upload(request: web.Request, settings: Settings) -> tuple[Path, str, dict[str, str]]:
    """Stream the multipart body: the ``file`` part to a temp file (size-limited), the rest as options."""
    if not request.content_type.startswith("multipart/"):
        raise SubmissionError(422, "send multipart/form-data with a 'file' part")
    reader = await request.multipart()
    fields: dict[str, str] = {}
    path: Path | None = None
    filename = ""
    try:
        while (part := await reader.next()) is not None:
            if part.name == "file":
                filename = part.filename or "upload"
                fd, tmp = tempfile.mkstemp(prefix="kafscribe-upload-")
                path = Path(tmp)
                size = 0
                with open(fd, "wb") as out:
                    while chunk := await part.read_chunk(1 << 20):
                        size += len(chunk)
                        if size > settings.max_upload_bytes:
                            raise SubmissionError(413, f"file exceeds the limit of {settings.max_upload_bytes} bytes")
                        out.write(chunk)
            else:
                fields[part.name or ""] = (await part.text()).strip()
    except SubmissionError:
        if path:
            path.unlink(missing_ok=True)
        raise
    if path is None:
        raise SubmissionError(422, "missing the 'file' part")
    return path, filename, fields


async def create_job(request: web.Request) -> web.Response:
    settings: Settings = request.app["settings"]
    backends: Backends = request.app["backends"]
    path = None
    try:
        path, filename, fields = await _read_upload(request, settings)
        options = parse_options(fields, settings)
        trace_id = request.headers.get("X-Trace-Id", "")
        tenant = request.headers.get("X-Tenant", "default")
        upload = await asyncio.to_thread(
            lambda: backends.submitter().submit(path, options, filename=filename, tenant=tenant, trace_id=trace_id)
        )
    except SubmissionError as exc:
        return _error(exc.status, exc.reason)
    except Unavailable as exc:
        log.warning("refusing upload: %s", exc)
        return _unavailable(settings, str(exc))
    finally:
        if path is not None:
            path.unlink(missing_ok=True)
    metrics.UPLOADS.inc()
    metrics.UPLOAD_BYTES.inc(upload.audio_bytes)
    log.info("accepted %.1fs of audio", upload.audio_duration, extra={"job_id": upload.job_id, "trace_id": upload.trace_id})
    return _json(
        {"job_id": upload.job_id, "status": "queued", "links": _links(request, upload.job_id)},
        status=202,
        headers={"Location": f"/v1/jobs/{upload.job_id}"},
    )


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
        "options": job["options"],
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


async def _load_job(request: web.Request) -> tuple[dict, dict | None]:
    backends: Backends = request.app["backends"]
    job_id = request.match_info["job_id"]

    def load():
        jobs = backends.jobs()
        try:
            job = jobs.get(job_id)
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
    job, result = await _load_job(request)
    view = job_view(job, result)
    view["links"] = _links(request, job["job_id"])
    return _json(view)


async def get_transcript(request: web.Request) -> web.Response:
    fmt = request.query.get("format", "json")
    if fmt not in formats.FORMATS:
        return _error(422, f"format must be one of {', '.join(formats.FORMATS)}")
    job, result = await _load_job(request)
    if job["status"] != COMPLETED or result is None:
        return _error(409, f"job is {job['status']}; the transcript exists once it is completed")
    lang = request.query.get("lang") or result["language"]
    if lang == result["language"]:
        segments, text = result["segments"], result["text"]
    elif lang == result["target_language"]:
        segments, text = result["translated_segments"], result["translated_text"]
    else:
        have = [x for x in (result["language"], result["target_language"]) if x]
        return _error(404, f"no transcript in {lang!r}; available: {', '.join(have)}")
    body, content_type = formats.render(fmt, segments, {"job_id": job["job_id"], "language": lang, "text": text})
    return web.Response(text=body, content_type=content_type.split(";")[0], charset="utf-8")


async def get_callbacks(request: web.Request) -> web.Response:
    """Every delivery attempt of the job's callback event."""
    backends: Backends = request.app["backends"]
    job, _ = await _load_job(request)

    def load():
        store = backends.callbacks()
        return store.get_event(job["job_id"]), store.attempts(job["job_id"])

    event, attempts = await asyncio.to_thread(load)
    return _json({
        "job_id": job["job_id"],
        "callback_url": job["options"].get("callback_url"),
        "event": None if event is None else {k: event[k] for k in ("event_id", "event_type", "url", "created_at")},
        "attempts": [
            {k: a[k] for k in ("attempt", "attempted_at", "status_code", "latency_ms", "error", "outcome")}
            for a in attempts
        ],
    })


async def redeliver_callback(request: web.Request) -> web.Response:
    """Send the job's callback event again, now (one attempt; the usual schedule while attempts remain)."""
    settings: Settings = request.app["settings"]
    backends: Backends = request.app["backends"]
    job, _ = await _load_job(request)

    def send():
        store = backends.callbacks()
        event = store.get_event(job["job_id"])
        if event is None:
            return None
        attempts = store.attempts(job["job_id"])
        attempt = CallbackAttempt(
            job_id=job["job_id"], tenant=event["tenant"], trace_id=job["trace_id"] or "",
            event_id=event["event_id"], url=event["url"], event_type=event["event_type"], body=event["body"],
            delivery_attempt=max((a["attempt"] for a in attempts), default=0) + 1, not_before=now_ms(),
        )
        backends.publisher.publish(settings.topic("callbacks.retry"), attempt.job_id.encode(), attempt.encode())
        return attempt

    try:
        attempt = await asyncio.to_thread(send)
    except PublishError as exc:
        return _unavailable(settings, str(exc))
    if attempt is None:
        return _error(409, "this job has no callback event (no callback_url, or not finished yet)")
    return _json({"job_id": attempt.job_id, "event_id": attempt.event_id,
                  "delivery_attempt": attempt.delivery_attempt}, status=202)


async def list_workers(request: web.Request) -> web.Response:
    """Every worker seen on the status topic: live, stale (no status for worker_stale_s) or stopped."""
    backends: Backends = request.app["backends"]
    workers = []
    for w in sorted(backends.view.workers(), key=lambda w: (w.status.stage, w.status.worker_id)):
        s = w.status
        workers.append({
            "worker_id": s.worker_id, "stage": s.stage, "state": w.liveness, "activity": s.state,
            "host": s.host, "pid": s.pid, "last_seen": s.produced_at, "model": s.model,
            "in_flight": s.in_flight, "partitions": s.partitions,
            "memory": {"rss": s.rss_bytes, "host_available": s.host_mem_available, "host_total": s.host_mem_total,
                       "gpu_free": s.gpu_mem_free, "gpu_total": s.gpu_mem_total, "budget": s.memory_budget,
                       "headroom": w.headroom},
        })
    return _json({"stale_after_s": request.app["settings"].worker_stale_s, "workers": workers})


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    settings: Settings = request.app["settings"]
    backends: Backends = request.app["backends"]

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
        return _json({"status": "ready", **checks})
    return _json({"status": "unavailable", **checks}, status=503, headers={"Retry-After": str(settings.retry_after_s)})


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[count_requests], client_max_size=settings.max_upload_bytes + (1 << 20))
    app["settings"] = settings
    app["backends"] = Backends(settings)
    app.router.add_post("/v1/jobs", create_job)
    app.router.add_get("/v1/jobs/{job_id}", get_job)
    app.router.add_get("/v1/jobs/{job_id}/transcript", get_transcript)
    app.router.add_get("/v1/jobs/{job_id}/callbacks", get_callbacks)
    app.router.add_post("/v1/jobs/{job_id}/callbacks/redeliver", redeliver_callback)
    app.router.add_get("/v1/workers", list_workers)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)

    async def close(app: web.Application) -> None:
        await asyncio.to_thread(app["backends"].close)

    app.on_cleanup.append(close)
    return app


def serve(settings: Settings) -> int:
    logs.setup(settings.log_level)
    log.info("ingress listening on %s:%s", settings.http_host, settings.http_port)
    web.run_app(build_app(settings), host=settings.http_host, port=settings.http_port, print=None)
    return 0
