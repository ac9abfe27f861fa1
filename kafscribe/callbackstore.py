"""Callback events and every delivery attempt, in Cassandra (shown by the API)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from schemas.events import CallbackAttempt


class CallbackStore:
    def __init__(self, session) -> None:
        self.session = session
        p = session.prepare
        self._save_event = p(
            "INSERT INTO callback_events (job_id, event_id, tenant, url, event_type, body, created_at)"
            " VALUES (?,?,?,?,?,?,?)"
        )
        self._get_event = p("SELECT * FROM callback_events WHERE job_id = ?")
        self._record = p(
            "INSERT INTO callback_attempts (job_id, event_id, attempt, attempted_at, url, status_code,"
            " latency_ms, error, outcome) VALUES (?,?,?,?,?,?,?,?,?)"
        )
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
               error: str | None, outcome: str) -> None:
        self.session.execute(self._record, (
            event.job_id, event.event_id, event.delivery_attempt, datetime.now(UTC), event.url,
            status_code, latency_ms, error, outcome,
        ))

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        rows = [r._asdict() for r in self.session.execute(self._attempts, (job_id,))]
        return sorted(rows, key=lambda r: r["attempt"])
