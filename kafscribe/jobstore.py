"""The job table: where a job's status is created, moved and read.

Statuses: ``queued -> transcribing -> translating -> completed | failed``.
Every write is an upsert keyed by ``job_id`` (segments: and track, index), so
a stage that redoes a job after a crash rewrites the same rows. A finished
job is never moved back to a running status by a late or replayed event.

Tenants: reads can be scoped to a tenant (another tenant's job reads as
missing), and the store keeps the set of each tenant's unfinished jobs
(``tenant_unfinished_jobs``) for the ingress's quota: a job enters it when
it is created (in one logged batch with the job row) and leaves it when it
moves to ``completed`` or ``failed`` (idempotent, so replays are harmless).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from cassandra.query import BatchStatement, BatchType

from schemas.events import JobOptions, Result, Segment, Upload

from . import cql_async

QUEUED, TRANSCRIBING, TRANSLATING, COMPLETED, FAILED = (
    "queued", "transcribing", "translating", "completed", "failed",
)
TERMINAL = frozenset({COMPLETED, FAILED})
STATUSES = (QUEUED, TRANSCRIBING, TRANSLATING, COMPLETED, FAILED)


def _now() -> datetime:
    return datetime.now(UTC)


class JobStore:
    def __init__(self, session) -> None:
        self.session = session
        p = session.prepare
        self._insert_job = p(
            "INSERT INTO jobs (job_id, tenant, status, created_at, updated_at, attempts, trace_id, filename,"
            " options, blob_ref, audio_sha256, audio_bytes, audio_duration) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
        )
        self._status = p("SELECT status, attempts, tenant FROM jobs WHERE job_id = ?")
        self._add_unfinished = p("INSERT INTO tenant_unfinished_jobs (tenant, job_id, created_at) VALUES (?,?,?)")
        self._drop_unfinished = p("DELETE FROM tenant_unfinished_jobs WHERE tenant = ? AND job_id = ?")
        self._unfinished = p("SELECT job_id FROM tenant_unfinished_jobs WHERE tenant = ? LIMIT ?")
        self._update = p(
            "UPDATE jobs SET status = ?, updated_at = ?, worker_id = ?, attempts = ?, error = ? WHERE job_id = ?"
        )
        self._get_job = p("SELECT * FROM jobs WHERE job_id = ?")
        self._insert_result = p(
            "INSERT INTO results (job_id, language, language_probability, duration, text, target_language,"
            " translated_text, engine, model, completed_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
        )
        self._insert_segment = p(
            "INSERT INTO segments (job_id, track, idx, start_s, end_s, text, avg_logprob, no_speech_prob)"
            " VALUES (?,?,?,?,?,?,?,?)"
        )
        self._get_result = p("SELECT * FROM results WHERE job_id = ?")
        self._get_segments = p("SELECT * FROM segments WHERE job_id = ?")

    # --- writes ------------------------------------------------------------
    def create(self, upload: Upload) -> None:
        """The job row of a new upload, ``queued``, and its place among the tenant's unfinished jobs."""
        self.session.execute(self._create_batch(upload))

    async def create_async(self, upload: Upload) -> None:
        """``create`` for a coroutine (the ingress): awaited on the loop, no thread."""
        await cql_async.execute(self.session, self._create_batch(upload))

    def _create_batch(self, upload: Upload) -> BatchStatement:
        now = _now()
        batch = BatchStatement(batch_type=BatchType.LOGGED)  # both rows or neither: no quota slot leaks
        batch.add(
            self._insert_job,
            (
                upload.job_id, upload.tenant, QUEUED, now, now, 0, upload.trace_id, upload.filename,
                json.dumps(asdict(upload.options)), upload.blob_ref, upload.audio_sha256,
                upload.audio_bytes, upload.audio_duration,
            ),
        )
        batch.add(self._add_unfinished, (upload.tenant, upload.job_id, now))
        return batch

    def transition(
        self, job_id: str, status: str, *, worker_id: str = "", attempts: int = 0, error: str | None = None
    ) -> bool:
        """Move a job to ``status``; refuses to move a finished job back to a running status."""
        row = self.session.execute(self._status, (job_id,)).one()
        return self._move(job_id, row, status, worker_id, attempts, error)

    def finished_status(self, job_id: str) -> str | None:
        """The job's status if it is finished (completed or failed), else None."""
        row = self.session.execute(self._status, (job_id,)).one()
        return row.status if row is not None and row.status in TERMINAL else None

    def start_attempt(self, job_id: str, status: str, worker_id: str) -> int:
        """A worker starts (or redoes) a job: count the attempt, return its number."""
        row = self.session.execute(self._status, (job_id,)).one()
        attempts = (row.attempts or 0) + 1 if row is not None else 1
        self._move(job_id, row, status, worker_id, attempts, None)
        return attempts

    def _move(self, job_id: str, row, status: str, worker_id: str, attempts: int, error: str | None) -> bool:
        """Write ``status`` unless ``row`` (the job as just read) is finished and ``status`` is not."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        if row is not None and row.status in TERMINAL and status not in TERMINAL:
            return False
        self.session.execute(self._update, (status, _now(), worker_id, attempts, error, job_id))
        if status in TERMINAL and row is not None and row.tenant is not None:
            self.session.execute(self._drop_unfinished, (row.tenant, job_id))
        return True

    def save_result(self, result: Result) -> bool:
        """Store a finished job's outcome and mark it completed or failed (idempotent).

        A job that is already finished keeps its result and status: a replay finds
        them written, and a late or forged ``Result`` overwrites nothing (returns False).
        """
        if self.finished_status(result.job_id) is not None:
            return False
        translation = result.translation
        if result.status == COMPLETED:
            self.session.execute(
                self._insert_result,
                (
                    result.job_id, result.language, result.language_probability, result.duration,
                    result.text, translation.target_language if translation else None,
                    translation.text if translation else None, result.engine, result.model, _now(),
                ),
            )
            futures = [self._segment_async(result.job_id, "source", s) for s in result.segments]
            if translation:
                futures += [self._segment_async(result.job_id, "translation", s) for s in translation.segments]
            for fut in futures:
                fut.result()
        self.transition(
            result.job_id, result.status, worker_id=result.worker_id, attempts=result.attempt, error=result.error
        )
        return True

    def _segment_async(self, job_id: str, track: str, s: Segment):
        return self.session.execute_async(
            self._insert_segment,
            (job_id, track, s.id, s.start, s.end, s.text, s.avg_logprob, s.no_speech_prob),
        )

    # --- reads -------------------------------------------------------------
    def get(self, job_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The job ``job_id``; with ``tenant``, None unless the job is that tenant's (no existence leak)."""
        row = self.session.execute(self._get_job, (job_id,)).one()
        if row is None or (tenant is not None and row.tenant != tenant):
            return None
        job = row._asdict()
        job["options"] = json.loads(job["options"] or "{}")
        return job

    def get_result(self, job_id: str) -> dict[str, Any] | None:
        row = self.session.execute(self._get_result, (job_id,)).one()
        if row is None:
            return None
        out = row._asdict()
        tracks: dict[str, list[dict]] = {"source": [], "translation": []}
        for s in self.session.execute(self._get_segments, (job_id,)):
            tracks.setdefault(s.track, []).append(
                {"id": s.idx, "start": s.start_s, "end": s.end_s, "text": s.text,
                 "avg_logprob": s.avg_logprob, "no_speech_prob": s.no_speech_prob}
            )
        out["segments"] = tracks["source"]
        out["translated_segments"] = tracks["translation"]
        return out


    def unfinished_jobs(self, tenant: str, limit: int) -> list[str]:
        """Up to ``limit`` ids of ``tenant``'s queued or running jobs (for the quota).

        At the limit the entries are checked against the job rows, and any whose
        job is finished or gone (a crash between two writes) are dropped, so a
        lost bookkeeping write cannot hold a tenant at its quota for ever.
        """
        ids = [r.job_id for r in self.session.execute(self._unfinished, (tenant, limit))]
        if len(ids) < limit:
            return ids
        live = []
        futures = [(job_id, self.session.execute_async(self._status, (job_id,))) for job_id in ids]
        for job_id, fut in futures:
            row = fut.result().one()
            if row is None or row.status in TERMINAL or row.tenant != tenant:
                self.session.execute(self._drop_unfinished, (tenant, job_id))
            else:
                live.append(job_id)
        return live


def options_from_json(raw: dict[str, Any]) -> JobOptions:
    return JobOptions(**{k: v for k, v in raw.items() if k in JobOptions.__dataclass_fields__})
