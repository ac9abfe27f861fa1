"""Per-tenant limits the ingress enforces: unfinished jobs, and callback redeliveries per job.

Both answer with the seconds a client should wait (``Retry-After``). The
counts live in Cassandra, so every ingress instance enforces the same limit:
unfinished jobs are the job store's bookkeeping; a redelivery claims a row
with a lightweight transaction (``IF NOT EXISTS``) that expires after the
interval, so two concurrent requests cannot both win.
"""

from __future__ import annotations

from datetime import UTC, datetime

from kafscribe.settings import Settings
from kafscribe.store.jobs import JobStore


class LimitExceeded(Exception):
    """Refused for now (HTTP 429); ``retry_after_s`` says when to try again."""

    def __init__(self, reason: str, retry_after_s: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = max(1, int(retry_after_s))


def check_unfinished(jobs: JobStore, tenant: str, settings: Settings) -> None:
    """Raise ``LimitExceeded`` when ``tenant`` already has its quota of unfinished jobs.

    Checked before a job is accepted: concurrent submissions of one tenant may
    overshoot the limit by the number in flight at that moment.
    """
    limit = settings.tenant_max_unfinished
    if limit > 0 and len(jobs.unfinished_jobs(tenant, limit)) >= limit:
        raise _over_quota(tenant, settings)


async def check_unfinished_async(jobs: JobStore, tenant: str, settings: Settings) -> None:
    """``check_unfinished`` for the ingress: no thread in the hot path."""
    limit = settings.tenant_max_unfinished
    if limit > 0 and len(await jobs.unfinished_jobs_async(tenant, limit)) >= limit:
        raise _over_quota(tenant, settings)


def _over_quota(tenant: str, settings: Settings) -> LimitExceeded:
    return LimitExceeded(
        f"tenant {tenant!r} has {settings.tenant_max_unfinished} unfinished jobs, its quota; retry when some"
        " have finished", settings.quota_retry_after_s,
    )


class RedeliverLimiter:
    """One redelivery per job per ``redeliver_interval_s`` (table ``redeliveries``)."""

    def __init__(self, session, settings: Settings) -> None:
        self.interval_s = settings.redeliver_interval_s
        self._claim = session.prepare(
            "INSERT INTO redeliveries (job_id, requested_at) VALUES (?, ?) IF NOT EXISTS USING TTL ?"
        )
        self._release = session.prepare("DELETE FROM redeliveries WHERE job_id = ? IF EXISTS")
        self.session = session

    def claim(self, job_id: str) -> None:
        """Take this job's redelivery slot, or raise ``LimitExceeded`` with the seconds left."""
        if self.interval_s <= 0:
            return
        now = datetime.now(UTC)
        row = self.session.execute(self._claim, (job_id, now, self.interval_s)).one()
        if row[0]:  # [applied]
            return
        last = row.requested_at.replace(tzinfo=UTC) if row.requested_at.tzinfo is None else row.requested_at
        left = self.interval_s - (now - last).total_seconds()
        raise LimitExceeded(
            f"this job's callback was redelivered less than {self.interval_s}s ago", int(left + 0.999)
        )

    def release(self, job_id: str) -> None:
        """Give the slot back (the redelivery could not be sent)."""
        self.session.execute(self._release, (job_id,))
