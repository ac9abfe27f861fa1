"""Callback events and every delivery attempt, in Cassandra (shown by the API).

Each attempt gets the next free number in its job's history at the moment it
is recorded, claimed with ``IF NOT EXISTS``: concurrent deliveries (retries,
any number of redeliveries, replays after a crash) each get their own row,
never overwrite one another's. The event's ``delivery_attempt`` counts the
retry schedule; the history number counts what actually happened.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from schemas.events import CallbackAttempt

CLAIM_TRIES = 100  # each lost race means another process recorded an attempt meanwhile


class CallbackStore:
    def __init__(self, session) -> None:
        self.session = session
        p = session.prepare
        self._save_event = p(
            "INSERT INTO callback_events (job_id, event_id, tenant, url, event_type, body, created_at)"
            " VALUES (?,?,?,?,?,?,?)"
        )
        self._get_event = p("SELECT * FROM callback_events WHERE job_id = ?")
        self._claim = p(
            "INSERT INTO callback_attempts (job_id, event_id, attempt, attempted_at, url, status_code,"
            " latency_ms, error, outcome) VALUES (?,?,?,?,?,?,?,?,?) IF NOT EXISTS"
        )
        self._last_number = p("SELECT max(attempt) AS last FROM callback_attempts WHERE job_id = ?")
        self._attempts = p("SELECT * FROM callback_attempts WHERE job_id = ?")

    def save_event(self, event: CallbackAttempt) -> None:
        self.session.execute(self._save_event, (
            event.job_id, event.event_id, event.tenant, event.url, event.event_type, event.body,
            datetime.now(UTC),
        ))

    def get_event(self, job_id: str) -> dict[str, Any] | None:
        row = self.session.execute(self._get_event, (job_id,)).one()
        return row._asdict() if row else None

    def record(self, event: CallbackAttempt, status_code: int | None, latency_ms: float,
               error: str | None, outcome: str) -> int:
        """Add one attempt to the job's history; returns the number it got."""
        attempted_at = datetime.now(UTC)
        number = (self.session.execute(self._last_number, (event.job_id,)).one().last or 0) + 1
        for _ in range(CLAIM_TRIES):
            claimed = self.session.execute(self._claim, (
                event.job_id, event.event_id, number, attempted_at, event.url,
                status_code, latency_ms, error, outcome,
            ))
            if claimed.was_applied:
                return number
            number += 1  # taken by a concurrent delivery (or the read was behind): the next one
        raise RuntimeError(f"no free attempt number for job {event.job_id} after {CLAIM_TRIES} tries")

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        rows = [r._asdict() for r in self.session.execute(self._attempts, (job_id,))]
        return sorted(rows, key=lambda r: r["attempt"])
