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
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from kafscribe.settings import Settings
from kafscribe.store import blobs as blobstore
from kafscribe.store.jobs import AUDIO_EXPIRY_SLACK_S, JobStore

log = logging.getLogger("kafscribe.store.retention")


def remove_audio(settings: Settings, session, blob_ref: str) -> None:
    """Delete the blob ``blob_ref`` (``cassandra:<id>`` or ``file:<id>``) from the store its scheme names."""
    scheme, _, blob_id = blob_ref.partition(":")
    blobstore.open_store(settings, session, scheme=scheme).delete(blob_id)


def delete_job(settings: Settings, session, jobs: JobStore, job: dict[str, Any]) -> None:
    """Remove a finished job for good: its audio, then its rows (``JobStore.delete``)."""
    if job.get("blob_ref"):
        remove_audio(settings, session, job["blob_ref"])
    jobs.delete(job["job_id"])


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
