"""The job table: where a job's status is created, moved and read.

Statuses: ``queued -> transcribing -> translating -> completed | failed``, and
``cancelled`` (``cancel``: a client's ``DELETE`` of an unfinished job).
Every write is an upsert keyed by ``job_id`` (segments: and track, index), so
a stage that redoes a job after a crash rewrites the same rows. A finished
job is never moved back to a running status by a late or replayed event.

Tenants: reads can be scoped to a tenant (another tenant's job reads as
missing), and the store keeps the set of each tenant's unfinished jobs
(``tenant_unfinished_jobs``) for the ingress's quota: a job enters it when
it is created (in one logged batch with the job row) and leaves it when it
moves to ``completed`` or ``failed`` (idempotent, so replays are harmless).

Listing, cancelling, deleting and retention (the ``api`` section below):
every job also has a row in ``jobs_by_tenant`` (tenant, UTC day, newest
first) for ``GET /v1/jobs``. A cancel sets ``cancelled_at`` besides the
status: a worker's status write that lands after the cancel (it read the job
before) cannot revive it, because a job with ``cancelled_at`` reads as
``cancelled`` and refuses every other status. When a job ends, its job and
index rows are rewritten with the result TTL (the ``results`` table's
``default_time_to_live``, set from ``KAFSCRIBE_RESULT_TTL_S`` by the schema
bootstrap), so the job expires together with its result, and its audio is
queued for removal (``audio_expiry``, swept by ``kafscribe.store.retention``).

Only ``create`` (and ``adopt``, for a direct producer's Upload that came
without its row) makes a job row: every other write reads the row first and
writes nothing for a job that does not exist, so no event -- late, replayed
or forged -- leaves a row behind for a job nobody created.

Deletion is final: ``delete`` first writes a mark (``deleted_jobs``, kept
``DELETED_MARK_TTL_S``, longer than any topic keeps an event that could redo
the job), then removes every row of the job. A worker checks the mark before
it works on a job and again after its last write for that event
(``kafscribe.store.retention.settle_deleted``); finding it, it removes the job
again and produces nothing. Whichever came first, the mark or the worker's
write, the rows are gone: a write before the mark is removed by the delete, a
write after it is seen by the worker's own check.
"""

from __future__ import annotations

import asyncio
import functools
import json
import types
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from cassandra.query import BatchStatement, BatchType

from kafscribe.statuses import (
    CANCELLED,
    COMPLETED,
    QUEUED,
    STATUSES,
    TERMINAL,
)
from kafscribe.store import cql_async
from schemas.events import JobOptions, Result, Segment, Upload

AUDIO_EXPIRY_SLACK_S = 7 * 86400  # audio_expiry rows outlive the result TTL by this (a stopped sweep catches up)
LIST_SCAN_ROWS = 2000  # index rows one listing call reads at most (a rare status filter returns a short page)


PROGRESS_TTL_S = 7 * 86400  # KAFSCRIBE_PROGRESS_TTL_S's default
DELETED_MARK_TTL_S = 35 * 86400  # a deleted job's mark outlives every topic's retention (7 days; DLQ 30)
# Tables whose rows are all of one job (partition key job_id): a deletion removes them whole.
JOB_TABLES = ("results", "segments", "callback_events", "callback_attempts", "redeliveries", "job_progress",
              "job_chunks")


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
        self._status = p("SELECT status, attempts, tenant, cancelled_at FROM jobs WHERE job_id = ?")
        self._add_unfinished = p("INSERT INTO tenant_unfinished_jobs (tenant, job_id, created_at) VALUES (?,?,?)")
        self._drop_unfinished = p("DELETE FROM tenant_unfinished_jobs WHERE tenant = ? AND job_id = ?")
        self._unfinished = p("SELECT job_id FROM tenant_unfinished_jobs WHERE tenant = ? LIMIT ?")
        self._update = p(
            "UPDATE jobs SET status = ?, updated_at = ?, worker_id = ?, attempts = ?, error = ? WHERE job_id = ?"
        )
        self._get_job = p("SELECT * FROM jobs WHERE job_id = ?")
        self._insert_job_if_absent = p(
            "INSERT INTO jobs (job_id, tenant, status, created_at, updated_at, attempts, trace_id, filename,"
            " options, blob_ref, audio_sha256, audio_bytes, audio_duration) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " IF NOT EXISTS"
        )
        self._set_chunks = p("UPDATE jobs SET chunks = ? WHERE job_id = ?")
        self._insert_result = p(
            "INSERT INTO results (job_id, language, language_probability, duration, text, target_language,"
            " translated_text, engine, model, completed_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
        )
        self._insert_segment = p(
            "INSERT INTO segments (job_id, track, idx, start_s, end_s, text, avg_logprob, no_speech_prob, words,"
            " temperature) VALUES (?,?,?,?,?,?,?,?,?,?)"
        )
        self._get_result = p("SELECT * FROM results WHERE job_id = ?")
        self._get_segments = p("SELECT * FROM segments WHERE job_id = ?")
        self._prepare_api()

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
        batch.add(self._add_listed, (upload.tenant, _day(now), now, upload.job_id))
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
        if row is not None and row.cancelled_at is not None:
            return CANCELLED
        return row.status if row is not None and row.status in TERMINAL else None

    def start_attempt(self, job_id: str, status: str, worker_id: str) -> int:
        """A worker starts (or redoes) a job: count the attempt, return its number (a job without a row:
        nothing is written)."""
        row = self.session.execute(self._status, (job_id,)).one()
        attempts = (row.attempts or 0) + 1 if row is not None else 1
        self._move(job_id, row, status, worker_id, attempts, None)
        return attempts

    def set_chunks(self, job_id: str, count: int) -> None:
        """Record that the job was split into ``count`` chunks (a redone split writes the same; a job
        without a row gets none)."""
        if self.session.execute(self._status, (job_id,)).one() is not None:
            self.session.execute(self._set_chunks, (count, job_id))

    def adopt(self, upload: Upload) -> bool:
        """The job row of a direct producer's valid ``Upload`` that came without one (the row it should
        have written), unless a row exists already; True if it was written. Never for a deleted job."""
        if self.deleted_mark(upload.job_id) is not None:
            return False
        now = _now()
        applied = self.session.execute(self._insert_job_if_absent, (
            upload.job_id, upload.tenant, QUEUED, now, now, 0, upload.trace_id, upload.filename,
            json.dumps(asdict(upload.options)), upload.blob_ref, upload.audio_sha256,
            upload.audio_bytes, upload.audio_duration,
        )).was_applied
        if applied:
            self.session.execute(self._add_unfinished, (upload.tenant, upload.job_id, now))
            self.session.execute(self._add_listed, (upload.tenant, _day(now), now, upload.job_id))
        return applied

    def _move(self, job_id: str, row, status: str, worker_id: str, attempts: int, error: str | None) -> bool:
        """Write ``status`` unless ``row`` (the job as just read) is finished and ``status`` is not."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        if row is None:
            return False  # no such job (never created, or deleted): a status write would create a row
        if row is not None and row.status in TERMINAL and status not in TERMINAL:
            return False
        if row is not None and row.cancelled_at is not None and status != CANCELLED:
            return False  # a cancelled job stays cancelled, whoever writes late
        self.session.execute(self._update, (status, _now(), worker_id, attempts, error, job_id))
        if status in TERMINAL and row is not None and row.tenant is not None:
            self.session.execute(self._drop_unfinished, (row.tenant, job_id))
        if status in TERMINAL and row is not None:
            self._seal(job_id)
        return True

    def save_result(self, result: Result) -> bool:
        """Store a finished job's outcome and mark it completed or failed (idempotent).

        A job that is already finished keeps its result and status: a replay finds
        them written, and a late or forged ``Result`` overwrites nothing (returns False).
        """
        row = self.session.execute(self._status, (result.job_id,)).one()
        if row is None or row.cancelled_at is not None or row.status in TERMINAL:
            return False  # no such job (never created, or deleted), or finished before
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
            (job_id, track, s.id, s.start, s.end, s.text, s.avg_logprob, s.no_speech_prob, words_json(s),
             s.temperature),
        )

    # --- reads -------------------------------------------------------------
    def get(self, job_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The job ``job_id``; with ``tenant``, None unless the job is that tenant's (no existence leak)."""
        row = self.session.execute(self._get_job, (job_id,)).one()
        if row is None or (tenant is not None and row.tenant != tenant):
            return None
        return _job(row)

    def get_result(self, job_id: str) -> dict[str, Any] | None:
        row = self.session.execute(self._get_result, (job_id,)).one()
        if row is None:
            return None
        out = row._asdict()
        tracks: dict[str, list[dict]] = {"source": [], "translation": []}
        for s in self.session.execute(self._get_segments, (job_id,)):
            tracks.setdefault(s.track, []).append(_segment_view(s))
        out["segments"] = tracks["source"]
        out["translated_segments"] = tracks["translation"]
        return out


    # --- progress of running jobs (kafscribe/store/progress.py writes, routes/events.py reads) ----
    @functools.cached_property
    def _progress_cql(self) -> types.SimpleNamespace:
        """Prepared on first use: only the ingress and the transcribers read or write progress."""
        p = self.session.prepare
        return types.SimpleNamespace(
            put=p("INSERT INTO job_progress (job_id, attempt, fraction, updated_at) VALUES (?,?,?,?) USING TTL ?"),
            get=p("SELECT fraction FROM job_progress WHERE job_id = ?"),
            drop=p("DELETE FROM job_progress WHERE job_id = ?"),
            put_live=p(
                "INSERT INTO segments (job_id, track, idx, start_s, end_s, text, avg_logprob, no_speech_prob, words)"
                " VALUES (?,'live',?,?,?,?,?,?,?) USING TTL ?"
            ),
            get_live=p("SELECT * FROM segments WHERE job_id = ? AND track = 'live' AND idx > ?"),
        )

    def record_progress(self, job_id: str, attempt: int, fraction: float, ttl_s: int = PROGRESS_TTL_S):
        """Attempt ``attempt`` of the job has done ``fraction`` (0..1) of its work; returns the write's future.

        Any stage may report (the transcriber per segment, a chunked job per chunk); readers
        see the highest fraction of any attempt, so a redo never shows progress going back.
        """
        fraction = min(max(float(fraction), 0.0), 1.0)
        return self.session.execute_async(self._progress_cql.put, (job_id, attempt, fraction, _now(), ttl_s))

    def record_live_segment(self, job_id: str, segment: Segment, ttl_s: int = PROGRESS_TTL_S):
        """A segment of a running job, for live readers (track ``live``; a redo rewrites the same index)."""
        return self.session.execute_async(self._progress_cql.put_live, (
            job_id, segment.id, segment.start, segment.end, segment.text, segment.avg_logprob,
            segment.no_speech_prob, words_json(segment), ttl_s,
        ))

    def progress(self, job_id: str) -> float | None:
        """The highest fraction any attempt of the job reported (None: none yet)."""
        rows = self.session.execute(self._progress_cql.get, (job_id,))
        return max((r.fraction for r in rows if r.fraction is not None), default=None)

    def live_segments(self, job_id: str, after: int = -1) -> list[dict[str, Any]]:
        """The running job's segments with an index above ``after``, in order."""
        return [_segment_view(s) for s in self.session.execute(self._progress_cql.get_live, (job_id, after))]

    def forget_progress(self, job_id: str) -> None:
        """Remove the job's progress rows (its live segments go with the job's segments)."""
        self.session.execute(self._progress_cql.drop, (job_id,))

    def unfinished_jobs(self, tenant: str, limit: int) -> list[str]:
        """Up to ``limit`` ids of ``tenant``'s queued or running jobs (for the quota).

        At the limit the entries are checked against the job rows, and any whose
        job is finished or gone (a crash between two writes) are dropped, so a
        lost bookkeeping write cannot hold a tenant at its quota for ever.
        """
        ids = [r.job_id for r in self.session.execute(self._unfinished, (tenant, limit))]
        return ids if len(ids) < limit else self._live_unfinished(tenant, ids)

    async def unfinished_jobs_async(self, tenant: str, limit: int) -> list[str]:
        """``unfinished_jobs`` for the ingress: the count is awaited on the loop; only a tenant at its
        limit (rare) has its entries checked against the job rows, in a thread."""
        rows = await cql_async.execute(self.session, self._unfinished, (tenant, limit))
        ids = [r.job_id for r in rows]
        return ids if len(ids) < limit else await asyncio.to_thread(self._live_unfinished, tenant, ids)

    def _live_unfinished(self, tenant: str, ids: list[str]) -> list[str]:
        live = []
        futures = [(job_id, self.session.execute_async(self._status, (job_id,))) for job_id in ids]
        for job_id, fut in futures:
            row = fut.result().one()
            if row is None or row.status in TERMINAL or row.tenant != tenant:
                self.session.execute(self._drop_unfinished, (tenant, job_id))
            else:
                live.append(job_id)
        return live

    # --- api: listing, cancel, delete, retention --------------------------------
    def _prepare_api(self) -> None:
        p = self.session.prepare
        self._add_listed = p("INSERT INTO jobs_by_tenant (tenant, day, created_at, job_id) VALUES (?,?,?,?)")
        self._add_listed_ttl = p(
            "INSERT INTO jobs_by_tenant (tenant, day, created_at, job_id) VALUES (?,?,?,?) USING TTL ?"
        )
        self._drop_listed = p("DELETE FROM jobs_by_tenant WHERE tenant = ? AND day = ? AND created_at = ? AND job_id = ?")
        self._listed = p("SELECT created_at, job_id FROM jobs_by_tenant WHERE tenant = ? AND day = ?")
        self._listed_before = p(
            "SELECT created_at, job_id FROM jobs_by_tenant WHERE tenant = ? AND day = ? AND created_at <= ?"
        )
        self._cancel = p("UPDATE jobs SET status = ?, cancelled_at = ?, updated_at = ?, error = ? WHERE job_id = ?")
        self._expire_audio = p(
            "INSERT INTO audio_expiry (hour, finished_at, job_id, blob_ref) VALUES (?,?,?,?) USING TTL ?"
        )
        self._delete_rows = [p(f"DELETE FROM {table} WHERE job_id = ?") for table in JOB_TABLES]
        self._delete_job = p("DELETE FROM jobs WHERE job_id = ?")
        self._reinsert: tuple[tuple[str, ...], Any] | None = None
        self._ttl: int | None = None

    def result_ttl_s(self) -> int:
        """The result TTL in force: ``results``' default TTL (``KAFSCRIBE_RESULT_TTL_S`` at bootstrap)."""
        if self._ttl is None:
            row = self.session.execute(
                "SELECT default_time_to_live FROM system_schema.tables WHERE keyspace_name = %s"
                " AND table_name = 'results'", (self.session.keyspace,),
            ).one()
            self._ttl = int(row.default_time_to_live or 0) if row is not None else 0
        return self._ttl

    def _seal(self, job_id: str) -> None:
        """A job just ended: its rows get the result TTL, its audio a place in the retention queue."""
        row = self.session.execute(self._get_job, (job_id,)).one()
        if row is None or row.created_at is None:
            return
        ttl = self.result_ttl_s()
        if ttl > 0:
            values = row._asdict()
            if self._reinsert is None or self._reinsert[0] != tuple(values):
                columns = tuple(values)
                self._reinsert = (columns, self.session.prepare(
                    f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) USING TTL ?"
                ))
            self.session.execute(self._reinsert[1], [*values.values(), ttl])
            if row.tenant is not None:
                self.session.execute(self._add_listed_ttl, (row.tenant, _day(row.created_at), row.created_at,
                                                            job_id, ttl))
        if row.blob_ref:  # the sweep removes it by then; the row outlives the job by a week at most
            now = _now()
            keep = ttl + AUDIO_EXPIRY_SLACK_S if ttl > 0 else 0
            self.session.execute(self._expire_audio, (_hour(now), now, job_id, row.blob_ref, keep))

    def cancel(self, job_id: str, reason: str = "cancelled by the client") -> bool:
        """Cancel a queued or running job; False if it had already finished (then nothing changes).

        A worker that holds the job stops at its next ``is_cancelled`` check;
        whatever it writes afterwards is refused (see ``_move``).
        """
        row = self.session.execute(self._status, (job_id,)).one()
        if row is None or row.status in TERMINAL or row.cancelled_at is not None:
            return False
        now = _now()
        self.session.execute(self._cancel, (CANCELLED, now, now, reason, job_id))
        if row.tenant is not None:
            self.session.execute(self._drop_unfinished, (row.tenant, job_id))
        self._seal(job_id)
        return True

    def is_cancelled(self, job_id: str) -> bool:
        """Whether the job was cancelled: what a worker checks before a job and between segments."""
        row = self.session.execute(self._status, (job_id,)).one()
        return row is not None and (row.cancelled_at is not None or row.status == CANCELLED)

    def delete(self, job_id: str) -> None:
        """Delete a job for good: the mark first (so no worker can bring it back), then every row (``purge``).
        The audio is the caller's (``kafscribe.store.retention``)."""
        self.mark_deleted(job_id)
        self.purge(job_id)

    # --- deletion is final: the mark every writer checks (see the module doc) -----------------
    @functools.cached_property
    def _deleted_cql(self) -> types.SimpleNamespace:
        p = self.session.prepare
        return types.SimpleNamespace(
            put=p("INSERT INTO deleted_jobs (job_id, tenant, created_at, blob_ref, chunks, deleted_at)"
                  " VALUES (?,?,?,?,?,?) USING TTL ?"),
            get=p("SELECT job_id, tenant, created_at, blob_ref, chunks FROM deleted_jobs WHERE job_id = ?"),
        )

    def mark_deleted(self, job_id: str) -> None:
        """Record that the job is deleted, with what a later removal needs once its row is gone."""
        row = self.session.execute(self._get_job, (job_id,)).one()
        old = self.deleted_mark(job_id)
        tenant = row.tenant if row is not None else (old.tenant if old is not None else None)
        created = row.created_at if row is not None else (old.created_at if old is not None else None)
        blob_ref = row.blob_ref if row is not None else (old.blob_ref if old is not None else None)
        chunks = max((row.chunks or 0) if row is not None else 0, (old.chunks or 0) if old is not None else 0)
        self.session.execute(self._deleted_cql.put,
                             (job_id, tenant, created, blob_ref, chunks or None, _now(), DELETED_MARK_TTL_S))

    def deleted_mark(self, job_id: str):
        """The job's deletion mark (``tenant``, ``created_at``, ``blob_ref``, ``chunks``), None if not deleted."""
        return self.session.execute(self._deleted_cql.get, (job_id,)).one()

    def is_deleted(self, job_id: str) -> bool:
        return self.deleted_mark(job_id) is not None

    def purge(self, job_id: str) -> None:
        """Remove every row of the job: result, segments, callbacks, progress, chunks, listing and quota
        entries, then the job row (last, so a removal cut short can be repeated). Idempotent."""
        row = self.session.execute(self._get_job, (job_id,)).one()
        mark = self.deleted_mark(job_id)
        for fut in [self.session.execute_async(stmt, (job_id,)) for stmt in self._delete_rows]:
            fut.result()
        for source in (row, mark):
            if source is not None and source.tenant is not None:
                self.session.execute(self._drop_unfinished, (source.tenant, job_id))
                if source.created_at is not None:
                    self.session.execute(self._drop_listed, (source.tenant, _day(source.created_at),
                                                             source.created_at, job_id))
        self.session.execute(self._delete_job, (job_id,))

    def listing_window(self, days: int) -> tuple[datetime, datetime]:
        """The oldest and newest instants a listing reaches: the start of the oldest of ``days`` UTC days
        and now (a cursor outside them names no job of the tenant's listing)."""
        now = _now()
        oldest = datetime.combine(now.date() - timedelta(days=max(days, 1) - 1), datetime.min.time(), UTC)
        return oldest, now

    async def list_jobs_async(
        self, tenant: str, *, limit: int = 20, before: tuple[datetime, str] | None = None,
        status: str | None = None, days: int = 31, max_reads: int = 400,
        alive: Callable[[], bool] = lambda: True,
    ) -> tuple[list[dict[str, Any]], tuple[datetime, str] | None]:
        """``tenant``'s jobs, newest first: up to ``limit`` and the position to continue from (None: the end).

        ``before`` is the (created_at, job_id) of the last job of the previous page. With ``status``, jobs in
        other statuses are skipped. Bounded: awaited on the loop (no thread), at most ``max_reads``
        Cassandra reads (a day partition or a job row each; past it the page ends early with the position
        to continue from), and stopped (``ConnectionResetError``) as soon as ``alive()`` is false (the
        client left). ``before`` later than now starts from now: the walk never leaves the window.
        """
        now = _now()
        oldest = now.date() - timedelta(days=max(days, 1) - 1)
        start = min(before[0], now) if before is not None else now
        day = start.astimezone(UTC).date()
        out: list[dict[str, Any]] = []
        reads = 0
        while day >= oldest:
            last: tuple[datetime, str] | None = None  # the last job scanned on this day
            if reads >= max_reads:
                return out, _day_start_position(day)
            if not alive():
                raise ConnectionResetError("the client went away")
            key = (tenant, day.strftime("%Y%m%d"))
            if before is not None and day == before[0].astimezone(UTC).date():
                rows = await cql_async.execute(self.session, self._listed_before, (*key, before[0]))
            else:
                rows = await cql_async.execute(self.session, self._listed, key)
            reads += 1
            batch = []
            for r in rows:
                created = r.created_at.replace(tzinfo=UTC)
                if before is not None and (created > before[0] or (created == before[0] and r.job_id <= before[1])):
                    continue  # on or above the previous page's last job
                batch.append((created, r.job_id))
            while batch:
                room = min(limit - len(out), max_reads - reads, LIST_SCAN_ROWS)
                if room <= 0:
                    return out, last if last is not None else _day_start_position(day)
                if not alive():
                    raise ConnectionResetError("the client went away")
                chunk, batch = batch[:room], batch[room:]
                found = await asyncio.gather(*(cql_async.execute(self.session, self._get_job, (job_id,))
                                               for _, job_id in chunk))
                for (created, job_id), job_rows in zip(chunk, found, strict=True):
                    reads += 1
                    last = (created, job_id)
                    job = _job(job_rows[0] if job_rows else None)
                    if job is None or job["tenant"] != tenant or (status is not None and job["status"] != status):
                        continue  # gone (deleted, expired) or filtered out
                    out.append(job)
            day -= timedelta(days=1)
        return out, None


def _day_start_position(day) -> tuple[datetime, str]:
    """A position above every job of ``day`` (the next day's first instant, after every job id created
    then): a listing from it reads ``day`` whole."""
    return datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC), "~"


def _job(row) -> dict[str, Any] | None:
    """A job row as a dict: options parsed; a job marked cancelled reads as ``cancelled``."""
    if row is None:
        return None
    job = row._asdict()
    job["options"] = json.loads(job["options"] or "{}")
    if job.get("cancelled_at") is not None:
        job["status"] = CANCELLED
    return job


def _day(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y%m%d") if at.tzinfo else at.strftime("%Y%m%d")


def _hour(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y%m%d%H")


def _segment_view(s) -> dict[str, Any]:
    """A ``segments`` row as the API shows it."""
    return {"id": s.idx, "start": s.start_s, "end": s.end_s, "text": s.text, "avg_logprob": s.avg_logprob,
            "no_speech_prob": s.no_speech_prob, "words": json.loads(s.words) if s.words else [],
            "temperature": getattr(s, "temperature", None)}


def words_json(segment: Segment) -> str | None:
    """A segment's words as the ``segments.words`` column holds them: a JSON list, None when it has none."""
    if not segment.words:
        return None
    return json.dumps([asdict(w) for w in segment.words], separators=(",", ":"))


def options_from_json(raw: dict[str, Any]) -> JobOptions:
    return JobOptions(**{k: v for k, v in raw.items() if k in JobOptions.__dataclass_fields__})
