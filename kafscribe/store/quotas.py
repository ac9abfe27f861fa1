"""Per-tenant limits the ingress enforces: unfinished jobs, audio seconds, and callback redeliveries per job.

All answer with the seconds a client should wait (``Retry-After``). The
counts live in Cassandra, so every ingress instance enforces the same limit:

- Unfinished jobs (``TenantQuotas``): an upload claims one of the tenant's
  ``KAFSCRIBE_TENANT_MAX_UNFINISHED`` slots (``quota_slots``, one partition per
  slot) with a lightweight transaction *before its body is read*; 20 uploads
  opened at once against a quota of 3 get exactly 3 slots, on one ingress or
  several. A refused or failed upload gives its slot back; an accepted one
  keeps it until its job finishes, when the next upload that finds the tenant
  at its limit frees it (the job row says it finished, or is gone; workers need
  not know about quotas). A slot with no job row after ``KAFSCRIBE_INGRESS_BODY_MAX_S``
  plus ``STALE_GRACE_S`` (an ingress died mid-upload) is freed the same way.
- Audio seconds in flight: once the upload is decoded its duration is written
  into its slot, then the slots are summed; over the limit, the upload is
  refused (written first, then summed: two racing uploads may both be refused,
  never both let over).
- Audio seconds per UTC day: a counter (``tenant_audio_daily``) is raised by
  the upload's duration, then read; over the limit, it is lowered again and the
  upload refused (the same write-then-check).
- Redeliveries: a redelivery claims a row with a lightweight transaction
  (``IF NOT EXISTS``) that expires after the interval, so two concurrent
  requests cannot both win.

``check_unfinished`` (the job store's ``tenant_unfinished_jobs``) is the older,
non-atomic count, kept for callers outside the ingress.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cassandra import WriteTimeout

from kafscribe.settings import Settings
from kafscribe.statuses import TERMINAL
from kafscribe.store import cql_async
from kafscribe.store import session as cassandra_session
from kafscribe.store.jobs import JobStore

log = logging.getLogger("kafscribe.quotas")

STALE_GRACE_S = 600  # past the body time limit: probe, blob and row of an upload take less than this


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


# --- unfinished jobs and audio seconds, reserved atomically at the door ---------------------------------


@dataclass
class Reservation:
    """What one upload holds: a slot (None when there is no job quota), the id its job will have, and the
    audio it charged to its day. ``state``: held -> submitting -> accepted | released."""

    tenant: str
    job_id: str
    slot: int | None = None
    day: str = ""
    audio_ms: int = 0
    state: str = "held"


class TenantQuotas:
    """The slots of unfinished jobs and the audio-seconds quotas (tables ``quota_slots``, ``tenant_audio_daily``).

    Every call is awaited on the caller's loop (``cql_async``): nothing blocks the ingress.
    """

    def __init__(self, session, settings: Settings) -> None:
        self.session = session
        self.settings = settings
        p = session.prepare
        self._claim = p("INSERT INTO quota_slots (tenant, slot, job_id, audio_s, reserved_at) VALUES (?,?,?,?,?)"
                        " IF NOT EXISTS")
        self._free = p("DELETE FROM quota_slots WHERE tenant = ? AND slot = ? IF job_id = ?")
        self._set_audio = p("UPDATE quota_slots SET audio_s = ? WHERE tenant = ? AND slot = ? IF job_id = ?")
        self._accept = p("UPDATE quota_slots SET accepted = true WHERE tenant = ? AND slot = ? IF job_id = ?")
        self._slots = p("SELECT slot, job_id, audio_s, reserved_at, accepted FROM quota_slots WHERE tenant = ?"
                        " AND slot IN ?")
        self._job = p("SELECT status, cancelled_at FROM jobs WHERE job_id = ?")
        self._holder = p("SELECT job_id FROM quota_slots WHERE tenant = ? AND slot = ?")
        self._holder.consistency_level = cassandra_session.consistency_level(
            settings.cassandra_serial_consistency, "cassandra_serial_consistency")  # sees every Paxos round
        self._add_day = p("UPDATE tenant_audio_daily SET audio_ms = audio_ms + ? WHERE tenant = ? AND day = ?")
        self._day = p("SELECT audio_ms FROM tenant_audio_daily WHERE tenant = ? AND day = ?")

    async def reserve(self, tenant: str) -> Reservation:
        """A slot for one upload of ``tenant`` (and the id its job will get); ``LimitExceeded`` at the quota."""
        res = Reservation(tenant=tenant, job_id=uuid.uuid4().hex)
        limit = self.settings.tenant_max_unfinished
        if limit <= 0:
            return res
        for _ in range(2):
            held = await self._held(tenant)
            free = [slot for slot in range(limit) if slot not in held]
            random.shuffle(free)  # racing uploads try different slots first
            for slot in free:
                if await self._try_claim(tenant, slot, res.job_id):
                    res.slot = slot
                    return res
            if not await self._prune(tenant, await self._held(tenant)):
                break  # every slot belongs to an unfinished job (or an upload in progress)
        raise _over_quota(tenant, self.settings)

    async def _try_claim(self, tenant: str, slot: int, job_id: str) -> bool:
        """Claim ``slot`` for ``job_id``. Racing claims of one slot may time out in Paxos (``WriteTimeout``,
        outcome unknown): the slot is then read at the serial consistency to learn who holds it."""
        try:
            rows = await cql_async.execute(self.session, self._claim, (tenant, slot, job_id, 0.0, datetime.now(UTC)))
            return bool(_one(rows)[0])  # [applied]
        except WriteTimeout:
            log.info("claim of quota slot %d of %r timed out (contention); reading who holds it", slot, tenant)
        row = _one(await cql_async.execute(self.session, self._holder, (tenant, slot)))
        return row is not None and row.job_id == job_id

    async def admit(self, res: Reservation, seconds: float) -> None:
        """The upload decoded to ``seconds``: charge them to the tenant's audio in flight and its day;
        ``LimitExceeded`` (nothing charged) when either quota would be passed."""
        limit = self.settings.tenant_max_audio_s_in_flight
        if res.slot is not None and limit > 0:
            await cql_async.execute(self.session, self._set_audio, (float(seconds), res.tenant, res.slot, res.job_id))
            total = await self._in_flight(res.tenant)
            if total > limit:
                raise LimitExceeded(
                    f"tenant {res.tenant!r} has {max(total - seconds, 0):.0f} s of audio in unfinished jobs; this"
                    f" upload's {seconds:.0f} s would pass its quota of {limit:.0f} s of audio in flight; retry when"
                    " some have finished", self.settings.quota_retry_after_s,
                )
        per_day = self.settings.tenant_max_audio_s_per_day
        if per_day > 0:
            now = datetime.now(UTC)
            day, ms = now.strftime("%Y%m%d"), int(round(seconds * 1000))
            await cql_async.execute(self.session, self._add_day, (ms, res.tenant, day))
            res.day, res.audio_ms = day, ms
            row = _one(await cql_async.execute(self.session, self._day, (res.tenant, day)))
            used_ms = row.audio_ms if row is not None and row.audio_ms is not None else ms
            if used_ms > per_day * 1000:
                await self._uncharge(res)
                midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
                raise LimitExceeded(
                    f"tenant {res.tenant!r} has had {max(used_ms - ms, 0) / 1000:.0f} s of audio accepted today"
                    f" (UTC); this upload's {seconds:.0f} s would pass its quota of {per_day:.0f} s per day",
                    int((midnight - now).total_seconds()) + 1,
                )

    async def accept(self, res: Reservation) -> None:
        """The upload's job exists: its slot stays until the job has finished or is gone (best effort: a
        slot left unmarked is freed once its job finished, or after the body time limit if it is gone)."""
        res.state = "accepted"
        if res.slot is None:
            return
        try:
            await cql_async.execute(self.session, self._accept, (res.tenant, res.slot, res.job_id))
        except Exception as exc:  # noqa: BLE001 - the job is accepted whatever this write does
            log.warning("quota slot of %r not marked accepted: %s", res.tenant, type(exc).__name__)

    async def release(self, res: Reservation) -> None:
        """Give back what a refused or failed upload held (best effort: Cassandra may be what failed)."""
        if res.state in ("released", "accepted"):
            return
        res.state = "released"
        try:
            if res.slot is not None:
                await cql_async.execute(self.session, self._free, (res.tenant, res.slot, res.job_id))
            await self._uncharge(res)
        except Exception as exc:  # noqa: BLE001 - a slot left behind is freed at the limit (no job row)
            log.warning("quota of tenant %r not released: %s", res.tenant, type(exc).__name__)

    async def _uncharge(self, res: Reservation) -> None:
        if res.audio_ms:
            ms, res.audio_ms = res.audio_ms, 0
            await cql_async.execute(self.session, self._add_day, (-ms, res.tenant, res.day))

    async def _held(self, tenant: str) -> dict[int, object]:
        """The tenant's claimed slots (rows by slot number)."""
        slots = list(range(max(self.settings.tenant_max_unfinished, 0)))
        if not slots:
            return {}
        rows = await cql_async.execute(self.session, self._slots, (tenant, slots))
        return {row.slot: row for row in rows}

    async def _in_flight(self, tenant: str) -> float:
        """Audio seconds of the tenant's slots, after freeing those of finished jobs when over the limit."""
        held = await self._held(tenant)
        total = sum(row.audio_s or 0.0 for row in held.values())
        if total > self.settings.tenant_max_audio_s_in_flight and await self._prune(tenant, held):
            total = sum(row.audio_s or 0.0 for row in (await self._held(tenant)).values())
        return total

    async def _prune(self, tenant: str, held: dict[int, object]) -> int:
        """Free the slots whose job finished, or that an upload left without a job row; how many were freed."""
        stale_before = datetime.now(UTC) - timedelta(seconds=self.settings.ingress_body_max_s + STALE_GRACE_S)
        rows = list(held.values())
        jobs = await asyncio.gather(*(cql_async.execute(self.session, self._job, (row.job_id,)) for row in rows))
        freed = 0
        for row, job_rows in zip(rows, jobs, strict=True):
            job = _one(job_rows)
            if job is None:  # deleted or expired once accepted; else an upload in progress, or one an ingress lost
                reserved = row.reserved_at.replace(tzinfo=UTC) if row.reserved_at is not None else None
                stale = bool(row.accepted) or reserved is None or reserved < stale_before
            else:
                stale = job.status in TERMINAL or job.cancelled_at is not None
            if stale:
                try:
                    applied = _one(await cql_async.execute(self.session, self._free, (tenant, row.slot, row.job_id)))
                except WriteTimeout:  # another upload frees it at the same moment
                    continue
                freed += 1 if applied[0] else 0
        return freed


def _one(rows):
    """The first row of what ``cql_async.execute`` returned (None: no row)."""
    rows = list(rows) if rows is not None else []
    return rows[0] if rows else None
