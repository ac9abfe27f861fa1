"""Submitting jobs from Python or the command line.

Two ways in:

- ``submit(path, ...)``: the direct producer. Stores the audio, writes the
  job row and produces the ``Upload`` to Kafka itself -- no HTTP hop, the
  same guarantees as the ingress (``producers.submission``).
- ``HttpClient``: talks to the ingress (``kafscribe submit`` uses it).

``wait_for`` follows a job until it is completed or failed.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kafscribe.settings import Settings
from kafscribe.statuses import TERMINAL


def submit(
    path: str | Path, *, language: str | None = None, task: str = "transcribe",
    translate_to: str | None = None, callback_url: str | None = None, model: str | None = None,
    tenant: str = "default", settings: Settings | None = None, word_timestamps: bool = False,
    vad_filter: bool = False, prompt: str | None = None, temperature: float | None = None,
) -> str:
    """Submit ``path`` straight to Kafka; returns the job id once the broker has the event.

    Options are checked as at the door (``SubmissionError`` with the reason): ``prompt`` is Whisper's
    initial prompt (at most ``kafscribe.speech.decoding.MAX_PROMPT_CHARS``), ``temperature`` 0..1 (None: the
    engine's fallback schedule).
    """
    from kafscribe.store import session as cassandra_session

    from .publisher import Publisher
    from .submission import Submitter, parse_options

    settings = settings or Settings.from_env()
    raw = {"language": language, "task": task, "translate_to": translate_to,
           "callback_url": callback_url, "model": model,
           "word_timestamps": str(word_timestamps).lower(), "vad_filter": str(vad_filter).lower(),
           "prompt": prompt, "temperature": None if temperature is None else repr(float(temperature))}
    options = parse_options({k: v for k, v in raw.items() if v is not None}, settings)
    session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
    publisher = Publisher(settings)
    try:
        upload = Submitter(settings, session, publisher).submit(Path(path), options, tenant=tenant)
    finally:
        publisher.close()
        session.cluster.shutdown()
    return upload.job_id


def wait_for(get_job: Callable[[], dict[str, Any] | None], timeout_s: float = 600.0,
             on_change: Callable[[dict[str, Any]], None] | None = None, interval_s: float = 0.5) -> dict[str, Any]:
    """Poll ``get_job`` until the job is completed or failed; returns the final view."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        job = get_job()
        if job is not None:
            if on_change and job.get("status") != last:
                on_change(job)
            last = job.get("status")
            if last in TERMINAL:
                return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job still {last} after {timeout_s:.0f}s")
        time.sleep(interval_s)


def direct_job_reader(settings: Settings) -> Callable[[str], dict[str, Any] | None]:
    from kafscribe.store import session as cassandra_session
    from kafscribe.store.jobs import JobStore

    session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
    return JobStore(session).get


class HttpError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class HttpClient:
    """A minimal client of the ingress API (stdlib only); sends ``api_key`` as a Bearer token."""

    def __init__(self, base_url: str, timeout_s: float = 120.0, api_key: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.api_key = api_key

    def _request(self, method: str, path: str, body: bytes | Iterable[bytes] | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
        headers = dict(headers or {})
        if self.api_key:
            headers.setdefault("Authorization", f"Bearer {self.api_key}")
        req = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    def submit(self, path: str | Path, **options: str) -> dict[str, Any]:
        """POST the file as multipart, streamed from disk (never read whole)."""
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in options.items():
            if value is not None:
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        path = Path(path)
        filename = path.name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")  # as browsers do
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode(errors="surrogateescape")
        )
        head, tail = b"".join(parts), f"\r\n--{boundary}--\r\n".encode()

        def body():
            yield head
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk
            yield tail

        status, answer, _ = self._request("POST", "/v1/jobs", body(), {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head) + path.stat().st_size + len(tail)),
        })
        if status != 202:
            raise HttpError(status, answer.decode(errors="replace"))
        return json.loads(answer)

    def job(self, job_id: str) -> dict[str, Any] | None:
        status, body, _ = self._request("GET", f"/v1/jobs/{job_id}")
        if status == 404:
            return None
        if status != 200:
            raise HttpError(status, body.decode(errors="replace"))
        return json.loads(body)

    def transcript(self, job_id: str, fmt: str = "txt", lang: str | None = None) -> str:
        query = f"?format={fmt}" + (f"&lang={lang}" if lang else "")
        status, body, _ = self._request("GET", f"/v1/jobs/{job_id}/transcript{query}")
        if status != 200:
            raise HttpError(status, body.decode(errors="replace"))
        return body.decode()

    def jobs(self, limit: int = 20, cursor: str | None = None, status: str | None = None) -> dict[str, Any]:
        """One page of the caller's tenant's jobs, newest first: ``{"jobs", "next_cursor", ...}``."""
        query = urllib.parse.urlencode({k: v for k, v in
                                        {"limit": limit, "cursor": cursor, "status": status}.items() if v})
        status_code, body, _ = self._request("GET", f"/v1/jobs?{query}")
        if status_code != 200:
            raise HttpError(status_code, body.decode(errors="replace"))
        return json.loads(body)

    def delete(self, job_id: str) -> dict[str, Any] | None:
        """Cancel an unfinished job or delete a finished one (the answer's body); None if there is no such job."""
        status, body, _ = self._request("DELETE", f"/v1/jobs/{job_id}")
        if status == 404:
            return None
        if status not in (200, 202):
            raise HttpError(status, body.decode(errors="replace"))
        return json.loads(body)
