"""The chunk table of split jobs: attempts per chunk, chunk results, and the merge mark.

Every write is an upsert keyed by (job_id, chunk index), so a chunk redone
after a crash rewrites its own row and counts one more attempt there only.
``merged_by`` is the one place that says which input produced a job's merged
``Transcript`` (or failed ``Result``): see ``consumers.merger``. Job statuses
are not here: they move only in ``kafscribe.store.jobs``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from schemas.events import ChunkTranscript, decode_event


def chunk_blob_id(job_id: str, index: int) -> str:
    """The blob id of chunk ``index`` of ``job_id`` (job ids may hold characters blob ids may not).

    The one way a chunk's audio is named: the merger and a deletion remove only ids made here from
    the job's own id, never a reference an event carries."""
    return f"chunk-{hashlib.sha256(job_id.encode()).hexdigest()[:32]}-{index}"


@dataclass(frozen=True)
class ChunkRow:
    index: int
    attempts: int
    result: ChunkTranscript | None


class ChunkStore:
    def __init__(self, session) -> None:
        p = session.prepare
        self.session = session
        self._attempts = p("SELECT attempts FROM job_chunks WHERE job_id = ? AND idx = ?")
        self._set_attempts = p("UPDATE job_chunks SET attempts = ?, worker_id = ? WHERE job_id = ? AND idx = ?")
        self._put_result = p("UPDATE job_chunks SET result = ?, failed = ? WHERE job_id = ? AND idx = ?")
        self._rows = p("SELECT idx, attempts, result, merged_by FROM job_chunks WHERE job_id = ?")
        self._merged = p("SELECT merged_by FROM job_chunks WHERE job_id = ? LIMIT 1")
        self._mark = p("UPDATE job_chunks SET merged_by = ? WHERE job_id = ?")
        self._forget = p("DELETE FROM job_chunks WHERE job_id = ?")

    def start_attempt(self, job_id: str, index: int, worker_id: str) -> int:
        """A transcriber starts (or redoes) chunk ``index``: count the attempt, return its number."""
        row = self.session.execute(self._attempts, (job_id, index)).one()
        attempts = ((row.attempts or 0) if row is not None else 0) + 1
        self.session.execute(self._set_attempts, (attempts, worker_id, job_id, index))
        return attempts

    def save_result(self, event: ChunkTranscript) -> None:
        """The chunk's outcome (idempotent: a redone chunk rewrites the same row)."""
        self.session.execute(self._put_result, (event.encode(), event.error is not None, event.job_id, event.index))

    def rows(self, job_id: str) -> list[ChunkRow]:
        """The job's chunk rows, in order, their results decoded."""
        out = []
        for r in self.session.execute(self._rows, (job_id,)):
            if r.idx is None:
                continue
            result = decode_event(r.result) if r.result else None
            out.append(ChunkRow(r.idx, r.attempts or 0, result if isinstance(result, ChunkTranscript) else None))
        return out

    def merged_by(self, job_id: str) -> str | None:
        row = self.session.execute(self._merged, (job_id,)).one()
        return row.merged_by if row is not None else None

    def mark_merged(self, job_id: str, marker: str) -> None:
        self.session.execute(self._mark, (marker, job_id))

    def forget(self, job_id: str) -> None:
        """Remove every chunk row of the job (a deleted job)."""
        self.session.execute(self._forget, (job_id,))
