"""What is kept and for how long: removing a job (``DELETE /v1/jobs/{id}``) and the audio retention sweep.

- A finished job's audio is removed ``KAFSCRIBE_AUDIO_RETENTION_S`` after the
  job ended (0: kept as long as the job): the job store queues every ended
  job's audio in ``audio_expiry`` by hour; ``sweep_audio`` removes what is due.
  The ingress runs it every ``KAFSCRIBE_RETENTION_SWEEP_S``; several ingresses
  may run it at once (deletes are idempotent). An ingress's first sweep looks
  back a week past the retention (``AUDIO_EXPIRY_SLACK_S``), later ones only
  from where the previous one ended.
- The job, its result and its segments expire ``KAFSCRIBE_RESULT_TTL_S`` after
  it ended (Cassandra TTLs, see ``kafscribe.store.jobs``); audio never outlives
  its job: the sweep removes it by then at the latest.
- A deleted job stays deleted: ``delete_job`` marks it before removing its
  audio, its chunks' audio and its rows; ``settle_deleted`` is what every stage
  calls before working on a job's event and after its last write for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from kafscribe.settings import Settings
from kafscribe.store import blobs as blobstore
from kafscribe.store.chunks import chunk_blob_id
from kafscribe.store.jobs import AUDIO_EXPIRY_SLACK_S, JobStore

log = logging.getLogger("kafscribe.store.retention")


def remove_audio(settings: Settings, session, blob_ref: str) -> None:
    """Delete the blob ``blob_ref`` (``cassandra:<id>`` or ``file:<id>``) from the store its scheme names."""
    scheme, _, blob_id = blob_ref.partition(":")
    blobstore.open_store(settings, session, scheme=scheme).delete(blob_id)


MAX_CHUNK_BLOBS = 100_000  # kafscribe.validation.MAX_CHUNKS: no recording has more chunks


def delete_job(settings: Settings, session, jobs: JobStore, job: dict[str, Any]) -> None:
    """Remove a finished job for good: the deletion mark first (nothing can bring it back after), then its
    audio, its chunks' audio and its rows (``JobStore.delete``)."""
    jobs.mark_deleted(job["job_id"])
    if job.get("blob_ref"):
        try:
            remove_audio(settings, session, job["blob_ref"])
        except blobstore.BlobError as exc:  # a ref no store can name: nothing of ours to remove
            log.warning("audio of job %s not removed: %s", job["job_id"], exc)
    remove_chunk_audio(settings, session, job["job_id"], range(job.get("chunks") or 0))
    jobs.purge(job["job_id"])


def remove_chunk_audio(settings: Settings, session, job_id: str, indexes: Iterable[int]) -> None:
    """Delete the audio of the job's chunks ``indexes``: only ids derived from the job's own id."""
    store = blobstore.open_store(settings, session)
    for index in indexes:
        if 0 <= index < MAX_CHUNK_BLOBS:
            store.delete(chunk_blob_id(job_id, index))


def settle_deleted(settings: Settings, session, jobs: JobStore, job_id: str, chunks: Iterable[int] = ()) -> bool:
    """Whether ``job_id`` was deleted; if so its rows (and the audio of its chunks: those its mark
    records, and ``chunks``, the ones the caller wrote) are removed again, since the caller may just
    have written some. Called by every stage before it works on an event and after its last write."""
    mark = jobs.deleted_mark(job_id)
    if mark is None:
        return False
    remove_chunk_audio(settings, session, job_id, sorted(set(range(mark.chunks or 0)) | set(chunks)))
    jobs.purge(job_id)
    log.info("job %s was deleted: its rows are removed again", job_id)
    return True


class AudioSweeper:
    """Removes the audio of jobs that ended longer ago than the retention; remembers how far it got."""

    def __init__(self, settings: Settings, session) -> None:
        self.settings = settings
        self.session = session
        self.jobs = JobStore(session)
        self._select = session.prepare(
            "SELECT finished_at, job_id, blob_ref FROM audio_expiry WHERE hour = ? AND finished_at <= ?"
        )
        self._drop = session.prepare("DELETE FROM audio_expiry WHERE hour = ? AND finished_at = ? AND job_id = ?")
        self._done_until: datetime | None = None  # every hour before this one is swept
        self._lock = threading.Lock()

    def retention_s(self) -> float | None:
        """Seconds after a job's end that its audio is removed (None: never)."""
        limits = [s for s in (self.settings.audio_retention_s, self.jobs.result_ttl_s()) if s > 0]
        return float(min(limits)) if limits else None

    def sweep(self, now: datetime | None = None) -> int:
        """Remove every audio blob that is due; returns how many."""
        with self._lock:
            retention = self.retention_s()
            if retention is None:
                return 0
            now = now or datetime.now(UTC)
            cutoff = now - timedelta(seconds=retention)
            hour = _floor_hour(self._done_until or (cutoff - timedelta(seconds=AUDIO_EXPIRY_SLACK_S)))
            hours = []
            while hour <= cutoff:
                hours.append(hour.strftime("%Y%m%d%H"))
                hour += timedelta(hours=1)
            removed = 0
            reads = [(h, self.session.execute_async(self._select, (h, cutoff))) for h in hours]
            for h, fut in reads:
                for row in fut.result():
                    try:
                        remove_audio(self.settings, self.session, row.blob_ref)
                    except blobstore.BlobError as exc:  # a malformed ref: drop the entry, say so
                        log.warning("audio of job %s not removed: %s", row.job_id, exc)
                    self.session.execute(self._drop, (h, row.finished_at, row.job_id))
                    removed += 1
            self._done_until = _floor_hour(cutoff)  # the cutoff's hour may still get due rows: swept again
            if removed:
                log.info("removed the audio of %d finished job(s) (retention %.0f s)", removed, retention)
            return removed


def _floor_hour(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
