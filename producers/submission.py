"""Accepting a job: validate, store the audio, write the job row, publish ``Upload``.

One code path for the HTTP ingress and the direct-producer client, so both
give the same guarantees: nothing is acknowledged before the broker has the
event and the job row exists; bad input is refused with a clear reason.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafscribe import audio, blobstore, memory
from kafscribe.callback_guard import CallbackRefused, check_url
from kafscribe.jobstore import FAILED, JobStore
from kafscribe.models import offline
from kafscribe.settings import Settings
from schemas.events import JobOptions, Upload

from . import routing
from .publisher import Publisher, PublishError
from .worker_view import WorkerView

TASKS = ("transcribe", "translate")
OPTION_FIELDS = ("language", "task", "translate_to", "callback_url", "model", "callback_include_transcript")


class SubmissionError(Exception):
    """Refused input; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Unavailable(Exception):
    """Kafka or Cassandra is down: nothing was accepted; try again later (503)."""


def _languages() -> dict[str, str]:
    from whisper.tokenizer import LANGUAGES

    return LANGUAGES


def parse_options(raw: dict[str, str], settings: Settings) -> JobOptions:
    """Validate client options (strings from a form or CLI) into ``JobOptions``; 422 on error."""
    unknown = sorted(set(raw) - set(OPTION_FIELDS))
    if unknown:
        raise SubmissionError(422, f"unknown option(s): {', '.join(unknown)}; allowed: {', '.join(OPTION_FIELDS)}")
    langs = _languages()
    opts = JobOptions()
    for name in ("language", "translate_to"):
        value = (raw.get(name) or "").strip().lower() or None
        if value is not None and value not in langs:
            raise SubmissionError(422, f"{name}={value!r} is not a Whisper language code (e.g. en, es, de)")
        setattr(opts, name, value)
    task = (raw.get("task") or "transcribe").strip().lower()
    if task not in TASKS:
        raise SubmissionError(422, f"task={task!r} must be one of {', '.join(TASKS)}")
    opts.task = task
    model = (raw.get("model") or "").strip() or None
    allowed = {settings.model, *offline.PACKAGED}
    if model is not None and model not in allowed:
        raise SubmissionError(422, f"model={model!r} is not served here; choose one of {', '.join(sorted(allowed))}")
    opts.model = model
    url = (raw.get("callback_url") or "").strip() or None
    if url is not None:
        try:
            check_url(url, settings.callback_allow_networks)
        except CallbackRefused as exc:
            raise SubmissionError(422, str(exc)) from exc
    opts.callback_url = url
    include = (raw.get("callback_include_transcript") or "false").strip().lower()
    opts.callback_include_transcript = include in ("1", "true", "yes")
    return opts


@dataclass
class Submitter:
    settings: Settings
    session: Any  # cassandra Session
    publisher: Publisher
    view: WorkerView | None = None  # live worker statuses, for memory-aware routing

    def __post_init__(self) -> None:
        self.jobs = JobStore(self.session)
        self.blobs = blobstore.open_store(self.settings, self.session)

    def submit(
        self, path: Path, options: JobOptions, *, filename: str = "", tenant: str = "default",
        trace_id: str = "", job_id: str | None = None,
    ) -> Upload:
        """Accept the audio at ``path``; returns the published ``Upload``."""
        size = path.stat().st_size
        if size == 0:
            raise SubmissionError(415, "the file is empty")
        if size > self.settings.max_upload_bytes:
            raise SubmissionError(413, f"file is {size} bytes; the limit is {self.settings.max_upload_bytes}")
        try:
            info = audio.probe(path)
        except audio.AudioTooLong as exc:
            raise SubmissionError(413, str(exc)) from exc
        except audio.AudioError as exc:
            raise SubmissionError(415, str(exc)) from exc
        data = path.read_bytes()
        job_id = job_id or uuid.uuid4().hex
        upload = Upload(
            job_id=job_id, tenant=tenant, trace_id=trace_id or uuid.uuid4().hex,
            blob_ref="", audio_sha256=hashlib.sha256(data).hexdigest(), audio_bytes=len(data),
            audio_duration=info.duration, filename=filename or path.name, options=options,
        )
        try:
            upload.blob_ref = self.blobs.put(job_id, data)
            self.jobs.create(upload)
        except Exception as exc:  # noqa: BLE001 - Cassandra/file errors all mean "not accepted"
            raise Unavailable(f"job store unavailable: {type(exc).__name__}: {exc}") from exc
        try:
            self.publisher.publish(
                self.settings.topic("uploads"), upload.job_id.encode(), upload.encode(),
                partition=self.choose_partition(upload),
            )
        except PublishError as exc:
            try:
                self.jobs.transition(job_id, FAILED, error=f"not queued: {exc}")
            except Exception:  # noqa: BLE001 - best effort; the client gets 503 either way
                pass
            raise Unavailable(str(exc)) from exc
        return upload

    def choose_partition(self, upload: Upload) -> int | None:
        """Partition of the live transcriber with the most headroom; None lets the key hash decide."""
        if self.view is None:
            return None
        need = memory.estimate_job_bytes(upload.audio_duration, upload.options.model or self.settings.model)
        choice = routing.choose_partition(self.view.workers(), need, dict(self.view.reserved))
        if choice is None:
            return None
        partition, worker_id = choice
        self.view.reserve(worker_id, need)
        return partition
